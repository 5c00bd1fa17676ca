"""``fusion-dist compare EXPERIMENT``: a sweep at a glance, without opening a notebook.

One row per configuration (parent run): the config keys that differ between them, and mean ± std over
seeds (child runs) of the chosen metrics; with ``--study FILE`` (the sweep's own file) also the paper-style table,
a row per setting and the paper's numbers beside ours. A plot of the first metric against the swept key (number of
MM layers, n_fusion, ...) is saved and logged to the experiment's "compare" report run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from mlflow.tracking import MlflowClient

from fusion_dist.errors import UserError

REPORT_TAG = "fusion_dist.report"
# Keys that always differ between runs and say nothing about the configuration.
_IGNORED = ("run.dir", "run.name", "tracking.")
# Preferred x axes for the plot, in order; "model.mm_layers" is plotted as the number of MM layers.
_PLOT_KEYS = ("model.mm_layers", "model.n_fusion", "model.n_av", "model.lora.r")


def _x_value(key: str, value: str) -> float | None:
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return None
    if key == "model.mm_layers" and isinstance(parsed, list):
        return float(len(parsed))
    return float(parsed) if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else None


def _x_label(key: str) -> str:
    return "number of MM layers" if key == "model.mm_layers" else key


def collect(client: MlflowClient, experiment: str) -> tuple[list, dict[str, list]]:
    """Parent runs (not reports) and their children, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"experiment '{experiment}' not found at {client.tracking_uri} "
                        f"(experiments there: {', '.join(names) or 'none'})")
    runs = client.search_runs([found.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and REPORT_TAG not in r.data.tags]
    children: dict[str, list] = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            children.setdefault(r.data.tags["mlflow.parentRunId"], []).append(r)
    if not parents:
        raise UserError(f"experiment '{experiment}' has no training runs to compare")
    return parents, children


def metric_values(parent, kids: list, metric: str) -> list[float]:
    """Final values over seeds; a configuration tracked without children contributes its own value."""
    values = [k.data.metrics[metric] for k in kids if metric in k.data.metrics]
    if not values and metric in parent.data.metrics:
        values = [parent.data.metrics[metric]]
    return values


def default_metrics(parents: list, children: dict[str, list]) -> list[str]:
    """Test metrics of the seeds (what the paper tables report); else whatever the parents carry."""
    names = {m for p in parents for k in children.get(p.info.run_id, []) for m in k.data.metrics
             if m.lower().startswith("test")}
    return sorted(names) or sorted({m for p in parents for m in p.data.metrics})


def differing_keys(parents: list) -> list[str]:
    keys = sorted({k for p in parents for k in p.data.params if not k.startswith(_IGNORED)})
    return [k for k in keys if len({p.data.params.get(k) for p in parents}) > 1]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f} (n={len(values)})"


def table(parents: list, children: dict[str, list], keys: list[str], metrics: list[str]) -> str:
    header = ["run", *keys, *metrics]
    rows = [[p.info.run_name, *(p.data.params.get(k, "-") for k in keys),
             *(_mean_std(metric_values(p, children.get(p.info.run_id, []), m)) for m in metrics)] for p in parents]
    return _columns(header, rows)


