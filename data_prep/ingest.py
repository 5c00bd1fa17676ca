"""Users' own features: a JSONL or CSV manifest plus ``.npy`` arrays -> the same records as MMSA pickles.

One row per sample with fields ``id``, ``split`` (``train``/``valid``/``test``), ``text``, ``label``,
``audio`` and ``vision`` (paths to ``.npy`` files of shape (frames, dim), relative to the manifest's
folder or absolute/URLs), and optionally ``label_T``, ``label_A``, ``label_V`` (all three or none).
Every row's feature dim must match the first row's. Frames are stored as float32 with ``-inf`` -> 0;
NaN/+inf features and non-finite labels are errors naming the line and field.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator

import fsspec
import numpy as np

from data_prep.mmsa import SPLITS
from fusion_dist.errors import UserError

REQUIRED = ("id", "split", "text", "label", "audio", "vision")
UNIMODAL = ("label_T", "label_A", "label_V")


def read_rows(path: str) -> list[dict]:
    """Parse and check the manifest's rows (fields, split names, labels); features are loaded later."""
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
    has_unimodal = all(k in rows[0][1] and rows[0][1][k] not in ("", None) for k in UNIMODAL)
    out = []
    for line, row in rows:
        where = f"{path}: line {line}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with fields {list(REQUIRED)}")
        absent = [k for k in REQUIRED + (UNIMODAL if has_unimodal else ()) if row.get(k) in (None, "")]
        if absent:
            raise UserError(f"{where}: missing field(s) {absent}")
        if row["split"] not in SPLITS:
            raise UserError(f"{where}: field 'split': '{row['split']}' is not one of {list(SPLITS)}")
        for key in ("label", *(UNIMODAL if has_unimodal else ())):
            try:
                row[key] = float(row[key])
            except (TypeError, ValueError):
                raise UserError(f"{where}: field '{key}': '{row[key]}' is not a number") from None
            if not math.isfinite(row[key]):
                raise UserError(f"{where}: field '{key}': {row[key]} (labels must be finite)")
        row["_line"] = line
        out.append(row)
    return out


def _load_npy(path: str, manifest: str, line: int, field: str) -> np.ndarray:
    where = f"{manifest}: line {line}: field '{field}'"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{where}: feature file {path} not found")
    try:
        with fs.open(fs_path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except ValueError as exc:
        raise UserError(f"{where}: {path} is not a numeric .npy array ({exc})") from exc
    if arr.ndim != 2:
        raise UserError(f"{where}: {path} has shape {arr.shape}, expected (frames, dim)")
    frames = arr.astype(np.float32)
    frames[frames == -np.inf] = 0.0
    if not np.isfinite(frames).all():
        raise UserError(f"{where}: {path} contains NaN or +inf")
    return frames


def _resolve(manifest: str, ref: str) -> str:
    if ref.startswith("/") or "://" in ref:
        return ref
    return f"{manifest.rsplit('/', 1)[0]}/{ref}" if "/" in manifest else ref


def feature_dims(path: str, rows: list[dict]) -> dict[str, int]:
    """Feature dims taken from the manifest's first row; every other row must agree."""
    first = rows[0]
    return {f: _load_npy(_resolve(path, first[f]), path, first["_line"], f).shape[1] for f in ("audio", "vision")}


def records(path: str, rows: list[dict], split: str, dims: dict[str, int]) -> Iterator[dict]:
    for row in rows:
        if row["split"] != split:
            continue
        rec = {"id": str(row["id"]), "raw_text": str(row["text"]), "label": row["label"]}
        rec.update({k: row[k] for k in UNIMODAL if k in row})
        for field in ("audio", "vision"):
            frames = _load_npy(_resolve(path, row[field]), path, row["_line"], field)
            if frames.shape[1] != dims[field]:
                raise UserError(
                    f"{path}: line {row['_line']}: field '{field}': feature dim {frames.shape[1]} disagrees "
                    f"with {dims[field]} (line {rows[0]['_line']})"
                )
            rec[field] = frames
        yield rec
