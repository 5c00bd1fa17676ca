"""Predictions of a model (or DeepSpeed engine) over samples, on one rank or split across ranks; used by
training, ``evaluate``, ``predict`` and the served model."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import torch

from fusion_dist import dist
from fusion_dist.data import Collator, RankSampler, ShardDataset, text_tokens
from fusion_dist.progress import Progress
from fusion_dist.rundir import atomic_write


def collator_for(model: torch.nn.Module, max_text_tokens: int) -> Collator:
    """The batch collator of ``model`` (its tokenizer; the stage-1 pretrainer has none)."""
    return Collator(getattr(model, "tokenizer", None), max_text_tokens)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def predict_module(forward: Callable | torch.nn.Module, samples, collator: Collator, batch_size: int,
                   indices: list[int] | None = None, progress: str | None = None,
                   summary: bool = True) -> tuple[list[str], list[float], list[float]]:
    """Predictions of ``forward`` (a model or engine, in eval mode) over ``samples[i]`` for ``indices``;
    ``progress`` names the work in progress lines (``fusion_dist.progress``), none without it."""
    module = getattr(forward, "module", forward)
    device = next(module.parameters()).device
    indices = list(range(len(samples))) if indices is None else indices
    shown = Progress(progress, len(indices), "samples", device, summary) if progress else None
    ids, preds, labels = [], [], []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = collator([samples[i] for i in indices[start : start + batch_size]])
            out = forward(to_device(batch, device))
            ids += batch["ids"]
            preds += out.prediction.float().cpu().tolist()
            labels += batch["label"].tolist()
            if shown:
                shown.update(len(batch["ids"]), text_tokens(batch))
    return ids, preds, labels


def evaluate_split(forward, ds: ShardDataset, collator: Collator, batch_size: int, denv: dist.DistEnv):
    """Every sample of the split exactly once across ranks, gathered in dataset order on every rank (progress
    lines, of rank 0's share, only when it takes long)."""
    indices = list(RankSampler(len(ds), denv.rank, denv.world_size, shuffle=False, seed=0))
    what = f"evaluate {ds.split}" + (" (rank 0's share)" if denv.world_size > 1 else "")
    part = predict_module(forward, ds, collator, batch_size, indices, what, summary=False)
    ordered: dict[int, tuple] = {}
    for rank_indices, (ids, preds, labels) in zip(
        dist.all_gather_object(indices), dist.all_gather_object(part)
    ):
        ordered.update({i: row for i, row in zip(rank_indices, zip(ids, preds, labels))})
    if sorted(ordered) != list(range(len(ds))):
        raise RuntimeError(f"evaluation of {ds.split} did not cover every sample exactly once")
    ids, preds, labels = (list(col) for col in zip(*(ordered[i] for i in range(len(ds)))))
    return ids, preds, labels


def write_predictions(path: Path, ids: list[str], preds: list[float], labels: list[float]) -> None:
    """``id,prediction,label`` rows, floats written so that they read back exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["id", "prediction", "label"])
    w.writerows(zip(ids, (repr(float(p)) for p in preds), (repr(float(t)) for t in labels)))
    atomic_write(path, text.getvalue())
