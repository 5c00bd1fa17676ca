"""fusion-dist across nodes, on a real two-node Slurm cluster started by the tests (tests/slurm_cluster.py).

Every job is the unchanged user-facing script (``slurm/train_mosi.sh`` or ``slurm/sweep.sh``) with the
CPU settings a CPU cluster needs: ``--gpus-per-node=0 --cpus-per-task=1`` on the sbatch line, and
``FD_CONFIG``/``FD_OVERRIDES``/``FD_PROCS_PER_NODE=1`` in the submitting environment. The config
(configs/test/cluster_mosi.yaml) trains a tiny DeepMLF for one epoch of 4 optimizer steps (64 synthetic
MOSI samples, global batch 16 over 2 ranks), with a checkpoint after every step. The uninterrupted
torchrun run is the reference the other launchers, the preempted run and the resumed run must equal.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from slurm_cluster import BIN, ROOT, rank_pids, send, signal_pending, slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CONFIG = str(ROOT / "configs/test/cluster_mosi.yaml")
SCRIPT = str(ROOT / "slurm/train_mosi.sh")
CPU = ("--gpus-per-node=0", "--cpus-per-task=1")  # the scripts' GPU defaults, switched off for this cluster
JOB_TIMEOUT = 300  # one tiny training on 2 "nodes" takes ~30 s
FIRST_JOB_TIMEOUT = 900  # on a fresh machine the first DeepSpeed start compiles a CPU op (minutes on 2 cores)


def fusion_dist(*args: str, cwd: Path | None = None) -> None:
    subprocess.run([str(BIN / "fusion-dist"), *args], check=True, capture_output=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    fusion_dist("make-backbone", "--arch", "llama", "--preset", "tiny", "--out", str(root / "backbone"))
    fusion_dist("synth", "--dataset", "mosi", "--out", str(root / "mosi.pkl"), "--samples", "110")
    fusion_dist("prepare", str(root / "mosi.pkl"), str(root / "shards"))  # train 65, valid 11, test 34
    return root


def fd_env(inputs: Path, run_dir: Path, data: Path | None = None, **extra: str) -> dict:
    overrides = f"model.backbone={inputs / 'backbone'} data.root={data or inputs / 'shards'} run.dir={run_dir}"
    return {"FD_CONFIG": CONFIG, "FD_OVERRIDES": overrides, "FD_PROCS_PER_NODE": "1", **extra}


def submit(cluster, inputs: Path, run_dir: Path, *sbatch_args: str, data: Path | None = None, **extra) -> int:
    logs = run_dir.parent / "logs"
    logs.mkdir(exist_ok=True)
    return cluster.sbatch(*CPU, f"--output={logs}/%x-%j.out", *sbatch_args, SCRIPT,
                          env=fd_env(inputs, run_dir, data, **extra))


def completed(cluster, job_id: int, timeout: float = JOB_TIMEOUT) -> dict:
    job = cluster.wait(job_id, timeout)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"log ends:\n{cluster.log(job_id, 60)}"
    return job


def poll_until(cluster, job_id: int, condition, timeout: float = JOB_TIMEOUT) -> None:
    """Check often (the tiny run's steps take a fraction of a second) while the job is queued or running."""
    deadline, checks = time.monotonic() + timeout, 0
    while not condition():
        checks += 1
        if checks % 50 == 0:
            assert time.monotonic() < deadline and cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
                cluster.log(job_id)
        time.sleep(0.01)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "seed0.jsonl").read_text().splitlines()]


