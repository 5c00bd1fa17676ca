"""Audio-visual encoder (SPEC 3.1), its stage-1 pretrainer, and the export it is saved to and loaded from.

Per modality: length-aware resampling to ``maxlen`` steps -> BatchNorm over channels (real steps only)
-> bias-free Linear x sqrt(d_enc) -> sinusoidal positions -> dropout -> pre-norm Transformer encoder.
The modalities are fused per time step (concat on channels -> Linear -> LayerNorm) into Z (B, maxlen, d_av).

Resampling: output step j averages the real frames in [floor(j L / M), floor((j+1) L / M)) (at least one
frame), so every sample of any true length L >= 1 covers its whole clip in exactly M steps and frames past
L never count. A modality with no real frame (L = 0) gives an all-padding row, masked everywhere after.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.shards import MODALITIES
from fusion_dist.config import AVEncoderConfig, from_yaml, to_yaml
from fusion_dist.errors import UserError
from fusion_dist.models.augment import augment_frames
from fusion_dist.models.heads import BatchNorm, ModelOutput, regression_head


def resample(x: torch.Tensor, lengths: torch.Tensor, maxlen: int) -> torch.Tensor:
    """(B, L, D) padded frames -> (B, maxlen, D): mean over each step's share of the real frames."""
    B, L, _ = x.shape
    steps = torch.arange(maxlen, device=x.device)
    lengths = lengths.to(x.device).clamp(max=L)
    start = (steps[None] * lengths[:, None]) // maxlen  # (B, M)
    end = torch.maximum(((steps[None] + 1) * lengths[:, None]) // maxlen, start + 1)
    end = torch.minimum(end, lengths[:, None])
    t = torch.arange(L, device=x.device)
    weight = ((t[None, None] >= start[..., None]) & (t[None, None] < end[..., None])).to(x.dtype)  # (B, M, L)
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1)
    return weight @ x


def sinusoidal_positions(n: int, d: int, device=None) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of the rows where ``mask`` is True (zeros for a row with none)."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ModalityEncoder(nn.Module):
    """One modality's frames -> (B, maxlen, d_enc) states."""

    def __init__(self, in_dim: int, cfg: AVEncoderConfig, batchnorm: bool):
        super().__init__()
        self.maxlen, self.d_enc = cfg.maxlen, cfg.d_enc
        self.norm_in = BatchNorm(in_dim) if batchnorm else None
        self.proj = nn.Linear(in_dim, cfg.d_enc, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.d_enc, cfg.n_heads, 4 * cfg.d_enc, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_enc) if cfg.encoder_norm else None, enable_nested_tensor=False
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = resample(x, lengths, self.maxlen)
        mask = (lengths > 0).to(x.device)[:, None].expand(-1, self.maxlen)  # True = real step
        if self.norm_in is not None:  # statistics over real steps only
            x = x.masked_scatter(mask[..., None], self.norm_in(x[mask]))
        x = self.proj(x) * math.sqrt(self.d_enc)
        x = self.dropout(x + sinusoidal_positions(self.maxlen, self.d_enc, x.device).to(x.dtype))
        # A sample with no real frame attends to its (zero) steps rather than to nothing, which would be NaN. Every
        # step is real in the normal case: no mask then, so attention takes its unmasked (fused) path.
        key_padding = ~mask & mask.any(1, keepdim=True)
        x = self.encoder(x, src_key_padding_mask=key_padding if key_padding.any() else None)
        return x * mask[..., None].to(x.dtype), mask


