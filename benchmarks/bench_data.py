"""Shard reader vs the reference's pickle loading: peak RSS and time to first batch of 2 ranks.

    .venv/bin/python benchmarks/bench_data.py            # MOSEI-shaped, 5000 samples (~1.1 GB float32)

Makes a synthetic MOSEI-shaped pickle, prepares shards, then starts 2 spawned processes (ranks 0 and 1)
per path, concurrently, as a 2-rank job would:
- pickle path, as MMSA's ``MMDataset`` does: ``pickle.load`` the whole file, cast audio/vision of the
  split to float32, replace ``-inf`` with 0, then index samples;
- shard path: ``ShardDataset`` (memory-mapped) + ``RankSampler``.
Each process builds its first batch with ``Collator`` and reports seconds from the start of loading to the
first batch and its peak RSS (``VmHWM``), both absolute (the same torch/pyarrow imports included
for both paths) and above the RSS it had after its imports (the data's own cost). Data lives under --workdir
and is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import shutil
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec, so a spawned child would report the parent's peak.
    return _status_mib("VmHWM")


def _pickle_rank(path: str, rank: int, batch_size: int, queue) -> None:
    import numpy as np

    from fusion_dist.data import Collator

    base, t0 = _rss_mib(), time.perf_counter()
    with open(path, "rb") as f:
        data = pickle.load(f)
    split = data["train"]
    audio = split["audio"].astype(np.float32)
    audio[audio == -np.inf] = 0
    vision = split["vision"].astype(np.float32)
    idx = range(rank, len(split["id"]), 2)
    samples = [{"id": split["id"][i], "raw_text": split["raw_text"][i], "label": float(split["regression_labels"][i]),
                "audio": audio[i, : split["audio_lengths"][i]], "vision": vision[i, : split["vision_lengths"][i]]}
               for i in list(idx)[:batch_size]]
    Collator()(samples)
    queue.put(("pickle", rank, time.perf_counter() - t0, _peak_mib(), _peak_mib() - base))


def _shard_rank(root: str, rank: int, batch_size: int, queue) -> None:
    from fusion_dist.data import Collator, RankSampler, ShardDataset

    base, t0 = _rss_mib(), time.perf_counter()
    ds = ShardDataset(root, "train")
    sampler = RankSampler(len(ds), rank, 2, shuffle=True, seed=0)
    Collator()([ds[i] for i in sampler.indices()[:batch_size]])
    queue.put(("shards", rank, time.perf_counter() - t0, _peak_mib(), _peak_mib() - base))


def _run_ranks(target, arg: str, batch_size: int) -> list[tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(arg, rank, batch_size, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"{target.__name__} rank process failed with exit code {p.exitcode}")
    return sorted(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mosei", choices=["mosi", "mosei", "sims"])
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/fusion-dist-bench-data")
    p.add_argument("--keep", action="store_true", help="keep the pickle and shards")
    args = p.parse_args()

    from data_prep import shards, synth

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pkl, root = work / f"{args.dataset}.pkl", work / "shards"
    try:
        t = time.perf_counter()
        synth.main(["--dataset", args.dataset, "--samples", str(args.samples), "--out", str(pkl)])
        print(f"synth: {pkl.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        shards.main_prepare([str(pkl), str(root), "--overwrite", "--rows-per-shard", str(args.rows_per_shard)])
        print(f"prepare: {time.perf_counter() - t:.0f} s")
        results = _run_ranks(_pickle_rank, str(pkl), args.batch_size) + _run_ranks(_shard_rank, str(root), args.batch_size)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'path':8s} {'rank':>4s} {'first batch (s)':>16s} {'peak RSS (MiB)':>15s} {'above imports (MiB)':>20s}")
    for path, rank, secs, rss, data_rss in results:
        print(f"{path:8s} {rank:4d} {secs:16.2f} {rss:15.0f} {data_rss:20.0f}")
    by = {k: [r for r in results if r[0] == k] for k in ("pickle", "shards")}
    rss_ratio = max(r[3] for r in by["shards"]) / max(r[3] for r in by["pickle"])
    data_ratio = max(r[4] for r in by["shards"]) / max(r[4] for r in by["pickle"])
    time_ratio = max(r[2] for r in by["shards"]) / max(r[2] for r in by["pickle"])
    print(f"ratio shards/pickle: peak RSS per rank {rss_ratio:.3f} (above the imports: {data_ratio:.3f}; target <= 0.1), "
          f"time to first batch {time_ratio:.3f} (target <= 0.2)")


if __name__ == "__main__":
    main()
