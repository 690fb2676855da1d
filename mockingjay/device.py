"""Which device a stage computes on: one policy for pretraining, extraction and probing."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when present (this rank's GPU), else CPU; a CUDA request without CUDA is a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)
