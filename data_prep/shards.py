"""The shard format's one owner: write Arrow IPC shards + ``manifest.json``, and verify them (SPEC 2.2).

Layout under a root (any fsspec URL: local path, ``file://``, ``memory://``, ``s3://`` ...)::

    <root>/manifest.json
    <root>/<split>/shard-00000-of-000NN.arrow      Arrow IPC file format, record batches of <= 256 rows

Columns: ``id`` string, ``raw_text`` string, ``audio`` / ``vision`` large_list<float32> holding the real
frames flattened row-major (true length x dim; trailing padding dropped), ``audio_len`` / ``vision_len``
int32 true frame counts, ``label`` float32 and, when the source has them, ``label_T``/``label_A``/``label_V``.
Flat float lists (dims in the manifest) rather than list<list<float>> because one flat child buffer
memory-maps into a numpy view with no copy: a row is ``values[offsets[i]:offsets[i+1]].reshape(len, dim)``.

Atomicity: all shards are written into a sibling staging folder ``<root>.staging-<uuid>``, moved into
place, and ``manifest.json`` is written last; any failure removes the staging folder. A folder without a
manifest is an unfinished conversion: the reader and ``verify`` refuse it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep import ingest, mmsa
from fusion_dist.errors import UserError

FORMAT_VERSION = 1
BATCH_ROWS = 256
ARROW_MAGIC = b"ARROW1"  # at both ends of an Arrow IPC file
LABEL_RANGES = {"mosi": [-3.0, 3.0], "sims": [-1.0, 1.0]}
UNIMODAL = mmsa.UNIMODAL
MODALITIES = ("audio", "vision")  # the feature columns; the manifest records features.<modality>.dim


def schema(unimodal: bool) -> pa.Schema:
    fields = [
        ("id", pa.string()), ("raw_text", pa.string()),
        ("audio", pa.large_list(pa.float32())), ("audio_len", pa.int32()),
        ("vision", pa.large_list(pa.float32())), ("vision_len", pa.int32()),
        ("label", pa.float32()),
    ]
    fields += [(k, pa.float32()) for k in UNIMODAL] if unimodal else []
    return pa.schema(fields)


@dataclass
class Source:
    """What ``prepare`` needs from an input: identity, row counts and a record stream per split."""

    path: str
    name: str
    sha256: str
    rows: dict[str, int]
    unimodal_labels: bool
    records: Callable[[str], Iterator[dict]]


def open_source(path: str, name: str | None) -> Source:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{path}: file not found")
    digest = mmsa.sha256_file(path)
    if path.endswith((".jsonl", ".csv")):
        rows = ingest.read_rows(path)
        dims = ingest.feature_dims(path, rows)
        source = Source(path, name or path.rsplit("/", 1)[-1].rsplit(".", 1)[0], digest,
                        {s: sum(r["split"] == s for r in rows) for s in mmsa.SPLITS}, UNIMODAL[0] in rows[0],
                        lambda split: ingest.records(path, rows, split, dims))
        where = f"{path}: field 'split'"
    else:
        arrays = mmsa.validate(path, mmsa.load_pickle(path))
        dims = tuple(arrays["train"][mod].shape[-1] for mod in MODALITIES)
        source = Source(path, name or mmsa.default_name(path, dims), digest, {s: len(a["id"]) for s, a in arrays.items()},
                        all(k in arrays["train"] for k in UNIMODAL),
                        lambda split: mmsa.records(path, split, arrays[split]))
        where = f"{path}: key 'id'"
    empty = [s for s, n in source.rows.items() if n == 0]
    if empty:
        raise UserError(f"{where}: no rows for split(s) {empty}; training needs rows in {list(mmsa.SPLITS)}")
    return source


class _HashingWriter:
    """File-like wrapper that hashes and counts the bytes Arrow writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = memoryview(data)
        self.sha.update(data)
        self.size += data.nbytes
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


def _batch(rows: list[dict], sch: pa.Schema) -> pa.RecordBatch:
    cols = {"id": pa.array([r["id"] for r in rows], pa.string()),
            "raw_text": pa.array([r["raw_text"] for r in rows], pa.string())}
    for mod in MODALITIES:
        flat = [r[mod].reshape(-1) for r in rows]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in flat])]).astype(np.int64)
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        cols[mod] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
        cols[f"{mod}_len"] = pa.array([len(r[mod]) for r in rows], pa.int32())
    for key in ("label", *UNIMODAL):
        if key in sch.names:
            cols[key] = pa.array([r[key] for r in rows], pa.float32())
    return pa.record_batch([cols[n] for n in sch.names], schema=sch)


