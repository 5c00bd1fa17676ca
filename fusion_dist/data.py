"""Read prepared shards: a memory-mapped ``ShardDataset``, a per-rank ``RankSampler`` and a padding ``Collator``.

Shards are opened lazily in each process (so the dataset pickles cheaply into DataLoader workers) with
``pyarrow.memory_map`` for local files: every rank on a node shares the page cache and no rank copies
the split into its own memory. For non-local fsspec URLs (``s3://``, ``memory://``) each shard's bytes
are read once per process instead. Feature dims, max lengths and the label range come from the manifest,
never from a config.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem

from data_prep.shards import UNIMODAL, check_root, feature_dims, metric_set, read_manifest, shard_problem
from fusion_dist.errors import UserError

__all__ = ["check_root", "feature_dims", "metric_set", "read_manifest", "ShardDataset", "RankSampler", "Collator"]


def _flat_views(col: pa.LargeListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a large_list<float32> column as numpy views over its buffers (no copy; unlike
    ``to_numpy`` this never imports pandas, which would cost seconds per process)."""
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + len(col) + 1]
    child = col.values
    values = np.frombuffer(child.buffers()[1], dtype=np.float32)[child.offset : child.offset + len(child)]
    return offsets, values


class _Shard:
    """Zero-copy numpy views of one shard's columns (one entry per record batch)."""

    def __init__(self, path: str):
        fs, fs_path = fsspec.core.url_to_fs(path)
        if isinstance(fs, LocalFileSystem):
            source = pa.memory_map(fs_path, "r")
        else:
            source = pa.BufferReader(fs.cat_file(fs_path))
        reader = pa.ipc.open_file(source)
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches]).tolist()
        self.frames = [{mod: _flat_views(b.column(mod)) for mod in ("audio", "vision")} for b in self.batches]

    def row(self, i: int, dims: dict[str, int]) -> dict:
        b = bisect.bisect_right(self.starts, i) - 1
        batch, j = self.batches[b], i - self.starts[b]
        rec = {"id": batch.column("id")[j].as_py(), "raw_text": batch.column("raw_text")[j].as_py()}
        for mod in ("audio", "vision"):
            offsets, values = self.frames[b][mod]
            rec[mod] = values[offsets[j] : offsets[j + 1]].reshape(-1, dims[mod])
        for key in ("label", *UNIMODAL):
            if key in batch.schema.names:
                rec[key] = float(batch.column(key)[j].as_py())
        return rec


class ShardDataset(torch.utils.data.Dataset):
    """One split of a shard root. ``ds[i]``: dict(id, raw_text, audio (len_a, Da) float32 read-only view,
    vision (len_v, Dv), label float, and label_T/A/V when the data has them)."""

    def __init__(self, root: str, split: str, verify: bool = False):
        self.root, self.split = root.rstrip("/"), split
        self.manifest = read_manifest(root)
        if split not in self.manifest["splits"]:
            raise UserError(f"{root}/manifest.json: no split '{split}'; splits: {sorted(self.manifest['splits'])}")
        self.shard_entries = self.manifest["splits"][split]["shards"]
        if verify:
            for entry in self.shard_entries:
                problem = shard_problem(root, entry)
                if problem:
                    raise UserError(problem)
        self.starts = np.cumsum([0] + [e["rows"] for e in self.shard_entries]).tolist()
        self.dims = feature_dims(self.manifest)
        self._shards: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for split '{self.split}' with {len(self)} rows")
        k = bisect.bisect_right(self.starts, i) - 1
        if k not in self._shards:
            self._shards[k] = _Shard(f"{self.root}/{self.shard_entries[k]['file']}")
        return self._shards[k].row(i - self.starts[k], self.dims)

    def texts(self) -> list[str]:
        """Every transcript of the split, in row order (the text column only)."""
        out = []
        for k, entry in enumerate(self.shard_entries):  # a scan: the shards it opens are not kept open
            shard = self._shards.get(k) or _Shard(f"{self.root}/{entry['file']}")
            out += [t for b in shard.batches for t in b.column("raw_text").to_pylist()]
        return out

    def __getstate__(self) -> dict:
        # Open maps do not travel to worker processes; each reopens (maps) what it touches.
        return {**self.__dict__, "_shards": {}}


