"""The trainer's prefix cache (``fusion_dist/train/prefix_cache.py``) on a prepared dataset: its size is known and
printed before it is computed, it holds every transcript of the splits that read it, memory and disk hold the
same numbers, a finished store is reused, and a store computed from another backbone or dataset is never used."""

import logging
import shutil
from collections import namedtuple

import pytest
import torch

from conftest import base_args, run_cli
from fusion_dist import dist
from fusion_dist.config import load_config
from fusion_dist.data import ShardDataset, feature_dims
from fusion_dist.errors import UserError
from fusion_dist.models import build_model
from fusion_dist.models.presets import make_backbone
from fusion_dist.models.prefix import PrefixCache
from fusion_dist.predict import collator_for
from fusion_dist.rundir import RunDir
from fusion_dist.train import prefix_cache

Run = namedtuple("Run", "cfg model data collator manifest")


def setup_run(engine_inputs, run_dir, *overrides, shards=None, backbone=None):
    args = base_args(engine_inputs, run_dir, *overrides)
    cfg = load_config(args[0], args[1:] + [f"data.root={shards}"] * bool(shards) + [f"model.backbone={backbone}"] *
                      bool(backbone))
    data = {s: ShardDataset(cfg.data.root, s) for s in ("train", "valid", "test")}
    torch.manual_seed(0)
    model = build_model(cfg.model, *feature_dims(data["train"].manifest).values()).train()
    return Run(cfg, model, data, collator_for(model, cfg.data.max_text_tokens), data["train"].manifest)


def prepare(run: Run, run_dir, **train):
    for k, v in train.items():
        setattr(run.cfg.train, k, v)
    return prefix_cache.prepare(run.model, run.cfg, run.data, run.collator, RunDir(run_dir), run.manifest,
                                dist.detect({}), torch.device("cpu"))


def stores(run_dir):
    return sorted(p.name for p in (run_dir / "prefix_cache").iterdir()) if (run_dir / "prefix_cache").is_dir() else []


def test_prefix_cache_size_reuse_and_staleness(engine_inputs, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fusion_dist")

    def size_line() -> str:
        return [r.getMessage() for r in caplog.records if " GiB in " in r.getMessage()][-1]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = setup_run(engine_inputs, run_dir)
    assert run.model.prefix_layers == 2 and run.model.deterministic_text

    # auto within prefix_cache_memory_gb: in memory, nothing written; every transcript of the three splits
    memory = prepare(run, run_dir)
    texts = [t for s in ("train", "valid", "test") for t in run.data[s].texts()]
    batch = run.collator.tokenize(texts)
    keys = set(PrefixCache.keys(batch["input_ids"], batch["attention_mask"].bool()))
    assert set(memory.index) == keys and not stores(run_dir)
    line = size_line()
    n_tokens = sum(map(len, keys))
    assert f"{len(keys)} transcripts of train, valid, test, {n_tokens} tokens x 2 layers" in line
    assert f"{memory.bytes / 2**30:.3f} GiB in each rank's CPU memory" in line
    calls = []
    rows = run.model.prefix_rows
    monkeypatch.setattr(run.model, "prefix_rows", lambda ids: calls.append(ids.shape) or rows(ids))
    assert prepare(run, run_dir) is memory and len(calls) == 1  # the next seed of the run: only the probe
    monkeypatch.undo()

    # over prefix_cache_memory_gb: on disk, the same numbers; a second start maps the finished store again
    disk = prepare(run, run_dir, prefix_cache_memory_gb=0.0)
    (store,) = stores(run_dir)
    assert disk.index.keys() == memory.index.keys() and disk.bytes == memory.bytes
    for key in list(keys)[:20]:
        (p, a), (q, b) = memory.index[key], disk.index[key]
        assert torch.equal(memory.parts[p][a:a + len(key)], disk.parts[q][b:b + len(key)])
    calls = []
    rows = run.model.prefix_rows
    monkeypatch.setattr(run.model, "prefix_rows", lambda ids: calls.append(ids.shape) or rows(ids))
    again = prepare(run, run_dir)
    assert len(calls) == 1 and stores(run_dir) == [store] and "(reused)" in size_line()  # the probe
    assert torch.equal(again.parts[0], disk.parts[0])

    # an unfinished store (no meta.json) is computed again, not read
    (run_dir / "prefix_cache" / store / "meta.json").unlink()
    prepare(run, run_dir)
    assert len(calls) > 2 and stores(run_dir) == [store]
    monkeypatch.undo()

    # another backbone of the same shape (other weights): a new store, the old one removed, other numbers
    other_bb = make_backbone("gpt2", "tiny", tmp_path / "bb1", seed=1)
    other = setup_run(engine_inputs, run_dir, backbone=other_bb)
    moved = prepare(other, run_dir, prefix_cache="disk")
    (new,) = stores(run_dir)
    assert new != store and moved.index.keys() == disk.index.keys()
    assert not torch.equal(moved.parts[0][:5], disk.parts[0][:5])
    # another dataset: a new store again
    shards = tmp_path / "shards1"
    for sub, args in (("synth", ["--dataset", "mosi", "--samples", "60", "--seed", "1", "--out", str(tmp_path / "s.pkl")]),
                      ("prepare", [str(tmp_path / "s.pkl"), str(shards)])):
        assert run_cli(sub, args).returncode == 0
    assert prepare(setup_run(engine_inputs, run_dir, shards=shards), run_dir, prefix_cache="disk") is not None
    assert stores(run_dir) not in ([new], [store])

    # text augmentation: the training split is not cached (it never reads it); off: nothing at all
    seqaug = setup_run(engine_inputs, run_dir, "model.augment.kind=seqaug")
    valid_test = prepare(seqaug, run_dir)
    assert len(valid_test) < len(memory) and "transcripts of valid, test," in size_line()
    assert prepare(run, run_dir, prefix_cache="off") is None

    # no room on disk: auto trains without it, disk refuses naming the key
    shutil.rmtree(run_dir / "prefix_cache")
    monkeypatch.setattr(prefix_cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    assert prepare(run, run_dir, prefix_cache="auto", prefix_cache_memory_gb=0.0) is None
    assert "training without it" in caplog.records[-1].getMessage()
    with pytest.raises(UserError, match=r"train\.prefix_cache: .* GiB for the cache, more than .* has free"):
        prepare(run, run_dir, prefix_cache="disk")