class AVEncoder(nn.Module):
    """Encoders for the given modalities fused per time step into Z (B, maxlen, d_av).

    With both modalities this is the bimodal AV encoder of SPEC 3.1; DMPF also uses it with one
    modality as its audio-only and video-only encoders.
    """

    def __init__(self, dims: dict[str, int], cfg: AVEncoderConfig):
        super().__init__()
        if cfg.d_enc % cfg.n_heads:
            raise UserError(f"model.av.n_heads: {cfg.n_heads} does not divide model.av.d_enc={cfg.d_enc}")
        self.dims = dict(dims)
        self.d_av, self.cfg = cfg.d_av, cfg
        self.encoders = nn.ModuleDict({m: ModalityEncoder(d, cfg, m in cfg.batchnorm) for m, d in dims.items()})
        self.fuse = nn.Linear(len(dims) * cfg.d_enc, cfg.d_av)
        self.norm = nn.LayerNorm(cfg.d_av)

    def forward(self, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> Z (B, maxlen, d_av), mask (B, maxlen) True = real step."""
        states, masks = [], []
        for m, enc in self.encoders.items():
            x, lengths = batch[m].to(dtype), batch[f"{m}_lengths"]
            if self.training:
                x = augment_frames(x, lengths, self.cfg, modality_mask=len(self.encoders) > 1)
            s, mask = enc(x, lengths)
            states.append(s)
            masks.append(mask)
        mask = torch.stack(masks).any(0)
        return self.norm(self.fuse(torch.cat(states, -1))), mask


class AVPretrainer(nn.Module):
    """Stage 1 ("bienc"): the AV encoder alone with a regression head, L1 on the sentiment label. ``head``:
    ``last`` (the reference's: a linear layer on the last step of Z; every step of a sample is real or none is,
    as resampling spreads the frames over all ``maxlen`` steps) or ``mean`` (the task-head MLP on the mean of Z)."""

    def __init__(self, av_encoder: AVEncoder, head_hidden: int, dropout: float, head: str = "mean"):
        super().__init__()
        if head not in PRETRAIN_HEADS:
            raise UserError(f"pretrain.head: unknown '{head}'; choose {', '.join(PRETRAIN_HEADS)}")
        self.av_encoder, self.pool = av_encoder, head
        self.head = nn.Linear(av_encoder.d_av, 1) if head == "last" else regression_head(av_encoder.d_av, head_hidden,
                                                                                          dropout)

    def forward(self, batch: dict) -> ModelOutput:
        z, mask = self.av_encoder(batch, next(self.head.parameters()).dtype)
        prediction = self.head(z[:, -1] if self.pool == "last" else masked_mean(z, mask)).squeeze(-1)
        loss = F.l1_loss(prediction.float(), batch["label"].float())
        return ModelOutput(prediction=prediction, loss=loss, losses={"task": loss.detach()})


PRETRAIN_HEADS = ("last", "mean")


def build_av_pretrainer(av_cfg: AVEncoderConfig, audio_dim: int, vision_dim: int, head_hidden: int = 64,
                        dropout: float = 0.1, head: str = "mean") -> AVPretrainer:
    return AVPretrainer(AVEncoder({"audio": audio_dim, "vision": vision_dim}, av_cfg), head_hidden, dropout, head)


# --------------------------------------------------------------------------- stage-1 export

ENCODER_FILE = "av_encoder.safetensors"
CONFIG_FILE = "config.yaml"


def save_av_encoder(state: dict[str, torch.Tensor], dims: dict[str, int], directory: str | Path, cfg) -> Path:
    """Write a stage-1 export's encoder: ``av_encoder.safetensors`` (an ``AVEncoder`` state dict, feature dims in
    its metadata) + ``config.yaml`` (the full ``Config``), what ``load_av_encoder`` reads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / ENCODER_FILE),
              metadata={f"{m}_dim": str(d) for m, d in dims.items()})
    (directory / CONFIG_FILE).write_text(to_yaml(cfg))
    return directory


SHAPE_KEYS = ("d_enc", "n_layers", "n_heads", "d_av", "encoder_norm")  # model.av keys that shape the weights (BatchNorm: load_into)


def load_av_encoder(directory: str | Path, expected: AVEncoderConfig | None = None, key: str = "model.av") -> AVEncoder:
    """Rebuild the encoder a stage-1 export holds (its own ``model.av`` config and feature dims); with
    ``expected`` (the stage-2 encoder's config, ``key`` naming it), refuse an export whose weights have another
    shape, naming the keys."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / ENCODER_FILE, directory / CONFIG_FILE
    for f in (weights, config):
        if not f.is_file():
            raise UserError(f"model.av.checkpoint: {directory} has no {f.name} (export of 'fusion-dist pretrain-av')")
    with safe_open(str(weights), "pt") as fh:
        metadata = fh.metadata() or {}
    dims = {m: int(metadata[f"{m}_dim"]) for m in MODALITIES if f"{m}_dim" in metadata}
    saved = from_yaml(config.read_text()).model.av
    diffs = [f"{key}.{k} {getattr(saved, k)!r} there, {getattr(expected, k)!r} here" for k in SHAPE_KEYS
             if expected is not None and getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise UserError(f"model.av.checkpoint: {directory} was trained with other encoder values ({'; '.join(diffs)}); "
                        "set them as the export has them")
    encoder = AVEncoder(dims, saved)
    encoder.load_state_dict(load_file(str(weights)))
    return encoder


def load_into(target: AVEncoder, state: dict[str, torch.Tensor]) -> list[str]:
    """An encoder state of the same shape keys into ``target``: the per-modality input BatchNorms follow the
    target's own ``batchnorm`` (one the state lacks starts fresh, one the target does not use is dropped).
    Returns the modalities whose BatchNorm starts fresh."""
    own = target.state_dict()
    state = {k: v for k, v in state.items() if not (".norm_in." in k and k not in own)}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all(".norm_in." in k for k in missing), (missing, unexpected)
    return sorted({k.split(".")[1] for k in missing})


def modality_state(source: AVEncoder, modality: str) -> dict[str, torch.Tensor]:
    """A one-modality encoder's state from its modality's part of a bimodal encoder: that modality's encoder, its
    columns of the fusion projection (and the bias), the output norm."""
    i, d = list(source.encoders).index(modality), source.cfg.d_enc
    state = {f"encoders.{modality}.{k}": v for k, v in source.encoders[modality].state_dict().items()}
    state.update({"fuse.weight": source.fuse.weight[:, i * d:(i + 1) * d], "fuse.bias": source.fuse.bias})
    state.update({f"norm.{k}": v for k, v in source.norm.state_dict().items()})
    return state
