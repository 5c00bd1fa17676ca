"""The run directory (SPEC 7) as one object: where each file lives, atomic writes, the finished seeds' results
and best checkpoints, the resume guard, and the metric summaries.

::

    config.yaml  ds_config.json  stage  metrics.json  predictions/<split>[-seed<S>].csv  export/
    backbone.json                  the backbone the run trains with, from its first start (a hub name's commit,
                                   a local directory's fingerprint): seeds, resumes and exports use that one
    checkpoints/seed<S>/step<N>/   a checkpoint (train/checkpoint.py): DeepSpeed states without frozen weights,
                                   trainable.safetensors, train_state*, and ``complete`` once every rank saved
    checkpoints/seed<S>/latest     the tag to resume from, written after ``complete``
    checkpoints/seed<S>/result.json   the seed's final metrics (a finished seed is not trained again)
    logs/seed<S>.jsonl             one line per optimizer step: losses by term, lr, grad norm
    prefix_cache/<id>/             the frozen prefix's rows on disk (train/prefix_cache.py), one store per identity
    tracking/  mlflow.db  mlruns/  the tracking journal, and the embedded MLflow store (tracking.py)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion_dist.config import STAGES, Config, from_yaml, to_flat_dict
from fusion_dist.errors import UserError
from fusion_dist.metrics import MOSI_NAMES, SIMS_NAMES, json_safe

KEY_METRIC = "MAE"  # early stopping, best checkpoint and best seed: lower is better
TRAINABLE = "trainable.safetensors"  # in a checkpoint tag: the trainable weights and buffers, gathered

# train.* keys a resumed run takes as given (README "Resume"). Every other train.* key, every model.* key and
# data.max_text_tokens are fixed by the checkpoints: the model, its optimizer and schedule were built from them
# and the checkpoint restores those, so a new value would be recorded but not used.
RESUME_APPLIES = ("train.eval_batch_size", "train.patience", "train.checkpoint_every_steps", "train.keep_last",
                  "train.log_every_steps", "train.dist_timeout_s", "train.activation_checkpointing",
                  "train.prefix_cache", "train.prefix_cache_memory_gb")


def atomic_write(path: Path, text: str) -> None:
    """``path`` holds the old text or the new one, never a part (a crash mid-write leaves a ``.tmp`` beside it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(json_safe(obj), indent=2))


def _file(name: str) -> property:
    return property(lambda self: self.root / name)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # -- the layout
    config = _file("config.yaml")
    ds_config = _file("ds_config.json")
    stage_file = _file("stage")
    backbone = _file("backbone.json")
    metrics = _file("metrics.json")
    export = _file("export")
    logs = _file("logs")
    tracking = _file("tracking")
    mlflow_db = _file("mlflow.db")
    mlruns = _file("mlruns")

    def checkpoints(self, seed: int | None = None) -> Path:
        return self.root / "checkpoints" if seed is None else self.root / "checkpoints" / f"seed{seed}"

    def result(self, seed: int) -> Path:
        return self.checkpoints(seed) / "result.json"

    def history(self, seed: int) -> Path:
        return self.logs / f"seed{seed}.jsonl"

    def predictions(self, split: str, seed: int, multi_seed: bool) -> Path:
        return self.root / "predictions" / (f"{split}-seed{seed}.csv" if multi_seed else f"{split}.csv")

    # -- reading it
    def read_config(self) -> Config:
        if not self.config.is_file():
            raise UserError(f"{self.root}: not a run directory (no {self.config.name})")
        return from_yaml(self.config.read_text())

    def has_checkpoints(self) -> bool:
        return any(self.checkpoints().glob("seed*/step*"))

    def trained_backbone(self, backbone: str) -> str:
        """What ``model.backbone`` loads for this run: a hub name at the commit ``backbone.json`` recorded when the
        run started (the hub may have moved since), anything else (another name included) as given."""
        if not self.backbone.is_file():
            return backbone
        kept = json.loads(self.backbone.read_text())
        if kept.get("local") or not kept.get("revision") or backbone.split("@", 1)[0] != kept["name"]:
            return backbone
        return f"{kept['name']}@{kept['revision']}"

    def stage(self) -> str:
        if not self.stage_file.is_file():
            raise UserError(f"run.dir: {self.root} holds no training run")
        stage = self.stage_file.read_text().strip()
        if stage not in STAGES:
            raise UserError(f"{self.stage_file}: '{stage}' is not a stage ({', '.join(STAGES)})")
        return stage

    def results(self) -> dict[int, dict]:
        """The finished seeds' ``result.json``, by seed."""
        results = {}
        for f in sorted(self.checkpoints().glob("seed*/result.json")):
            r = json.loads(f.read_text())
            results[r["seed"]] = r
        return results

    def best_checkpoint(self, seed: int | None) -> tuple[str, Path]:
        """(stage, trainable weights file of the best checkpoint) of ``seed``, or of the seed with the best
        validation MAE."""
        results = self.results()
        if not results:
            raise UserError(f"{self.root}: no finished training (no checkpoints/seed*/result.json)")
        if seed is None:
            seed = best_seed(results)
        if seed not in results:
            raise UserError(f"{self.root}: no finished seed {seed}; finished: {sorted(results)}")
        r = results[seed]
        return r["stage"], self.checkpoints(seed) / r["best_tag"] / TRAINABLE

    def check_resumable(self, cfg: Config, stage: str, training: bool = True) -> list[str]:
        """Refuse to continue (``training``) or evaluate a run with values its checkpoints cannot take, naming each
        key old -> new; returns the changed keys that do apply."""
        if not self.config.is_file() or not self.has_checkpoints():
            return []
        if self.stage_file.is_file() and self.stage() != stage:
            raise UserError(f"{self.root}: holds a '{self.stage()}' run, not '{stage}'")
        saved, now = to_flat_dict(self.read_config()), to_flat_dict(cfg)
        changed = [k for k in now if saved.get(k) != now[k]]
        fixed = [k for k in changed if k.startswith("model.") or k == "data.max_text_tokens"
                 or (training and k.startswith("train.") and k not in RESUME_APPLIES)]
        if fixed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in fixed)
            how = ("a resumed run keeps what its checkpoints were built with; use a new run.dir, or pass --restart "
                   "to train this one from scratch" if training else "evaluate with the values the run was trained with")
            raise UserError(f"{self.root}: has checkpoints trained with other values ({diffs}); {how}")
        return [k for k in changed if k in RESUME_APPLIES]


