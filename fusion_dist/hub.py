"""``fusion-dist export RUN_DIR OUT --hub``: an export that can be uploaded to the Hugging Face Hub as it is.

Besides the export's own files (``model.safetensors``: the trainable weights; ``config.yaml``; ``export.json``)
it holds a ``README.md`` model card: ``base_model`` metadata (a hub backbone, at the commit the run used), the
test metrics of every seed and their mean and std, the training command and the dataset (name, manifest
sha256, rows). Nothing is uploaded; ``huggingface-cli upload ORG/NAME OUT`` does that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fusion_dist.config import Config
from fusion_dist.metrics import MOSI_NAMES, SIMS_NAMES
from fusion_dist.rundir import atomic_write

CARD = "README.md"


def _cell(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _metrics_table(summary: dict) -> str:
    names = MOSI_NAMES if summary["metric_set"] == "mosi" else SIMS_NAMES
    rows = [f"| seed {s} | " + " | ".join(_cell(r["test"].get(n)) for n in names) + " |"
            for s, r in summary["seeds"].items()]
    mean, std = summary["mean"]["test"], summary["std"]["test"]
    rows.append("| mean ± std | " + " | ".join(f"{_cell(mean[n])} ± {_cell(std[n])}" for n in names) + " |")
    return "\n".join([f"| | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|", *rows])


def model_card(cfg: Config, meta: dict, summary: dict, dataset: dict) -> str:
    """The card's text: YAML metadata, then what the model is, its results, how it was trained and on what."""
    ref = meta["backbone"]
    profile = json.loads(dataset["profile"])
    if ref["local"]:
        backbone = f"the local backbone `{ref['name']}` (fingerprint `{ref['fingerprint']}`)"
        front = []
    else:
        backbone = f"[{ref['name']}](https://huggingface.co/{ref['name']})" + (
            f" at commit `{ref['revision']}`" if ref.get("revision") else "")
        front = [f"base_model: {json.dumps(ref['name'])}", "base_model_relation: adapter"]
    m = cfg.model
    blocks = f"MM blocks after layers {list(m.mm_layers)}" if m.mm_layers else "no MM blocks (text-only baseline)"
    tokens = f"{m.n_fusion} fusion tokens" if m.family == "deepmlf" else f"{m.n_audio}/{m.n_video}/{m.n_av} " \
             "audio/video/AV fusion tokens"
    rows = ", ".join(f"{k.removesuffix('_rows')} {v}" for k, v in profile.items() if k.endswith("_rows"))
    lines = [
        "---", *front, "library_name: fusion-dist", "tags:", "- multimodal-sentiment-analysis",
        f"- {m.family}", "- fusion-dist", "---", "",
        f"# {m.family.upper()} on {dataset['name']}", "",
        f"A {m.family.upper()} multimodal sentiment model trained with fusion-dist: {backbone}, frozen, with "
        f"{tokens} and {blocks}. This folder holds the trainable weights only (`model.safetensors`: fusion "
        "tokens, MM blocks, AV encoder, heads); the backbone loads from where `export.json` points.", "",
        "## Results", "",
        f"Test split, best validation checkpoint of each seed ({len(summary['seeds'])} seeds; std: "
        "sample std over seeds):", "", _metrics_table(summary), "",
        "## Training", "",
        "`config.yaml` is the run's resolved configuration; to train it again on your copy of the data:", "",
        "```bash", "fusion-dist train config.yaml data.root=DATA_ROOT   # under deepspeed / torchrun / srun for "
        "several ranks", "```", "",
        "## Dataset", "",
        f"`{dataset['name']}`, {rows} rows; shards from `{json.loads(dataset['source'])['uri']}`, manifest sha256 "
        f"`{profile['manifest_sha256']}`.", "",
        "## Use", "",
        "```bash", "fusion-dist predict . DATA_ROOT --split test --out predictions.csv", "```", "",
    ]
    return "\n".join(lines)


def write_card(out: Path, cfg: Config, meta: dict, summary: dict, data_root: str, manifest: dict) -> Path:
    """``out/README.md`` for the export at ``out`` (``meta``: its export.json; ``summary``: the run's metrics.json)."""
    from fusion_dist.tracking import dataset_input

    path = out / CARD
    atomic_write(path, model_card(cfg, meta, summary, dataset_input(data_root, manifest)))
    return path
