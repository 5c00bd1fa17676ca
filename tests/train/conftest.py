"""Shared, session-scoped inputs of the engine tests: one prepared dataset, one tiny backbone, and
helpers that launch the real CLI on 1 rank or on 2 CPU ranks (torchrun or the ``deepspeed`` launcher)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FD = str(BIN / "fusion-dist")
CONFIG = str(ROOT / "configs/test/deepmlf_tiny_gpt2.yaml")


def _env() -> dict:
    # one thread per rank: 2 ranks on a 2-core box, no oversubscription
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(sub: str, args: list[str], ranks: int, launcher: str = "torchrun") -> list[str]:
    """The CLI on 1 rank, or on ``ranks`` local ranks under torchrun (quicker to start, as it does not import
    DeepSpeed itself) or the ``deepspeed`` launcher (the demo's)."""
    if ranks == 1:
        return [FD, sub, *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), FD, sub, *args]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(free_port()),
            "-m", "fusion_dist.cli", sub, *args]


def run_cli(sub: str, args: list[str], ranks: int = 1, timeout: float = 300, launcher: str = "torchrun",
            cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(sub, args, ranks, launcher), env={**_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def popen_cli(sub: str, args: list[str], ranks: int, launcher: str = "torchrun") -> subprocess.Popen:
    return subprocess.Popen(command(sub, args, ranks, launcher), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def history(run_dir: Path, seed: int = 0) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "logs" / f"seed{seed}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def engine_inputs(tmp_path_factory):
    """(shard root, tiny GPT-2 dir) shared by every engine test."""
    d = tmp_path_factory.mktemp("engine_inputs")
    for sub, args in [
        ("synth", ["--dataset", "mosi", "--samples", "200", "--seed", "0", "--out", str(d / "s.pkl")]),
        ("prepare", [str(d / "s.pkl"), str(d / "shards")]),
        ("make-backbone", ["--arch", "gpt2", "--preset", "tiny", "--out", str(d / "bb")]),
    ]:
        r = run_cli(sub, args)
        assert r.returncode == 0, r.stderr
    return d / "shards", d / "bb"


def base_args(engine_inputs, run_dir: Path, *extra: str) -> list[str]:
    shards, bb = engine_inputs
    return [CONFIG, f"data.root={shards}", f"model.backbone={bb}", f"run.dir={run_dir}", "tracking.enabled=false",
            "train.log_every_steps=1000", *extra]


# dropout 0, no BatchNorm, no token-averaged LM term: a sample's loss does not depend on the ranks or
# micro-batches it shares
EXACT = ["model.av.batchnorm=[]", "model.loss.lambda_lm=0", "train.epochs=2", "train.global_batch_size=16",
         "train.micro_batch_size=4", "train.checkpoint_every_steps=3", "train.keep_last=10"]


def last_weights(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints/seed0"
    return load_file(str(ck / (ck / "latest").read_text().strip() / "trainable.safetensors"))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history(run_dir)}


def final_test_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["mean"]["test"]



def shared_memory_buffers() -> set[str]:
    """DeepSpeed's shared-memory all-reduce buffers (the ``deepspeed`` launcher's CPU ranks map one each)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


@pytest.fixture(scope="session")
def reference_run(engine_inputs, tmp_path_factory):
    """``reference_run(zero, ranks)`` -> (run dir, CompletedProcess) of an uninterrupted EXACT run, trained once
    per session: the references of the resume, evaluation and batch-equivalence tests."""
    done = {}

    def get(zero: int, ranks: int):
        if (zero, ranks) not in done:
            run_dir = tmp_path_factory.mktemp(f"ref_zero{zero}_ranks{ranks}") / "run"
            r = run_cli("train", base_args(engine_inputs, run_dir, *EXACT, f"train.zero_stage={zero}"), ranks=ranks)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            done[zero, ranks] = run_dir, r
        return done[zero, ranks]

    return get


@pytest.fixture(scope="session")
def ref_run(reference_run):
    """Uninterrupted 2-rank ZeRO-2 run."""
    return reference_run(zero=2, ranks=2)[0]


def rank_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes of a job started by ``popen_cli``: the process itself on 1 rank, else the launcher's
    children it passes --local_rank=N (the ``deepspeed`` launcher), not the launcher's own processes."""
    launcher = psutil.Process(proc.pid)
    ranks = [p for p in launcher.children(recursive=True) if any(a.startswith("--local_rank=") for a in p.cmdline())]
    return ranks or [launcher]


def wait_for_checkpoint(run_dir: Path, proc, min_step: int, timeout: float = 240) -> None:
    latest = run_dir / "checkpoints/seed0/latest"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if latest.is_file() and int(latest.read_text().strip()[4:]) >= min_step:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")
