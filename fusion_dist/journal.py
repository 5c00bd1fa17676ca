"""The tracking journal of a run directory and its replay to an MLflow tracking URI.

Every tracking call is first appended to ``<run_dir>/tracking/journal.jsonl`` and only then sent; what each
tracking URI acknowledged is kept in ``<run_dir>/tracking/state.json`` (the last acknowledged record and the
MLflow id of each run). ``Replayer`` sends what is pending, in order, idempotently: runs are found again by a
journal tag, metrics carry their original step and timestamp.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from fusion_dist.rundir import atomic_write

JOURNAL_TAG = "fusion_dist.journal_key"
# Error codes of requests the server understood and refused: sending them again cannot help, so the
# record is skipped (it stays in the journal). Anything else means "server not available right now".
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


class Unavailable(Exception):
    """The tracking backend did not answer; the records stay pending."""


class Journal:
    """Append-only record of every tracking call of one run directory, plus what each URI acknowledged."""

    def __init__(self, tracking_dir: str | Path):
        self.dir = Path(tracking_dir)
        self.path = self.dir / "journal.jsonl"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def open_for_append(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last_seq = len(self.records())
        # A crash mid-write leaves a partial last line; start on a fresh line so it stays isolated.
        if self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            with self.path.open("a") as f:
                f.write("\n")

    def append(self, op: str, **fields: Any) -> dict:
        self.last_seq += 1
        record = {"seq": self.last_seq, "t": int(time.time() * 1000), "op": op, **fields}
        # Closing hands the line to the OS, so a crashed process loses nothing; no fsync per step,
        # which costs milliseconds on shared cluster filesystems.
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def records(self, after: int = 0) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn tail of an interrupted write
            if record["seq"] > after:
                out.append(record)
        return out

    def state(self) -> dict:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"journal_id": uuid.uuid4().hex, "targets": {}}

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=1))

    def snapshot(self, path: Path, seq: int) -> str:
        """Copy an artifact as it is now, so a later replay sends what was logged; returns a relative path."""
        rel = Path("artifacts") / str(seq) / path.name
        dest = self.dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)
        return str(rel)


class Replayer:
    """Sends a journal's pending records to one tracking URI, in order, remembering what landed."""

    def __init__(self, journal: Journal, uri: str):
        self.journal = journal
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.state = journal.state()
        self.target = self.state["targets"].setdefault(uri, {"acked": 0, "runs": {}, "experiments": {}})

    @property
    def acked(self) -> int:
        return self.target["acked"]

    def run_id(self, key: str | None) -> str | None:
        return self.target["runs"].get(key) if key else None

    def reachable(self, timeout_s: float = 5.0) -> bool:
        """Cheap liveness probe for servers; other stores are tried directly by ``replay``."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            return requests.get(self.uri.rstrip("/") + "/health", timeout=timeout_s).ok
        except requests.RequestException:
            return False

    def replay(self) -> tuple[int, list[str]]:
        """Send everything pending; returns (records sent, descriptions of refused records).

        Raises ``Unavailable`` (after saving progress) when the backend stops answering.
        """
        pending = self.journal.records(after=self.acked)
        sent, refused = 0, []
        i = 0
        while i < len(pending):
            group = self._group(pending, i)
            try:
                self._send(group)
            except MlflowException as exc:
                if exc.error_code not in _REFUSED:
                    self.journal.save_state(self.state)
                    raise Unavailable(_short(exc)) from exc
                refused.append(f"record {group[0]['seq']} ({group[0]['op']}): {_short(exc)}")
            except Exception as exc:  # connection-level failures surface as many types
                self.journal.save_state(self.state)
                raise Unavailable(_short(exc)) from exc
            self.target["acked"] = group[-1]["seq"]
            sent += len(group)
            i += len(group)
        self.journal.save_state(self.state)
        return sent, refused

    @staticmethod
    def _group(records: list[dict], i: int) -> list[dict]:
        """Consecutive metric records of one run go out as one batch request."""
        first = records[i]
        if first["op"] != "metrics":
            return [first]
        group, count = [first], len(first["metrics"])
        for record in records[i + 1:]:
            if record["op"] != "metrics" or record["run"] != first["run"]:
                break
            if count + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
                break
            group.append(record)
            count += len(record["metrics"])
        return group

    def _send(self, group: list[dict]) -> None:
        first = group[0]
        op = first["op"]
        if op == "open":
            self._open(first)
            return
        run_id = self.run_id(first["run"])
        if run_id is None:
            raise MlflowException(f"run '{first['run']}' was never opened", error_code="INVALID_STATE")
        if op == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, float(v), r["t"], r["step"]) for r in group for k, v in r["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif op == "params":
            self._log_params(run_id, first["params"])
        elif op == "tags":
            self._set_tags(run_id, first["tags"])
        elif op == "artifact":
            local = self.journal.dir / first["snapshot"]
            if local.is_dir():
                self.client.log_artifacts(run_id, str(local), first["artifact_path"])
            else:
                self.client.log_artifact(run_id, str(local), first["artifact_path"])
        elif op == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            d = first["dataset"]
            entity = Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"])
            self.client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", d["context"])])])
        elif op == "end":
            self.client.set_terminated(run_id, first["status"], end_time=first["t"])
        else:
            raise MlflowException(f"unknown journal operation '{op}'", error_code="BAD_REQUEST")

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        if name in self.target["experiments"]:
            return self.target["experiments"][name]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self.client.create_experiment(name, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        self.target["experiments"][name] = experiment_id
        return experiment_id

    def _open(self, record: dict) -> None:
        """Create a run, or reopen the one this key (or the given id) already maps to."""
        key = record["run"]
        journal_key = f"{self.state['journal_id']}/{key}"
        run_id = self.run_id(key) or self._existing(record.get("run_id"))
        if run_id is None:  # created before, but the acknowledgement was lost?
            experiment_id = self._experiment_id(record["experiment"], record.get("artifact_location"))
            found = self.client.search_runs([experiment_id], f"tags.`{JOURNAL_TAG}` = '{journal_key}'",
                                            max_results=1)
            run_id = found[0].info.run_id if found else None
        tags = {**record["tags"], JOURNAL_TAG: journal_key}
        parent_id = self.run_id(record.get("parent"))
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if run_id is None:
            experiment_id = self._experiment_id(record["experiment"], record.get("artifact_location"))
            run = self.client.create_run(experiment_id, start_time=record["t"], run_name=record["name"],
                                         tags={k: _tag_value(v) for k, v in tags.items()})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._set_tags(run_id, tags)
        self.target["runs"][key] = run_id

    def _existing(self, run_id: str | None) -> str | None:
        """A run id handed over by the trainer (checkpoint state), if this server knows it."""
        if run_id is None:
            return None
        try:
            return self.client.get_run(run_id).info.run_id
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params are immutable in MLflow: a resumed run with a changed value records it as a tag."""
        existing = self.client.get_run(run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {f"changed_param.{k}": v for k, v in params.items() if k in existing and existing[k] != v}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in new.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start:start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
        if changed:
            self._set_tags(run_id, changed)

    def _set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[start:start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
