"""The weights of a foreign checkpoint under our names and back: s3prl and the original Mockingjay
code name their tensors as BERT does (`encoder.layer.0.attention.self.query.weight`, LayerNorm
`gamma`/`beta` in older files), where we fuse query, key and value into one projection. The
layouts themselves, and why the networks are the same, are in `mockingjay.interop`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .checkpoint import CheckpointError


class InteropError(CheckpointError):
    """A foreign checkpoint cannot be converted faithfully; the message names the entry or field."""


def module_pairs(num_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """(our module, their module(s)) for the encoder; a fused module maps to several of theirs."""
    pairs = [
        ("input_representation.projection", ("input_representations.spec_transform",)),
        ("input_representation.layer_norm", ("input_representations.LayerNorm",)),
    ]
    for i in range(num_layers):
        theirs = f"encoder.layer.{i}."
        pairs += [
            (
                f"layers.{i}.attention.qkv",
                tuple(f"{theirs}attention.self.{n}" for n in ("query", "key", "value")),
            ),
            (f"layers.{i}.attention.output", (f"{theirs}attention.output.dense",)),
            (f"layers.{i}.attention_norm", (f"{theirs}attention.output.LayerNorm",)),
            (f"layers.{i}.feed_forward.up", (f"{theirs}intermediate.dense",)),
            (f"layers.{i}.feed_forward.down", (f"{theirs}output.dense",)),
            (f"layers.{i}.output_norm", (f"{theirs}output.LayerNorm",)),
        ]
    return pairs


HEAD_PAIRS = [("dense", ("dense",)), ("layer_norm", ("LayerNorm",)), ("output", ("output",))]


def to_foreign_state(state: Mapping[str, Tensor], pairs) -> dict[str, Tensor]:
    """Our state dict in BERT names (fused tensors split; each a fresh contiguous tensor)."""
    out = {}
    for ours, theirs in pairs:
        for param in ("weight", "bias"):
            for name, part in zip(theirs, state[f"{ours}.{param}"].chunk(len(theirs))):
                out[f"{name}.{param}"] = part.clone()
    return out


def modern_name(key: str) -> str:
    head, _, last = key.rpartition(".")
    renamed = {"gamma": "weight", "beta": "bias"}.get(last, last)
    return f"{head}.{renamed}" if head else renamed


def from_foreign_state(
    state: Mapping[str, Any], pairs, expected: Mapping[str, Tensor], where: str
) -> dict:
    """BERT-named tensors (gamma/beta accepted) -> our names; every tensor must find its place."""
    state = {modern_name(k): v for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    out, used, missing = {}, set(), []
    for ours, theirs in pairs:
        for param in ("weight", "bias"):
            names = [f"{name}.{param}" for name in theirs]
            absent = [name for name in names if name not in state]
            if absent:
                missing += absent
                continue
            for name in names:
                if not isinstance(state[name], Tensor):
                    raise InteropError(
                        f"{where}.{name}: expected a tensor, got {type(state[name]).__name__}"
                    )
            used.update(names)
            out[f"{ours}.{param}"] = (
                torch.cat([state[n].float() for n in names])
                if len(names) > 1
                else state[names[0]].float()
            )
    problems = [f"missing {name}" for name in missing]
    problems += [
        f"weights with no place in the model: {name}" for name in sorted(set(state) - used)
    ]
    problems += [
        f"{name}: file {list(out[name].shape)} vs config {list(t.shape)}"
        for name, t in expected.items()
        if name in out and out[name].shape != t.shape
    ]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise InteropError(
            f"{where}: weights do not fit the network the config describes: "
            f"{'; '.join(problems[:4])}{more}"
        )
    return out
