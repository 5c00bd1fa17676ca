"""The Tracker against a real ``mlflow server`` (sqlite backend, proxied artifacts) on 127.0.0.1.

One server per module; each test uses its own experiment. The outage test hangs the server (SIGSTOP),
lets it recover, kills it, restarts it on the same backend and syncs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fusion_dist.cli import main as cli
from fusion_dist.config import to_flat_dict
from fusion_dist.tracking import Tracker, dataset_input
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)
from test_tracking import make_cfg, run_two_seeds, runs_of

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_global_tracking_uri():
    """``mlflow.set_tracking_uri`` (here and in ``register``) also sets ``$MLFLOW_TRACKING_URI``, which later tests'
    trackers would read: a dead server's URI once its fixture stopped it."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_parent_child_params_metrics_artifacts_and_only_rank0_writes(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, f"tracking.uri={mlflow_server.uri}", "tracking.experiment=integration",
                   "run.name=nf8", "run.seeds=[0,1]")
    tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    tracker.start_parent(to_flat_dict(cfg), {"family": "deepmlf", "zero_stage": "2"})
    children = {}
    for seed in (0, 1):
        children[seed] = tracker.start_child(seed)
        for step in range(25):
            tracker.log_metrics({"loss/task": 1.0 / (step + 1), "gate/mm1.attn": 0.5}, step)
        (tmp_path / f"pred-{seed}.csv").write_text("id,prediction,label\na,0.1,0.2\n")
        tracker.log_artifact(tmp_path / f"pred-{seed}.csv", "predictions")
        tracker.end_child({"test/MAE": 0.5 + seed})
    tracker.end_parent({"test/MAE_mean": 1.0, "test/MAE_std": 0.5})

    # rank 1 of the same job, in its own process, makes every call and must write nothing anywhere
    rank1_dir = tmp_path / "rank1"
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_tracking import make_cfg, run_two_seeds\n"
        "from fusion_dist.tracking import Tracker\n"
        f"cfg = make_cfg({str(rank1_dir)!r}, 'tracking.uri={mlflow_server.uri}', 'tracking.experiment=integration')\n"
        f"assert run_two_seeds(Tracker(cfg, {str(rank1_dir)!r}, rank=1, dataset='mosi'), cfg) == [None, None]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=os.getcwd())
    assert not rank1_dir.exists()

    client = MlflowClient(mlflow_server.uri)
    runs = runs_of(client, "integration")
    assert sorted(runs) == ["nf8", "seed-0", "seed-1"]  # one parent, one child per seed, nothing from rank 1
    parent = runs["nf8"]
    assert parent.info.run_id == tracker.parent_run_id
    assert parent.data.metrics == {"test/MAE_mean": 1.0, "test/MAE_std": 0.5}
    assert parent.data.params["run.seeds"] == "[0, 1]" and parent.data.tags["zero_stage"] == "2"
    for seed, run_id in children.items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.metrics["test/MAE"] == 0.5 + seed
        history = client.get_metric_history(run_id, "loss/task")
        assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(25)]
        assert [a.path for a in client.list_artifacts(run_id, "predictions")] == [f"predictions/pred-{seed}.csv"]


def test_hung_then_dead_server_loses_nothing(mlflow_server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, f"tracking.uri={mlflow_server.uri}", "tracking.experiment=outage",
                   "tracking.timeout_s=2", "tracking.retry_every_s=1")
    tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    tracker.start_parent(to_flat_dict(cfg), {})
    child = tracker.start_child(0)
    flush_marker = tmp_path / "marker.txt"
    flush_marker.write_text("x")

    def phase(steps):
        """Log steps, then an artifact (which sends at once); returns how long the calls took."""
        started = time.monotonic()
        for step in steps:
            tracker.log_metrics({"loss/task": step / 10}, step)
        tracker.log_artifact(flush_marker, f"phase-{steps.start}")
        return time.monotonic() - started

    phase(range(0, 60))
    assert "unavailable" not in capsys.readouterr().err

    mlflow_server.pause()
    try:
        assert phase(range(60, 120)) < 20  # one bounded request, then only journaling
    finally:
        mlflow_server.resume()
    err = capsys.readouterr().err
    journal = run_dir.resolve() / "tracking" / "journal.jsonl"
    assert err.count("is unavailable") == 1 and str(journal) in err

    time.sleep(1.5)  # past retry_every_s: the next call probes, finds the server and replays
    phase(range(120, 180))
    assert "is back; replayed" in capsys.readouterr().err
    assert len(MlflowClient(mlflow_server.uri).get_metric_history(child, "loss/task")) == 180

    mlflow_server.kill()
    started = time.monotonic()
    phase(range(180, 240))
    tracker.end_child({"test/MAE": 0.4})
    tracker.end_parent()
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert "is unavailable" in err and "still not on" in err and f"sync-tracking {run_dir.resolve()}" in err

    mlflow_server.start()
    assert cli(["sync-tracking", str(run_dir)]) == 0
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(child, "loss/task")
    assert [m.step for m in history] == list(range(240))
    assert client.get_run(child).info.status == "FINISHED"
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"
    assert len(client.list_artifacts(child)) == 4


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is unavailable to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900)
    return shutil.which("chromium")


