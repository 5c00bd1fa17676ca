"""Prediction heads and the output every model returns.

DeepMLF (SPEC 3.2): the task head is an MLP over [mean AV token || last real text state || mean fusion
state]; linear auxiliary heads read each of those alone. DMPF (SPEC 3.3): a self-attention head over the
seven stream vectors, or the concat-MLP baseline.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class ModelOutput(NamedTuple):
    """What every model's forward returns (the trainer's contract).

    prediction: (B,) sentiment scores. loss: weighted total, requires grad. losses: unweighted terms, detached.
    hidden_states: final (post-norm) LM states (B, T + fusion, d) in the internal layout [left-aligned text |
    fusion groups]; text_mask: (B, T) real text tokens in that layout (both None for the AV pretrainer). Where
    nothing reads the other text states (``FusionLM.tail_from``) T is 1, the last text token, unless the forward
    was asked for ``all_states``.

    A named tuple, not a dataclass, because ZeRO-3 must see these tensors: DeepSpeed re-gathers a module's
    partitioned parameters for backward through hooks on the tensors its forward returns (it walks tuples
    and dicts only). Without them the parameters the model owns directly (the fusion tokens) would still be
    partitioned (size 0) when autograd reaches them.
    """

    prediction: torch.Tensor
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    hidden_states: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm that normalizes in fp32 whatever the training dtype.

    Under bf16/fp16 the parameters are cast to the training dtype (DeepSpeed keeps their fp32 master copies)
    while the running statistics, buffers, stay fp32: an EMA of feature statistics in bf16 would lose most of
    its precision, and raw features span orders of magnitude. The output returns in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps).to(x.dtype)


def regression_head(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The task-head MLP of the reference: Linear, BatchNorm, ReLU, (dropout), Linear -> 1."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), BatchNorm(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
    )


class AuxHeads(nn.Module):
    """One linear regressor per named representation (W_av, W_t, W_f, ...)."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(d, 1) for name, d in dims.items()})

    def forward(self, features: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
        return {n: self.heads[n](features[n]).squeeze(-1) for n in names}


class StreamAttentionHead(nn.Module):
    """DMPF late fusion: project each stream vector to a common width, self-attend, mean-pool, MLP."""

    def __init__(self, dims: list[int], width: int, n_heads: int, dropout: float):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, width) for d in dims)
        self.stream_embedding = nn.Parameter(torch.zeros(len(dims), width))
        self.attn = nn.TransformerEncoderLayer(
            width, n_heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.mlp = regression_head(width, width, dropout)

    def forward(self, streams: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([p(s) for p, s in zip(self.proj, streams)], 1) + self.stream_embedding
        return self.mlp(self.attn(x).mean(1)).squeeze(-1)


class ConcatHead(nn.Module):
    """DMPF ablation baseline: the stream vectors concatenated into the task MLP."""

    def __init__(self, dims: list[int], hidden: int, dropout: float):
        super().__init__()
        self.mlp = regression_head(sum(dims), hidden, dropout)

    def forward(self, streams: list[torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat(streams, -1)).squeeze(-1)
