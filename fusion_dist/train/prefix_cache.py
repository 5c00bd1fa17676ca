"""The trainer's side of the prefix cache (``fusion_dist/models/prefix.py``): which transcripts, how big, where it
lives, and computing it once before the first epoch.

The splits that will read it are tokenized (train only where the text's path is deterministic; valid and test
always) and their distinct transcripts cut into chunks; a one-token probe gives the row width, so the size is known
before anything is computed, and printed.

- ``memory``: every rank computes every chunk into its own memory (the same layer calls on every rank, as ZeRO-3's
  collective gathers need); the run's next seed reuses it.
- ``disk``: rank r computes chunks r, r + W, ... into ``<run.dir>/prefix_cache/<id>/part-<r>.{bin,json}`` (a rank
  with one chunk fewer computes one more and drops it, so ZeRO-3 ranks still make the same calls), rank 0 writes
  ``meta.json`` last, and every rank maps every part. ``<id>`` hashes what the rows are a function of: the data
  manifest, the backbone (a local directory's fingerprint; a hub name with its revision), the transcripts' token ids,
  the prefix depth, dtype, attention kernel and torch version. A store is used only when its ``meta.json`` records
  exactly that identity; the run directory's other stores (its earlier backbones or data) are removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from fusion_dist import dist
from fusion_dist.config import Config
from fusion_dist.dist import log
from fusion_dist.errors import UserError
from fusion_dist.export import backbone_reference
from fusion_dist.models.prefix import CHUNK, PrefixCache, chunks
from fusion_dist.progress import Progress
from fusion_dist.rundir import RunDir

TOKENIZE_BATCH = 256
_KEPT: dict[str, PrefixCache] = {}  # the last in-memory cache, by identity: the run's next seed reuses it


def transcripts(data: dict, splits: list[str], collator) -> list[tuple]:
    """Every transcript of ``splits`` as the collator tokenizes it (its real token ids)."""
    keys = []
    for split in splits:
        texts = data[split].texts()
        for i in range(0, len(texts), TOKENIZE_BATCH):
            batch = collator.tokenize(texts[i:i + TOKENIZE_BATCH])
            keys += PrefixCache.keys(batch["input_ids"], batch["attention_mask"].bool())
    return keys


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _identity(model, cfg: Config, manifest: dict, work: list[list[tuple]], layout) -> dict:
    ref = backbone_reference(cfg.model.backbone)  # a local backbone by content, wherever it lies
    backbone = {"fingerprint": ref["fingerprint"]} if ref["local"] else {
        "name": ref["name"], "revision": getattr(model.lm.config, "_commit_hash", None)}
    return {"manifest": _sha(manifest), "backbone": backbone, "transcripts": _sha(work), "layout": asdict(layout),
            "kernel": model.attn_kernel, "torch": torch.__version__, "chunk": CHUNK}


def _progress(work: list[list[tuple]], unit: str, device: torch.device) -> Progress:
    return Progress("prefix cache", sum(map(len, work)), unit, device)


def prepare(model, cfg: Config, data: dict, collator, run: RunDir, manifest: dict, denv: dist.DistEnv,
            device: torch.device) -> PrefixCache | None:
    """The cache ``train.prefix_cache`` asks for, computed or opened; None where it does not apply."""
    mode = cfg.train.prefix_cache
    if mode == "off" or not model.prefix_layers:
        return None
    splits = (["train"] if model.deterministic_text else []) + ["valid", "test"]
    work = chunks(transcripts(data, splits, collator))

    def rows_of(ids):
        return model.prefix_rows(ids.to(device))

    probe, layout = rows_of(torch.tensor([work[0][0][:1]]))
    n_tokens = sum(len(k) for chunk in work for k in chunk)
    size = n_tokens * layout.width * probe.element_size()
    identity = _identity(model, cfg, manifest, work, layout)
    key = _sha(identity)[:16]
    directory = run.root / "prefix_cache" / key
    stored = PrefixCache.identity_of(directory) == identity
    if mode == "auto":
        mode = "memory" if size <= cfg.train.prefix_cache_memory_gb * 2**30 else "disk"
    if mode == "disk" and not stored:
        free = shutil.disk_usage(run.root).free
        if not all(dist.all_gather_object(size < 0.9 * free)):
            problem = (f"train.prefix_cache: {size / 2**30:.2f} GiB for the cache, more than {run.root} has free "
                       f"({free / 2**30:.2f} GiB)")
            if cfg.train.prefix_cache == "disk":
                raise UserError(f"{problem}; free space there, or set train.prefix_cache=off")
            log.warning(f"{problem}; training without it")
            return None
    reused = key in _KEPT if mode == "memory" else stored
    where = ("each rank's CPU memory" if mode == "memory" else str(directory)) + (" (reused)" if reused else "")
    log.info(f"prefix cache: {sum(map(len, work))} transcripts of {', '.join(splits)}, {n_tokens} tokens x "
             f"{layout.layers} layers = {size / 2**30:.3f} GiB in {where} (train.prefix_cache=off to recompute instead)")
    if mode == "memory":
        if not reused:
            _KEPT.clear()
            _KEPT[key] = PrefixCache.compute(rows_of, work, _progress(work, "transcripts", device))
        return _KEPT[key]
    if not stored:
        _write_store(directory, rows_of, work, layout, identity, denv, device)
    return PrefixCache.open(directory)


def _write_store(directory: Path, rows_of, work, layout, identity: dict, denv: dist.DistEnv,
                 device: torch.device) -> None:
    if denv.is_main:
        shutil.rmtree(directory, ignore_errors=True)  # an unfinished store of this run (no meta.json)
        directory.mkdir(parents=True)
    dist.barrier()
    mine = work[denv.rank::denv.world_size]
    PrefixCache.write_part(directory, denv.rank, rows_of, mine, _progress(mine, "transcripts (rank 0's share)",
                                                                          device))
    for _ in range(-(-len(work) // denv.world_size) - len(mine)):
        rows_of(torch.tensor(work[0]))  # the same number of layer calls on every rank (ZeRO-3 gathers)
    dist.barrier()
    if denv.is_main:
        PrefixCache.write_meta(directory, layout, denv.world_size, identity)  # last: marks the store finished
        for old in directory.parent.iterdir():
            if old != directory and old.is_dir():
                log.info(f"prefix cache: removing {old}, computed for another backbone, dataset or tokenizer")
                shutil.rmtree(old)
    dist.barrier()
