"""Train-time augmentation: of the text embeddings (SPEC 3.2: SeqAug, Gaussian noise, dropout, or none) and of
the raw audio/vision frames (SoftPerm; DMPF's frame and modality masking).

Every method touches real positions only: padding neither receives nor lends values. In eval mode all are identity.

SeqAug / SoftPerm (Georgiou & Potamianos 2023): draw a permutation pi of each sample's real positions and a
per-sample Bernoulli(p) mask over channels; the drawn channels take the permuted position's value,
X <- m * X + (1 - m) * X[pi] with m = 1 - Bernoulli(p). SeqAug applies it to token embeddings, to a batch with
probability p_apply; SoftPerm to every training batch of frames.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion_dist.config import AugmentConfig, AVEncoderConfig, ConfigError

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


def soft_permute(x: torch.Tensor, valid: torch.Tensor, p: float) -> torch.Tensor:
    """SeqAug's rule on (B, T, D): each (sample, channel) with probability ``p`` takes the values of a permutation
    of the sample's real positions."""
    swap = torch.rand(x.shape[0], 1, x.shape[-1], device=x.device) < p
    return torch.where(swap & valid[..., None], permute_real_positions(x, valid), x)


def augment_frames(x: torch.Tensor, lengths: torch.Tensor, cfg: AVEncoderConfig, modality_mask: bool) -> torch.Tensor:
    """Raw frames (B, L, D) of one modality at train time: SoftPerm with ``cfg.softperm``, each real frame zeroed
    with ``cfg.frame_mask``, and (``modality_mask``: in an encoder of several modalities) the sample's whole
    modality zeroed with ``cfg.modality_mask``."""
    valid = torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None]
    if cfg.softperm > 0:
        x = soft_permute(x, valid, cfg.softperm)
    drop = torch.zeros_like(valid)
    if cfg.frame_mask > 0:
        drop |= torch.rand(valid.shape, device=x.device) < cfg.frame_mask
    if modality_mask and cfg.modality_mask > 0:
        drop |= torch.rand(x.shape[0], 1, device=x.device) < cfg.modality_mask
    drop &= valid
    return x.masked_fill(drop[..., None], 0.0) if drop.any() else x


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
            return soft_permute(emb, valid, cfg.p_perm)
        if cfg.kind == "noise":
            return emb + real * cfg.noise_std * torch.randn_like(emb)
        return emb + real * (nn.functional.dropout(emb, cfg.dropout, True) - emb)