class RankSampler(torch.utils.data.Sampler[int]):
    """This rank's indices of a split of ``n`` rows.

    The split's order is cut into chunks of ``chunk`` consecutive indices dealt round-robin to the
    ranks: rank ``r`` gets chunks ``r, r + world, ...``. With ``chunk`` = the micro-batch size, micro-batch
    ``a`` of optimizer step ``s`` on rank ``r`` is ``order[s*G + (a*world + r)*chunk :][:chunk]`` for a
    global batch ``G``, so every step consumes the same ``G`` samples *in the same micro-batches* whatever
    the world size (1 rank with ``world`` x the accumulation sees exactly the micro-batches ``world``
    ranks see; BatchNorm batch statistics and gradients match).

    ``shuffle=True`` (training): the order is a permutation drawn from ``seed + epoch`` (call
    ``set_epoch``); ranks are disjoint and get the same count so they step together: the order is
    padded to whole rounds of ``chunk x world`` by repeating its start, or cut to whole rounds with
    ``drop_last``. ``shuffle=False`` (evaluation): ``0..n-1``, every index exactly once across ranks,
    no padding, so counts may differ by up to ``chunk`` (``drop_last`` cuts to equal counts instead).
    ``start_at(k)`` skips the first ``k`` indices of the next iteration (mid-epoch resume); later
    iterations are whole again.
    """

    def __init__(self, n: int, rank: int, world: int, shuffle: bool, seed: int, drop_last: bool = False,
                 chunk: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        if chunk < 1:
            raise ValueError(f"chunk {chunk} must be >= 1")
        self.n, self.rank, self.world, self.chunk = n, rank, world, chunk
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, k: int) -> None:
        self.skip = k

    def indices(self) -> list[int]:
        """This rank's whole order for the current epoch (ignores ``start_at``)."""
        round_size = self.chunk * self.world
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist()
            rounds = self.n // round_size if self.drop_last else -(-self.n // round_size)
            order = (order * (1 + rounds * round_size // max(1, self.n)))[: rounds * round_size]
        else:
            order = list(range(self.n))
            if self.drop_last:
                order = order[: self.n // round_size * round_size]
        starts = range(self.rank * self.chunk, len(order), round_size)
        return [i for start in starts for i in order[start : start + self.chunk]]

    def __iter__(self) -> Iterator[int]:
        order, self.skip = self.indices()[self.skip :], 0
        return iter(order)

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.skip)


def text_tokens(batch: dict) -> int:
    """The real text tokens of a collated batch (0 without text: the stage-1 AV pretrainer's batches)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else 0


class Collator:
    """list of samples -> batch dict (the batch contract the models read).

    Audio/vision are zero-padded to the longest sample in the batch, with ``*_lengths`` and boolean
    ``*_mask`` (True = real frame). A sample with 0 real frames is given one all-zero frame counted as
    real (length 1, mask True), so attention over it and means over it stay finite. With a HF tokenizer,
    ``input_ids``/``attention_mask`` are right-padded, truncated to ``max_text_tokens``, and an empty
    transcript gets one BOS (or EOS) token.
    """

    def __init__(self, tokenizer=None, max_text_tokens: int = 50):
        self.tokenizer, self.max_text_tokens = tokenizer, max_text_tokens

    def __call__(self, samples: list[dict]) -> dict:
        batch = {"ids": [s["id"] for s in samples], "raw_text": [s["raw_text"] for s in samples]}
        for mod in ("audio", "vision"):
            lengths = [max(1, len(s[mod])) for s in samples]
            dim = samples[0][mod].shape[1]
            feats = torch.zeros(len(samples), max(lengths), dim, dtype=torch.float32)
            for i, s in enumerate(samples):
                feats[i, : len(s[mod])] = torch.from_numpy(np.array(s[mod], dtype=np.float32))
            lens = torch.tensor(lengths, dtype=torch.int64)
            batch[mod], batch[f"{mod}_lengths"] = feats, lens
            batch[f"{mod}_mask"] = torch.arange(max(lengths))[None, :] < lens[:, None]
        for key in ("label", *UNIMODAL):
            if key in samples[0]:
                batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.float32)
        if self.tokenizer is not None:
            batch.update(self.tokenize(batch["raw_text"]))
        return batch

    def tokenize(self, texts: list[str]) -> dict:
        tok = self.tokenizer
        fallback = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else fallback
        ids = [tok(t, truncation=True, max_length=self.max_text_tokens)["input_ids"] or [fallback] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad, dtype=torch.int64)
        attention = torch.zeros((len(ids), width), dtype=torch.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            attention[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention}
