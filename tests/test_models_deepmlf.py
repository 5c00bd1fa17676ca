"""DeepMLF means what the paper says: AV never reaches text, closed gates give back the plain LM,
padding is invisible, the FFW copy is the LM's MLP, and only the fusion parts train."""

import pytest
import torch

from fusion_dist.config import ConfigError
from fusion_dist.models import build_model
from model_helpers import AUDIO_DIM, TEXTS, VISION_DIM, backbones, make_batch, tiny_cfg, single_thread  # noqa: F401

ARCHS = ["gpt2", "llama", "qwen2"]
FEATURES = ("audio", "vision", "audio_lengths", "vision_lengths", "audio_mask", "vision_mask", "label")


def build(backbones, arch, family="deepmlf", **over):
    torch.manual_seed(0)
    return build_model(tiny_cfg(backbones[arch], family, **over), AUDIO_DIM, VISION_DIM).eval()


def real_text_states(out, i):
    T = out.text_mask.shape[1]
    return out.hidden_states[i, :T][out.text_mask[i]]


def open_gates(model, value=2.0):
    """Move every gate away from its init so the fusion path really contributes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(value)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_states_do_not_depend_on_av(backbones, arch):
    model = build(backbones, arch, mm_layers=[0, 2, 3])
    open_gates(model)
    batch = make_batch(model.tokenizer)
    other = dict(batch, audio=torch.randn_like(batch["audio"]) * 5, vision=torch.randn_like(batch["vision"]))
    with torch.no_grad():
        a, b = model(batch, all_states=True), model(other, all_states=True)
    T = a.text_mask.shape[1]
    torch.testing.assert_close(a.hidden_states[:, :T], b.hidden_states[:, :T])
    assert (a.hidden_states[:, T:] - b.hidden_states[:, T:]).abs().max() > 1e-3  # fusion tokens do see AV


def test_without_mm_blocks_the_model_is_text_only(backbones):
    model = build(backbones, "llama", mm_layers=[])
    assert not any(p.requires_grad for p in model.av_encoder.parameters())
    batch = make_batch(model.tokenizer)
    other = dict(batch, audio=torch.randn_like(batch["audio"]) * 5, vision=torch.randn_like(batch["vision"]))
    with torch.no_grad():
        a, b = model(batch), model(other)
    torch.testing.assert_close(a.prediction, b.prediction, rtol=0, atol=0)
    assert "av" not in a.losses


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_closed_gates_give_the_plain_lm(backbones, arch, kernel):
    model = build(backbones, arch, gating="tanh", gate_init=0.0, attn_implementation=kernel)
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        out = model(batch, all_states=True)
        for i in range(len(TEXTS)):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
            ref = model.lm(ids, output_hidden_states=True)
            ours = real_text_states(out, i)
            torch.testing.assert_close(ours, model.lm.base_model(ids).last_hidden_state[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(model.adapter.lm_head(ours), ref.logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_closed_cross_attention_gates_keep_av_out_of_fusion_tokens(backbones, arch):
    model = build(backbones, arch, gating="tanh")
    with torch.no_grad():
        for block in model.mm_blocks.values():
            block.ffw_gate.a.fill_(1.5)  # FFW open, cross-attention closed (tanh(0) = 0)
    batch = make_batch(model.tokenizer)
    other = dict(batch, audio=torch.randn_like(batch["audio"]) * 5, vision=torch.randn_like(batch["vision"]))
    with torch.no_grad():
        a, b = model(batch, all_states=True), model(other, all_states=True)
    torch.testing.assert_close(a.hidden_states, b.hidden_states)


@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_never_changes_a_prediction(backbones, arch, family):
    model = build(backbones, arch, family)
    open_gates(model, 1.0)
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        right = model(batch).prediction
        left = model(make_batch(model.tokenizer, padding_side="left")).prediction
        longer = make_batch(model.tokenizer, TEXTS + ["a much longer transcript " * 6])
        for key in FEATURES:
            longer[key] = torch.cat([batch[key], batch[key][:1]])
        padded_more = model(longer).prediction[: len(TEXTS)]
        alone = []
        for i in range(len(TEXTS)):
            single = make_batch(model.tokenizer, [TEXTS[i]])
            single.update({key: batch[key][i : i + 1] for key in FEATURES})
            alone.append(model(single).prediction[0])
        alone = torch.stack(alone)
    for other in (left, padded_more, alone):
        torch.testing.assert_close(other, right, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ffw_copy_is_the_source_mlp_at_init(backbones, arch):
    model = build(backbones, arch)
    x = torch.randn(2, 5, model.adapter.hidden_size)
    for i, block in model.mm_blocks.items():
        source = model.adapter.mlp(int(i))
        torch.testing.assert_close(block.ffw(x), source(x))
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(block.ffw.parameters(), source.parameters()))


@pytest.mark.parametrize("lora", [False, True])
def test_only_fusion_parts_train_and_backbone_never_changes(backbones, lora):
    model = build(backbones, "gpt2", lora__enabled=lora, lora__r=4).train()
    before = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    allowed = ("fusion_tokens", "mm_blocks.", "av_encoder.", "task_head.", "aux_heads.")
    assert trainable and all(n.startswith(allowed) for n in trainable), trainable
    ffw_trainable = [n for n in trainable if ".ffw." in n]
    if lora:
        assert ffw_trainable and all("lora_" in n for n in ffw_trainable)
    else:
        assert any(n.endswith("ffw.c_fc.weight") for n in ffw_trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(make_batch(model.tokenizer)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.lm.named_parameters():
        assert torch.equal(p, before[n]), n


def test_lora_targets_matching_nothing_name_the_key(backbones):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        build(backbones, "llama", lora__enabled=True, lora__target_modules=["c_fc"])


@pytest.mark.parametrize("over, key", [
    ({"mm_layers": [1, 4]}, "model.mm_layers"),
    ({"n_fusion": 0}, "model.n_fusion"),
    ({"gating": "relu"}, "model.gating"),
    ({"gca_queries": "audio"}, "model.gca_queries"),
    ({"av__init": "pretrained+tune"}, "model.av.checkpoint"),
])
def test_bad_config_names_the_key(backbones, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(backbones, "gpt2", **over)


@pytest.mark.parametrize("queries", ["text", "text+fusion"])
def test_gca_query_ablation_lets_text_see_av(backbones, queries):
    model = build(backbones, "gpt2", gca_queries=queries)
    batch = make_batch(model.tokenizer)
    with torch.no_grad():
        a, b = (model(x, all_states=True) for x in (batch, dict(batch, audio=torch.randn_like(batch["audio"]) * 5)))
    T = a.text_mask.shape[1]
    assert (a.hidden_states[:, :T][a.text_mask] - b.hidden_states[:, :T][b.text_mask]).abs().max() > 1e-4


def test_loss_terms_switch_off_and_gates_and_state_roundtrip(backbones):
    model = build(backbones, "gpt2", loss__lambda_t=0.0, loss__lambda_lm=0.0, ffw=False)
    out = model(make_batch(model.tokenizer))
    assert set(out.losses) == {"task", "av", "f"}
    assert all(not v.requires_grad for v in out.losses.values()) and out.loss.requires_grad
    assert model.gate_values() == {"mm1.attn_av": 0.5, "mm3.attn_av": 0.5}
    state = model.trainable_state_dict()
    assert any("running_mean" in k for k in state) and not any(k.startswith("lm.") for k in state)
    other = build(backbones, "gpt2", loss__lambda_t=0.0, loss__lambda_lm=0.0, ffw=False)
    other.load_trainable_state_dict({k: v.clone() for k, v in state.items()})
    batch = make_batch(model.tokenizer, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(other(batch).prediction, model(batch).prediction)


def test_reference_switches_cross_attention_scale_fusion_positions_and_encoder_norm(backbones, monkeypatch):
    """The reference's three small differences, each a switch: 1/sqrt(d) cross-attention logits over the LM width,
    fusion-token positions fixed at L..L+n-1, no final LayerNorm in the modality encoders."""
    import math

    import torch.nn.functional as F

    from fusion_dist.models.mm_block import CrossAttention

    torch.manual_seed(0)
    x, ctx, mask = torch.randn(2, 3, 16), torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    for scale, divisor in (("head", math.sqrt(16 / 4)), ("model", math.sqrt(16))):
        attn = CrossAttention(16, 6, 4, 0.0, scale)
        q = attn.q(x).view(2, 3, 4, 4).transpose(1, 2)
        k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in attn.kv(ctx).chunk(2, -1))
        want = F.softmax(q @ k.transpose(-1, -2) / divisor, -1) @ v
        torch.testing.assert_close(attn(x, ctx, mask), attn.out(want.transpose(1, 2).reshape(2, 3, 16)))

    seen = []
    for start in (None, 20):
        model = build_model(tiny_cfg(backbones["gpt2"], fusion_position_start=start), AUDIO_DIM, VISION_DIM).eval()
        add_positions = model.adapter.add_positions
        monkeypatch.setattr(model.adapter, "add_positions", lambda h, ids: seen.append(ids) or add_positions(h, ids))
        batch = make_batch(model.tokenizer)
        model(batch)
        n_text = batch["attention_mask"].sum(1)
        fusion = seen[-1][:, -model.cfg.n_fusion:]
        first = n_text if start is None else torch.full_like(n_text, start)
        assert torch.equal(fusion, first[:, None] + torch.arange(model.cfg.n_fusion)), (start, fusion)

    with_norm = build_model(tiny_cfg(backbones["gpt2"]), AUDIO_DIM, VISION_DIM)
    without = build_model(tiny_cfg(backbones["gpt2"], av__encoder_norm=False), AUDIO_DIM, VISION_DIM)
    count = lambda m: sum(p.numel() for p in m.av_encoder.parameters())  # noqa: E731
    assert count(with_norm) - count(without) == 2 * 2 * with_norm.cfg.av.d_enc  # a LayerNorm per modality


def test_fused_ops_compute_the_same_function(backbones, monkeypatch):
    """``model.fused_ops``: GPT-2's element-wise gelu_new becomes PyTorch's fused tanh GELU, in the frozen LM
    and in the FFW copies, the LM loss runs at real token pairs only, in logit chunks with its gradient taken in the
    forward pass, and the model computes the same function: prediction, LM loss and every gradient."""
    from fusion_dist.models import fusion_lm

    from transformers.activations import NewGELUActivation

    x = torch.randn(16, 48, 256) * 4
    fused = torch.nn.GELU(approximate="tanh")
    assert (fused(x) - NewGELUActivation()(x)).abs().max() < 1e-5
    torch.manual_seed(0)
    on = build_model(tiny_cfg(backbones["gpt2"]), AUDIO_DIM, VISION_DIM).eval()
    torch.manual_seed(0)
    off = build_model(tiny_cfg(backbones["gpt2"], fused_ops=False), AUDIO_DIM, VISION_DIM).eval()
    kinds = lambda m: {type(a).__name__ for a in m.modules() if "GELU" in type(a).__name__}  # noqa: E731
    assert kinds(on) == {"GELU"} and "NewGELUActivation" in kinds(off)
    assert any(isinstance(a, torch.nn.GELU) for a in on.mm_blocks["1"].ffw.modules())
    batch = make_batch(on.tokenizer)
    assert not batch["attention_mask"].all()  # padding, which the fused LM loss skips
    torch.testing.assert_close(on(batch).prediction, off(batch).prediction, atol=1e-5, rtol=1e-5)
    on.train(), off.train()
    vocabulary = on.adapter.lm_head.weight.shape[0]
    monkeypatch.setattr(fusion_lm, "LOGIT_CHUNK", 4 * vocabulary)  # chunks of 4 rows, the last one shorter
    losses, grads = [], []
    for model in (on, off):
        model.mm_blocks.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
        out = model(batch)
        (2.0 * out.loss).backward()  # an upstream gradient other than 1 reaches the LM term
        losses.append(out.losses["lm"])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert int((batch["attention_mask"][:, 1:] & batch["attention_mask"][:, :-1]).sum()) % 4  # a short last chunk
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]["fusion_tokens"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert on.adapter.lm_head.weight.grad is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_lora_is_peft_lora(backbones, arch):
    """``model.fused_ops`` with LoRA: each adapter's product is added into its base output by one addmm (the scaling
    as its alpha); output, input gradient and every adapter gradient are peft's own, with the same dropout draws."""
    from fusion_dist.models.mm_block import lora_addmm_forward

    models = [build(backbones, arch, fused_ops=fused, lora__enabled=True, lora__r=4, lora__alpha=32,
                    lora__dropout=0.5).train() for fused in (True, False)]
    ffws = [m.mm_blocks["1"].ffw for m in models]
    on, off = ffws
    installed = lambda ffw: [getattr(m.forward, "__func__", None) is lora_addmm_forward  # noqa: E731
                             for m in ffw.modules() if hasattr(m, "lora_A")]
    assert installed(on) and all(installed(on)) and not any(installed(off))
    for name, p in on.named_parameters():
        if "lora_B" in name:  # zeros at init: give the adapters a product to add
            torch.nn.init.normal_(p, std=0.1)
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 5, models[0].adapter.hidden_size)
    results = []
    for ffw in ffws:
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        y = ffw(xi)
        (y * torch.linspace(-1, 2, y.shape[-1])).sum().backward()
        results.append((y, xi.grad, {n: p.grad for n, p in ffw.named_parameters() if p.requires_grad}))
    (y_on, gx_on, g_on), (y_off, gx_off, g_off) = results
    torch.testing.assert_close(y_on, y_off, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_on, gx_off, atol=1e-5, rtol=1e-4)
    assert g_on.keys() == g_off.keys() and any("lora_A" in n for n in g_on)
    for name in g_on:
        torch.testing.assert_close(g_on[name], g_off[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.manual_seed(1)
    assert not torch.allclose(on(x), on.eval()(x))  # the dropout ran: the draws above were compared


def test_the_lm_loss_is_a_training_term_only(backbones):
    model = build_model(tiny_cfg(backbones["gpt2"]), AUDIO_DIM, VISION_DIM)
    batch = make_batch(model.tokenizer)
    assert "lm" in model.train()(batch).losses
    out = model.eval()(batch)
    assert "lm" not in out.losses and torch.isfinite(out.prediction).all()
