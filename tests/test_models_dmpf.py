"""DMPF: the group attention mask is the preset table, AV tokens read audio, text never does."""

import pytest
import torch

from fusion_dist.config import ConfigError
from fusion_dist.models import build_model
from fusion_dist.models.dmpf import MASK_PRESETS
from fusion_dist.models.fusion_lm import group_attention_mask
from model_helpers import AUDIO_DIM, VISION_DIM, backbones, make_batch, tiny_cfg, single_thread  # noqa: F401

# SPEC 3.3, written out independently of the implementation: query group -> {key group: rule}.
EXPECTED = {
    "avseesall": {"t": {"t": "causal"}, "a": {"t": "all", "a": "causal"}, "v": {"t": "all", "v": "causal"},
                  "av": {"t": "all", "a": "all", "v": "all", "av": "causal"}},
    "original": {"t": {"t": "causal"}, "a": {"t": "all", "a": "causal"}, "v": {"t": "all", "v": "causal"},
                 "av": {"t": "all", "av": "causal"}},
    "allcausal": {"t": {"t": "causal"}, "a": {"t": "all", "a": "causal"}, "v": {"t": "all", "a": "all", "v": "causal"},
                  "av": {"t": "all", "a": "all", "v": "all", "av": "causal"}},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_mask_matches_the_preset_table_cell_by_cell(preset):
    from fusion_dist.models.dmpf import sees_matrix

    assert set(MASK_PRESETS) == set(EXPECTED)
    sizes = {"t": 5, "a": 2, "v": 3, "av": 4}
    text_valid = torch.tensor([[False, False, True, True, True]])  # left-aligned, 2 padding tokens
    mask = group_attention_mask(text_valid, [2, 3, 4], sees_matrix(preset), torch.float32)[0, 0]
    allowed = mask == 0
    starts, s = {}, 0
    for g, n in sizes.items():
        starts[g] = s
        s += n
    for i in range(s):
        qg = max((g for g in sizes if starts[g] <= i), key=lambda g: starts[g])
        for j in range(s):
            kg = max((g for g in sizes if starts[g] <= j), key=lambda g: starts[g])
            rule = EXPECTED[preset][qg].get(kg)
            want = rule == "all" or (rule == "causal" and j <= i)
            if kg == "t" and not text_valid[0, j]:
                want = i == j  # padding: seen by nobody but itself
            if qg == "t" and not text_valid[0, i]:
                want = i == j
            assert allowed[i, j] == want, (preset, i, j, qg, kg)


def test_text_states_ignore_audio_and_av_tokens_read_it(backbones):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(backbones["llama"], "dmpf"), AUDIO_DIM, VISION_DIM).eval()
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        a = model(batch, all_states=True)
        b = model(dict(batch, audio=torch.randn_like(batch["audio"]) * 5), all_states=True)
    T = a.text_mask.shape[1]
    n_a, n_v, n_av = 2, 2, 3
    torch.testing.assert_close(a.hidden_states[:, :T], b.hidden_states[:, :T])
    video = slice(T + n_a, T + n_a + n_v)
    torch.testing.assert_close(a.hidden_states[:, video], b.hidden_states[:, video])  # video sees no audio
    for span in (slice(T, T + n_a), slice(T + n_a + n_v, T + n_a + n_v + n_av)):
        assert (a.hidden_states[:, span] - b.hidden_states[:, span]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@pytest.mark.parametrize("head", ["selfattn", "concat"])
def test_dmpf_runs_forward_backward(backbones, arch, head):
    model = build_model(tiny_cfg(backbones[arch], "dmpf", task_head=head), AUDIO_DIM, VISION_DIM).train()
    out = model(make_batch(model.tokenizer))
    out.loss.backward()
    assert {"task", "a", "v", "f", "t", "av", "lm"} == set(out.losses)
    assert set(model.gate_values()) == {f"mm{i}.{g}" for i in (1, 3)
                                         for g in ("attn_audio", "attn_video", "attn_av", "ffw")}
    assert model.fusion_tokens_audio.grad is not None and model.audio_encoder.fuse.weight.grad is not None


@pytest.mark.parametrize("over, key", [
    ({"n_audio": 0}, "model.n_audio"),
    ({"n_av": 0}, "model.n_av"),
    ({"mask_preset": "nonesuch"}, "model.mask_preset"),
    ({"task_head": "mlp"}, "model.task_head"),
])
def test_bad_dmpf_config_names_the_key(backbones, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(tiny_cfg(backbones["gpt2"], "dmpf", **over), AUDIO_DIM, VISION_DIM)


def test_each_encoder_has_its_own_sizes_and_the_unimodal_heads_can_read_the_encoders(backbones):
    """``model.video_encoder`` sizes its own encoder (unset keys from ``model.av``), the MM blocks cross-attend to
    each encoder's width, and ``unimodal_aux=encoders`` puts the audio / video heads on the encoder means."""
    cfg = tiny_cfg(backbones["gpt2"], "dmpf", unimodal_aux="encoders", video_encoder__d_enc=12,
                   video_encoder__n_heads=3, video_encoder__n_layers=2, video_encoder__d_av=6)
    model = build_model(cfg, AUDIO_DIM, VISION_DIM).train()
    video, audio = model.video_encoder, model.audio_encoder
    assert (video.cfg.d_enc, video.cfg.n_heads, video.d_av, len(video.encoders["vision"].encoder.layers)) == (12, 3, 6, 2)
    assert (audio.cfg.d_enc, audio.d_av) == (cfg.av.d_enc, cfg.av.d_av)
    assert model.aux_heads.heads["v"].in_features == 6 and model.aux_heads.heads["a"].in_features == cfg.av.d_av
    assert model.mm_blocks["1"].cross_attn["video"].attn.kv.in_features == 6
    out = model(make_batch(model.tokenizer))
    out.loss.backward()
    assert torch.isfinite(out.loss) and video.encoders["vision"].proj.weight.grad is not None
    tokens_only = build_model(tiny_cfg(backbones["gpt2"], "dmpf"), AUDIO_DIM, VISION_DIM)
    assert tokens_only.aux_heads.heads["v"].in_features == tokens_only.adapter.hidden_size


def test_unimodal_encoders_start_from_their_part_of_the_stage1_export(backbones, tmp_path):
    from fusion_dist.config import Config, DataConfig
    from fusion_dist.errors import UserError
    from fusion_dist.models import build_av_pretrainer, save_av_encoder

    stage1_cfg = Config(data=DataConfig(root="unused"), model=tiny_cfg("unused"))
    stage1 = build_av_pretrainer(stage1_cfg.model.av, AUDIO_DIM, VISION_DIM, head_hidden=16).av_encoder
    export = str(save_av_encoder(stage1.state_dict(), stage1.dims, tmp_path / "stage1", stage1_cfg))
    common = dict(av__init="pretrained+tune", av__checkpoint=export, audio_encoder__init="stage1",
                  video_encoder__init="stage1")
    model = build_model(tiny_cfg(backbones["gpt2"], "dmpf", **common), AUDIO_DIM, VISION_DIM)
    d = stage1.cfg.d_enc
    for encoder, modality, cols in ((model.audio_encoder, "audio", slice(0, d)),
                                    (model.video_encoder, "vision", slice(d, 2 * d))):
        for k, v in stage1.encoders[modality].state_dict().items():
            assert torch.equal(encoder.encoders[modality].state_dict()[k], v), (modality, k)
        assert torch.equal(encoder.fuse.weight, stage1.fuse.weight[:, cols])
        assert torch.equal(encoder.norm.weight, stage1.norm.weight)
    random = build_model(tiny_cfg(backbones["gpt2"], "dmpf", av__init="pretrained+tune", av__checkpoint=export),
                         AUDIO_DIM, VISION_DIM)
    assert not torch.equal(random.audio_encoder.fuse.weight, stage1.fuse.weight[:, :d])
    with pytest.raises(UserError, match=r"model\.video_encoder\.d_enc 8 there, 12 here"):
        build_model(tiny_cfg(backbones["gpt2"], "dmpf", **common, video_encoder__d_enc=12, video_encoder__n_heads=3),
                    AUDIO_DIM, VISION_DIM)
    with pytest.raises(ConfigError, match=r"model\.audio_encoder\.init=stage1"):
        build_model(tiny_cfg(backbones["gpt2"], "dmpf", audio_encoder__init="stage1"), AUDIO_DIM, VISION_DIM)


@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
def test_unimodal_labels_are_the_targets_of_the_unimodal_heads(backbones, family):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(backbones["gpt2"], family, loss__unimodal_labels=True), AUDIO_DIM, VISION_DIM).eval()
    batch = make_batch(model.tokenizer)
    batch.update({k: batch["label"] for k in ("label_T", "label_A", "label_V")})
    plain = model(batch).losses
    far = {**batch, "label_T": batch["label"] + 100, "label_A": batch["label"] - 100, "label_V": batch["label"] + 50}
    moved = model(far).losses
    heads = {"t": 100, "a": 100, "v": 50} if family == "dmpf" else {"t": 100}
    for k, v in moved.items():
        if k in heads:
            assert v > heads[k] - 10 > plain[k], k
        else:
            assert torch.equal(v, plain[k]), k


@pytest.mark.parametrize("mm_layers", [[2, 3], []])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
def test_frozen_prefix_split_gives_the_full_sequences_loss_and_gradients(backbones, arch, family, mm_layers,
                                                                          monkeypatch):
    """``model.prefix_split``: the layers up to the first MM block (all of them without MM blocks) run the text
    without autograd and the fusion tokens on its detached keys / values; loss and every trainable gradient equal
    the full path's (fp32 rounding)."""
    import fusion_dist.models.fusion_lm as fusion_lm

    calls, grads = [], {}
    run_prefix = fusion_lm.run_prefix
    monkeypatch.setattr(fusion_lm, "run_prefix", lambda *a: calls.append(split) or run_prefix(*a))
    for split in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(backbones[arch], family, mm_layers=mm_layers, prefix_split=split),
                            AUDIO_DIM, VISION_DIM).train()
        out = model(make_batch(model.tokenizer))
        out.loss.backward()
        grads[split] = {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}
    assert calls == [True]
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > (10 if mm_layers else 4)
    for name, full in grads[False].items():
        assert full is not None, name
        torch.testing.assert_close(grads[True][name], full, rtol=1e-4, atol=1e-6 * (1 + full.abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("family, arch, queries", [("deepmlf", "gpt2", "fusion"), ("deepmlf", "llama", "text+fusion"),
                                                 ("dmpf", "llama", "fusion")])
def test_last_layer_runs_only_the_positions_the_heads_read(backbones, family, arch, queries):
    """``model.fused_ops`` without an LM loss: the last layer and its MM block run from the last text token on (the
    earlier text positions give only keys / values); prediction, loss and every trainable gradient equal the full
    path's, in training and in evaluation. With an LM loss in training every position runs."""
    def run(model, batch, **kw):
        model.zero_grad()
        out = model(batch, **kw)
        if model.training:
            out.loss.backward()
        return out, {"loss": out.loss.detach(), "prediction": out.prediction.detach(),
                     **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}

    torch.manual_seed(0)
    model = build_model(tiny_cfg(backbones[arch], family, gca_queries=queries, loss__lambda_lm=0.0),
                        AUDIO_DIM, VISION_DIM)
    for m in model.modules():  # the tail draws fewer dropout masks than the full path: compare without dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch(model.tokenizer)
    n_groups = model.cfg.n_fusion if family == "deepmlf" else 7
    seen = []
    model.adapter.mlp(model.adapter.num_layers - 1).register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        (full, want), (tail, got) = run(model, batch, all_states=True), run(model, batch)
        assert full.hidden_states.shape[1] == batch["input_ids"].shape[1] + n_groups
        assert tail.hidden_states.shape[1] == 1 + n_groups and tail.text_mask.shape[1] == 1
        assert seen[-2:] == [full.hidden_states.shape[1], 1 + n_groups]
        assert got.keys() == want.keys() and (len(got) == 2 if mode == "eval" else len(got) > 10)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6 * (1 + value.abs().max().item()),
                                       msg=lambda m, name=name: f"{mode} {name}: {m}")
    model.cfg.loss.lambda_lm = 0.5
    assert model.train()(batch).hidden_states.shape[1] == batch["input_ids"].shape[1] + n_groups


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
def test_prefix_cache_serves_each_transcript_exactly_whatever_its_batch(backbones, arch, family, tmp_path):
    """``train.prefix_cache``: transcripts computed once, in chunks of one length, serve them in batches of any
    length and padding; loss and gradients equal the uncached model's. The on-disk store (parts written by
    different ranks) holds the same numbers as the in-memory one. A text augmentation keeps it out of training,
    not out of evaluation; a transcript it does not hold falls back to the uncached path."""
    from fusion_dist.models.prefix import PrefixCache, chunks
    from model_helpers import TEXTS

    def run(model, texts):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in the FFW copies (GPT-2's own MLP dropout)
        out = model(make_batch(model.tokenizer, texts))
        out.loss.backward()
        return {"loss": out.loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.requires_grad and p.grad is not None}}

    def close(got, want):
        assert got.keys() == want.keys()
        for name, full in want.items():
            torch.testing.assert_close(got[name], full, rtol=1e-4, atol=1e-5 * (1 + full.abs().max().item()),
                                       msg=lambda m, name=name: f"{name}: {m}")

    torch.manual_seed(0)
    cfg = tiny_cfg(backbones[arch], family, mm_layers=[2, 3])
    cached, plain = build_model(cfg, AUDIO_DIM, VISION_DIM).train(), build_model(cfg, AUDIO_DIM, VISION_DIM).train()
    plain.load_state_dict(cached.state_dict())
    batch = make_batch(cached.tokenizer, TEXTS)
    work = chunks(PrefixCache.keys(batch["input_ids"], batch["attention_mask"].bool()) * 2)
    assert sum(map(len, work)) == len(TEXTS) and all(len({len(k) for k in c}) == 1 for c in work)
    memory = PrefixCache.compute(cached.prefix_rows, work)
    layout = memory.layout
    assert layout.layers == 3  # up to the first MM block: after layer 2
    for part in (0, 1):  # two ranks' shares
        PrefixCache.write_part(tmp_path, part, cached.prefix_rows, work[part::2])
    PrefixCache.write_meta(tmp_path, layout, 2, {"made": "here"})
    disk = PrefixCache.open(tmp_path)
    assert len(disk) == len(memory) == len(TEXTS) and disk.bytes == memory.bytes > 0
    assert PrefixCache.identity_of(tmp_path) == {"made": "here"}
    lookups = []
    for cache in (memory, disk):
        lookup = cache.lookup
        cache.lookup = lambda *a, lookup=lookup: lookups.append(1) or lookup(*a)
    results = {}
    for texts in (TEXTS, [TEXTS[3], TEXTS[1]]):  # the second batch is shorter: other length, other padding
        want = run(plain, texts)
        for name, cache in (("memory", memory), ("disk", disk)):
            cached.prefix_cache = cache
            results[name] = run(cached, texts)
            close(results[name], want)
        assert all(torch.equal(results["memory"][k], results["disk"][k]) for k in want)
    assert len(lookups) == 4
    cached.prefix_cache = memory
    unknown = ["a transcript the cache does not hold", TEXTS[0]]
    close(run(cached, unknown), run(plain, unknown))
    assert len(lookups) == 4
    augmented = build_model(tiny_cfg(backbones[arch], family, mm_layers=[2, 3], augment__kind="seqaug"),
                            AUDIO_DIM, VISION_DIM)
    assert cached.deterministic_text and not augmented.deterministic_text
    augmented.prefix_cache = memory
    augmented.train()(make_batch(augmented.tokenizer))
    assert len(lookups) == 4
    with torch.no_grad():
        augmented.eval()(make_batch(augmented.tokenizer))
    assert len(lookups) == 5
