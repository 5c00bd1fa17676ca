"""A few optimizer steps on planted-signal batches reduce the training loss, for both families, on
GPT-2 and Llama backbones, in fp32 and under bf16 autocast; a bf16 model takes fp32 features."""

import contextlib

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


def test_bf16_model_casts_fp32_features(backbones):
    model = build_model(tiny_cfg(backbones["llama"]), AUDIO_DIM, VISION_DIM).to(torch.bfloat16)
    out = model(planted_batch(model.tokenizer, n=4))
    out.loss.backward()
    assert out.prediction.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_av_pretrainer_learns(backbones):
    torch.manual_seed(0)
    model = build_av_pretrainer(tiny_cfg("unused").av, AUDIO_DIM, VISION_DIM, head_hidden=16).train()
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
