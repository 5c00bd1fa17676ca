"""Checks the Slurm scripts run before they queue or launch anything.

    python slurm/jobtools.py check CONFIG [key=value ...]
        Loads the config the way ``fusion-dist train`` will; prints its ``run.dir``. A bad config or
        override prints one line naming the file and key, exit 2.
    python slurm/jobtools.py sweep SWEEP.yaml
        Expands a sweep file into one line of overrides per array task (``<dir>/tasks.tsv``, tab-separated),
        checks every task's config, creates the MLflow experiment, and prints shell assignments
        (``tasks= dir= script= config= experiment= uri= name=``) for slurm/sweep.sh to ``eval``.

Sweep file (YAML)::

    script: slurm/train_mosi.sh            # job script every task runs (its #SBATCH resources apply)
    config: configs/paper/deepmlf_mosi.yaml
    experiment: mosi-depth                 # MLflow experiment of all tasks and of the report
    dir: runs/sweeps/mosi-depth            # task i trains in <dir>/task<i>; shared store <dir>/mlflow.db
    overrides: ["run.seeds=[0,1,2]"]       # optional, applied to every task
    grid:                                  # one task per combination, first key varying slowest
      model.mm_layers: [[11], [11, 17], [11, 14, 17, 20, 23]]
      model.n_fusion: [4, 8]

With ``$MLFLOW_TRACKING_URI`` set, the tasks and the report use that server instead of ``<dir>/mlflow.db``.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from fusion_dist.config import load_config
from fusion_dist.errors import UserError

SWEEP_KEYS = {"script", "config", "experiment", "dir", "grid", "overrides"}


def check(config: str, overrides: list[str]) -> str:
    return load_config(config, overrides).run.dir


def _value(v) -> str:
    """An override value as YAML flow text (``[1,3]``, ``0.5``, ``abc``), which OmegaConf parses back."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def _read_sweep(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: sweep file not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(sorted(SWEEP_KEYS))}")
    unknown = set(spec) - SWEEP_KEYS
    missing = SWEEP_KEYS - {"overrides"} - set(spec)
    if unknown or missing:
        problems = [f"{what} key(s) {sorted(keys)}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys]
        raise UserError(f"{path}: {', '.join(problems)}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    grid = spec["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: 'grid' must map config keys to non-empty lists of values")
    if not isinstance(spec.get("overrides", []), list):
        raise UserError(f"{path}: 'overrides' must be a list of key=value strings")
    if not Path(spec["script"]).is_file():
        raise UserError(f"{path}: script {spec['script']} not found")
    return spec


def sweep(path: Path) -> str:
    spec = _read_sweep(path)
    out_dir = Path(spec["dir"]).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir / 'mlflow.db'}"
    common = [str(o) for o in spec.get("overrides", [])] + [f"tracking.uri={uri}", f"tracking.experiment={spec['experiment']}"]
    keys = list(spec["grid"])
    tasks = []
    for i, combo in enumerate(itertools.product(*spec["grid"].values())):
        task = common + [f"{k}={_value(v)}" for k, v in zip(keys, combo)] + [f"run.dir={out_dir / f'task{i}'}"]
        try:
            check(spec["config"], task)
        except UserError as exc:
            raise UserError(f"{path}: task {i}: {exc}") from exc
        tasks.append(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tasks.tsv").write_text("".join("\t".join(t) + "\n" for t in tasks))
    _create_experiment(uri, spec["experiment"], out_dir)
    for i, task in enumerate(tasks):
        print(f"task {i}: " + " ".join(task[len(common):-1]), file=sys.stderr)
    values = {"tasks": len(tasks), "dir": out_dir, "script": spec["script"], "config": spec["config"],
              "experiment": spec["experiment"], "uri": uri, "name": Path(spec["dir"]).name}
    return "\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items())


def _create_experiment(uri: str, name: str, out_dir: Path) -> None:
    """Made once here, so concurrent tasks neither race to create it nor to initialise a fresh sqlite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        local = uri.startswith("sqlite:")
        client.create_experiment(name, artifact_location=(out_dir / "mlruns").as_uri() if local else None)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        print(check(argv[1], argv[2:]))
    elif len(argv) == 2 and argv[0] == "sweep":
        print(sweep(Path(argv[1])))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as exc:
        print(f"fusion-dist: error: {exc}", file=sys.stderr)
        sys.exit(2)
