"""MLflow tracking of training runs: global rank 0 only, and no tracker outage ever loses a run.

Layout in MLflow: one experiment per dataset (``fusion-dist/<dataset>``), a parent run per
configuration (one run directory) and a nested child run per seed. Parent and children carry the same params
(the flattened config plus numeric study axes), so filtering the runs table by a config value keeps the seeds.

Every call is first appended to the run directory's tracking journal and only then sent (``journal.py``),
so

* an unreachable or dying server costs one bounded request, one warning, and nothing else: training
  goes on, the journal keeps growing, the server is probed again every ``tracking.retry_every_s``
  seconds and everything pending is replayed when it answers (and once more at ``end_parent``);
* ``fusion-dist sync-tracking RUN_DIR`` replays whatever is still pending later, creating the runs
  that were started offline; replays are idempotent (runs are found again by a journal tag, metrics
  carry their original step and timestamp, which the SQL store de-duplicates);
* a requeued or resumed job reopens the same parent and child runs (same run directory -> same ids).

Without a tracking URI (config or ``$MLFLOW_TRACKING_URI``) runs go to ``sqlite:///<run_dir>/mlflow.db``
with artifacts under ``<run_dir>/mlruns``; view them with ``mlflow ui --backend-store-uri ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from fusion_dist.config import Config
from fusion_dist.errors import UserError
from fusion_dist.journal import Journal, Replayer, Unavailable
from fusion_dist.rundir import RunDir

# Live metrics are sent in batches: at most this long after they were logged ...
_FLUSH_EVERY_S = 10.0
# ... or as soon as this many metric records are pending.
_FLUSH_RECORDS = 50


def _say(msg: str) -> None:
    print(f"fusion-dist tracking: {msg}", file=sys.stderr, flush=True)


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{RunDir(Path(run_dir).resolve()).mlflow_db}"


def resolve_uri(cfg: Config, run_dir: str | Path) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then the run directory's own sqlite store."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def bound_http_requests(timeout_s: float) -> None:
    """Keep a dead server from stalling training: one retry, short timeout (user settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def param_value(value: Any) -> str:
    """MLflow params are strings of bounded length; lists keep their YAML/JSON look."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def environment_tags() -> dict[str, str]:
    """What the tracker knows by itself: code version, scheduler job, host and library versions."""
    tags = {"fusion_dist.host": socket.gethostname(), "fusion_dist.python": sys.version.split()[0],
            "fusion_dist.mlflow": mlflow.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        tags["fusion_dist.torch"] = torch.__version__
        if torch.cuda.is_available():
            tags["fusion_dist.gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    for var, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_RESTART_COUNT", "slurm.restart_count")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    code_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(code_dir), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            tags["fusion_dist.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git on this machine: the commit is simply not tagged
    return tags


def dataset_input(root: str, manifest: dict) -> dict:
    """A shard root as an MLflow dataset: named after its dataset, the digest is its manifest's sha256 (cut to
    MLflow's 36 characters; the profile has it whole, with each split's rows), the source is the root's URI."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(f"{root.rstrip('/')}/manifest.json")
    sha = hashlib.sha256(fs.cat_file(path)).hexdigest()
    uri = Path(root.removeprefix("file://")).resolve().as_uri() if isinstance(fs, LocalFileSystem) else root
    profile = {"manifest_sha256": sha, **{f"{s}_rows": e["rows"] for s, e in manifest["splits"].items()}}
    return {"name": manifest.get("dataset", "custom"), "digest": sha[:36], "context": "train",
            "source_type": "local" if uri.startswith("file:") else uri.split(":", 1)[0],
            "source": json.dumps({"uri": uri}), "profile": json.dumps(profile)}


