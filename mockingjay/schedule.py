"""Learning-rate schedule: linear warm-up to the peak, then linear decay to zero.

This is the schedule of the paper and of s3prl (warm-up over the first 7% of the steps). The
multiplier is a pure function of the optimizer step, so a resumed run lands on exactly the same
learning rate as an uninterrupted one whatever state the scheduler object was restored from.

Convention (the one of BERT and `transformers.get_linear_schedule_with_warmup`): the update
with index `step` (0-based) uses `peak * multiplier(step)`; the multiplier rises from 0 at step
0 to 1 at `warmup_steps` and falls back to 0 at `total_steps`.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

DEFAULT_WARMUP_PROPORTION = 0.07


def warmup_steps_for(total_steps: int, warmup_proportion: float = DEFAULT_WARMUP_PROPORTION) -> int:
    """Number of warm-up steps: `warmup_proportion` of the total, rounded to the nearest step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_proportion < 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion}")
    return int(round(total_steps * warmup_proportion))


def lr_multiplier(
    step: int, total_steps: int, warmup_proportion: float = DEFAULT_WARMUP_PROPORTION
) -> float:
    """Fraction of the peak learning rate used by the update with index `step`."""
    warmup = warmup_steps_for(total_steps, warmup_proportion)
    if step < warmup:
        return step / warmup
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / (total_steps - warmup)


def lr_at(
    step: int,
    peak_lr: float,
    total_steps: int,
    warmup_proportion: float = DEFAULT_WARMUP_PROPORTION,
) -> float:
    """Learning rate of the update with index `step`."""
    return peak_lr * lr_multiplier(step, total_steps, warmup_proportion)


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_proportion: float = DEFAULT_WARMUP_PROPORTION,
) -> LambdaLR:
    """A `LambdaLR` applying `lr_multiplier` to every parameter group's peak (initial) LR.

    Call `scheduler.step()` once after every `optimizer.step()`. The lambda is a closure, so
    `state_dict()` stores only plain numbers (`last_epoch`, base LRs): safe for
    `torch.load(weights_only=True)`.
    """
    warmup_steps_for(total_steps, warmup_proportion)  # validate early, with a clear message

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_proportion)

    return LambdaLR(optimizer, multiplier)