def final_test_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["seeds"]["0"]["test"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same losses at every optimizer step and the same test metrics as the reference run."""
    ours, ref = history(run_dir), history(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert final_test_metrics(run_dir) == pytest.approx(final_test_metrics(reference), rel=1e-6, nan_ok=True)


def mlflow_runs(run_dir: Path, experiment: str = "fusion-dist/mosi") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.fixture(scope="module")
def reference(slurm_cluster, inputs):
    """Plain ``sbatch slurm/train_mosi.sh`` (default launcher torchrun, default log path logs/%x-%j.out)."""
    run_dir = inputs / "reference"
    job_id = slurm_cluster.sbatch(*CPU, SCRIPT, env=fd_env(inputs, run_dir))
    log_file = Path(slurm_cluster.job(job_id)["StdOut"])
    assert log_file == ROOT / "logs" / f"fd-mosi-{job_id}.out"
    try:
        completed(slurm_cluster, job_id, FIRST_JOB_TIMEOUT)
        yield run_dir, slurm_cluster.log(job_id)
    finally:
        log_file.unlink(missing_ok=True)


def test_sbatch_trains_on_both_nodes_and_tracks_final_test_metrics(reference):
    run_dir, log = reference
    assert "distributed: launcher=torchrun world_size=2 backend=gloo" in log
    for node in ("node1", "node2"):  # each node's launcher ran its rank to the end
        assert f"fusion-dist launch: {node}: torchrun: 2 node(s) x 1 rank(s)" in log
        assert f"fusion-dist launch: {node}: torchrun exited with 0" in log
    assert re.search(r"restart count 0, run dir", log) and "finished; results in" in log
    assert [r["step"] for r in history(run_dir)] == [1, 2, 3, 4]
    runs = mlflow_runs(run_dir)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and len(children) == 1
    assert children[0].data.metrics["test/MAE"] == pytest.approx(final_test_metrics(run_dir)["MAE"])
    nodes = {k.split("/")[1] for k in children[0].data.metrics if k.endswith("/cpu_utilization_percentage")}
    assert nodes == {"node1", "node2"}  # system metrics of each node, from its local rank 0


def test_deepspeed_and_srun_launchers_agree_with_torchrun(slurm_cluster, inputs, reference):
    runs = {launcher: inputs / f"launcher-{launcher}" for launcher in ("deepspeed", "srun")}
    jobs = {launcher: submit(slurm_cluster, inputs, run_dir, FD_LAUNCHER=launcher)
            for launcher, run_dir in runs.items()}  # both fit on the cluster at once
    for launcher, job_id in jobs.items():
        completed(slurm_cluster, job_id)
        log = slurm_cluster.log(job_id)
        assert f"distributed: launcher={launcher} world_size=2" in log
        for node in ("node1", "node2"):
            assert re.search(rf"fusion-dist launch: {node}: (deepspeed: 2 host\(s\).*--no_ssh|rank \d)", log), log
        assert_same_run(runs[launcher], reference[0])


def test_single_node_torchrun_wrapper_agrees_with_two_nodes(inputs, reference):
    run_dir = inputs / "torchrun-one-node"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "FD_PROCS_PER_NODE": "2"}
    out = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "train", CONFIG, *fd_env(inputs, run_dir)[
        "FD_OVERRIDES"].split()], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "torchrun: 1 node(s) x 2 rank(s), --standalone" in out.stdout
    assert_same_run(run_dir, reference[0])


def test_preemption_checkpoints_requeues_and_resumes_into_the_same_runs(slurm_cluster, inputs, reference):
    run_dir = inputs / "preempted"
    job_id = submit(slurm_cluster, inputs, run_dir)
    steps = run_dir / "logs" / "seed0.jsonl"  # rank 0 appends a line per optimizer step
    poll_until(slurm_cluster, job_id, lambda: steps.is_file() and steps.stat().st_size > 0)
    # Hold the ranks still so the signal lands mid-epoch however fast the steps are, then let them go.
    ranks = rank_pids(job_id)
    assert len(ranks) == 2
    send(ranks, signal.SIGSTOP)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))  # what --signal=B:USR1@N does
    deadline = time.monotonic() + 30
    while not all(signal_pending(pid, signal.SIGUSR1) for pid in ranks):
        assert time.monotonic() < deadline, "SIGUSR1 was not forwarded to the ranks"
        time.sleep(0.1)
    send(ranks, signal.SIGCONT)
    slurm_cluster.release_requeued(job_id)
    job = completed(slurm_cluster, job_id)
    assert job["Restarts"] == "1"
    log = slurm_cluster.log(job_id)
    assert "SIGUSR1" in log and f"scontrol requeue {job_id}" in log
    assert re.search(r"preempted; saved step\d", log)
    assert "restart count 1" in log and re.search(r"resumed from step\d \(epoch 0, step \d of 4", log), log
    assert_same_run(run_dir, reference[0])
    runs = mlflow_runs(run_dir)  # the requeued job continued the parent and child runs it had started
    assert len(runs) == 2 and sum("mlflow.parentRunId" in r.data.tags for r in runs) == 1
    assert all(r.info.status == "FINISHED" and r.data.tags["slurm.restart_count"] == "1" for r in runs)


def test_killed_rank_fails_the_job_and_resubmitting_resumes(slurm_cluster, inputs, reference):
    run_dir = inputs / "killed"
    job_id = submit(slurm_cluster, inputs, run_dir)
    latest = run_dir / "checkpoints" / "seed0" / "latest"
    poll_until(slurm_cluster, job_id, latest.is_file)
    ranks = rank_pids(job_id)
    send(ranks, signal.SIGSTOP)  # freeze the run right after its first complete checkpoint
    send(rank_pids(job_id, "node2"), signal.SIGKILL)
    send(ranks, signal.SIGCONT)
    job = slurm_cluster.wait(job_id, 120)  # the survivor must notice and the job must end, not hang
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", slurm_cluster.log(job_id)
    assert "failed (exit" in slurm_cluster.log(job_id)
    saved = latest.read_text().strip()

    job_id = submit(slurm_cluster, inputs, run_dir)
    completed(slurm_cluster, job_id)
    log = slurm_cluster.log(job_id)
    assert f"seed0:{saved}" in log and f"resumed from {saved}" in log
    assert_same_run(run_dir, reference[0])


def test_study_array_then_report(slurm_cluster, inputs):
    """A 2-setting study (x a 2-value grid) as the paper's studies run: one array task per configuration, then the
    report job's tables, the paper-style one with the study's paper numbers beside the runs' mean ± std."""
    work = inputs / "sweep-submit"
    work.mkdir()
    sweep = work / "sweep.yaml"
    sweep.write_text(f"""
script: {SCRIPT}
config: {CONFIG}
experiment: cluster-sweep
dir: {work / 'out'}
overrides: ["model.backbone={inputs / 'backbone'}", "data.root={inputs / 'shards'}"]
settings:
  - {{label: shallow, set: {{model.mm_layers: [1]}}, paper: {{Acc2: 85.6, MAE: 0.692}}}}
  - {{label: deep, set: {{model.mm_layers: [1, 3]}}}}
grid:
  model.n_fusion: [2, 3]
""")
    out = slurm_cluster.run("bash", str(ROOT / "slurm/sweep.sh"), str(sweep), "--nodes=1", *CPU, cwd=work,
                            env={"FD_PROCS_PER_NODE": "1"}, timeout=120).stdout
    ids = dict(re.findall(r"(array|report)=(\d+)", out))
    completed(slurm_cluster, int(ids["report"]), 2 * JOB_TIMEOUT)
    tasks = slurm_cluster.run("scontrol", "show", "job", "-o", ids["array"]).stdout.splitlines()
    assert len(tasks) == 4 and all("JobState=COMPLETED" in t for t in tasks)
    report = slurm_cluster.log(int(ids["report"]))
    assert re.search(r"^run\s+model\.mm_layers\s+model\.n_fusion\s", report, re.M), report
    for i, (layers, n_f) in enumerate([("[1]", 2), ("[1]", 3), ("[1, 3]", 2), ("[1, 3]", 3)]):
        assert re.search(rf"^task{i}\s+{re.escape(layers)}\s+{n_f}\s+-?\d", report, re.M), report
    metrics = {i: json.loads((work / "out" / f"task{i}" / "metrics.json").read_text()) for i in range(4)}
    for i, label in enumerate(["shallow n_fusion=2", "shallow n_fusion=3", "deep n_fusion=2", "deep n_fusion=3"]):
        m = metrics[i]["mean"]["test"]
        acc, mae = f"{100 * m['Has0_acc_2']:.2f} ± 0.00", f"{m['MAE']:.3f} ± 0.000"  # one seed: std 0
        paper = (" [85.6]", " [0.692]") if label.startswith("shallow") else ("", "")
        row = re.search(rf"^{re.escape(label)}\s+(.*)$", report, re.M)
        assert row and f"{acc}{paper[0]}" in row[1] and f"{mae}{paper[1]}" in row[1], (label, report)
    assert re.search(r"^setting\s+Has0_acc_2\s+Has0_F1_score\s+Non0_acc_2", report, re.M), report
    assert (work / "out" / "compare.png").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cluster-sweep").experiment_id])
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags) == \
        ["compare-report", "task0", "task1", "task2", "task3"]


