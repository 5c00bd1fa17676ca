"""A real Slurm cluster for integration tests, and the helpers to drive jobs on it.

``scripts/slurm_local_cluster.sh up`` starts munged, slurmctld and two slurmd "nodes" (node1, node2),
each in its own network namespace with its own address and hostname, on this machine (Debian packages,
installed by the script when missing; needs root). The nodes share this filesystem, so the checkout, its
.venv and pytest's tmp paths are the same on both. The cluster gets its own state directory, namespace
prefix, subnet and ports, so it never touches another local cluster, and ``/etc/slurm`` is left alone:
every command gets ``SLURM_CONF`` instead (jobs inherit it from the submitting environment).

Use the module-scoped ``slurm_cluster`` fixture (import it into a test module): one cluster per module,
always stopped at the end, even when a test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local_cluster.sh"
BIN = Path(sys.executable).parent
STATE_DIR = "/tmp/fusion-dist-test-slurm"
SETTINGS = {"SLURM_LOCAL_DIR": STATE_DIR, "SLURM_LOCAL_PREFIX": "fdtest", "SLURM_LOCAL_SUBNET": "10.79.0",
            "SLURM_LOCAL_PORT": "17017", "SLURM_LOCAL_LINK_ETC": "0", "SLURM_LOCAL_NODES": "2",
            # CPUs each node advertises: two jobs of 1 CPU per node may share it (both nodes share the cores)
            "SLURM_LOCAL_CPUS": str(max(2, os.cpu_count() or 1))}
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmCluster:
    def __init__(self):
        self.env = {**os.environ, **SETTINGS, "SLURM_CONF": f"{STATE_DIR}/etc/slurm.conf",
                    "PATH": f"{BIN}:{os.environ['PATH']}:/usr/sbin:/sbin",
                    # one thread per rank: the two "nodes" share this machine's cores
                    "OMP_NUM_THREADS": "1"}
        self.env.pop("VIRTUAL_ENV", None)

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def up(self) -> None:
        out = self._script("up", timeout=900)  # a fresh machine installs the packages first
        if out.returncode != 0:
            raise RuntimeError(f"slurm_local_cluster.sh up failed:\n{out.stdout}\n{out.stderr}")

    def down(self) -> None:
        self._script("down", timeout=120)

    def run(self, *cmd: str, env: dict | None = None, timeout: float = 60, check: bool = True,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                             timeout=timeout, cwd=cwd)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(self, *args: str, env: dict | None = None) -> int:
        """``sbatch --parsable ARGS`` from the checkout; the job inherits ``env`` on top of the cluster's."""
        return int(self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Reason, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def wait(self, job_id: int, timeout: float, until=lambda j: j["JobState"] in FINISHED) -> dict[str, str]:
        """Poll until ``until(job)`` holds (default: the job ended); fail the test after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout:.0f} s; log ends:\n"
                            f"{self.log(job_id, 60)}")
            time.sleep(0.5)

    def release_requeued(self, job_id: int, timeout: float = 60) -> None:
        """Start a requeued job now instead of after Slurm's delay (about 2 minutes, the credential lifetime).

        The delay exists because a node refuses to launch a job whose previous run it is still tearing
        down ("Job credential revoked"): wait until no step daemon of the old run is left, and one more
        second, as credentials are compared by their creation time in whole seconds.
        """
        self.wait(job_id, timeout, lambda j: j["JobState"] == "PENDING" and int(j["Restarts"]) >= 1)
        deadline = time.monotonic() + timeout
        while step_daemons(job_id):
            assert time.monotonic() < deadline, f"job {job_id}: the requeued run's steps did not end"
            time.sleep(0.2)
        time.sleep(1.1)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def log(self, job_id: int, tail: int | None = None) -> str:
        """The job's log, or its last ``tail`` lines (failure messages: the end says why)."""
        path = Path(self.job(job_id)["StdOut"])
        text = path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"
        return "\n".join(text.splitlines()[-tail:]) if tail else text


def _processes():
    """(pid, argv, environ) of every process on this machine; the nodes live in network namespaces but
    share its process table. Processes that end while being read are skipped."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        yield int(proc.name), argv, environ


def step_daemons(job_id: int) -> list[int]:
    """slurmstepd processes still serving a job (its batch, extern and numbered steps), on any node."""
    prefix = f"slurmstepd: [{job_id}.".encode()
    return [pid for pid, argv, _ in _processes() if argv[0].startswith(prefix)]


def rank_pids(job_id: int, node: str | None = None) -> list[int]:
    """Trainer rank processes of a job (not their launchers), optionally on one node only."""
    pids = []
    for pid, argv, environ in _processes():
        is_rank = argv[1:3] == [b"-m", b"fusion_dist.cli"] or argv[1:4] == [b"-u", b"-m", b"fusion_dist.cli"]
        if is_rank and f"SLURM_JOB_ID={job_id}".encode() in environ and (
                node is None or f"SLURMD_NODENAME={node}".encode() in environ):
            pids.append(pid)
    return pids


def signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits for delivery to ``pid`` (e.g. while the process is stopped)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(v, 16) for k, v in re.findall(r"^(SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M)]
    return any(m >> (sig - 1) & 1 for m in masks)


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


@pytest.fixture(scope="module")
def slurm_cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs Linux and root (network namespaces, apt-get)")
    cluster = SlurmCluster()
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()  # also kills whatever a job left running in the nodes' namespaces
