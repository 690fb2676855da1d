"""Tensor files whose failed writes are said as the OSErrors they are, and RNG states as tensors.

`save_torch` and `save_safetensors` write one file each (callers make it atomic: the checkpoint
directories through `mockingjay.atomic`); a full disk or a file size limit raises an OSError naming
the file instead of torch's `enforce fail at inline_container.cc` or safetensors' own error type.
`capture_rng_state` gives Python's, numpy's, torch's and CUDA's RNG states as values that
`torch.load(weights_only=True)` reads back (`restore_rng_state`).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mockingjay.atomic import named_error


def save_torch(obj: Any, file: str | Path) -> None:
    """`torch.save` through a file object of ours, so that a failed write (full disk, file size
    limit) raises the OSError it is, naming the file. Given a path, torch writes through its own
    C++ writer and says only `enforce fail at inline_container.cc ... unexpected pos`."""
    writer = None
    try:
        with open(file, "wb", buffering=0) as f:
            writer = _WholeWrites(f)
            torch.save(obj, writer)
    except OSError as err:
        raise named_error(err, file) from None
    except RuntimeError:
        if writer is None or writer.error is None:
            raise
        raise named_error(writer.error, file) from None  # torch swallowed it into `unexpected pos`


class _WholeWrites:
    """A file whose `write` writes every byte or raises the OSError, and keeps it: torch's writer
    reports some failed writes (a partial write at a file size limit) as its own RuntimeError."""

    def __init__(self, f):
        self._fd = f.fileno()
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            self.error = err
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def save_safetensors(
    save: Callable[..., None], what: Any, file: str | Path, metadata: dict[str, str]
) -> None:
    """`save(what, file, metadata=...)` of safetensors, whose failed write is a SafetensorError
    ("Error while serializing: I/O error: File too large (os error 27)"): said as the OSError it
    is, naming the file.

    At most one metadata key: safetensors writes its metadata map in no fixed order, so with two
    keys the same weights become a different file from run to run (DVC hashes, bitwise checks)."""
    if len(metadata) > 1:
        raise ValueError(
            f"{file}: one safetensors metadata key at most (the file must be deterministic), "
            f"got {sorted(metadata)}"
        )
    try:
        save(what, str(file), metadata=metadata)
    except OSError as err:
        raise named_error(err, file) from None
    except Exception as err:  # noqa: BLE001 - safetensors_rust.SafetensorError has no importable base here
        code = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(err))
        if code is None:
            raise
        errno = int(code.group(1) or code.group(2))
        raise OSError(errno, os.strerror(errno), str(file)) from None


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors, ints and lists only."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's own GPU only: asking for every device would open a context on each.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
