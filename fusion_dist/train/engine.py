"""The DeepSpeed engine: its config generated from ours, the AdamW param groups, the LR schedule.

The only module that imports deepspeed at top level. Users never write DeepSpeed JSON: everything
comes from ``TrainConfig`` in ``deepspeed_config``; ``train.deepspeed_config`` may point at an extra
JSON that is merged over the generated one for the rare knob we do not expose.

Batch arithmetic (logged at start): global batch = micro-batch x gradient accumulation x world
size. The user sets the global batch and a cap on the micro-batch; the micro-batch and the
accumulation are derived for the world size at hand (``batch_geometry``), so the same config runs,
and takes the same optimizer steps, on 1 or N ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import time; without a GPU it must be the CPU one (gloo).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from fusion_dist.config import TrainConfig, batch_geometry  # noqa: E402
from fusion_dist.errors import UserError  # noqa: E402

AV_ENCODER_NAMES = ("av_encoder", "audio_encoder", "video_encoder")
ACTIVATION_CHECKPOINTING = ("none", "lm", "all")
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce / all-gather bucket (elements)
MIN_BUCKET = 1_000_000
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_train_config(train: TrainConfig) -> None:
    """The ``train.*`` values DeepSpeed would otherwise reject late, or not at all."""
    if train.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"train.zero_stage={train.zero_stage}: must be 0, 1, 2 or 3")
    if train.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision={train.precision!r}: must be fp32, bf16 or fp16")
    if train.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise UserError(f"train.activation_checkpointing={train.activation_checkpointing!r}: must be one of "
                        f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    if train.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UserError(f"train.precision=fp16: this machine's accelerator ({get_accelerator().device_name()}) "
                        "does not support fp16; use bf16")
    if train.offload_optimizer and train.zero_stage == 0:
        raise UserError("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
    if train.offload_params and train.zero_stage != 3:
        raise UserError("train.offload_params needs train.zero_stage 3")


def bucket_elements(trainable: int) -> int:
    """DeepSpeed's gradient reduce / all-gather bucket for a model that trains ``trainable`` parameters.

    DeepSpeed's default, 5e8 elements (1 GB in bf16, allocated whole, and twice with overlapping
    communication), is sized for models that train billions of parameters; ours train 1e5-1e8 next to a
    frozen backbone. A quarter of the trainable count keeps a step at about four collectives per bucket
    kind while the buffer stays a fraction of the trainable state."""
    return int(min(DEEPSPEED_BUCKET, max(MIN_BUCKET, trainable // 4)))


def deepspeed_config(train: TrainConfig, world_size: int, trainable: int | None = None) -> dict[str, Any]:
    """The complete DeepSpeed JSON for this run (also written to ``<run>/ds_config.json``); with the model's
    ``trainable`` parameter count its buckets are sized for it (else DeepSpeed's defaults)."""
    check_train_config(train)
    geometry = batch_geometry(train, world_size)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.zero_stage == 3:
        # gather the (small) trainable weights at save time so exports are plain tensors
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if trainable is not None and train.zero_stage >= 1:
        bucket = bucket_elements(trainable)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if train.zero_stage == 3:
            # gathered layers are released soon after use: by default DeepSpeed keeps up to 1e9 gathered parameters
            # alive (2 GB in bf16, most of a 1.7B backbone on every rank) and prefetches 5e7 at a time
            zero.update(stage3_prefetch_bucket_size=bucket, stage3_max_live_parameters=2 * bucket,
                        stage3_max_reuse_distance=bucket)
    cfg: dict[str, Any] = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.micro,
        "gradient_accumulation_steps": geometry.accumulation,
        "gradient_clipping": train.grad_clip if train.grad_clip_mode == "norm" else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress lines are ours (rank 0, one per interval)
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"train.deepspeed_config: cannot read {path}: {exc}") from exc
        if not isinstance(extra, dict):
            raise UserError(f"train.deepspeed_config: {path} must hold a JSON object")
        cfg = _merge(cfg, extra)
    return cfg


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "gate" in name or "fusion_tokens" in name


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups (SPEC 4): LM-side trainables at ``lr``, AV encoders at ``av_lr``; no weight decay on
    biases, norms and other 1-D params, gates and fusion tokens. Frozen params never reach the optimizer.
    ``clip_value``: the element-wise gradient bound of the group (0: none; ``train.grad_clip_mode=value``)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        side = "av" if any(part in AV_ENCODER_NAMES for part in name.split(".")) else "lm"
        groups.setdefault((side, _no_decay(name, p)), []).append(p)
    if not groups:
        raise UserError("the model has no trainable parameters (check model.av.init and model.lora)")
    return [
        {
            "name": f"{side}{'_no_decay' if nd else ''}",
            "params": params,
            "lr": train.av_lr if side == "av" else train.lr,
            "weight_decay": 0.0 if nd else train.weight_decay,
            "clip_value": train.grad_clip if train.grad_clip_mode == "value" and (side == "lm" or train.grad_clip_av)
            else 0.0,
        }
        for (side, nd), params in sorted(groups.items())
    ]