def best_seed(results: dict[int, dict]) -> int:
    """The seed whose best checkpoint has the lowest validation MAE (a missing or non-finite one never wins)."""
    def mae(seed: int) -> float:
        v = results[seed]["valid"].get(KEY_METRIC)
        return math.inf if v is None or not math.isfinite(v) else v

    return min(results, key=mae)


_STD = "sample standard deviation over the seeds (ddof=1, as the paper's mean +- std over five seeds); 0 for one seed"
REPORTING = {  # what metrics.json says about its own numbers, per metric set
    "mosi": {"std": _STD, "Acc2/F1": "MMSA's two binary accuracies: Has0_* (negative vs non-negative) and Non0_* "
             "(negative vs positive, zero labels left out). The DeepMLF paper reports one Acc2 / F1 per dataset "
             "without saying which; compare a paper number with both."},
    "sims": {"std": _STD, "Acc2/F1": "Mult_acc_2 / F1_score: negative vs non-negative (MMSA's SIMS metrics)."},
}


def summarize(results: dict[int, dict], metric_set: str) -> dict:
    """metrics.json: per seed, and mean/std over seeds (sample std, 0 for one seed) of every metric."""
    names = MOSI_NAMES if metric_set == "mosi" else SIMS_NAMES
    out: dict[str, Any] = {"metric_set": metric_set, "key_metric": KEY_METRIC, "notes": REPORTING[metric_set],
                           "seeds": {str(s): r for s, r in results.items()}, "mean": {}, "std": {}}
    for split in ("valid", "test"):
        out["mean"][split], out["std"][split] = {}, {}
        for n in names:
            vals = np.array([math.nan if r[split].get(n) is None else r[split][n] for r in results.values()], float)
            out["mean"][split][n] = float(vals.mean())
            out["std"][split][n] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return out


def metric_table(rows: dict[str, dict[str, float]], names: list[str], stds: dict | None = None) -> str:
    """Plain text table: one row per entry of ``rows``, one column per metric (``mean ± std`` with stds)."""
    width = max(10, *(len(n) for n in names))
    head = f"{'':12s}" + "".join(f"{n:>{width + 2}s}" for n in names)
    lines = [head]
    for label, m in rows.items():
        cells = []
        for n in names:
            v = m.get(n, math.nan)
            s = f"{v:.4f}" if stds is None else f"{v:.4f}±{stds[label].get(n, math.nan):.4f}"
            cells.append(f"{s:>{width + 2}s}")
        lines.append(f"{label:12s}" + "".join(cells))
    return "\n".join(lines)


def summary_text(summary: dict) -> str:
    """The test metrics of ``summarize``'s output: a row per seed, then mean ± std."""
    names = MOSI_NAMES if summary["metric_set"] == "mosi" else SIMS_NAMES
    rows = {f"seed {s}": {k: (math.nan if v is None else v) for k, v in r["test"].items()}
            for s, r in summary["seeds"].items()}
    mean, std = summary["mean"]["test"], summary["std"]["test"]
    return ("test metrics (best validation checkpoint of each seed):\n" + metric_table(rows, names) + "\n"
            + metric_table({"mean±std": mean}, names, {"mean±std": std}))
