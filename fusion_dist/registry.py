"""The model registry: an export as an MLflow pyfunc model, registered, with ``champion``/``challenger`` aliases.

``fusion-dist register RUN_DIR`` logs the run's export (``RUN_DIR/export`` or ``--export``) as a pyfunc
model under the run's MLflow parent run, registers a new version, and points the alias ``champion`` at
it only if its test metric beats the current champion's (else ``challenger``). Stages are never used.
Loading ``models:/<name>@champion`` gives a model that predicts like ``fusion-dist predict``::

    model = mlflow.pyfunc.load_model("models:/fusion-dist-mosi-deepmlf@champion")
    model.predict(pd.DataFrame({"id": [...], "text": [...], "audio": [frames x Da], "vision": [frames x Dv]}))

The pyfunc holds the export directory (trainable weights + config). The frozen backbone is found by its
fingerprint (``export.locate_backbone``): in the model itself with ``--bundle-backbone`` (a copy of a local
backbone; the demo's model loads anywhere), else at the path recorded at training time, in
``$FUSION_DIST_BACKBONES``, or where ``mlflow.pyfunc.load_model(uri, model_config={"backbone": DIR})`` says.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fusion_dist.config import Config
from fusion_dist.data import feature_dims
from fusion_dist.errors import UserError
from fusion_dist.rundir import RunDir

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
METRIC_TAG, VALUE_TAG = "fusion_dist.test_metric", "fusion_dist.test_metric_value"
COLUMNS = ("id", "text", "audio", "vision")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(f"invalid registry name '{name}': use 1-255 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (MLflow names cannot contain '/' or ':')")
    return name


def default_name(experiment: str, cfg: Config) -> str:
    """``tracking.registry_name``, else ``<experiment>-<family>`` with the slashes replaced."""
    return cfg.tracking.registry_name or f"{experiment}-{cfg.model.family}".replace("/", "-")


def frame_to_samples(frame: pd.DataFrame, dims: dict[str, int]) -> list[dict]:
    """DataFrame rows (id, text, audio/vision as frames x dim nested lists or arrays) -> reader samples."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise MlflowException(f"input is missing column(s) {missing}; expected {list(COLUMNS)}",
                              error_code="INVALID_PARAMETER_VALUE")
    from data_prep.ingest import check_frames

    samples = []
    for n, row in enumerate(frame.itertuples(index=False)):
        where = f"row {n} (id {row.id!r})"
        try:
            if not isinstance(row.text, str):
                raise UserError(f"{where}: column 'text': {row.text!r} is not a string")
            sample = {"id": str(row.id), "raw_text": row.text, "label": float("nan")}
            for mod, dim in dims.items():
                value = getattr(row, mod)
                frames = np.stack([np.asarray(f) for f in value]) if len(value) else np.zeros((0, dim), np.float32)
                sample[mod] = check_frames(frames, f"{where}: column '{mod}'", dim)  # prepare's rules
        except (UserError, ValueError) as exc:
            raise MlflowException(str(exc), error_code="INVALID_PARAMETER_VALUE") from None
        samples.append(sample)
    return samples


class SentimentModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from the backbone + the export artifact; predicts one sentiment score per row."""

    def load_context(self, context) -> None:
        from fusion_dist.predict import collator_for
        from fusion_dist.export import load_export

        backbone = (getattr(context, "model_config", None) or {}).get("backbone")
        self.model, meta, cfg = load_export(context.artifacts["export"], backbone)
        self.dims = feature_dims(meta)
        self.collator = collator_for(self.model, cfg.data.max_text_tokens)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from fusion_dist.predict import predict_module

        ids, preds, _ = predict_module(self.model, frame_to_samples(model_input, self.dims), self.collator, 64)
        return pd.DataFrame({"id": list(ids), "prediction": np.asarray(preds, dtype=np.float64)})


def input_example(dims: dict[str, int]) -> pd.DataFrame:
    """Two rows in the input format (zero features of a few frames), shown in the UI and used for the signature."""
    return pd.DataFrame({
        "id": ["clip-1", "clip-2"],
        "text": ["what a wonderful film", "not my thing at all"],
        "audio": [np.zeros((3, dims["audio"])).tolist(), np.zeros((2, dims["audio"])).tolist()],
        "vision": [np.zeros((3, dims["vision"])).tolist(), np.zeros((2, dims["vision"])).tolist()],
    })


def _code_paths() -> list[str]:
    """The packages the model's code imports (``pyfunc_model.py``): fusion_dist and data_prep (its input checks)."""
    import data_prep
    import fusion_dist

    return [str(Path(m.__file__).parent) for m in (fusion_dist, data_prep)]


def _requirements() -> list[str]:
    """fusion-dist's own runtime dependencies (inferring them would rebuild the model in a subprocess)."""
    reqs = importlib.metadata.requires("fusion-dist") or []
    return [r for r in reqs if "extra ==" not in r]


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in ("mae", "loss", "mse", "error"))


