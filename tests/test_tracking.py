"""Tracker on the embedded sqlite store and with no server at all: journal, replay, resume, rank gating."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from fusion_dist.cli import main as cli
from fusion_dist.config import load_config, to_flat_dict
from mlflow_server import free_port
from fusion_dist.journal import Journal
from fusion_dist.tracking import Tracker, param_value, sync


def make_cfg(run_dir, *overrides):
    return load_config(None, ["data.root=/data", "model.backbone=/backbone", f"run.dir={run_dir}",
                              "model.mm_layers=[1,3]", *overrides])


def run_two_seeds(tracker, cfg, steps=range(5), seeds=(0, 1)):
    tracker.start_parent(to_flat_dict(cfg), {"family": "deepmlf", "world_size": "1"})
    child_ids = []
    for seed in seeds:
        child_ids.append(tracker.start_child(seed))
        for step in steps:
            tracker.log_metrics({"loss/task": 1.0 / (step + 1), "lr": 1e-4 * step}, step)
        tracker.end_child({"test/MAE": 0.5 + seed})
    tracker.end_parent({"test/MAE_mean": 1.0})
    return child_ids


def runs_of(client, experiment="fusion-dist/mosi"):
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_embedded_store_holds_parent_children_params_metrics_artifacts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir)
    tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    tracker.start_parent(to_flat_dict(cfg), {"family": "deepmlf"})
    child = tracker.start_child(0)
    for step in range(3):
        tracker.log_metrics({"loss/task": float(step)}, step)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("changed after logging\n")
    tracker.end_child({"test/MAE": 0.7})
    tracker.end_parent()

    uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in capsys.readouterr().err
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fusion-dist/mosi")
    assert exp.artifact_location == (run_dir.resolve() / "mlruns").as_uri()
    runs = runs_of(client)
    parent, seed0 = runs["run"], runs["seed-0"]
    assert parent.info.run_id == tracker.parent_run_id and seed0.info.run_id == child
    assert seed0.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["model.mm_layers"] == "[1, 3]"
    assert parent.data.params["model.n_fusion"] == "8"
    assert parent.data.tags["family"] == "deepmlf" and "mlflow.source.git.commit" in parent.data.tags
    assert [m.value for m in client.get_metric_history(child, "loss/task")] == [0.0, 1.0, 2.0]
    assert seed0.data.metrics["test/MAE"] == 0.7
    assert {parent.info.status, seed0.info.status} == {"FINISHED"}
    local = client.download_artifacts(child, "config.yaml", str(tmp_path / "dl"))
    assert open(local).read() == "a: 1\n"  # what was logged, not what the file became later


def test_other_ranks_and_disabled_tracking_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir)
    for tracker in (Tracker(cfg, run_dir, rank=1, dataset="mosi"),
                    Tracker(make_cfg(run_dir, "tracking.enabled=false"), run_dir, rank=0, dataset="mosi")):
        assert run_two_seeds(tracker, cfg) == [None, None]
        assert tracker.parent_run_id is None
    assert not run_dir.exists()


def test_resume_reopens_the_same_runs(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir)
    first = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    parent = first.start_parent(to_flat_dict(cfg), {})
    child = first.start_child(0)
    first.log_metrics({"loss/task": 1.0}, 0)
    # the job is preempted here; the requeued job passes the child id saved in its checkpoint
    resumed_cfg = make_cfg(run_dir, "train.epochs=20")
    second = Tracker(resumed_cfg, run_dir, rank=0, dataset="mosi")
    assert second.start_parent(to_flat_dict(resumed_cfg), {}) == parent
    assert second.start_child(0, run_id=child) == child
    second.log_metrics({"loss/task": 0.5}, 1)
    second.end_child()
    second.end_parent()
    client = MlflowClient(second.uri)
    runs = runs_of(client)
    assert sorted(runs) == ["run", "seed-0"]
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss/task")] == [(0, 1.0), (1, 0.5)]
    assert runs["run"].data.params["train.epochs"] == "10"
    assert runs["run"].data.tags["changed_param.train.epochs"] == "20"


def test_unreachable_server_at_start_warns_once_keeps_everything_and_syncs_later(tmp_path, capsys):
    run_dir = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = make_cfg(run_dir, f"tracking.uri={dead}", "tracking.timeout_s=1", "tracking.retry_every_s=600")
    started = time.monotonic()
    tracker = Tracker(cfg, run_dir, rank=0, dataset="mosi")
    assert run_two_seeds(tracker, cfg, steps=range(30)) == [None, None]
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    journal = run_dir.resolve() / "tracking" / "journal.jsonl"
    assert err.count(f"MLflow at {dead} is unavailable") == 1
    assert str(journal) in err and f"fusion-dist sync-tracking {run_dir.resolve()}" in err
    assert "still not on" in err

    # later, towards a store that works: runs created offline are created now, ids are remembered
    target = f"sqlite:///{tmp_path / 'central.db'}"
    _, sent, ids = sync(run_dir, uri=target)
    assert sent == len(Journal(run_dir / "tracking").records())
    assert set(ids) == {"parent", "seed-0", "seed-1"}
    client = MlflowClient(target)
    runs = runs_of(client)
    assert {name: r.info.run_id for name, r in runs.items()} == {"run": ids["parent"], "seed-0": ids["seed-0"],
                                                                 "seed-1": ids["seed-1"]}
    history = client.get_metric_history(ids["seed-1"], "loss/task")
    assert [m.step for m in history] == list(range(30))

    # replaying everything again (e.g. the acknowledgement was lost) duplicates nothing
    state_path = run_dir / "tracking" / "state.json"
    state = json.loads(state_path.read_text())
    state["targets"][target] = {"acked": 0, "runs": {}, "experiments": {}}
    state_path.write_text(json.dumps(state))
    sync(run_dir, uri=target)
    assert len(runs_of(client)) == 3
    assert len(client.get_metric_history(ids["seed-1"], "loss/task")) == 30


def test_sync_tracking_command(tmp_path, capsys):
    assert cli(["sync-tracking", str(tmp_path)]) == 2
    assert "no tracking journal" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir)
    run_two_seeds(Tracker(cfg, run_dir, rank=0, dataset="mosi"), cfg)
    assert cli(["sync-tracking", str(run_dir)]) == 0
    assert "synced 0 records" in capsys.readouterr().out


def test_param_values_are_strings_within_mlflow_limits():
    assert param_value([7, 14]) == "[7, 14]"
    assert param_value(None) == "None"
    long = param_value(list(range(5000)))
    assert len(long) == 6000 and long.endswith("...")
