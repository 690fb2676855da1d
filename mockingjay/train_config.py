"""The settings of a pretraining run (`TrainConfig`) and the data it reads (`TrainData`).

Both are frozen and validated when the run is built; the pipeline stage makes `TrainConfig` from
`params.yaml: pretrain.train` (every error names the parameter there) and `TrainData` from the
feature stores, whose hop gives the frame rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings of a pretraining run (defaults follow s3prl)."""

    total_steps: int = 1000
    learning_rate: float = 2e-4
    weight_decay: float = 0.01  # applied to matrices only, not to biases and LayerNorm
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_proportion: float = 0.07
    grad_clip: float = 5.0  # max global gradient norm; 0 disables clipping
    grad_accumulation: int = 1
    max_frames_per_batch: int = 12000  # padded frames per micro-batch (s3prl: 8 x 1500)
    max_batch_size: int | None = None
    max_length: int | None = 1500  # longer utterances are randomly cropped to this many frames
    bucket_pool_size: int = 2048  # utterances sorted together when bucketing by length
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: held-out loss only at step 0 and at the end
    eval_max_utterances: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    num_workers: int | None = None  # DataLoader workers; None: 0 on CPU, up to 4 per GPU process
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (NaN fails every check)."""

        def check(name: str, ok: bool, requirement: str) -> None:
            if not ok:
                raise ValueError(
                    f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}"
                )

        for name in (
            "total_steps",
            "grad_accumulation",
            "max_frames_per_batch",
            "bucket_pool_size",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            check(name, getattr(self, name) >= 1, ">= 1")
        for name in ("max_batch_size", "max_length", "eval_max_utterances"):
            check(name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 or null")
        check("num_workers", self.num_workers is None or self.num_workers >= 0, ">= 0 or null")
        check("learning_rate", 0 < self.learning_rate < math.inf, "a positive number")
        for name in ("weight_decay", "grad_clip", "eval_every"):
            check(name, getattr(self, name) >= 0, ">= 0")
        check("warmup_proportion", 0.0 <= self.warmup_proportion < 1.0, "in [0, 1)")
        check(
            "adam_betas",
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "two numbers in [0, 1)",
        )
        check("adam_eps", self.adam_eps > 0, "> 0")
        check("precision", self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32")
        check(
            "device",
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "auto, cpu, cuda or cuda:N",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainData:
    """The feature stores a run reads. Without target stores the model reconstructs its input (MAM)."""

    train: str | Path | Sequence[str | Path]
    heldout: str | Path | None = None
    train_targets: Sequence[str | Path | None] | None = None
    heldout_target: str | Path | None = None
    frame_rate: float = (
        100.0  # feature frames per second of audio: only for the audio-seconds figures
    )

    def __post_init__(self):
        if not self.frame_rate > 0:
            raise ValueError(f"TrainData.frame_rate must be > 0, got {self.frame_rate!r}")
