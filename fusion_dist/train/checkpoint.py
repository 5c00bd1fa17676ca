"""A seed's checkpoints: where training stands (``TrainState``), DeepSpeed tags without frozen weights plus the
gathered trainable weights and a world-size-independent trainable state, completion markers, pruning, the tag to
resume from, RNG capture and restore.

A tag ``step<N>/`` holds DeepSpeed's own states (exact resume on the same number of ranks), ``trainable.safetensors``
(the trainable weights and buffers as the model holds them: evaluation and export read it) and the trainable state
of any world size: ``train_state.json`` (``TrainState``, LR schedule, optimizer step) with
``train_state-<k>.safetensors`` (full fp32 master weights and Adam moments of every trainable parameter). A run
resumed on another number of ranks restores from those (``Checkpoints.load``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusion_dist import dist
from fusion_dist.dist import log
from fusion_dist.errors import UserError
from fusion_dist.models.build import weights_of
from fusion_dist.rundir import TRAINABLE, atomic_write

COMPLETE = "complete"  # in a checkpoint tag, written once every rank saved its part
TRAIN_STATE = "train_state"  # <tag>/train_state.json and train_state-<k>.safetensors: the world-size-free state
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count (torch and DeepSpeed's CPU Adam)
PART_BYTES = 64 * 2**20  # rank 0 holds at most about this much of the gathered trainable state while saving


@dataclass
class EarlyStopping:
    """The best validation MAE so far and its tag; stop once ``patience`` epochs in a row did not improve on it."""
    best: float | None = None
    best_tag: str | None = None
    bad_epochs: int = 0
    stop: bool = False

    def update(self, mae: float, tag: str, patience: int) -> None:
        if self.best is None or mae < self.best:
            self.best, self.best_tag, self.bad_epochs = mae, tag, 0
        else:
            self.bad_epochs += 1
            self.stop = self.bad_epochs >= patience


@dataclass
class Plateau:
    """ReduceLROnPlateau (``train.schedule=plateau``) on the validation MAE, torch's rule: an epoch improves when it
    beats the best by more than 1e-4 relative; after more than ``patience`` epochs in a row that do not, the
    learning rate is multiplied by ``factor`` and the count starts again."""
    best: float | None = None
    bad_epochs: int = 0
    scale: float = 1.0

    def update(self, mae: float, patience: int, factor: float) -> None:
        if self.best is None or mae < self.best * (1 - 1e-4):
            self.best, self.bad_epochs = mae, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > patience:
            self.scale, self.bad_epochs = self.scale * factor, 0


@dataclass
class TrainState:
    """Where a seed's training stands; ``state_dict`` is the client state every checkpoint carries.

    The sampler position is ``step_in_epoch`` global batches into epoch ``epoch``: it does not depend on the
    number of ranks, nor does the noise a micro-batch draws (seeded by its position), so a run resumes on any."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    plateau: Plateau = field(default_factory=Plateau)
    tracking: dict = field(default_factory=lambda: {"parent": None, "child": None})  # MLflow run ids

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.early_stopping = EarlyStopping(**state["early_stopping"])
        self.plateau = Plateau(**state.get("plateau", {}))
        self.tracking = dict(state["tracking"])


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

    def save(self, engine, tag: str, state: TrainState, denv: dist.DistEnv) -> None:
        # A checkpoint keeps rank 0's module state, so the ranks' BatchNorm statistics must agree first for a
        # resumed run to continue like an uninterrupted one (the running averages are linear, so averaging them
        # early does not change the average taken at the epoch end).
        dist.average_buffers(engine.module)
        client = {**state.state_dict(), "world_size": denv.world_size, "rng": dist.all_gather_object(rng_state())}
        # the frozen backbone (and frozen FFW copies) is rebuilt from model.backbone on resume, never written:
        # a tag holds the trainable state alone, whatever the backbone's size
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=True)
        weights = gathered_weights(engine.module)
        if denv.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(self.root / tag / TRAINABLE))
        del weights
        save_train_state(engine, self.root / tag, state, denv)
        dist.barrier()  # every rank's shards are on disk before the tag counts as complete
        if denv.is_main:
            (self.root / tag / COMPLETE).touch()
            atomic_write(self.root / "latest", tag)
            self._prune(keep={tag, state.early_stopping.best_tag})
        dist.barrier()

    def load(self, engine, tag: str, denv: dist.DistEnv) -> TrainState:
        """Restore ``engine`` from ``tag``: DeepSpeed's own states when saved by as many ranks, else the
        world-size-independent trainable state (elastic resume); returns where training stands."""
        meta_file = self.root / tag / f"{TRAIN_STATE}.json"
        saved_world = json.loads(meta_file.read_text())["world_size"] if meta_file.is_file() else denv.world_size
        state = TrainState()
        if saved_world == denv.world_size:
            _, client = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False)
            if client["world_size"] != denv.world_size:  # a tag saved before train_state existed
                raise UserError(f"{self.root}/{tag}: saved by {client['world_size']} ranks without the trainable "
                                f"state another number of ranks resumes from; resume on {client['world_size']} ranks")
            state.load_state_dict(client)
            set_rng_state(client["rng"][denv.rank])
        elif engine.fp16_enabled():  # the dynamic loss scale lives in DeepSpeed's per-rank states only
            raise UserError(f"{self.root}/{tag}: an fp16 run saved by {saved_world} ranks resumes on "
                            f"{saved_world} ranks only (this is {denv.world_size}); bf16 runs resume on any")
        else:
            state.load_state_dict(load_train_state(engine, self.root / tag))
            log.info(f"{self.root}/{tag}: saved by {saved_world} ranks, restored on {denv.world_size} from its "
                     "trainable state")
        return state

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


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _flat_masters(optimizer) -> list[torch.Tensor]:
    """The tensors the inner optimizer steps and keys its state by: ZeRO's flat fp32 partitions (stages 1-2, 3,
    and the bf16 optimizer of stage 0), else the parameters themselves."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return [p for g in optimizer.param_groups for p in g["params"]]


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _link_moments(optimizer) -> None:
    """Point each parameter's ZeRO fragment at its part of the Adam moments (stages 1-2, bf16 optimizer).

    DeepSpeed links them once, right after the first param group's first step, when the other groups have no
    moments yet: with more than one group (ours have four) it must be done again."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _full(p: torch.nn.Parameter, optimizer, key: str | None) -> torch.Tensor:
    """Parameter ``p``'s whole fp32 master (``key`` None) or Adam moment, wherever ZeRO keeps its parts (a
    collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    return p.detach() if key is None else _inner(optimizer).state[p][key]


def _set_full(p: torch.nn.Parameter, optimizer, key: str | None, value: torch.Tensor) -> None:
    """Write this rank's part of ``p``'s fp32 master or Adam moment from the whole ``value``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id"):
        # ZeRO-3 pads the last partitions of a parameter that does not split evenly (a scalar gate on 2 ranks is
        # one element and one of padding), and DeepSpeed's setter reads past the end of such a value
        part, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        start = part.numel() * torch.distributed.get_rank(group=p.ds_process_group)
        mine = value.flatten()[start : start + part.numel()]
        with torch.no_grad():
            part.zero_()
            part[: mine.numel()].copy_(mine)
    elif hasattr(p, "_hp_mapping"):
        safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key)
    else:
        (p.data if key is None else _inner(optimizer).state[p][key]).copy_(value)


