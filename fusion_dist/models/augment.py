"""Text-embedding augmentation at train time (SPEC 3.2): SeqAug, Gaussian noise, dropout, or none.

Every method touches real text positions only: padding neither receives nor lends values.

SeqAug (Georgiou & Potamianos 2023): draw a permutation pi of each sample's real positions and a
per-sample Bernoulli(p_perm) mask over embedding channels; the drawn channels take the permuted
position's value, E <- m * E + (1 - m) * E[pi] with m = 1 - Bernoulli(p_perm).
"""

from __future__ import annotations

import torch
from torch import nn

from fusion_dist.config import AugmentConfig, ConfigError

KINDS = ("seqaug", "noise", "dropout", "none")


def permute_real_positions(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with each sample's real positions (``valid``) randomly permuted among themselves."""
    B, T = valid.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    # Both orders list the real positions first: ascending (the slots) and shuffled (their new sources);
    # padding follows in ascending order in both, so it maps onto itself.
    slots = torch.where(valid, pos, pos + T).argsort(1)
    keys = torch.where(valid, torch.rand(B, T, device=x.device), 2.0 + pos / T)
    sources = keys.argsort(1)
    src = torch.empty_like(slots).scatter_(1, slots, sources)
    return x.gather(1, src[..., None].expand_as(x))


class TextAugment(nn.Module):
    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        if cfg.kind not in KINDS:
            raise ConfigError(f"model.augment.kind: unknown augmentation '{cfg.kind}'; choose {', '.join(KINDS)}")
        self.cfg = cfg

    def forward(self, emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if not self.training or cfg.kind == "none" or torch.rand(()).item() >= cfg.p_apply:
            return emb
        real = valid[..., None].to(emb.dtype)
        if cfg.kind == "seqaug":
            swap = torch.rand(emb.shape[0], 1, emb.shape[-1], device=emb.device) < cfg.p_perm
            return torch.where(swap & valid[..., None], permute_real_positions(emb, valid), emb)
        if cfg.kind == "noise":
            return emb + real * cfg.noise_std * torch.randn_like(emb)
        return emb + real * (nn.functional.dropout(emb, cfg.dropout, True) - emb)
