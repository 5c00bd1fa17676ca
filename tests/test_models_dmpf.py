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
        a = model(batch)
        b = model(dict(batch, audio=torch.randn_like(batch["audio"]) * 5))
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
