"""What a checkpoint holds of a training run besides its weights, and the loop's own errors.

`state_of(loop, ...)` is the trainer state written beside the weights (step, data position, the
optimizer and scheduler, every rank's random streams); `restore_state(loop, path)` puts a run back
where a checkpoint left it, bit for bit when the world size is the same. `Tally` is what the steps
add up to between the loop's sync points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mockingjay.checkpoint import load_trainer_state, load_weights
from mockingjay.tensor_files import restore_rng_state

TRAINER_STATE_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient norm became inf/NaN; no checkpoint was written after it."""


class TrainingStopped(RuntimeError):
    """`should_stop()` asked the run to stop: it finished its step and wrote `checkpoint` there."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class Tally:
    """What the steps add up to between sync points. Device tensors, so a step never waits for the GPU."""

    loss: torch.Tensor  # summed micro-batch losses since the last log
    skipped: torch.Tensor  # batches with nothing to learn from (count 0), this run
    nonfinite: torch.Tensor  # any inf/NaN loss or gradient norm, this run
    grad_norm: torch.Tensor  # of the last step
    micro_batches: int = 0  # since the last log
    frames: int = 0  # since the last log
    run_frames: int = 0
    start: float = field(default_factory=time.perf_counter)  # of the interval, pauses excluded
    paused: float = 0.0  # evaluation and checkpoint seconds this run, kept out of the throughput
    last_loss: float | None = None


def state_of(loop, skipped_total: int, per_rank: list) -> dict[str, Any]:
    """The trainer state of `loop` now; `per_rank` holds every rank's random streams."""
    return {
        "version": TRAINER_STATE_VERSION,
        "step": loop.step,
        "epoch": loop.epoch,
        "batch_in_epoch": loop.batch_in_epoch,
        "skipped_batches": skipped_total,
        "heldout_loss_initial": loop.heldout_loss_initial,
        "world_size": loop.dist.world_size,
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "rank_states": per_rank,
    }


def restore_state(loop, path: Path) -> None:
    """Load checkpoint `path` into `loop` (weights, optimizer, scheduler, position, streams)."""
    load_weights(path, loop.model, device=loop.device)
    state = load_trainer_state(path, map_location="cpu")
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.step, loop.epoch, loop.batch_in_epoch = (
        state["step"],
        state["epoch"],
        state["batch_in_epoch"],
    )
    loop.skipped_before = state["skipped_batches"]
    loop.heldout_loss_initial = state["heldout_loss_initial"]
    per_rank = state["rank_states"]
    if len(per_rank) == loop.dist.world_size:
        restore_rng_state(per_rank[loop.dist.rank]["rng"])
        loop.mask_generator.set_state(per_rank[loop.dist.rank]["mask_generator"])
    else:  # different world size: the random streams restart, the epoch's batches differ
        torch.manual_seed(loop.config.seed + loop.step)
        loop.batch_in_epoch = min(loop.batch_in_epoch, loop.sampler.batches_per_epoch(loop.epoch))
        loop.mask_generator.manual_seed(loop.config.seed + loop.step + 7919 * loop.dist.rank)


def nonfinite_error(loop, step: int) -> NonFiniteLossError:
    where = (
        f"the last good checkpoint is {loop.last_good}"
        if loop.last_good
        else "no checkpoint was written yet"
    )
    return NonFiniteLossError(
        f"training loss or gradient norm became inf/NaN by step {step} (learning rate "
        f"{loop.scheduler.get_last_lr()[0]:.3g}); stopped without writing a checkpoint; {where}. "
        "Check the features for inf/NaN values or lower TrainConfig.learning_rate."
    )