def lr_factor(train: TrainConfig, steps_per_epoch: int, peak: float, plateau_scale=None):
    """The LR multiplier of optimizer step s for a param group whose peak lr is ``peak``.

    Linear warmup from 0 over ``train.warmup_epochs``; then ``cosine``: from 1 down to ``min_lr / peak`` over
    ``train.schedule_epochs`` (default: the rest of ``train.epochs``), restarting at 1 after each such period with
    ``train.lr_restarts``, else holding the floor; or ``plateau``: ``plateau_scale()``, the ReduceLROnPlateau
    factor that epoch ends update (``TrainState.plateau``)."""
    warmup = round(train.warmup_epochs * steps_per_epoch)
    period = max(1, round(train.schedule_epochs * steps_per_epoch) if train.schedule_epochs
                 else train.epochs * steps_per_epoch - warmup)
    floor = min(1.0, train.min_lr / peak)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "plateau":
            return plateau_scale()
        t = step - warmup
        t = t % period if train.lr_restarts and train.schedule_epochs else min(t, period)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t / period))

    return factor


def schedule_text(train: TrainConfig) -> str:
    """``lr_factor`` in words, for the start-up line."""
    after = (f"x {train.plateau_factor:g} after {train.plateau_patience} epochs on a plateau"
             if train.schedule == "plateau" else
             f"cosine over {f'{train.schedule_epochs:g}' if train.schedule_epochs else 'the other'} epochs to "
             f"{train.min_lr:g}" +
             (", with restarts" if train.lr_restarts and train.schedule_epochs else ""))
    return f"lr: {train.warmup_epochs:g} warmup epochs, then {after}"


def refresh_lr(engine) -> None:
    """Set every group's lr to what the schedule gives for the current step now (after a plateau update or a
    resume), not only at the next optimizer step."""
    sched = engine.lr_scheduler
    for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["lr"] = group["initial_lr"] * factor(sched.last_epoch)


def _clip_by_value(optimizer, args, kwargs) -> None:
    """Optimizer step pre-hook: clamp each group's gradients to +-``clip_value`` (``train.grad_clip_mode=value``).

    It runs on what the optimizer steps: under ZeRO the reduced gradients of this rank's fp32 partition, so an
    element-wise clamp gives the same update on any number of ranks."""
    for group in optimizer.param_groups:
        c = group["clip_value"]
        if c > 0:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-c, c)


@contextlib.contextmanager
def model_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this: under ZeRO-3 the HF backbone is loaded already partitioned
    (transformers reads the live ``HfDeepSpeedConfig``), so no rank ever holds the full LM."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # adopts our process group, so the config sees the real world size
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None  # not glibc: nothing to tune


def return_freed_memory_promptly() -> None:
    """Give every allocation of 1 MiB or more its own mapping, so that freeing it returns it to the OS at once.

    glibc raises its mmap threshold to 32 MiB after the first large frees; from then on the layers a rank
    loads, copies or gathers (ZeRO-3) and frees again stay in the heap and count in its resident memory, which
    grew by 1.8 GB per rank on SmolLM2-1.7B under ZeRO-3. Called once per process, before the backbone loads."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def release_free_memory() -> None:
    """Return to the OS what the heap holds free (around the engine's start-up)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def initialize(model: torch.nn.Module, train: TrainConfig, ds_config: dict[str, Any], steps_per_epoch: int,
               plateau_scale=None):
    """``deepspeed.initialize`` with our optimizer and schedule (``lr_factor``); returns the engine.

    ZeRO-Offload uses DeepSpeed's CPU Adam (the fast one for offloaded states); otherwise torch AdamW.
    """
    groups = param_groups(model, train)
    betas = tuple(train.betas)
    # Checkpoints exclude frozen parameters, but DeepSpeed finds them by their first name only: a tied alias (the
    # LM head sharing the embedding matrix, 0.2 GB on SmolLM2-1.7B) would still be written into every tag.
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop_frozen(module, state, prefix, local_metadata) -> None:
        for name in frozen:
            state.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop_frozen)
    if train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=betas)
    optimizer.register_step_pre_hook(_clip_by_value)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_factor(train, steps_per_epoch, g["lr"], plateau_scale) for g in groups])
    release_free_memory()  # what loading freed, before DeepSpeed allocates its buffers
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    release_free_memory()  # the unpartitioned copies ZeRO-3 replaced, the ZeRO-1/2 flattening's originals
    _unlink_shared_memory()
    return engine


def _unlink_shared_memory() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce buffer (CPU ranks of one machine).

    When every rank runs on one machine (the ``deepspeed`` launcher says so in ``LOCAL_SIZE``) DeepSpeed maps one
    such file per rank, 66 MB in /dev/shm, that is in RAM, and never removes it: every run left its buffers
    behind, finished or killed. Once the engine is up every rank has mapped every other rank's buffer, and a
    mapping outlives the name: after a barrier each rank removes its own, and a run killed later leaves nothing."""
    from fusion_dist import dist

    dist.barrier()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    name.unlink(missing_ok=True)


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds: ``weights`` (its share of every parameter, frozen ones included)
    and ``optimizer`` (master copies and moments of its partition). Gradients and buffers come and go within a
    step and are not counted. ``fusion-dist plan`` estimates the same two numbers."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    weights = size(getattr(p, "ds_tensor", p) for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3 hands its fp32 partitions to the inner optimizer only for the duration of a step
    masters = [p for g in inner.param_groups for p in g["params"]]
    masters += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
    moments = [v for state in inner.state.values() for v in state.values()]
    return {"weights": weights, "optimizer": size(masters) + size(moments)}