def write_split(fs, staging: str, split: str, records: Iterable[dict], n_rows: int, rows_per_shard: int,
                sch: pa.Schema, label_range: list[float], stats: dict, where: str) -> dict:
    """Write one split's shards under ``staging``; returns the split's manifest entry."""
    n_shards = max(1, math.ceil(n_rows / rows_per_shard))
    shards, seen, it = [], set(), iter(tqdm(records, total=n_rows, desc=f"prepare {split}", unit="row", disable=None))
    fs.makedirs(f"{staging}/{split}", exist_ok=True)
    for k in range(n_shards):
        rel = f"{split}/shard-{k:05d}-of-{n_shards:05d}.arrow"
        with fs.open(f"{staging}/{rel}", "wb") as f:
            out = _HashingWriter(f)
            with pa.ipc.new_file(out, sch) as writer:
                rows, written = [], 0
                for rec in it:
                    _check_record(rec, split, label_range, stats, seen, where)
                    rows.append(rec)
                    if len(rows) == BATCH_ROWS or written + len(rows) == rows_per_shard:
                        writer.write_batch(_batch(rows, sch))
                        written, rows = written + len(rows), []
                    if written == rows_per_shard:
                        break
                if rows:
                    writer.write_batch(_batch(rows, sch))
                    written += len(rows)
        shards.append({"file": rel, "rows": written, "bytes": out.size, "sha256": out.sha.hexdigest()})
    total = sum(s["rows"] for s in shards)
    if total != n_rows:
        raise UserError(f"{where}: split '{split}': expected {n_rows} rows, read {total}")
    return {"rows": total, "shards": shards}


def _check_record(rec: dict, split: str, label_range: list[float], stats: dict, seen: set, where: str) -> None:
    if rec["id"] in seen:
        raise UserError(f"{where}: split '{split}', sample '{rec['id']}': id used twice (ids must be unique within a split)")
    seen.add(rec["id"])
    lo, hi = label_range
    for key in ("label", *UNIMODAL):
        if key in rec and not lo <= rec[key] <= hi:
            raise UserError(f"{where}: split '{split}', sample '{rec['id']}': {key} {rec[key]} outside the label range "
                            f"[{lo}, {hi}] (pass --metrics to choose the dataset kind)")
    for mod in MODALITIES:
        dim = stats[mod]["dim"]
        if dim is not None and rec[mod].shape[1] != dim:
            raise UserError(f"{where}: split '{split}', sample '{rec['id']}': {mod} dim {rec[mod].shape[1]} != {dim}")
        stats[mod]["dim"] = rec[mod].shape[1]
        stats[mod]["max_len"] = max(stats[mod]["max_len"], len(rec[mod]))


def feature_dims(meta: dict) -> dict[str, int]:
    """Feature dim by modality of a shard manifest, or of anything that records ``features`` the same way
    (an export's ``export.json``)."""
    return {m: meta["features"][m]["dim"] for m in MODALITIES}


def metric_set(meta: dict) -> str:
    """The metrics a manifest's (or export's) labels are scored with: ``mosi`` (MOSI/MOSEI) or ``sims``."""
    return meta.get("metrics", "mosi")


def read_manifest(root: str) -> dict:
    """The manifest at ``root``; UserError when it is missing (unfinished conversion) or malformed."""
    path = f"{root.rstrip('/')}/manifest.json"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{path}: not found: {root} is not a prepared shard root (or its conversion did not finish)")
    try:
        manifest = json.loads(fs.cat_file(fs_path))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: field 'format_version': expected {FORMAT_VERSION}")
    for key in ("dataset", "metrics", "source", "features", "label_range", "unimodal_labels", "splits"):
        if key not in manifest:
            raise UserError(f"{path}: missing field '{key}'")
    return manifest


