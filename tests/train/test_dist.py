import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fusion_dist.dist import detect


def test_single_process():
    d = detect({})
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (0, 0, 1, "single")


def test_deepspeed_launcher_and_torchrun():
    base = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    d = detect({**base, "CROSS_RANK": "1"})
    assert (d.rank, d.local_rank, d.world_size, d.launcher, d.master_addr, d.master_port) == (
        3, 1, 4, "deepspeed", "n1", 1234)
    assert detect({**base, "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"
    assert detect(base).launcher == "env"
    # a launcher inside an srun step wins over the SLURM variables
    assert detect({**base, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}).rank == 3


def test_srun_uses_first_host_from_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    d = detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "srun")
    assert d.master_addr == "gpu07" and d.master_port == 15123
    assert detect({**env, "MASTER_ADDR": "head", "MASTER_PORT": "999"}).master_addr == "head"
    # the batch script's own shell (no job step) is a single process
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).launcher == "single"


WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from fusion_dist.dist import init_distributed, all_gather_object, barrier, log, shutdown
    d = init_distributed(timeout_s=float(sys.argv[1]))
    got = all_gather_object({"rank": d.rank})
    assert got == [{"rank": r} for r in range(d.world_size)], got
    log.info("main only")
    log.warning("warned")
    if sys.argv[2] == "kill" and d.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    barrier()
    shutdown()  # as the commands do: gloo's threads stopped before the interpreter exits
    print("done", d.rank, flush=True)
""")


def _launch(tmp_path, mode, timeout_s):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(timeout_s), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_ranks_gather_and_rank_prefixed_logging(tmp_path):
    p0, p1 = _launch(tmp_path, "ok", 60)
    out0, err0 = p0.communicate(timeout=120)
    out1, err1 = p1.communicate(timeout=120)
    assert p0.returncode == 0 and p1.returncode == 0, err0 + err1
    assert "main only" in out0 and "warned" in out0 and "done 0" in out0
    assert "main only" not in out1 + err1 and "[rank 1] warned" in err1


def test_killed_rank_makes_survivor_exit_nonzero_in_bounded_time(tmp_path):
    p0, p1 = _launch(tmp_path, "kill", 20)
    t0 = time.monotonic()
    p0.communicate(timeout=90)
    p1.communicate(timeout=90)
    assert p1.returncode == -9
    assert p0.returncode != 0
    assert time.monotonic() - t0 < 60