def parent_metric(run, metric: str | None) -> tuple[str, float]:
    """The configuration's test metric on its parent run: ``metric`` if given, else the mean test MAE."""
    metrics = run.data.metrics
    if metric is None:
        candidates = sorted(k for k in metrics if "test" in k.lower() and "mae" in k.lower() and "std" not in k.lower())
        if not candidates:
            raise UserError(f"parent run {run.info.run_id} has no test MAE metric (has: {sorted(metrics)}); "
                            "choose one with --metric")
        metric = candidates[0]
    if metric not in metrics:
        raise UserError(f"parent run {run.info.run_id} has no metric '{metric}' (has: {sorted(metrics)})")
    return metric, metrics[metric]


def promote(client: MlflowClient, name: str, version: str, metric: str, value: float) -> str:
    """``champion`` if this version beats the current champion on ``metric`` (or there is none), else ``challenger``."""
    client.set_model_version_tag(name, version, METRIC_TAG, metric)
    client.set_model_version_tag(name, version, VALUE_TAG, repr(value))
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        champion = None
    best = float(champion.tags[VALUE_TAG]) if champion is not None and VALUE_TAG in champion.tags else None
    if champion is not None and champion.tags.get(METRIC_TAG) not in (None, metric):
        raise UserError(f"model '{name}': the champion (version {champion.version}) was ranked on "
                        f"{champion.tags[METRIC_TAG]}, this one on {metric}; register with --metric "
                        f"{champion.tags[METRIC_TAG]}")
    wins = best is None or (value < best if lower_is_better(metric) else value > best)
    alias = "champion" if wins else "challenger"
    client.set_registered_model_alias(name, alias, version)
    return alias


def bundle(export_dir: Path, staging: Path) -> Path:
    """A copy of ``export_dir`` with its local backbone inside (``backbone/``), under ``staging``."""
    from fusion_dist.export import BUNDLED, META, export_meta, locate_backbone

    ref = export_meta(export_dir)["backbone"]
    if not (ref or {}).get("local"):
        raise UserError(f"--bundle-backbone: {export_dir} uses the hub backbone {(ref or {}).get('name')}, "
                        "which loads by name; bundle only local backbones")
    source = Path(locate_backbone(ref, export_dir, None, f"{export_dir}/{META}"))
    out = staging / "export"
    shutil.copytree(export_dir, out, ignore=shutil.ignore_patterns(BUNDLED))
    shutil.copytree(source, out / BUNDLED)
    size = sum(f.stat().st_size for f in (out / BUNDLED).rglob("*") if f.is_file())
    print(f"bundling the backbone {source} ({size / 2**20:.1f} MiB) into the model")
    return out


def register(run_dir: str | Path, name: str | None = None, export_dir: str | Path | None = None,
             uri: str | None = None, metric: str | None = None, bundle_backbone: bool = False) -> tuple[str, str, str]:
    """Log + register a run's export (with ``bundle_backbone``, and a copy of its backbone); returns (name,
    version, alias)."""
    from fusion_dist.export import load_export
    from fusion_dist.tracking import resolve_uri, sync

    run = RunDir(run_dir)
    run_dir, cfg = run.root, run.read_config()
    if name or cfg.tracking.registry_name:
        check_name(name or cfg.tracking.registry_name)  # fail before any work
    export_dir = Path(export_dir or run.export).resolve()
    uri = uri or resolve_uri(cfg, run_dir)
    _, _, runs = sync(run_dir, uri)  # a parent created offline exists only after this
    if "parent" not in runs:
        raise UserError(f"{run_dir}: no MLflow parent run recorded for {uri}")
    # Loading first proves the artifact works here: a missing backbone or a bad export is a clear error
    # before anything is logged.
    model, meta, _ = load_export(export_dir)
    del model
    dims = feature_dims(meta)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(runs["parent"])
    name = check_name(name or default_name(client.get_experiment(parent.info.experiment_id).name, cfg))
    metric, value = parent_metric(parent, metric)
    example = input_example(dims)
    signature = mlflow.models.infer_signature(
        example, pd.DataFrame({"id": example["id"], "prediction": np.zeros(len(example))}))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as staging, mlflow.start_run(run_id=runs["parent"]):
        artifact = bundle(export_dir, Path(staging)) if bundle_backbone else export_dir
        info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                       code_paths=_code_paths(), artifacts={"export": str(artifact)},
                                       signature=signature, input_example=example,
                                       pip_requirements=_requirements(),
                                       model_config={"backbone": None},  # load_model(..., model_config=) may set it
                                       registered_model_name=name)
    version = str(info.registered_model_version)
    alias = promote(client, name, version, metric, value)
    return name, version, alias


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-dist register",
                                     description="log a run's export as an MLflow pyfunc model, register it, set its alias")
    parser.add_argument("run_dir")
    parser.add_argument("--name", help="registered model name (default: tracking.registry_name or <experiment>-<family>)")
    parser.add_argument("--export", help="export directory (default: RUN_DIR/export)")
    parser.add_argument("--uri", help="tracking URI (default: the one the run used)")
    parser.add_argument("--metric", help="parent-run metric that ranks versions (default: the mean test MAE)")
    parser.add_argument("--bundle-backbone", action="store_true",
                        help="copy the (local) backbone into the model, so it loads on machines without it")
    args = parser.parse_args(argv)
    name, version, alias = register(args.run_dir, args.name, args.export, args.uri, args.metric, args.bundle_backbone)
    print(f"registered {name} version {version} as @{alias}; load it with "
          f"mlflow.pyfunc.load_model('models:/{name}@{alias}')")
    return 0
