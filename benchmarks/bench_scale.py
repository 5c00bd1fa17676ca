"""The paper MOSI job at its real size on 2 CPU ranks: SmolLM2-1.7B shape, bf16, LoRA r=512, ZeRO-2 and ZeRO-3.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py [--work DIR] [--samples N] [--stages 2 3]

Minutes, and 7 GB of disk under --work (default /tmp/fd_bench_scale, kept between runs so the backbone is
made once); run it alone, not next to the test suite. Steps:

1. ``make-backbone --arch llama --preset smollm2-1.7b`` (random weights, the real shape) and a synthetic
   MOSI-shaped dataset (``synth`` + ``prepare``);
2. per ZeRO stage, ``fusion-dist train configs/paper/deepmlf_mosi.yaml`` on 2 ranks (torchrun) with overrides
   only for the backbone, data, run dir, epochs, batch sizes, seeds (one instead of five) and
   ``model.av.init=random+tune`` (no stage-1 export needed). The ZeRO-2 run is asked to stop (SIGUSR1, as
   Slurm does before a time limit) after its first epoch and resumed for a second one;
3. prints per rank: peak anonymous RSS and the log line it came after (sampled from /proc every 50 ms; file-backed pages of the memory-mapped
   backbone are not counted), the bf16 weights the rank holds and the target (those + 3 GiB), the model
   state the engine holds (its log line) next to ``fusion-dist plan``'s estimate of the same, seconds per
   optimizer step, and checkpoint bytes;
4. activation memory of one micro-batch (bytes autograd saves for backward) with
   ``train.activation_checkpointing`` none / lm / all, in one process on the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = str(ROOT / "configs/paper/deepmlf_mosi.yaml")
GIB = 2**30
MARGIN = 3 * GIB  # the target: peak anonymous RSS <= bf16 weights the rank holds + 3 GiB


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True, env=env())


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{os.environ['PATH']}"}


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Peak RssAnon of each rank process (children of the launcher that carry a RANK), and the phase it
    happened in: the log's last line at that moment."""

    def __init__(self, launcher: subprocess.Popen, log: Path):
        super().__init__(daemon=True)
        self.launcher, self.log, self.stop = psutil.Process(launcher.pid), log, threading.Event()
        self.peaks: dict[int, int] = {}
        self.phases: dict[int, str] = {}

    def ranks(self) -> dict[int, int]:
        out = {}
        for p in self.launcher.children(recursive=True):
            try:
                rank = p.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                out[int(rank)] = p.pid
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for rank, pid in self.ranks().items():
                rss = rss_anon(pid)
                if rss > self.peaks.get(rank, 0):
                    self.peaks[rank], self.phases[rank] = rss, self.last_line()
            time.sleep(0.05)

    def last_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:80] if lines else "start-up"


def train(args: list[str], log: Path, stop_after_epoch: bool = False) -> dict:
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "fusion_dist.cli", "train", CONFIG, *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = PeakSampler(proc, log)
        sampler.start()
        signalled = False
        while proc.poll() is None:
            if stop_after_epoch and not signalled and re.search(r"epoch 1/\d+: valid", log.read_text()):
                for pid in sampler.ranks().values():
                    os.kill(pid, signal.SIGUSR1)  # as slurm/_common.sh forwards --signal=B:USR1@N
                signalled = True
            time.sleep(0.2)
        sampler.stop.set()
        sampler.join()
    text = log.read_text()
    # torchrun reports a rank's exit 85 (checkpointed and stopped) as its own failure: the log says which
    if (proc.returncode != 0) != stop_after_epoch or (stop_after_epoch and "preempted" not in text):
        sys.exit(f"training exited {proc.returncode}; log: {log}\n{text[-3000:]}")
    rates = [float(m) for m in re.findall(r"\| ([\d.]+) samples/s", text)]
    held = re.search(r"weights ([\d.]+) GiB \+ optimizer ([\d.]+) GiB", text)
    return {"peaks": sampler.peaks, "phases": sampler.phases, "rates": rates, "wall_s": time.perf_counter() - t0, "resumed": "resumed from" in text,
            "held": (float(held.group(1)) + float(held.group(2))) * GIB}


def plan_estimate(overrides: list[str], stage: int) -> dict:
    out = subprocess.run([str(BIN / "fusion-dist"), "plan", CONFIG, *overrides, "--gpus", "2", "--gpu-mem", "1TB",
                          "--json"], env=env(), capture_output=True, text=True, check=True).stdout
    option = next(o for o in json.loads(out)["options"] if o["name"] == f"zero{stage}")
    return option


def checkpoint_bytes(run_dir: Path) -> int:
    ck = run_dir / "checkpoints"
    tag = next(ck.glob("seed*/latest")).read_text().strip()
    return sum(f.stat().st_size for f in next(ck.glob("seed*")).joinpath(tag).rglob("*") if f.is_file())


