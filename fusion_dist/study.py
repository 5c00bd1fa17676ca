"""Sweep and study files: a set of training configurations as one Slurm job array (``slurm/sweep.sh``), and the
paper's numbers for each to compare with (``fusion-dist compare --study``).

    script: slurm/train_sims.sh            # job script every task runs (its #SBATCH resources apply)
    config: configs/paper/deepmlf_sims.yaml
    experiment: sims-depth                 # MLflow experiment of all tasks and of the report
    dir: runs/studies/sims-depth           # task i trains in <dir>/task<i>; shared store <dir>/mlflow.db
    overrides: ["run.seeds=[0,1,2,3,4]"]   # optional, applied to every task
    settings:                              # optional: the rows of a paper table, in order
      - label: 8:12                        #   the row's name
        set: {model.mm_layers: [7, 8, 9, 10, 11]}   # its overrides
        paper: {MAE: 0.374, Corr: 0.697}   #   optional: the paper's numbers as printed (Acc2, F1, Acc5, Acc7
                                           #   or MMSA metric names; accuracies in %)
    grid:                                  # optional: one task per combination, first key varying slowest
      model.n_fusion: [8, 16]

Tasks are every setting x every grid combination (settings outer); at least one of the two is needed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from fusion_dist.errors import UserError
from fusion_dist.metrics import MOSI_NAMES, SIMS_NAMES

SWEEP_KEYS = {"script", "config", "experiment", "dir", "grid", "overrides", "settings"}
SETTING_KEYS = {"label", "set", "paper"}
# The paper's column names -> the MMSA metrics they stand beside. The paper's one Acc2 / F1 per dataset may be
# MMSA's Has0_* or Non0_* (it does not say): it is shown beside both.
PAPER_COLUMNS = {"Acc2": ("Has0_acc_2", "Non0_acc_2", "Mult_acc_2"), "F1": ("Has0_F1_score", "Non0_F1_score", "F1_score"),
                 "Acc3": ("Mult_acc_3",), "Acc5": ("Mult_acc_5",), "Acc7": ("Mult_acc_7",)}


class Task(NamedTuple):
    label: str | None  # the setting's label (None without settings)
    values: dict[str, Any]  # config key -> value: the setting's, then the grid combination's

    def overrides(self) -> list[str]:
        return [f"{k}={override_value(v)}" for k, v in self.values.items()]


def override_value(v) -> str:
    """An override value as YAML flow text (``[1,3]``, ``0.5``, ``abc``), which OmegaConf parses back."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def read(path: Path) -> dict:
    """The sweep file, checked: its keys, ``grid`` and ``settings`` shapes, the job script's existence."""
    if not path.is_file():
        raise UserError(f"{path}: sweep file not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(sorted(SWEEP_KEYS))}")
    unknown = set(spec) - SWEEP_KEYS
    missing = SWEEP_KEYS - {"overrides", "grid", "settings"} - set(spec)
    if unknown or missing:
        problems = [f"{what} key(s) {sorted(keys)}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys]
        raise UserError(f"{path}: {', '.join(problems)}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    if "grid" not in spec and "settings" not in spec:
        raise UserError(f"{path}: needs 'grid' or 'settings' (or both)")
    grid = spec.get("grid", {"": [None]})
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: 'grid' must map config keys to non-empty lists of values")
    settings = spec.get("settings", [])
    if not isinstance(settings, list) or ("settings" in spec and not settings):
        raise UserError(f"{path}: 'settings' must be a non-empty list of {{label, set, paper}} entries")
    labels = []
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or "label" not in s or set(s) - SETTING_KEYS:
            raise UserError(f"{path}: settings[{i}] must be a mapping with 'label' and optionally 'set', 'paper'")
        if not isinstance(s.get("set", {}), dict) or not isinstance(s.get("paper", {}), dict):
            raise UserError(f"{path}: settings[{i}] ('{s['label']}'): 'set' and 'paper' must be mappings")
        bad = [k for k in s.get("paper", {}) if k not in PAPER_COLUMNS and k not in (*MOSI_NAMES, *SIMS_NAMES)]
        if bad:
            raise UserError(f"{path}: settings[{i}] ('{s['label']}'): paper metric(s) {bad}: use "
                            f"{', '.join(PAPER_COLUMNS)} or MMSA names ({', '.join(MOSI_NAMES)}; {', '.join(SIMS_NAMES)})")
        labels.append(str(s["label"]))
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: settings labels must differ, got {labels}")
    if not isinstance(spec.get("overrides", []), list):
        raise UserError(f"{path}: 'overrides' must be a list of key=value strings")
    if not Path(spec["script"]).is_file():
        raise UserError(f"{path}: script {spec['script']} not found")
    return spec


def tasks(spec: dict) -> list[Task]:
    """Every setting x every grid combination, in array-task order."""
    grid = spec.get("grid", {})
    combos = [dict(zip(grid, c)) for c in itertools.product(*grid.values())] if grid else [{}]
    settings = spec.get("settings") or [None]
    return [Task(None if s is None else str(s["label"]), {**((s or {}).get("set") or {}), **combo})
            for s in settings for combo in combos]


def paper_numbers(spec: dict) -> dict[str, dict[str, float]]:
    """``{label: {MMSA metric: the paper's value}}`` of the settings that give one."""
    out = {}
    for s in spec.get("settings", []):
        row = {}
        for key, value in (s.get("paper") or {}).items():
            row.update({name: value for name in PAPER_COLUMNS.get(key, (key,))})
        out[str(s["label"])] = row
    return out
