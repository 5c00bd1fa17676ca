"""Read MMSA feature pickles safely and check they have the layout SPEC 2.1 describes.

Pickles can run arbitrary code when loaded, so they are opened with ``SafeUnpickler``: it only
resolves the globals that plain containers, numbers, strings and numpy arrays/dtypes need, and refuses
everything else *before* it is called. Validation then checks keys, ndim, matching N, lengths and
labels, and ``records`` turns one split into the per-sample records the shard writer stores
(true length kept, trailing padding dropped, ``-inf`` -> 0, float32).

Non-finite features: ``-inf`` is a known artefact of COVAREP audio and becomes 0 as in MMSA's own
loaders; ``NaN`` or ``+inf`` anywhere in the real frames means a broken file and is an error, as is a
``NaN`` label.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import numpy as np

from fusion_dist.errors import UserError

SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = ("raw_text", "audio", "vision", "id", "regression_labels")
UNIMODAL = ("label_T", "label_A", "label_V")  # our per-modality label columns (optional, all three or none)
UNIMODAL_KEYS = {"label_T": "regression_labels_T", "label_A": "regression_labels_A", "label_V": "regression_labels_V"}

# Everything a numpy-1 or numpy-2 pickle of arrays, dtypes and builtin containers needs.
_ALLOWED_GLOBALS = {
    ("builtins", name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "complex", "bool")
} | {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    (mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles store raw bytes as codecs.encode(str, "latin1")
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside ``_ALLOWED_GLOBALS`` (so no code can run)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UserError(
                f"{self.source}: refused to load: the pickle references '{module}.{name}', which is not a "
                "plain container, number, string or numpy array/dtype (it could run code)"
            )
        return super().find_class(module, name)


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_pickle(path: str) -> dict:
    """Load an MMSA pickle with the restricted unpickler; UserError for a missing file or non-pickle."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise UserError(f"{path}: file not found")
    with fs.open(fs_path, "rb") as f:
        try:
            data = SafeUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as exc:  # UnpicklingError, EOFError, ValueError ... all mean "not a pickle"
            raise UserError(f"{path}: not a readable pickle file ({type(exc).__name__}: {exc})") from exc
    return data


def _array(path: str, split: str, data: dict, key: str, ndim: int) -> np.ndarray:
    value = np.asarray(data[key])
    if value.ndim == 2 and ndim == 1 and value.shape[1] == 1:  # labels stored as (N, 1)
        value = value[:, 0]
    if value.ndim != ndim:
        raise UserError(f"{path}: split '{split}', field '{key}': expected {ndim} dimensions, got shape {value.shape}")
    return value


def validate(path: str, data: object) -> dict[str, dict[str, np.ndarray]]:
    """Check the SPEC 2.1 layout and return ``{split: {field: array}}`` with only the fields we use."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level is a {type(data).__name__}, expected a dict with keys {list(SPLITS)}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise UserError(f"{path}: missing split(s) {missing}; top-level keys are {sorted(map(str, data))}")
    out = {}
    for split in SPLITS:
        part = data[split]
        if not isinstance(part, dict):
            raise UserError(f"{path}: split '{split}' is a {type(part).__name__}, expected a dict of arrays")
        absent = [k for k in REQUIRED_KEYS if k not in part]
        if absent:
            raise UserError(f"{path}: split '{split}': missing field(s) {absent}; present: {sorted(part)}")
        arrays = {
            "raw_text": _array(path, split, part, "raw_text", 1),
            "id": _array(path, split, part, "id", 1),
            "audio": _array(path, split, part, "audio", 3),
            "vision": _array(path, split, part, "vision", 3),
            "label": _array(path, split, part, "regression_labels", 1).astype(np.float64),
        }
        for ours, theirs in UNIMODAL_KEYS.items():
            if theirs in part:
                arrays[ours] = _array(path, split, part, theirs, 1).astype(np.float64)
        for mod in ("audio", "vision"):
            key = f"{mod}_lengths"
            padded = arrays[mod].shape[1]
            # Aligned files carry no lengths: every padded frame then counts as real.
            lengths = _array(path, split, part, key, 1) if key in part else np.full(len(arrays[mod]), padded)
            lengths = np.asarray(lengths, dtype=np.int64)
            if (lengths > padded).any() or (lengths < 0).any():
                bad = int(np.flatnonzero((lengths > padded) | (lengths < 0))[0])
                raise UserError(
                    f"{path}: split '{split}', field '{key}': row {bad} has length {lengths[bad]}, "
                    f"outside [0, padded length {padded}]"
                )
            arrays[f"{mod}_lengths"] = lengths
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise UserError(f"{path}: split '{split}': fields disagree on the number of samples N: {sizes}")
        for key in ("label", *[k for k in UNIMODAL_KEYS if k in arrays]):
            nan = np.flatnonzero(~np.isfinite(arrays[key]))
            if nan.size:
                field = "regression_labels" if key == "label" else UNIMODAL_KEYS[key]
                raise UserError(f"{path}: split '{split}', field '{field}': row {nan[0]} is {arrays[key][nan[0]]} (labels must be finite)")
        out[split] = arrays
    return out


def records(path: str, split: str, arrays: dict[str, np.ndarray]) -> Iterator[dict]:
    """Per-sample records: true-length float32 frames with ``-inf`` -> 0; other non-finite values are errors."""
    extra = [k for k in UNIMODAL_KEYS if k in arrays]
    for i in range(len(arrays["id"])):
        rec = {"id": str(arrays["id"][i]), "raw_text": str(arrays["raw_text"][i]), "label": float(arrays["label"][i])}
        for mod in ("audio", "vision"):
            frames = np.array(arrays[mod][i, : arrays[f"{mod}_lengths"][i]], dtype=np.float32)
            frames[frames == -np.inf] = 0.0
            if not np.isfinite(frames).all():
                raise UserError(f"{path}: split '{split}', field '{mod}': row {i} ({rec['id']}) contains NaN or +inf")
            rec[mod] = frames
        for k in extra:
            rec[k] = float(arrays[k][i])
        yield rec


# (audio, vision) feature dims of the MMSA releases: a pickle not named after its dataset is known by them
RELEASE_DIMS = {(5, 20): "mosi", (74, 35): "mosei", (33, 709): "sims"}


def default_name(path: str, dims: tuple[int, int] | None = None) -> str:
    """``.../MOSI/Processed/unaligned_50.pkl`` -> ``mosi``: the first known dataset named in the path, else the
    release with these (audio, vision) dims (``fusion-dist synth --dataset mosi --out x.pkl`` -> ``mosi``), else
    the file's stem."""
    lowered = path.lower()
    for name in ("mosei", "mosi", "sims"):
        if name in lowered:
            return name
    return RELEASE_DIMS.get(dims) or PurePosixPath(path).stem
