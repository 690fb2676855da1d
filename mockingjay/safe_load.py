"""Read checkpoints pickled by other code (s3prl, the original Mockingjay) without running it.

Those files are `torch.save` pickles. Besides tensors and plain containers they hold an
`argparse.Namespace` (s3prl `Args`, original `Settings.Paras`) and, in older files, learning-rate
schedule objects inside the optimizer state (`optimizers.WarmupLinearSchedule` and kin: s3prl's
own loader, s3prl/upstream/mockingjay/builder.py, swaps a module into `sys.modules` so that
plain `torch.load` can import them). A plain `pickle.load` or `torch.load(weights_only=False)`
imports and calls whatever the pickle names, so a crafted file runs any command.

The choice here: torch's restricted unpickler (`torch.load(weights_only=True)`: it builds tensors,
containers and primitive values, and refuses every other global before anything is called) with
an explicit allow-list, passed through `torch.serialization.safe_globals`:

* `argparse.Namespace`, the real class: unpickling one only fills its `__dict__`;
* numpy scalars and dtypes (a stray `np.int64` step count): values, no code;
* any class of a known optimizer / scheduler module (`INERT_MODULES`), each replaced by an inert
  placeholder (`Unloaded`) that only keeps the state it was pickled with. Those modules are never
  imported and nothing of theirs runs; we read no optimizer state anyway.

Every other global is refused with a `CheckpointError` that names it; the file is then not read
further. Placeholders are found one at a time: torch's refusal names the first global it met, and
when that global belongs to an inert module a placeholder is registered under its exact dotted
name and the load is retried (at most `MAX_PLACEHOLDERS` times). The weights-only unpickler reads
both torch's zip format and the legacy format of files written before torch 1.6.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError

# Modules whose pickled objects are optimizer or learning-rate-schedule state. `optimizers` is
# s3prl's old top-level module (builder.py maps it to s3prl.optimizers); the BERT ports carry
# BertAdam and the Warmup*Schedule classes.
INERT_MODULES = (
    "optimizers",
    "s3prl.optimizers",
    "s3prl.schedulers",
    "schedulers",
    "utility.optimizers",
    "mockingjay.optimization",
    "transformer.optimization",
    "pytorch_pretrained_bert.optimization",
    "pytorch_transformers.optimization",
    "transformers.optimization",
    "apex.optimizers",
    "torch.optim",
)
MAX_PLACEHOLDERS = 64
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_ERROR_LINE = re.compile(r"GLOBAL|Unsupported global|Can only|Trying to|unrecognized")
# torch's errors end with advice to retry with weights_only=False, i.e. to run the file's code:
# the opposite of why this module exists, so those sentences are never relayed.
_ADVICE = re.compile(r"weights_only|trusted source|PyTorch 2\.6|arbitrary code")


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle names a global outside the allow-list (it could run code)."""


class Unloaded:
    """Stands in for an object of a class we do not import; keeps only its pickled state."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualified_name}>"


def _allowed_globals() -> list:
    numpy_scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [
        argparse.Namespace,
        (numpy_scalar, "numpy._core.multiarray.scalar"),
        (numpy_scalar, "numpy.core.multiarray.scalar"),  # files written under numpy 1
        np.dtype,
        *dtype_classes,
    ]


def is_inert(qualified_name: str) -> bool:
    module = qualified_name.rpartition(".")[0]
    return any(module == name or module.startswith(name + ".") for name in INERT_MODULES)


def _placeholder(qualified_name: str) -> tuple[type, str]:
    cls = type(qualified_name.rpartition(".")[2], (Unloaded,), {"qualified_name": qualified_name})
    return cls, qualified_name


def load_untrusted(path: str | Path) -> Any:
    """The object in `path`, read with torch's weights-only unpickler and the allow-list above.

    Raises UnsafeCheckpointError (naming the global) for a pickle that would import anything
    else, and CheckpointError for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    placeholders: dict[str, tuple[type, str]] = {}
    while True:
        try:
            with torch.serialization.safe_globals([*_allowed_globals(), *placeholders.values()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _REFUSED_GLOBAL.search(str(err))
            name = match.group(1) if match else None
            if (
                name
                and is_inert(name)
                and name not in placeholders
                and len(placeholders) < MAX_PLACEHOLDERS
            ):
                placeholders[name] = _placeholder(name)
                continue
            reason = _reason(err)
            if name or _ERROR_LINE.search(reason):
                raise UnsafeCheckpointError(_refusal(path, name, reason)) from None
            raise CheckpointError(
                f"{path}: not a torch checkpoint the safe loader reads ({reason})"
            ) from None
        except Exception as err:  # noqa: BLE001 - truncated zips, garbage: all say "unreadable"
            detail = _without_advice(str(err).splitlines()[0] if str(err) else "")
            raise CheckpointError(
                f"{path}: unreadable as a torch checkpoint ({type(err).__name__}"
                f"{': ' + detail if detail else ''})"
            ) from None


def _without_advice(text: str) -> str:
    if "legacy .tar format" in text:
        return "saved in torch's legacy .tar format (before torch 0.4), which the safe loader does not read"
    return " ".join(s for s in re.split(r"(?<=\.)\s+", text) if s and not _ADVICE.search(s)).strip()


def _reason(err: Exception) -> str:
    """The line of torch's weights-only error that says what it met (not its generic advice)."""
    lines = [_without_advice(line.strip()) for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if line]
    specific = [
        line
        for line in lines
        if _ERROR_LINE.search(line) or "operand" in line or "load key" in line
    ]
    return (specific or lines[-1:] or [""])[0][:300]


def _refusal(path: Path, name: str | None, reason: str) -> str:
    what = f"the global {name}" if name else "an operation the safe loader does not allow"
    detail = "" if name else f" ({reason})"
    return (
        f"{path}: refused: its pickle needs {what}{detail}, which is not on the allow-list "
        f"(tensors, containers, argparse.Namespace, numpy scalars, optimizer state); loading it "
        f"could run code, so nothing from it was executed or converted"
    )
