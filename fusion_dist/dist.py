"""Who am I in the job: rank/world detection for every launcher, process-group setup, gathers, logging.

The only module that reads launcher environment variables. Supported launchers, checked in order:

- ``deepspeed`` launcher (sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and CROSS_RANK);
- ``torchrun`` (same variables plus TORCHELASTIC_RUN_ID);
- any other ``env://`` launcher that sets RANK and WORLD_SIZE;
- ``srun`` with one task per device (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID inside a job step);
  MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST (``scontrol show hostnames``) and
  MASTER_PORT to a port derived from the job id, so every task agrees without talking first;
- a plain single process (world size 1).

Failure is bounded: the process group gets a timeout, so if a rank dies the survivors leave their
collective with an error (gloo notices a closed peer at once; the timeout is the backstop) and exit
non-zero instead of hanging. The launchers then stop the rest of the job.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as tdist

log = logging.getLogger("fusion_dist")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """``deepspeed``, ``torchrun``, ``env``, ``srun`` or ``single``."""
    node: str
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if any(c in nodelist for c in "[,"):
        raise RuntimeError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} without scontrol; set MASTER_ADDR explicitly"
        )
    return nodelist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job's ranks when none is given: one per job, so that two jobs sharing a
    head node do not collide (``launch/srun.sh`` asks for it too)."""
    return 15000 + job_id % 20000


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, local rank and world size from whichever launcher started this process."""
    env = os.environ if env is None else env
    node = env.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's name for the node, where it has one
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            launcher=launcher,
            node=node,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    # SLURM_PROCID also exists in a batch script's own shell; SLURM_STEP_ID only inside an srun step.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", node))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=int(env.get("SLURM_NTASKS", "1")),
            launcher="srun",
            node=node,
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT") or slurm_master_port(job_id)),
        )
    return DistEnv(0, 0, 1, "single", node, "127.0.0.1", 0)


def setup_logging(denv: DistEnv) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings and errors, prefixed with their rank."""
    handler = logging.StreamHandler(sys.stdout if denv.is_main else sys.stderr)
    prefix = "" if denv.is_main else f"[rank {denv.rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if denv.is_main else logging.WARNING)
    log.propagate = False


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Detect the launcher, export the env:// variables DeepSpeed reads, and create the process group.

    gloo on CPU, nccl on GPU. A single process still gets a 1-rank group, because the DeepSpeed
    engine always runs on one.
    """
    denv = detect()
    if denv.launcher == "single":
        denv = DistEnv(0, 0, 1, "single", denv.node, "127.0.0.1", _free_port())
    os.environ.update(
        RANK=str(denv.rank),
        LOCAL_RANK=str(denv.local_rank),
        WORLD_SIZE=str(denv.world_size),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
    setup_logging(denv)
    # DeepSpeed's ZeRO collectives call the deprecated torch names: one warning per call would bury the log
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    if not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(denv.local_rank)
        tdist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    log.info(
        f"distributed: launcher={denv.launcher} world_size={denv.world_size} "
        f"backend={tdist.get_backend()} master={denv.master_addr}:{denv.master_port}"
    )
    return denv


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a plain list when not distributed)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def average_and_any(values: dict[str, float], flag: bool) -> tuple[dict[str, float], bool]:
    """``values`` averaged over ranks, and whether ``flag`` is set on any rank (one all-reduce)."""
    keys = sorted(values)
    vec = torch.tensor([values[k] for k in keys] + [float(flag)], dtype=torch.float64)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(vec)
        vec[:-1] /= tdist.get_world_size()
    return dict(zip(keys, vec[:-1].tolist())), bool(vec[-1] > 0)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place.

    DeepSpeed synchronises gradients, not buffers: each rank's running statistics have seen only its own
    micro-batches. Averaging them before evaluation and checkpointing makes every rank hold the same model
    and brings a W-rank run's statistics close to a 1-rank run's over the same micro-batches.
    """
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            tdist.all_reduce(buf)
            buf.div_(tdist.get_world_size())


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
