"""How one optimizer step's global batch is cut across ranks: micro-batch x accumulation x world size."""

from __future__ import annotations

from dataclasses import dataclass

from fusion_dist.config.schema import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step of ``global_batch`` samples is cut: ``world`` ranks x ``accumulation``
    micro-batches of ``micro`` samples each."""

    global_batch: int
    world: int
    micro: int
    accumulation: int

    def steps_per_epoch(self, n_train: int) -> int:
        """Whole optimizer steps in an epoch of ``n_train`` samples (``RankSampler`` drops the incomplete
        last round of micro-batches)."""
        return n_train // (self.micro * self.world) // self.accumulation

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = micro {self.micro} x accumulation {self.accumulation} "
                f"x world {self.world}")


def batch_geometry(train: TrainConfig, world_size: int) -> BatchGeometry:
    """The per-rank micro-batch and the accumulation for this world size (or a ConfigError naming both numbers).

    ``train.micro_batch_size`` is a cap ("at most this many per forward"): the micro-batch is the largest
    divisor of the per-rank share of the global batch that fits under it, so the accumulation is the least
    that respects the cap. Whenever two world sizes give the same micro-batch they run the very same
    micro-batches (``RankSampler`` deals them by position), and on any world size step ``s`` consumes the
    same ``global_batch`` samples.
    """
    g, cap = train.global_batch_size, train.micro_batch_size
    if g < 1 or cap < 1:
        raise ConfigError(f"train.global_batch_size={g} and train.micro_batch_size={cap} must both be >= 1")
    if world_size < 1 or g % world_size:
        raise ConfigError(
            f"train.global_batch_size={g} is not divisible by the world size {world_size} (ranks = nodes x ranks "
            f"per node); choose a global batch that is a multiple of {world_size}, or another number of ranks"
        )
    per_rank = g // world_size
    micro = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    return BatchGeometry(g, world_size, micro, per_rank // micro)
