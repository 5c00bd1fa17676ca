"""Progress of long work, shown by rank 0 only: one log line every ``INTERVAL_S`` seconds and one at the end
(done / total, items/s, tokens/s, elapsed, ETA, peak memory), or a tqdm bar instead when stderr is a terminal;
and a node's system metrics (MLflow's names) for the tracker."""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch

log = logging.getLogger("fusion_dist")


def peak_memory(device: torch.device | None = None) -> str:
    """The process's peak memory: the GPU allocator's on a GPU, else the resident set's."""
    if device is not None and device.type == "cuda":
        return f"peak GPU mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak mem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # KiB on Linux


def node_metrics(device: torch.device) -> dict[str, float]:
    """This node's CPU and memory use (since the last call), and its GPUs' when it has them, named as MLflow's
    system metrics (``system/<node>/<name>`` once prefixed with the node)."""
    import psutil

    memory = psutil.virtual_memory()
    out = {"cpu_utilization_percentage": psutil.cpu_percent(interval=None),
           "system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
           "system_memory_usage_percentage": memory.percent}
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out[f"gpu_{i}_memory_usage_megabytes"] = (total - free) / 2**20
            try:
                out[f"gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
            except (ModuleNotFoundError, RuntimeError):  # no NVML (pynvml) on this machine
                pass
    return out


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rates(items: float, tokens: float, elapsed: float, unit: str) -> str:
    elapsed = max(elapsed, 1e-9)
    text = f"{items / elapsed:.1f} {unit}/s"
    return text + (f", {tokens / elapsed:.0f} tokens/s" if tokens else "")


class Progress:
    """``update(n, tokens)`` after each piece of work; ``what`` names it in every line. The end gets a line when
    ``summary`` or when the work was long enough to get interval lines."""

    INTERVAL_S = 30.0

    def __init__(self, what: str, total: int, unit: str, device: torch.device | None = None, summary: bool = True):
        self.what, self.total, self.unit, self.device = what, total, unit, device
        self.summary = summary
        self.done = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if log.isEnabledFor(logging.INFO) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, leave=False)

    def update(self, n: int, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
        now = time.perf_counter()
        finished = self.done >= self.total
        if (finished and self.summary) or (self.bar is None and now - self.last >= self.INTERVAL_S):
            self.last, self.summary = now, True
            self._line(now - self.t0, finished)
        if finished and self.bar is not None:
            self.bar.close()

    def _line(self, elapsed: float, finished: bool) -> None:
        frac = self.done / max(1, self.total)
        eta = "done" if finished else f"ETA {duration(elapsed * (1 - frac) / max(frac, 1e-9))}"
        log.info(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * frac:.0f}%) | "
                 f"{rates(self.done, self.tokens, elapsed, self.unit)} | {duration(elapsed)}, {eta} | "
                 f"{peak_memory(self.device)}")