def activation_memory(backbone: Path, data: Path) -> dict[str, int]:
    """Bytes of activations autograd keeps for backward over one training micro-batch of 4 (the weights it also
    keeps references to are not counted), per activation_checkpointing mode."""
    import torch

    from fusion_dist.config import load_config
    from fusion_dist.data import ShardDataset
    from fusion_dist.models.build import build_for_stage
    from fusion_dist.predict import collator_for

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(CONFIG, [f"model.backbone={backbone}", f"data.root={data}", "model.av.init=random+tune"])
    ds = ShardDataset(str(data), "train")
    model = build_for_stage(cfg, "train", ds.dims).train()
    batch = collator_for(model, cfg.data.max_text_tokens)([ds[i] for i in range(4)])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved for backward, but not activations
    out = {}
    for mode in ("none", "lm", "all"):
        model.activation_checkpointing = mode
        kept: list[int] = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        out[mode] = sum(kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/fd_bench_scale")
    p.add_argument("--samples", type=int, default=120, help="synthetic MOSI samples (about 70%% train)")
    p.add_argument("--stages", type=int, nargs="*", default=[2, 3], help="none: only the activation measurement")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    backbone, data = work / "smollm2-1.7b", work / "mosi"
    fd = str(BIN / "fusion-dist")
    if not (backbone / "config.json").is_file():
        sh(fd, "make-backbone", "--arch", "llama", "--preset", "smollm2-1.7b", "--out", str(backbone))
    if not (data / "manifest.json").is_file():
        sh(fd, "synth", "--dataset", "mosi", "--samples", str(a.samples), "--seed", "0", "--out", str(work / "mosi.pkl"))
        sh(fd, "prepare", str(work / "mosi.pkl"), str(data))
    common = [f"model.backbone={backbone}", f"data.root={data}", "model.av.init=random+tune"]
    batch = ["train.global_batch_size=16", "train.micro_batch_size=4", "train.eval_batch_size=16"]
    rows = []
    for stage in a.stages:
        run_dir = work / f"run_zero{stage}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        overrides = [*common, *batch, f"run.dir={run_dir}", "run.seeds=[0]", f"train.zero_stage={stage}",
                     "tracking.enabled=false", "train.log_every_steps=1", f"train.epochs={2 if stage == 2 else 1}"]
        runs = {"epoch 1": train(overrides, work / f"zero{stage}.log", stop_after_epoch=stage == 2)}
        if stage == 2:
            runs["resumed, epoch 2"] = train(overrides, work / f"zero{stage}_resume.log")
            assert runs["resumed, epoch 2"]["resumed"], "the second run did not resume"
        plan = plan_estimate(overrides, stage)
        weights_held = plan["frozen"] + plan["trainable"]  # bf16 weights per rank (partitioned under ZeRO-3)
        for name, r in runs.items():
            for rank, peak in sorted(r["peaks"].items()):
                rows.append({
                    "stage": stage, "run": name, "rank": rank, "peak_anon_gib": peak / GIB,
                    "bf16_weights_gib": weights_held / GIB, "target_gib": (weights_held + MARGIN) / GIB,
                    "meets_target": peak <= weights_held + MARGIN,
                    "engine_model_state_gib": r["held"] / GIB,
                    "plan_model_state_gib": (weights_held + plan["optimizer"]) / GIB,
                    "plan_over_engine": (weights_held + plan["optimizer"]) / r["held"],
                    "s_per_step": 16 / statistics.median(r["rates"][1:] or r["rates"]),
                    "checkpoint_mib": checkpoint_bytes(run_dir) / 2**20,
                    "peak_after": r["phases"][rank],
                })
    acts = activation_memory(backbone, data)
    print("\n| ZeRO | run | rank | peak anon RSS (GiB) | bf16 weights held (GiB) | target (GiB) | met | "
          "engine model state (GiB) | plan (GiB) | plan / engine | s / step | checkpoint (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"ZeRO-{r['stage']} {r['run']} rank {r['rank']}: peak after log line '{r['peak_after']}'")
    for r in rows:
        print(f"| {r['stage']} | {r['run']} | {r['rank']} | {r['peak_anon_gib']:.2f} | {r['bf16_weights_gib']:.2f} | "
              f"{r['target_gib']:.2f} | {'yes' if r['meets_target'] else 'NO'} | {r['engine_model_state_gib']:.2f} | "
              f"{r['plan_model_state_gib']:.2f} | {r['plan_over_engine']:.2f} | {r['s_per_step']:.1f} | "
              f"{r['checkpoint_mib']:.0f} |")
    print("\nactivation memory of one micro-batch of 4 (bytes saved for backward): " +
          ", ".join(f"{k} {v / 2**20:.0f} MiB ({v / acts['none']:.2f}x)" for k, v in acts.items()))
    (work / "results.json").write_text(json.dumps({"rows": rows, "activations": acts}, indent=2))


if __name__ == "__main__":
    main()
