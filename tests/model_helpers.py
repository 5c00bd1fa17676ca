"""Shared pieces of the model tests: tiny backbones built once per session, configs, collate-format batches.

Batches follow the collator contract (fusion_dist.data.Collator) but are built here, so the model tests
do not depend on the data layer.
"""

from __future__ import annotations

import pytest
import torch

from fusion_dist.config import AugmentConfig, AVEncoderConfig, LossConfig, ModelConfig
from fusion_dist.models.presets import make_backbone

AUDIO_DIM, VISION_DIM = 5, 7
TEXTS = [
    "the movie was great and i loved it",
    "bad",
    "honestly it was okay not good not bad just average",
    "what a waste of time",
]


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, str]:
    """Tiny random GPT-2, Llama and Qwen2 written by make-backbone, loaded like real checkpoints."""
    root = tmp_path_factory.mktemp("backbones")
    return {arch: str(make_backbone(arch, "tiny", root / arch)) for arch in ("gpt2", "llama", "qwen2")}


def tiny_cfg(backbone: str, family: str = "deepmlf", **overrides) -> ModelConfig:
    cfg = ModelConfig(
        family=family, backbone=backbone, mm_layers=[1, 3], n_fusion=3, n_audio=2, n_video=2, n_av=3,
        cross_attn_heads=4, head_hidden=16, dropout=0.0,
        av=AVEncoderConfig(maxlen=6, d_enc=8, n_layers=1, n_heads=2, d_av=8, dropout=0.0, init="random+tune"),
        augment=AugmentConfig(kind="none"), loss=LossConfig(lambda_lm=0.5),
    )
    for key, value in overrides.items():
        target = cfg
        *path, last = key.split("__")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def make_batch(tokenizer, texts=TEXTS, seed: int = 0, padding_side: str = "right", audio=None,
               labels=None) -> dict:
    """A collate-format batch: right- (or left-) padded ids, zero-padded features with lengths and masks."""
    g = torch.Generator().manual_seed(seed)
    B = len(texts)
    tokenizer.padding_side = padding_side
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    batch = {"ids": [str(i) for i in range(B)], "raw_text": list(texts),
             "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    for name, dim, max_len in (("audio", AUDIO_DIM, 11), ("vision", VISION_DIM, 9)):
        lengths = torch.randint(1, max_len + 1, (B,), generator=g)
        mask = torch.arange(max_len)[None] < lengths[:, None]
        feats = torch.randn(B, max_len, dim, generator=g) * mask[..., None]
        batch.update({name: feats, f"{name}_lengths": lengths, f"{name}_mask": mask})
    if audio is not None:
        batch["audio"] = audio
    batch["label"] = labels if labels is not None else torch.randn(B, generator=g)
    return batch


def planted_batch(tokenizer, n: int = 16, seed: int = 0) -> dict:
    """Labels planted in the mean of audio channel 0 and in the transcript's wording."""
    g = torch.Generator().manual_seed(seed)
    words = ["great wonderful", "awful horrible"]
    polarity = torch.randint(0, 2, (n,), generator=g)
    texts = [f"the movie was {words[int(p)]}" for p in polarity]
    batch = make_batch(tokenizer, texts, seed=seed)
    signal = torch.randn(n, generator=g)
    batch["audio"][..., 0] += signal[:, None] * batch["audio_mask"]
    batch["label"] = (signal + (1 - 2 * polarity.float())).clamp(-3, 3)
    return batch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which costs seconds on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
