"""Checks the Slurm scripts run before they queue or launch anything.

    python slurm/jobtools.py check [--world-size N] CONFIG [key=value ...]
        Loads the config the way ``fusion-dist train`` will and, given the number of ranks the job runs
        on, checks its batch geometry for it; prints ``run.dir``. A bad config, override or geometry
        prints one line naming the file and key, exit 2.
    python slurm/jobtools.py world SCRIPT [sbatch options ...]
        The number of ranks SCRIPT gets from ``sbatch [options] SCRIPT``: nodes x ranks per node, from
        the options given, else the script's ``#SBATCH`` lines (ranks per node: $FD_PROCS_PER_NODE, else
        the GPUs per node, else 1).
    python slurm/jobtools.py sweep SWEEP.yaml [sbatch options ...]
        Expands a sweep file into one line of overrides per array task (``<dir>/tasks.tsv``, tab-separated),
        checks every task's config (for the ranks its job script gets with those options), creates the MLflow experiment, and prints shell assignments
        (``tasks= dir= script= config= experiment= uri= name=``) for slurm/sweep.sh to ``eval``.

Sweep and study files: ``fusion_dist/study.py``.

With ``$MLFLOW_TRACKING_URI`` set, the tasks and the report use that server instead of ``<dir>/mlflow.db``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from fusion_dist.config import batch_geometry, load_config
from fusion_dist import study
from fusion_dist.errors import UserError


def check(config: str, overrides: list[str], world_size: int | None = None) -> str:
    cfg = load_config(config, overrides)
    if world_size is not None:
        batch_geometry(cfg.train, world_size)
    return cfg.run.dir


def _sbatch_options(args: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` / ``-N n`` options as {name: value} (later ones win)."""
    short = {"-N": "nodes", "-G": "gpus", "-n": "ntasks"}
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif arg in short or (arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("-")):
            name, value = short.get(arg, arg[2:]), args[i + 1] if i + 1 < len(args) else ""
            i += 1
        elif arg[:2] in short and len(arg) > 2:
            name, value = short[arg[:2]], arg[2:]
        else:
            name, value = arg.lstrip("-"), ""
        out[name] = value
        i += 1
    return out


def _count(value: str, what: str, script: Path) -> int:
    """``8``, ``a100:8`` or ``gpu:a100:8`` -> 8; a range ``2-4`` is refused (the world size must be known)."""
    text = value.rsplit(":", 1)[-1]
    if not text.isdigit():
        raise UserError(f"{script}: cannot read {what} '{value}' as a number of ranks (a range cannot be checked)")
    return int(text)


def world_size(script: Path, sbatch_args: list[str]) -> int:
    if not script.is_file():
        raise UserError(f"{script}: job script not found")
    headers = [ln.split(None, 1)[1].split("#", 1)[0].split() for ln in script.read_text().splitlines()
               if ln.startswith("#SBATCH ")]
    opts = _sbatch_options([a for h in headers for a in h] + list(sbatch_args))
    nodes = _count(opts.get("nodes", "1"), "--nodes", script)
    per_node = os.environ.get("FD_PROCS_PER_NODE")
    if per_node:
        return nodes * _count(per_node, "FD_PROCS_PER_NODE", script)
    gpus = 0
    if "gpus-per-node" in opts:
        gpus = _count(opts["gpus-per-node"], "--gpus-per-node", script)
    elif opts.get("gres", "").startswith("gpu"):
        gpus = _count(opts["gres"], "--gres", script)
    elif "gpus" in opts:
        gpus = -(-_count(opts["gpus"], "--gpus", script) // nodes)
    return nodes * max(gpus, 1)


def sweep(path: Path, sbatch_args: list[str] = ()) -> str:
    spec = study.read(path)
    out_dir = Path(spec["dir"]).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir / 'mlflow.db'}"
    common = [str(o) for o in spec.get("overrides", [])] + [f"tracking.uri={uri}", f"tracking.experiment={spec['experiment']}"]
    world = world_size(Path(spec["script"]), list(sbatch_args))
    tasks = []
    for i, planned in enumerate(study.tasks(spec)):
        task = common + planned.overrides() + [f"run.dir={out_dir / f'task{i}'}"]
        try:
            check(spec["config"], task, world)
        except UserError as exc:
            raise UserError(f"{path}: task {i}: {exc}") from exc
        tasks.append(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tasks.tsv").write_text("".join("\t".join(t) + "\n" for t in tasks))
    _create_experiment(uri, spec["experiment"], out_dir)
    for i, (task, planned) in enumerate(zip(tasks, study.tasks(spec))):
        label = f"[{planned.label}] " if planned.label else ""
        print(f"task {i}: {label}" + " ".join(task[len(common):-1]), file=sys.stderr)
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
    if len(argv) >= 4 and argv[:2] == ["check", "--world-size"]:
        if not argv[2].isdigit() or int(argv[2]) < 1:
            raise UserError(f"--world-size: '{argv[2]}' is not a positive number of ranks")
        print(check(argv[3], argv[4:], int(argv[2])))
    elif len(argv) >= 2 and argv[0] == "check":
        print(check(argv[1], argv[2:]))
    elif len(argv) >= 2 and argv[0] == "world":
        print(world_size(Path(argv[1]), argv[2:]))
    elif len(argv) >= 2 and argv[0] == "sweep":
        print(sweep(Path(argv[1]), argv[2:]))
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
