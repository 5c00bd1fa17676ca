"""Shared, session-scoped inputs of the engine tests: one prepared dataset, one tiny backbone, and
helpers that launch the real CLI on 1 rank or on 2 CPU ranks (torchrun or the ``deepspeed`` launcher)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(sub, args, ranks, launcher), env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


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
