"""Users' own features: a JSONL or CSV manifest plus ``.npy`` arrays -> the same records as MMSA pickles.

One row per sample with fields ``id``, ``split`` (``train``/``valid``/``test``), ``text``, ``label``,
``audio`` and ``vision`` (paths to ``.npy`` files of shape (frames, dim), relative to the manifest's
folder or absolute/URLs), and optionally ``label_T``, ``label_A``, ``label_V`` (all three or none).
Every row's feature dim must match the first row's, ids are unique within a split. Frames are stored as
float32 with ``-inf`` -> 0; NaN/+inf or non-numeric features, booleans or non-finite labels and non-string
text are errors naming the line and field. ``predict`` reads the same files with the same rules, ``split``
and ``label`` optional (``check_frames`` / ``check_label`` are also the served model's rules).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator

import fsspec
import numpy as np

from data_prep.mmsa import SPLITS, UNIMODAL
from fusion_dist.errors import UserError

REQUIRED = ("id", "split", "text", "label", "audio", "vision")
SERVING = ("id", "text", "audio", "vision")  # what predicting needs; split and label are optional there


def read_rows(path: str, training: bool = True) -> list[dict]:
    """Parse and check the manifest's rows (fields, split names, labels, unique ids); features are loaded later.
    ``training=False`` (``predict``): ``split`` and ``label`` may be absent (a missing label is NaN)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{path}: file not found")
    text = fs.cat_file(fs_path).decode("utf-8")
    if path.endswith(".csv"):
        rows = [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(io.StringIO(text)))]
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {i}: not valid JSON ({exc.msg})") from exc
    if not rows:
        raise UserError(f"{path}: no rows")
    first = rows[0][1] if isinstance(rows[0][1], dict) else {}
    has_unimodal = training and all(first.get(k) not in ("", None) for k in UNIMODAL)
    required = (REQUIRED if training else SERVING) + (UNIMODAL if has_unimodal else ())
    out, seen = [], {}
    for line, row in rows:
        where = f"{path}: line {line}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with fields {list(required)}")
        absent = [k for k in required if row.get(k) in (None, "")]
        if absent:
            raise UserError(f"{where}: missing field(s) {absent}")
        if training and row["split"] not in SPLITS:
            raise UserError(f"{where}: field 'split': '{row['split']}' is not one of {list(SPLITS)}")
        for key in ("label", *(UNIMODAL if has_unimodal else ())):
            row[key] = check_label(row.get(key), f"{where}: field '{key}'")
        for key in ("id", "text", "audio", "vision"):
            if not isinstance(row[key], (str, int)) or isinstance(row[key], bool) or \
                    (key != "id" and not isinstance(row[key], str)):
                raise UserError(f"{where}: field '{key}': {row[key]!r} is not a "
                                f"{'string or integer' if key == 'id' else 'string'}")
        key = (row.get("split"), str(row["id"]))
        if key in seen:
            raise UserError(f"{where}: field 'id': '{row['id']}' already used on line {seen[key]} (ids must be unique"
                            f"{' within a split' if training else ''})")
        seen[key] = line
        row["_line"] = line
        out.append(row)
    return out


def check_label(value, where: str) -> float:
    """A label as float: a finite number (not a boolean); absent or null is NaN (unlabelled, for predicting)."""
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is a boolean, not a number")
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(label):
        raise UserError(f"{where}: {label} (labels must be finite)")
    return label


def check_frames(value, where: str, dim: int | None = None) -> np.ndarray:
    """Features as float32 (frames, dim): numeric, 2-D, ``dim`` wide when given, -inf (MMSA padding) -> 0 and
    NaN/+inf refused. The one rule set of ``prepare``, ``predict`` and the served model."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise UserError(f"{where}: not a (frames, dim) array ({exc})") from None
    if arr.dtype.kind not in "fiu" and not (arr.dtype == object and arr.size == 0):
        raise UserError(f"{where}: dtype {arr.dtype} is not numeric")
    if arr.ndim != 2:
        raise UserError(f"{where}: shape {arr.shape}, expected (frames, dim)")
    if dim is not None and arr.shape[1] != dim:
        raise UserError(f"{where}: feature dim {arr.shape[1]}, expected {dim}")
    frames = arr.astype(np.float32)
    frames[frames == -np.inf] = 0.0
    if not np.isfinite(frames).all():
        raise UserError(f"{where}: contains NaN or +inf")
    return frames


def _load_npy(path: str, manifest: str, line: int, field: str, dim: int | None = None) -> np.ndarray:
    where = f"{manifest}: line {line}: field '{field}'"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{where}: feature file {path} not found")
    try:
        with fs.open(fs_path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except ValueError as exc:
        raise UserError(f"{where}: {path} is not a numeric .npy array ({exc})") from exc
    return check_frames(arr, f"{where}: {path}", dim)


def _resolve(manifest: str, ref: str) -> str:
    if ref.startswith("/") or "://" in ref:
        return ref
    return f"{manifest.rsplit('/', 1)[0]}/{ref}" if "/" in manifest else ref


def feature_dims(path: str, rows: list[dict]) -> dict[str, int]:
    """Feature dims taken from the manifest's first row; every other row must agree."""
    first = rows[0]
    return {f: _load_npy(_resolve(path, first[f]), path, first["_line"], f).shape[1] for f in ("audio", "vision")}


def records(path: str, rows: list[dict], split: str | None, dims: dict[str, int]) -> Iterator[dict]:
    """The samples of ``split`` (every row with None), features loaded and checked against ``dims``."""
    for row in rows:
        if split is not None and row["split"] != split:
            continue
        rec = {"id": str(row["id"]), "raw_text": row["text"], "label": row["label"]}
        rec.update({k: row[k] for k in UNIMODAL if k in row})
        for field in ("audio", "vision"):
            rec[field] = _load_npy(_resolve(path, row[field]), path, row["_line"], field, dims[field])
        yield rec
