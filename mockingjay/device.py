"""Which device a stage computes on, and in which precision: one policy for pretraining,
extraction and probing.

`resolve_device` turns a setting ("auto", "cpu", "cuda", "cuda:N") into a device; `autocast`
is the context the model runs in there: bf16 autocast on CUDA (tensor cores, fp32 range), full
fp32 everywhere else, unless a precision is asked for. The probe heads train in fp32 always; the
encoder the online probe runs on the fly goes through extraction's `encode_batches`, so under
this same `autocast`.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> CUDA when present (this rank's GPU), else CPU; a CUDA request without CUDA is a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def wants_cuda(name: str) -> bool:
    """Whether the setting `name` computes on CUDA, known before a process group assigns the GPU."""
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype on `device`: bf16 for precision "bf16", and for "auto" on CUDA; None
    (no autocast: fp32) for "fp32", and for "auto" anywhere else."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The context a forward pass runs in on `device` (`autocast_dtype`; a null context for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
