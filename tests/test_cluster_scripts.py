"""The cluster scripts' checks that need no cluster: sweep expansion, config and hostfile validation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/test/cluster_mosi.yaml")
sys.path.insert(0, str(ROOT / "slurm"))
import jobtools  # noqa: E402

from fusion_dist.errors import UserError  # noqa: E402


def write_sweep(tmp_path: Path, **changes) -> Path:
    spec = {"script": str(ROOT / "slurm/train_mosi.sh"), "config": CONFIG, "experiment": "unit-sweep",
            "dir": str(tmp_path / "out"), "overrides": ["run.seeds=[0,1]"],
            "grid": {"model.mm_layers": [[1], [1, 3]], "model.n_fusion": [2, 4, 8]}, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


def test_sweep_expands_the_grid_one_task_per_combination(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assigned = dict(line.split("=", 1) for line in jobtools.sweep(write_sweep(tmp_path)).splitlines())
    out = tmp_path / "out"
    assert assigned["tasks"] == "6" and assigned["experiment"] == "unit-sweep" and assigned["name"] == "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    tasks = [line.split("\t") for line in (out / "tasks.tsv").read_text().splitlines()]
    assert len(tasks) == 6
    assert tasks[0] == ["run.seeds=[0,1]", f"tracking.uri={uri}", "tracking.experiment=unit-sweep",
                        "model.mm_layers=[1]", "model.n_fusion=2", f"run.dir={out / 'task0'}"]
    assert [t[3:5] for t in tasks] == [[f"model.mm_layers={m}", f"model.n_fusion={n}"]
                                      for m in ("[1]", "[1,3]") for n in (2, 4, 8)]
    # every line is a valid config, exactly as the array task will load it
    cfg = jobtools.load_config(CONFIG, tasks[4])
    assert (cfg.model.mm_layers, cfg.model.n_fusion, cfg.run.seeds) == ([1, 3], 4, [0, 1])
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("unit-sweep") is not None


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"model.n_fusoin": [2, 3]}}, "task 0: command line: unknown config key 'model.n_fusoin'"),
    ({"grid": {"model.n_fusion": []}}, "'grid' must map config keys to non-empty lists"),
    ({"experiment": None}, "missing key(s) ['experiment']"),
    ({"seeds": [0, 1]}, "unknown key(s) ['seeds']"),
    ({"script": "slurm/no_such.sh"}, "script slurm/no_such.sh not found"),
])
def test_sweep_file_errors_name_the_problem(tmp_path, changes, message):
    with pytest.raises(UserError, match=re.escape(message)):
        jobtools.sweep(write_sweep(tmp_path, **changes))
    assert not (tmp_path / "out" / "tasks.tsv").exists()


def test_check_prints_the_run_dir_or_one_error_line(tmp_path):
    run = [sys.executable, str(ROOT / "slurm/jobtools.py"), "check"]
    ok = subprocess.run([*run, CONFIG, f"run.dir={tmp_path}/r"], capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, f"{tmp_path}/r\n")
    bad = subprocess.run([*run, CONFIG, "train.epoch=3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fusion-dist: error: command line: unknown config key "
                                                         "'train.epoch'") and len(bad.stderr.splitlines()) == 1


def test_job_scripts_know_the_trainers_preemption_exit_code():
    from fusion_dist.train.trainer import PREEMPTED_EXIT

    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT} " in (ROOT / "slurm/_common.sh").read_text()


@pytest.mark.parametrize("hostfile, env, message", [
    ("localhost slots=1\nno-such-host.invalid slots=1\n", {},
     "line 2: unknown host 'no-such-host.invalid' (it does not resolve on"),
    ("# two GPUs\nlocalhost 2\n", {}, "line 2: expected 'HOSTNAME slots=N', got 'localhost 2'"),
    ("localhost slots=1\n", {"FD_NODE_RANK": "1"}, "has 1 host(s), so it must be 0..0"),
    ("# nothing\n", {}, "no hosts"),
])
def test_deepspeed_wrapper_refuses_a_bad_hostfile_before_launching(tmp_path, hostfile, env, message):
    path = tmp_path / "hostfile"
    path.write_text(hostfile)
    out = subprocess.run(["bash", str(ROOT / "launch/deepspeed.sh"), str(path), "train", CONFIG],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "fusion-dist launch" not in out.stdout  # no launcher started


def test_shipped_sweep_file_expands(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)  # its paths are relative to the checkout
    spec = yaml.safe_load((ROOT / "slurm/sweeps/mosi_depth.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**spec, "dir": str(tmp_path / "out")}))
    assert "tasks=9\n" in jobtools.sweep(path)