def _columns(header: list, rows: list[list]) -> str:
    """Left-aligned text columns under a header and a rule."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _percent(name: str) -> bool:
    return "acc" in name.lower() or "f1" in name.lower()


def study_table(parents: list, children: dict[str, list], spec: dict) -> str:
    """The paper-style table of a study: a row per task (its setting's label and grid values), a column per MMSA
    test metric, mean ± std over seeds (accuracies and F1 in %, as the paper prints them), and the paper's number
    in brackets where the study file gives one. Task i is the parent run of ``<dir>/task<i>``."""
    from fusion_dist.metrics import MOSI_NAMES, SIMS_NAMES
    from fusion_dist.study import paper_numbers, tasks

    by_name = {p.info.run_name: p for p in parents}
    have = {m for kids in children.values() for k in kids for m in k.data.metrics}
    names = next((ns for ns in (MOSI_NAMES, SIMS_NAMES) if any(f"test/{n}" in have for n in ns)), MOSI_NAMES)
    paper, grid = paper_numbers(spec), list(spec.get("grid", {}))
    rows = []
    for i, task in enumerate(tasks(spec)):
        label = " ".join([task.label or f"task{i}", *(f"{k.rsplit('.', 1)[-1]}={task.values[k]}" for k in grid)])
        p, cells = by_name.get(f"task{i}"), []
        for n in names:
            values = metric_values(p, children.get(p.info.run_id, []), f"test/{n}") if p else []
            scale, digits = (100.0, 2) if _percent(n) else (1.0, 3)  # as the paper prints them
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}" if values else "-"
            if n in paper.get(task.label, {}):
                cell += f" [{paper[task.label][n]}]"
            cells.append(cell)
        rows.append([label, *cells])
    legend = "test metrics, mean ± std over seeds (ddof=1); accuracies and F1 in %; [the paper's number]"
    return f"{legend}\n" + _columns(["setting", *names], rows)


def plot(parents: list, children: dict[str, list], keys: list[str], metric: str, x_key: str | None,
         out: Path) -> Path:
    """Metric (mean ± std over seeds) against the swept key; a bar per run if nothing numeric differs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    if x_key is None:
        x_key = next((k for k in (*_PLOT_KEYS, *keys) if k in keys and all(
            _x_value(k, p.data.params.get(k)) is not None for p in parents)), None)
    points = []
    for p in parents:
        values = metric_values(p, children.get(p.info.run_id, []), metric)
        if values:
            x = _x_value(x_key, p.data.params.get(x_key)) if x_key else None
            points.append((x, p.info.run_name, statistics.fmean(values),
                           statistics.stdev(values) if len(values) > 1 else 0.0))
    if not points:
        raise UserError(f"no run has metric '{metric}' to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    if x_key is not None and all(x is not None for x, *_ in points):
        points.sort()
        ax.errorbar([p[0] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                    marker="o", capsize=4)
        ax.set_xlabel(_x_label(x_key))
    else:
        ax.bar(range(len(points)), [p[2] for p in points], yerr=[p[3] for p in points], capsize=4)
        ax.set_xticks(range(len(points)), [p[1] for p in points], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def log_report(client: MlflowClient, experiment: str, files: list[Path]) -> str:
    """Attach the files to the experiment's single "compare" report run (reused on every call)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], f"tags.`{REPORT_TAG}` = 'compare'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        experiment_id, run_name="compare-report", tags={REPORT_TAG: "compare"}).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), "compare")
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-dist compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", help="MLflow experiment name, e.g. fusion-dist/mosi")
    parser.add_argument("--uri", help="tracking URI (default $MLFLOW_TRACKING_URI), e.g. sqlite:///RUN_DIR/mlflow.db")
    parser.add_argument("--metric", action="append", help="metric to tabulate (repeatable; default: test metrics)")
    parser.add_argument("--x", dest="x_key", help="config key for the plot's x axis (default: the swept one)")
    parser.add_argument("--out", type=Path, help="plot file (default: compare-<experiment>.png here)")
    parser.add_argument("--no-log", action="store_true", help="do not log the plot and table to MLflow")
    parser.add_argument("--study", type=Path, help="the sweep / study file of the experiment: also print the "
                                                  "paper-style table (a row per setting, the paper's numbers)")
    args = parser.parse_args(argv)
    spec = None
    if args.study:
        from fusion_dist.study import read

        spec = read(args.study)

    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("no tracking URI: pass --uri (e.g. sqlite:///RUN_DIR/mlflow.db) or set MLFLOW_TRACKING_URI")
    from fusion_dist.tracking import bound_http_requests

    bound_http_requests(10.0)
    client = MlflowClient(tracking_uri=uri)
    parents, children = collect(client, args.experiment)
    metrics = args.metric or default_metrics(parents, children)
    if not metrics:
        raise UserError(f"experiment '{args.experiment}' has no metrics to compare")
    keys = differing_keys(parents)
    text = table(parents, children, keys, metrics)
    if spec is not None:
        text += "\n\n" + study_table(parents, children, spec)
    print(text)
    out = args.out or Path(f"compare-{args.experiment.replace('/', '-')}.png")
    plot(parents, children, keys, metrics[0], args.x_key, out)
    print(f"plot: {out}")
    if not args.no_log:
        table_file = out.with_suffix(".txt")
        table_file.write_text(text + "\n")
        run_id = log_report(client, args.experiment, [out, table_file])
        print(f"logged to run {run_id} (artifacts under compare/)")
    return 0