def _page_text(chromium: str, url: str, profile) -> str:
    """What a user sees: the DOM after MLflow's JS app has rendered, without tags."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=20000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_mlflow_ui_shows_experiment_parent_and_children(mlflow_server, tmp_path):
    chromium = _chromium()
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, f"tracking.uri={mlflow_server.uri}", "tracking.experiment=fusion-dist/ui",
                   "run.name=deepmlf-nf8-ui")
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"dataset": "mosi", "splits": {"train": {"rows": 3}, "valid": {"rows": 1}, "test": {"rows": 1}}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    tracker.start_parent(to_flat_dict(cfg), {"family": "deepmlf"}, dataset_input(str(shards), manifest))
    for seed in (0, 1):
        tracker.start_child(seed)
        tracker.end_child({"test/MAE": 0.5 + seed})
    tracker.end_parent({"test/MAE_mean": 1.0, "test/MAE_std": 0.5})
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name("fusion-dist/ui").experiment_id

    runs_page = _page_text(chromium, f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs", tmp_path / "p1")
    assert "fusion-dist/ui" in runs_page and "deepmlf-nf8-ui" in runs_page and "mosi" in runs_page  # the dataset
    ids = [r.info.run_id for r in client.search_runs([experiment_id])]
    query = f'runs={json.dumps(ids)}&experiments={json.dumps([experiment_id])}'.replace(" ", "")
    compare = _page_text(chromium, f"{mlflow_server.uri}/#/compare-runs?{query}", tmp_path / "p3")
    assert "Parameters" in compare and "model.n_fusion" in compare and "run.seed" in compare
    assert "test/MAE_std" in compare and "test/MAE_mean" in compare and "seed-0" in compare
    parent_page = _page_text(chromium, f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/"
                                       f"{tracker.parent_run_id}", tmp_path / "p2")
    children = re.search(r"Child runs (seed-\d) , (seed-\d)", parent_page)
    assert children and sorted(children.groups()) == ["seed-0", "seed-1"]
    assert "model.mm_layers [ 1, 3 ]" in parent_page


def test_compare_tabulates_a_sweep_and_logs_its_plot(mlflow_server, tmp_path, capsys, monkeypatch):
    for n_fusion, maes in ((4, (0.9, 0.8)), (8, (0.7, 0.6)), (16, (0.65, 0.75))):
        run_dir = tmp_path / f"nf{n_fusion}"
        cfg = make_cfg(run_dir, f"tracking.uri={mlflow_server.uri}", "tracking.experiment=sweep",
                       f"model.n_fusion={n_fusion}", f"run.name=nf{n_fusion}")
        tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
        tracker.start_parent(to_flat_dict(cfg), {})
        for seed, mae in enumerate(maes):
            tracker.start_child(seed)
            tracker.log_metrics({"loss/task": 1.0}, 0)
            tracker.end_child({"test/MAE": mae, "test/Corr": 0.5})
        tracker.end_parent()
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)

    assert cli(["compare", "sweep", "--uri", mlflow_server.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "model.n_fusion", "test/Corr", "test/MAE"]
    assert lines[3].split()[:2] == ["nf8", "8"] and "0.6500 ± 0.0707 (n=2)" in lines[3]
    assert (tmp_path / "compare-sweep.png").stat().st_size > 1000
    client = MlflowClient(mlflow_server.uri)
    report = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                "tags.`fusion_dist.report` = 'compare'")
    assert len(report) == 1
    assert sorted(a.path for a in client.list_artifacts(report[0].info.run_id, "compare")) == [
        "compare/compare-sweep.png", "compare/compare-sweep.txt"]

    assert cli(["compare", "no-such-experiment", "--uri", mlflow_server.uri]) == 2
    err = capsys.readouterr().err
    assert "fusion-dist compare: error: experiment 'no-such-experiment' not found" in err and "sweep" in err


def _wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def test_two_rank_training_is_tracked_registered_and_served_like_predict(mlflow_server, tmp_path, capsys):
    import numpy as np
    import pandas as pd
    import mlflow

    from fusion_dist.data import ShardDataset

    pytest.importorskip("fusion_dist.train.commands", reason="needs the trainer (fusion-dist train / export / predict)")
    backbone, shards, run_dir = tmp_path / "backbone", tmp_path / "shards", tmp_path / "run"
    assert cli(["make-backbone", "--arch", "gpt2", "--preset", "tiny", "--out", str(backbone)]) == 0
    assert cli(["synth", "--dataset", "mosi", "--out", str(tmp_path / "mosi.pkl"), "--samples", "48"]) == 0
    assert cli(["prepare", str(tmp_path / "mosi.pkl"), str(shards)]) == 0
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(__import__("mlflow_server").free_port()), "-m", "fusion_dist.cli", "train",
             "configs/test/deepmlf_tiny_gpt2.yaml", f"model.backbone={backbone}", f"data.root={shards}",
             f"run.dir={run_dir}", "run.seeds=[0,1]", "train.epochs=1", f"tracking.uri={mlflow_server.uri}",
             "tracking.experiment=trained"]
    trained = subprocess.run(train, check=True, timeout=300, capture_output=True, text=True)
    assert "Loading weights" not in trained.stdout + trained.stderr  # transformers' bars stay out of the log

    client = MlflowClient(mlflow_server.uri)
    runs = runs_of(client, "trained")
    assert sorted(runs) == ["run", "seed-0", "seed-1"]  # rank 1 created nothing
    parent = runs["run"]
    assert parent.data.tags["world_size"] == "2" and parent.data.params["run.seeds"] == "[0, 1]"
    assert "test/MAE_mean" in parent.data.metrics
    assert "metrics.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # comparable in MLflow itself: std beside mean, the seeds' params, each seed's selected checkpoint
    assert parent.data.metrics["n_seeds"] == 2 and "test/MAE_std" in parent.data.metrics
    assert parent.data.params["model.n_mm_layers"] == "2" and parent.data.params["model.first_mm_layer"] == "1"
    sha = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    for run in runs.values():  # the shard root, as an MLflow dataset input of every run
        (logged,) = run.inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("mosi", sha[:36])
        assert json.loads(logged.dataset.source) == {"uri": shards.resolve().as_uri()}
        assert json.loads(logged.dataset.profile)["manifest_sha256"] == sha
        assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "train")]
    for seed in (0, 1):
        child = runs[f"seed-{seed}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and "test/MAE" in child.data.metrics
        assert [m.step for m in client.get_metric_history(child.info.run_id, "valid/MAE")]
        assert child.data.params == {**parent.data.params, "run.seed": str(seed)}
        result = json.loads((run_dir / f"checkpoints/seed{seed}/result.json").read_text())
        assert child.data.metrics["valid/best_MAE"] == pytest.approx(result["valid"]["MAE"])
        assert child.data.metrics["best_epoch"] == 1  # train.epochs=1
        assert child.data.metrics["train/tokens_per_s"] > 0
        system = {k.split("/")[1] for k in child.data.metrics if k.endswith("/system_memory_usage_megabytes")}
        assert system == {socket.gethostname()}  # one node: its local rank 0's numbers, once

    assert cli(["register", str(run_dir), "--name", "bad/name"]) == 2
    assert "invalid registry name 'bad/name'" in capsys.readouterr().err
    assert cli(["register", str(run_dir), "--name", "tiny-deepmlf", "--bundle-backbone"]) == 0
    out = capsys.readouterr().out
    assert "@champion" in out and f"bundling the backbone {backbone.resolve()}" in out
    assert client.get_model_version_by_alias("tiny-deepmlf", "champion").version == "1"

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    # the model carries its backbone: it loads after the training-time backbone moved, from another directory
    moved = backbone.rename(tmp_path / "backbone-moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        served = mlflow.pyfunc.load_model("models:/tiny-deepmlf@champion")
        given = mlflow.pyfunc.load_model("models:/tiny-deepmlf@champion", model_config={"backbone": str(moved)})
    finally:
        os.chdir(cwd)
    assert served.unwrap_python_model().model.cfg.backbone.endswith("export/backbone")
    assert given.unwrap_python_model().model.cfg.backbone == str(moved)
    test = ShardDataset(str(shards), "test")
    rows = [test[i] for i in range(len(test))]
    frame = pd.DataFrame({"id": [r["id"] for r in rows], "text": [r["raw_text"] for r in rows],
                          "audio": [r["audio"].tolist() for r in rows], "vision": [r["vision"].tolist() for r in rows]})
    got = served.predict(frame)
    pd.testing.assert_frame_equal(given.predict(frame), got)
    assert cli(["predict", str(run_dir / "export"), str(shards), "--out", str(tmp_path / "pred.csv"),
                "--backbone", str(moved)]) == 0
    want = pd.read_csv(tmp_path / "pred.csv", dtype={"id": str})
    assert list(got["id"]) == list(want["id"])
    np.testing.assert_allclose(got["prediction"], want["prediction"], atol=1e-6, rtol=0)

    # served over REST from another directory, the run directory moved away: the same predictions
    run_dir.rename(tmp_path / "run-moved")
    port = __import__("mlflow_server").free_port()
    serve = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-deepmlf@champion",
                              "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], cwd=elsewhere,
                             env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,  # serve execs uvicorn
                                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        import requests

        _wait_until_up(serve, f"http://127.0.0.1:{port}/ping", timeout_s=180)
        body = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert answer.ok, answer.text
        rows = answer.json()["predictions"]
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    assert [r["id"] for r in rows] == list(want["id"])
    np.testing.assert_allclose([r["prediction"] for r in rows], want["prediction"], atol=1e-6, rtol=0)
