"""Per-dimension count, sum and sum of squares of rows that arrive in chunks, in float64.

One accumulator for every mean and standard deviation computed over data too large to hold:
global CMVN over the training split (`features.GlobalCMVN`), a long file's per-utterance CMVN
(`features.stream_features`), and the probes' standardisation of each layer
(`probe_heads.RunningMoments`). They differ only in how they finish: CMVN adds an epsilon to
the deviation, the probes leave a constant dimension unscaled. numpy only (no torch import: a
tensor is converted through its own `.double()`).
"""

from __future__ import annotations

import numpy as np


class Moments:
    """`update` with [N, dim] chunks (numpy arrays or torch tensors), `merge` partial sums,
    then `mean_std` (float64, population standard deviation)."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_sq = np.zeros(dim, dtype=np.float64)

    def update(self, rows) -> None:
        if hasattr(rows, "double") and not isinstance(
            rows, np.ndarray
        ):  # a torch tensor, on any device
            rows = rows.double().cpu().numpy()
        rows = np.asarray(rows, dtype=np.float64)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.sum_sq += np.square(rows).sum(axis=0)

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no rows to compute a mean and standard deviation from")
        mean = self.sum / self.count
        return mean, np.sqrt(np.maximum(self.sum_sq / self.count - np.square(mean), 0.0))
