"""A few optimizer steps on planted-signal batches reduce the training loss, for both families, on
GPT-2 and Llama backbones, in fp32 and under bf16 autocast; a bf16 model takes fp32 features."""

import contextlib

from pathlib import Path

import pytest
import torch

from fusion_dist.models import build_av_pretrainer, build_model
from model_helpers import AUDIO_DIM, VISION_DIM, backbones, planted_batch, tiny_cfg, single_thread  # noqa: F401


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_steps_reduce_the_loss(backbones, arch, family, precision):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(backbones[arch], family, augment__kind="seqaug"), AUDIO_DIM, VISION_DIM).train()
    batch = planted_batch(model.tokenizer, n=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast"
                else contextlib.nullcontext())
    losses = []
    for _ in range(8):
        with autocast:
            out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def stage1_exports(tmp_path_factory) -> dict[bool, str]:
    """Stage-1 exports (AV encoder weights + config, as ``pretrain-av`` writes them), with and without BatchNorm."""
    from fusion_dist.config import Config, DataConfig
    from fusion_dist.models import save_av_encoder

    out = {}
    for batchnorm in (True, False):
        cfg = Config(data=DataConfig(root="unused"),
                     model=tiny_cfg("unused", av__batchnorm=["audio", "vision"] if batchnorm else []))
        pretrainer = build_av_pretrainer(cfg.model.av, AUDIO_DIM, VISION_DIM, head_hidden=16)
        out[batchnorm] = str(save_av_encoder(pretrainer.av_encoder.state_dict(), pretrainer.av_encoder.dims,
                                             tmp_path_factory.mktemp("stage1"), cfg))
    return out


@pytest.mark.parametrize("init", ["random+tune", "pretrained+tune", "pretrained+frozen"])
@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
def test_bf16_model_casts_fp32_features(backbones, stage1_exports, family, lora, batchnorm, init):
    cfg = tiny_cfg(backbones["llama"], family, lora__enabled=lora, av__batchnorm=["audio", "vision"] * batchnorm,
                   av__init=init,
                   av__checkpoint=None if init == "random+tune" else stage1_exports[batchnorm])
    model = build_model(cfg, AUDIO_DIM, VISION_DIM, dtype=torch.bfloat16).train()
    # one dtype for every parameter (what DeepSpeed's flat buffers need); BatchNorm statistics stay fp32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stats = [b for n, b in model.named_buffers() if "running_" in n]
    assert (stats or not batchnorm) and all(b.dtype == torch.float32 for b in stats)
    out = model(planted_batch(model.tokenizer, n=4))
    out.loss.backward()
    assert out.prediction.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_stage1_export_of_another_shape_is_refused_naming_the_keys(backbones, stage1_exports):
    from fusion_dist.errors import UserError

    cfg = tiny_cfg(backbones["gpt2"], av__d_enc=4, av__init="pretrained+tune", av__checkpoint=stage1_exports[True])
    with pytest.raises(UserError, match=r"model\.av\.d_enc 8 there, 4 here"):
        build_model(cfg, AUDIO_DIM, VISION_DIM)


def test_stage2_batchnorm_choice_differs_from_stage1(backbones, stage1_exports):
    """Stage 2 loads a stage-1 encoder with its own BatchNorm choice (the reference's MOSI: audio BatchNorm in
    stage 1, none in stage 2): every other weight is the export's, a BatchNorm the export lacks starts fresh."""
    from safetensors.torch import load_file

    from fusion_dist.models.av_encoder import ENCODER_FILE

    for exported, own in [(True, []), (False, ["audio"])]:
        cfg = tiny_cfg(backbones["gpt2"], av__batchnorm=own, av__init="pretrained+tune",
                       av__checkpoint=stage1_exports[exported])
        state = build_model(cfg, AUDIO_DIM, VISION_DIM).av_encoder.state_dict()
        saved = load_file(str(Path(stage1_exports[exported]) / ENCODER_FILE))
        assert {k for k in state if ".norm_in." in k} == {k for k in state if k.startswith("encoders.audio.norm_in.")
                                                         and own}
        for k, v in state.items():
            if ".norm_in." not in k:
                assert torch.equal(v, saved[k]), k
        assert all(".norm_in." in k for k in set(saved) - set(state))


@pytest.mark.parametrize("head", ["last", "mean"])
def test_av_pretrainer_learns(backbones, head):
    torch.manual_seed(0)
    model = build_av_pretrainer(tiny_cfg("unused").av, AUDIO_DIM, VISION_DIM, head_hidden=16, head=head).train()
    from transformers import AutoTokenizer

    batch = planted_batch(AutoTokenizer.from_pretrained(backbones["gpt2"]))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


@pytest.mark.parametrize("family", ["deepmlf", "dmpf"])
def test_activation_checkpointing_keeps_every_gradient_and_saves_activations(backbones, family):
    """Recomputing the frozen layers (``lm``) and the MM blocks (``all``) in backward gives every trainable
    parameter the gradient it gets without recomputation (dropout on: the RNG state is replayed), while autograd
    keeps fewer activations."""
    grads, saved = {}, {}
    for mode in ("none", "lm", "all"):
        torch.manual_seed(0)
        cfg = tiny_cfg(backbones["llama"], family, dropout=0.1, lora__enabled=True)
        model = build_model(cfg, AUDIO_DIM, VISION_DIM).train()
        model.activation_checkpointing = mode
        batch = planted_batch(model.tokenizer, n=4)
        torch.manual_seed(1)
        kept, weights = [], {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # activations only, not the weights autograd keeps
                kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch)
        out.loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        saved[mode] = sum(kept)
    assert all(g is not None for g in grads["none"].values())
    assert grads["none"]["fusion_tokens" if family == "deepmlf" else "fusion_tokens_audio"].abs().sum() > 0
    for mode in ("lm", "all"):
        assert grads[mode].keys() == grads["none"].keys()
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    assert saved["all"] < saved["lm"] < 0.8 * saved["none"], saved