def save_train_state(engine, tag_dir: Path, state: TrainState, denv: dist.DistEnv) -> None:
    """``train_state.json`` and ``train_state-<k>.safetensors`` of ``tag_dir`` (a collective): what a run on
    any number of ranks resumes from. Rank 0 writes a part whenever it holds ``PART_BYTES``."""
    optimizer = engine.optimizer
    step = _inner(optimizer).state[_flat_masters(optimizer)[0]]["step"]
    _link_moments(optimizer)
    part: dict[str, torch.Tensor] = {}
    n_parts = part_bytes = 0

    def flush() -> None:
        nonlocal part, n_parts, part_bytes
        if part:
            save_file(part, str(tag_dir / f"{TRAIN_STATE}-{n_parts:05d}.safetensors"))
            n_parts += 1
        part, part_bytes = {}, 0

    for name, p in _trainable(engine.module):
        for key in (None, *MOMENTS):
            value = _full(p, optimizer, key)
            if denv.is_main:
                part[f"{key or 'fp32'}/{name}"] = value.detach().float().cpu().clone().reshape(
                    getattr(p, "ds_shape", p.shape))
                part_bytes += value.numel() * 4
                if part_bytes >= PART_BYTES:
                    flush()
    if denv.is_main:
        flush()
    if denv.is_main:
        meta = {"world_size": denv.world_size, "state": state.state_dict(), "optimizer_step": int(step),
                "scheduler": engine.lr_scheduler.state_dict(), "parts": n_parts}
        atomic_write(tag_dir / f"{TRAIN_STATE}.json", json.dumps(meta, indent=1))


def load_train_state(engine, tag_dir: Path) -> dict:
    """Put a tag's world-size-independent trainable state into a freshly built ``engine`` on any number of ranks:
    weights and buffers, fp32 masters, Adam moments and step, LR schedule. Returns the saved ``TrainState`` dict."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    meta = json.loads((tag_dir / f"{TRAIN_STATE}.json").read_text())
    load_weights(engine.module, load_file(str(tag_dir / TRAINABLE)))  # the low-precision copies, as saved
    optimizer, inner = engine.optimizer, _inner(engine.optimizer)
    step = meta["optimizer_step"]
    # the moments exist only after a first optimizer step: create them as that step would, for ZeRO to link
    # every parameter's fragment to them
    for flat in _flat_masters(optimizer):
        inner.state[flat] = {"step": step if isinstance(inner, DeepSpeedCPUAdam) else torch.tensor(float(step)),
                             **{k: torch.zeros_like(flat) for k in MOMENTS}}
    _link_moments(optimizer)
    params = dict(_trainable(engine.module))
    seen = set()
    for k in range(meta["parts"]):
        with safe_open(str(tag_dir / f"{TRAIN_STATE}-{k:05d}.safetensors"), "pt") as fh:
            for full_key in fh.keys():
                key, name = full_key.split("/", 1)
                if name not in params:
                    raise UserError(f"{tag_dir}: trainable state of {name}, which this model does not train")
                _set_full(params[name], optimizer, None if key == "fp32" else key, fh.get_tensor(full_key))
                seen.add(name)
    if seen != set(params):
        raise UserError(f"{tag_dir}: no trainable state for {sorted(set(params) - seen)[:5]}")
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = meta["state"]["global_step"]
    engine.global_samples = engine.global_steps * engine.train_batch_size()
    return meta["state"]


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