def prepare(src: str, out: str, *, overwrite: bool = False, rows_per_shard: int = 1000,
            name: str | None = None, metrics: str = "auto") -> dict | None:
    """Convert ``src`` into shards under ``out``; returns the manifest, or None when already prepared."""
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard: must be >= 1, got {rows_per_shard}")
    source = open_source(src, name)
    fs, out_path = fsspec.core.url_to_fs(out)
    out_path = out_path.rstrip("/")
    if fs.exists(out_path) and not overwrite:
        if fs.isfile(f"{out_path}/manifest.json"):
            old = read_manifest(out)
            if old["dataset"] == source.name and old["source"]["sha256"] == source.sha256:
                return None
            raise UserError(f"{out}: already holds dataset '{old['dataset']}' from {old['source']['name']}; "
                            "pass --overwrite to replace it")
        if fs.ls(out_path):
            raise UserError(f"{out}: exists, is not empty and holds no manifest.json; pass --overwrite to replace it")
    if metrics == "auto":
        metrics = "sims" if source.unimodal_labels or "sims" in source.name.lower() else "mosi"
    label_range = LABEL_RANGES[metrics]
    sch = schema(source.unimodal_labels)
    stats = {m: {"dim": None, "max_len": 0} for m in MODALITIES}
    for stale in fs.glob(f"{out_path}.staging-*"):  # left by a conversion that crashed
        fs.rm(stale, recursive=True)
    staging = f"{out_path}.staging-{uuid.uuid4().hex[:12]}"
    try:
        splits = {split: write_split(fs, staging, split, source.records(split), n, rows_per_shard, sch,
                                     label_range, stats, src)
                  for split, n in source.rows.items()}
        if fs.exists(out_path):
            fs.rm(out_path, recursive=True)
        fs.mv(staging, out_path, recursive=True)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": source.name,
        "metrics": metrics,
        "source": {"name": source.path.rsplit("/", 1)[-1], "sha256": source.sha256},
        "features": stats,
        "label_range": label_range,
        "unimodal_labels": source.unimodal_labels,
        "columns": {"audio": "large_list<float32>: audio_len x dim, row-major", "audio_len": "int32",
                    "vision": "large_list<float32>: vision_len x dim, row-major", "vision_len": "int32"},
        "rows_per_shard": rows_per_shard,
        "splits": splits,
    }
    # The manifest is what makes the folder valid, so it appears last and in one piece.
    with fs.open(f"{out_path}/manifest.json.tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    fs.mv(f"{out_path}/manifest.json.tmp", f"{out_path}/manifest.json")
    return manifest


def shard_problem(root: str, shard: dict, checksum: bool = True) -> str | None:
    """Why a shard does not match its manifest entry, or None when it does: missing, size, then its sha256
    (``checksum``) or, in milliseconds, the Arrow file markers at both ends and the footer's row count."""
    path = f"{root.rstrip('/')}/{shard['file']}"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        return f"{path}: missing"
    size = fs.size(fs_path)
    if size != shard["bytes"]:
        return f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)"
    if checksum:
        return f"{path}: sha256 mismatch (corrupted)" if mmsa.sha256_file(path) != shard["sha256"] else None
    with fs.open(fs_path, "rb") as f:
        head = f.read(6)
        f.seek(size - 6)
        tail = f.read(6)
        if head != ARROW_MAGIC or tail != ARROW_MAGIC:
            return f"{path}: not an Arrow file (corrupted header or footer)"
        f.seek(0)
        try:
            if isinstance(fs, LocalFileSystem):  # batch headers through a memory map: no batch body is read
                reader = pa.ipc.open_file(pa.memory_map(fs_path))
                rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                if rows != shard["rows"]:
                    return f"{path}: {rows} rows, manifest says {shard['rows']}"
            else:
                pa.ipc.open_file(f)  # the footer alone
        except pa.ArrowException as exc:
            return f"{path}: unreadable Arrow file ({exc})"
    return None


def check_root(root: str, checksums: bool) -> dict:
    """The manifest of a shard root that training can use: every split present and non-empty, every listed
    shard present and intact (``shard_problem``); UserError naming the first problem."""
    manifest = read_manifest(root)
    for split in mmsa.SPLITS:
        entry = manifest["splits"].get(split)
        if not entry or not entry.get("rows"):
            raise UserError(f"{root}/manifest.json: split '{split}' is {'missing' if not entry else 'empty'}; "
                            "training needs rows in train, valid and test")
        for shard in tqdm(entry["shards"], desc=f"check {split}", unit="shard", disable=None):
            problem = shard_problem(root, shard, checksum=checksums)
            if problem:
                raise UserError(problem)
    return manifest


def verify(root: str) -> dict:
    """Check the manifest and every shard's sha256; UserError naming the first bad shard."""
    return check_root(root, checksums=True)


def _summary(m: dict) -> str:
    rows = ", ".join(f"{s} {e['rows']}" for s, e in m["splits"].items())
    f = m["features"]
    return (f"dataset '{m['dataset']}' ({m['metrics']} metrics): {rows} rows; audio dim {f['audio']['dim']} "
            f"(max len {f['audio']['max_len']}), vision dim {f['vision']['dim']} (max len {f['vision']['max_len']}), "
            f"labels in {m['label_range']}")


def main_prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fusion-dist prepare",
                                description="MMSA pickle (.pkl) or JSONL/CSV manifest -> Arrow shards + manifest.json")
    p.add_argument("src", help="MMSA pickle, or a .jsonl/.csv of id,split,text,label[,label_T/A/V],audio,vision")
    p.add_argument("out_root", help="output folder: local path or fsspec URL (file://, memory://, s3://, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever OUT_ROOT holds")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="rows per shard file (default 1000)")
    p.add_argument("--name", help="dataset name in the manifest (default: mosi/mosei/sims if the path names one, "
                                  "else the file's stem)")
    p.add_argument("--metrics", choices=["auto", "mosi", "sims"], default="auto",
                   help="metric set / label range: sims = [-1, 1], mosi = [-3, 3]; auto picks sims when the data has "
                        "unimodal labels or is named sims")
    args = p.parse_args(argv)
    manifest = prepare(args.src, args.out_root, overwrite=args.overwrite, rows_per_shard=args.rows_per_shard,
                       name=args.name, metrics=args.metrics)
    if manifest is None:
        print(f"prepare: {args.out_root} already holds this dataset from this source (same sha256); nothing to do")
        return 0
    n = sum(len(e["shards"]) for e in manifest["splits"].values())
    print(f"prepare: wrote {n} shards to {args.out_root}: {_summary(manifest)}")
    return 0


def main_verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fusion-dist verify", description="check a shard root's manifest and checksums")
    p.add_argument("root", help="shard root (local path or fsspec URL)")
    args = p.parse_args(argv)
    manifest = verify(args.root)
    n = sum(len(e["shards"]) for e in manifest["splits"].values())
    print(f"verify: OK, {n} shards match their sha256 and size; {_summary(manifest)}")
    return 0
