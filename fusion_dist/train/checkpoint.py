"""A seed's checkpoints: DeepSpeed tags without frozen weights plus the gathered trainable weights, completion
markers, pruning, the tag to resume from, the best seed and checkpoint of a run, and the resume guard."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fusion_dist.config import Config, from_yaml, to_flat_dict
from fusion_dist.errors import UserError
from fusion_dist.export import weights_of
from fusion_dist.train import dist
from fusion_dist.train.dist import log

KEY_METRIC = "MAE"  # early stopping and best checkpoint: lower is better
TRAINABLE = "trainable.safetensors"
COMPLETE = "complete"  # in a checkpoint tag, written once every rank saved its part


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    """``checkpoints/seed<S>/``: DeepSpeed tags ``step<N>``, ``latest`` only after a complete save."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def tags(self) -> list[str]:
        """Complete checkpoints (every rank's shards on disk), oldest first."""
        done = [p.name for p in self.root.glob("step*") if (p / COMPLETE).is_file()]
        return sorted(done, key=lambda t: int(t[4:]))

    def check(self) -> None:
        """Before a run starts: surviving checkpoints without ``latest`` are never trained over (or pruned)."""
        tags = self.tags()
        if tags and not (self.root / "latest").is_file():
            raise UserError(f"{self.root}/latest: missing, but checkpoints {', '.join(tags)} survive; write "
                            "the tag to resume from into it, or pass --restart to train from scratch")

    def latest(self) -> str | None:
        """The tag to resume from: ``latest``'s, or the newest complete one when that is gone or incomplete."""
        f = self.root / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        if (self.root / tag / COMPLETE).is_file():
            return tag
        tags = self.tags()
        if not tags:
            raise UserError(f"{f}: names {tag}, which is missing or incomplete, and no complete checkpoint is left; "
                            "pass --restart to train from scratch")
        log.warning(f"{f}: names {tag}, which is missing or incomplete; resuming from {tags[-1]}, the newest "
                    "complete checkpoint")
        return tags[-1]

    def save(self, engine, tag: str, client_state: dict, best_tag: str | None, denv: dist.DistEnv) -> None:
        # the frozen backbone (and frozen FFW copies) is rebuilt from model.backbone on resume, never written:
        # a tag holds the trainable state alone, whatever the backbone's size
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        weights = gathered_weights(engine.module)
        if denv.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(self.root / tag / TRAINABLE))
        dist.barrier()  # every rank's shards are on disk before the tag counts as complete
        if denv.is_main:
            (self.root / tag / COMPLETE).touch()
            atomic_write(self.root / "latest", tag)
            self._prune(keep={tag, best_tag})
        dist.barrier()

    def _prune(self, keep: set) -> None:
        tags = sorted((p for p in self.root.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        keep |= {p.name for p in tags[-self.keep_last :]} if self.keep_last > 0 else set()
        for p in tags:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def gathered_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``weights_of(module)`` with ZeRO-3 partitions gathered (a collective: every rank calls it)."""
    from fusion_dist.models import gathered

    with gathered([p for n, p in module.named_parameters() if not n.startswith("lm.")]):
        return {k: v.detach().clone() for k, v in weights_of(module).items()}


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put ``weights`` (as ``gathered_weights`` returns them) back into ``module``, into ZeRO-3 partitions too
    (a collective: every rank calls it with the same weights)."""
    from fusion_dist.models import gathered

    params = dict(module.named_parameters())
    unexpected = set(weights) - set(params) - {n for n, _ in module.named_buffers()}
    if unexpected:
        raise UserError(f"trainable weights do not fit this model: unexpected {sorted(unexpected)[:5]}")
    with gathered([params[k] for k in weights if k in params], modifier_rank=0), torch.no_grad():
        module.load_state_dict(weights, strict=False)  # non-persistent buffers (constants) are not loaded


def best_seed(results: dict[int, dict]) -> int:
    """The seed whose best checkpoint has the lowest validation MAE (a missing or non-finite one never wins)."""
    def mae(seed: int) -> float:
        v = results[seed]["valid"].get(KEY_METRIC)
        return math.inf if v is None or not math.isfinite(v) else v

    return min(results, key=mae)


def best_checkpoint(run_dir: Path, seed: int | None) -> tuple[str, Path]:
    """(stage, trainable weights file of the best checkpoint) of ``seed``, or of the seed with the best
    validation MAE."""
    results = {}
    for f in sorted(Path(run_dir, "checkpoints").glob("seed*/result.json")):
        r = json.loads(f.read_text())
        results[r["seed"]] = r
    if not results:
        raise UserError(f"{run_dir}: no finished training (no checkpoints/seed*/result.json)")
    if seed is None:
        seed = best_seed(results)
    if seed not in results:
        raise UserError(f"{run_dir}: no finished seed {seed}; finished: {sorted(results)}")
    r = results[seed]
    return r["stage"], Path(run_dir, "checkpoints", f"seed{seed}", r["best_tag"], TRAINABLE)


# train.* keys a resumed run takes as given (README "Resuming a run"). Every other train.* key, every model.* key
# and data.max_text_tokens are fixed by the checkpoints: the model, its optimizer and schedule were built from them
# and DeepSpeed restores those, so a new value would be recorded but not used.
RESUME_APPLIES = ("train.eval_batch_size", "train.patience", "train.checkpoint_every_steps", "train.keep_last",
                  "train.log_every_steps", "train.dist_timeout_s", "train.activation_checkpointing")


def check_resumable(cfg: Config, run_dir: Path, stage: str, training: bool = True) -> list[str]:
    """Refuse to continue (``training``) or evaluate a run with values its checkpoints cannot take, naming each
    key old -> new; returns the changed keys that do apply."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file() or not any(run_dir.glob("checkpoints/seed*/step*")):
        return []
    stage_file = run_dir / "stage"
    if stage_file.is_file() and stage_file.read_text().strip() != stage:
        raise UserError(f"{run_dir}: holds a '{stage_file.read_text().strip()}' run, not '{stage}'")
    saved = to_flat_dict(from_yaml(saved_file.read_text()))
    now = to_flat_dict(cfg)
    changed = [k for k in now if saved.get(k) != now[k]]
    fixed = [k for k in changed if k.startswith("model.") or k == "data.max_text_tokens"
             or (training and k.startswith("train.") and k not in RESUME_APPLIES)]
    if fixed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in fixed)
        how = ("a resumed run keeps what its checkpoints were built with; use a new run.dir, or pass --restart to "
               "train this one from scratch" if training else "evaluate with the values the run was trained with")
        raise UserError(f"{run_dir}: has checkpoints trained with other values ({diffs}); {how}")
    return [k for k in changed if k in RESUME_APPLIES]