class Tracker:
    """The trainer's view of MLflow (see the module docstring); every method is a no-op off rank 0.

    No method ever raises because of the tracking backend: failures are warned about once per outage
    and the calls stay in the journal until they are acknowledged.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, rank: int, dataset: str):
        self.parent_run_id: str | None = None
        self.child_run_id: str | None = None
        self.active = rank == 0 and cfg.tracking.enabled
        if not self.active:
            return
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(cfg, self.run_dir)
        self.embedded = self.uri == default_uri(self.run_dir)
        self.experiment = cfg.tracking.experiment or f"fusion-dist/{dataset}"
        self.run_name = cfg.run.name or self.run_dir.name
        self.timeout_s = cfg.tracking.timeout_s
        self.retry_every_s = cfg.tracking.retry_every_s
        bound_http_requests(cfg.tracking.timeout_s)
        self.journal = Journal(RunDir(self.run_dir).tracking)
        self.journal.open_for_append()
        self.replayer = Replayer(self.journal, self.uri)
        self.journal.save_state(self.replayer.state)  # records the URI, so sync-tracking knows it
        self._current: str | None = None  # journal key of the run that log_* calls go to
        self._parent_open = False
        self._outage: str | None = None  # reason, while the backend is unavailable
        self._next_probe = 0.0
        self._last_flush = time.monotonic()

    # -- the trainer's API -------------------------------------------------------------------------

    def start_parent(self, params: dict, tags: dict, dataset: dict | None = None) -> str | None:
        """``dataset``: the run's data as an MLflow dataset input (``dataset_input``), logged on every run."""
        if not self.active:
            return None
        if self.embedded:
            _say(f"runs are stored in {self.uri}; view them with: {ui_command(self.uri)}")
        artifact_location = RunDir(self.run_dir).mlruns.as_uri() if self.embedded else None
        self._open("parent", None, self.run_name, {**environment_tags(), **tags}, artifact_location)
        self._parent_open = True
        self.params = {k: param_value(v) for k, v in params.items()}
        self._record("params", run="parent", params=self.params)
        self.dataset = dataset
        if dataset:
            self._record("dataset", run="parent", dataset=dataset)
        self.parent_run_id = self.replayer.run_id("parent")
        return self.parent_run_id

    def start_child(self, seed: int, run_id: str | None = None) -> str | None:
        if not self.active:
            return None
        key = f"seed-{seed}"
        parent = "parent" if self._parent_open else None
        self._open(key, parent, f"seed-{seed}", {"fusion_dist.seed": seed, **environment_tags()}, None, run_id)
        if self._parent_open:
            self._record("params", run=key, params={**self.params, "run.seed": str(seed)})
            if self.dataset:
                self._record("dataset", run=key, dataset=self.dataset)
        self.child_run_id = self.replayer.run_id(key) or run_id
        return self.child_run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or not metrics or self._current is None:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._record("metrics", run=self._current, step=int(step), metrics=values, flush=False)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or self._current is None:
            return
        path = Path(path)
        if not path.exists():
            _say(f"warning: artifact {path} does not exist; not logged")
            return
        seq = self.journal.last_seq + 1
        snapshot = self.journal.snapshot(path, seq)
        self._record("artifact", run=self._current, snapshot=snapshot, artifact_path=artifact_path)

    def end_child(self, metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
        if not self.active or self._current in (None, "parent"):
            return
        self._end(metrics, status)
        self._current = "parent" if self._parent_open else None
        self.child_run_id = None

    def end_parent(self, metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
        if not self.active or not self._parent_open:
            return
        self._current = "parent"
        self._end(metrics, status)
        self._current = None
        self._next_probe = 0.0  # last chance to deliver: probe now, whatever the schedule
        self._flush(force=True)
        pending = self.journal.last_seq - self.replayer.acked
        if pending:
            _say(f"{pending} tracking records are still not on {self.uri}; they are kept in "
                 f"{self.journal.path}; send them later with: fusion-dist sync-tracking {self.run_dir}")

    def fail(self, status: str = "FAILED") -> None:
        """A run that died after setup: its open runs end with ``status`` (journal first, then the server); the
        resume reopens them as RUNNING."""
        if not self.active:
            return
        if self._current not in (None, "parent"):
            self.end_child(status=status)
        self.end_parent(status=status)

    # -- internals -----------------------------------------------------------------------------------

    def _open(self, key: str, parent: str | None, name: str, tags: dict, artifact_location: str | None,
              run_id: str | None = None) -> None:
        self._record("open", run=key, parent=parent, name=name, experiment=self.experiment,
                              tags={k: str(v) for k, v in tags.items()}, artifact_location=artifact_location,
                              run_id=run_id)
        self._current = key

    def _end(self, metrics: dict[str, float] | None, status: str) -> None:
        if metrics:
            self._record("metrics", run=self._current, step=0, metrics={k: float(v) for k, v in metrics.items()})
        self._record("end", run=self._current, status=status)

    def _record(self, op: str, flush: bool = True, **fields: Any) -> dict:
        record = self.journal.append(op, **fields)
        self._flush(force=flush)
        return record

    def _flush(self, force: bool) -> None:
        now = time.monotonic()
        if self._outage is not None:
            if now < self._next_probe:
                return
            self._next_probe = now + self.retry_every_s
            if not self.replayer.reachable(self.timeout_s):
                return
        elif not force:
            pending = self.journal.last_seq - self.replayer.acked
            if pending < _FLUSH_RECORDS and now - self._last_flush < _FLUSH_EVERY_S:
                return
        self._last_flush = now
        try:
            sent, refused = self.replayer.replay()
        except Unavailable as exc:
            if self._outage is None:
                self._outage = str(exc)
                self._next_probe = time.monotonic() + self.retry_every_s
                _say(f"warning: MLflow at {self.uri} is unavailable ({exc}). Training continues; every "
                     f"tracking call is kept in {self.journal.path} and replayed when the server answers "
                     f"(checked every {self.retry_every_s:g}s), at the end of the run, or with: "
                     f"fusion-dist sync-tracking {self.run_dir}")
            return
        if refused:
            _say(f"warning: MLflow refused {len(refused)} tracking record(s), first: {refused[0]}; "
                 f"they stay in {self.journal.path}")
        if self._outage is not None:
            self._outage = None
            _say(f"MLflow at {self.uri} is back; replayed {sent} pending tracking records")


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[str, int, dict[str, str]]:
    """Replay a run directory's pending tracking records; returns (uri, records sent, key -> run id)."""
    run_dir = Path(run_dir)
    journal = Journal(RunDir(run_dir).tracking)
    if not journal.exists():
        raise UserError(f"{journal.path}: no tracking journal (is {run_dir} a run directory?)")
    state = journal.state()
    if uri is None:
        targets = list(state["targets"])
        if len(targets) != 1:
            raise UserError(f"{journal.state_path}: {len(targets)} tracking URIs recorded ({', '.join(targets)}); "
                            "choose one with --uri")
        uri = targets[0]
    bound_http_requests(5.0)
    replayer = Replayer(journal, uri)
    try:
        sent, refused = replayer.replay()
    except Unavailable as exc:
        raise UserError(f"{uri}: tracking server unavailable ({exc}); nothing was lost, run again later") from exc
    for line in refused:
        _say(f"warning: MLflow refused {line}")
    return uri, sent, dict(replayer.target["runs"])


def main_sync(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fusion-dist sync-tracking",
                                     description="Send a run directory's pending MLflow records (idempotent).")
    parser.add_argument("run_dir")
    parser.add_argument("--uri", help="tracking URI (default: the one the run used)")
    args = parser.parse_args(argv)
    uri, sent, runs = sync(args.run_dir, args.uri)
    print(f"synced {sent} records to {uri}")
    for key, run_id in runs.items():
        print(f"  {key}: {run_id}")
    return 0