def test_missing_config_fails_at_once_with_a_clear_line(slurm_cluster, inputs, tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    job_id = submit(slurm_cluster, inputs, tmp_path / "run", FD_CONFIG=str(missing))
    job = slurm_cluster.wait(job_id, 60)
    log = slurm_cluster.log(job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert f"error: {missing}: config file not found" in log
    assert "fusion-dist launch" not in log  # nothing was started
    # and slurm/submit.sh refuses before anything is queued
    out = slurm_cluster.run("bash", str(ROOT / "slurm/submit.sh"), SCRIPT, *CPU, check=False,
                            env=fd_env(inputs, tmp_path / "run", FD_CONFIG=str(missing)))
    assert out.returncode == 2 and f"{missing}: config file not found" in out.stderr
    assert "Submitted batch job" not in out.stdout


def test_requeue_before_any_checkpoint_starts_fresh_and_a_split_smaller_than_the_world_evaluates(
        slurm_cluster, inputs):
    # own data: 32 training samples (2 steps), a 1-sample test split for 2 ranks
    data, rng = inputs / "tiny", np.random.default_rng(0)
    data.mkdir()
    rows = []
    for i, split in enumerate(["train"] * 32 + ["valid"] * 3 + ["test"]):
        np.save(data / f"a{i}.npy", rng.normal(size=(12, 5)).astype(np.float32))
        np.save(data / f"v{i}.npy", rng.normal(size=(10, 20)).astype(np.float32))
        rows.append({"id": f"clip{i}", "split": split, "text": "a good film" if i % 2 else "a bad film",
                     "label": round(float(rng.uniform(-3, 3)), 1), "audio": f"a{i}.npy", "vision": f"v{i}.npy"})
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fusion_dist("prepare", str(data / "manifest.jsonl"), str(data / "shards"))

    run_dir = inputs / "requeued-fresh"
    job_id = submit(slurm_cluster, inputs, run_dir, data=data / "shards")
    slurm_cluster.wait(job_id, 60, lambda j: j["JobState"] == "RUNNING")
    slurm_cluster.run("scontrol", "requeue", str(job_id))  # the scheduler takes the nodes back at once
    slurm_cluster.release_requeued(job_id)
    completed(slurm_cluster, job_id)
    log = slurm_cluster.log(job_id)
    assert f"requeued (restart 1) but {run_dir} has no checkpoint yet: starting fresh" in log
    with open(run_dir / "predictions" / "test.csv") as fh:
        (row,) = list(csv.DictReader(fh))  # the one test sample, scored once although 2 ranks evaluated
    assert row["id"] == "clip35"
    assert final_test_metrics(run_dir)["MAE"] == pytest.approx(abs(float(row["prediction"]) - float(row["label"])))
