"""The layout of the folders that hold ragged stores: which store lives under which name.

`featstore.py` owns the files inside one store (data, index, meta); this module owns the names of
the stores and tables in the folders around them, and is the only place that builds or parses
them. A features folder (the featurize stage)::

    {train,dev,test}/            the model input, one float16 store per split
    {train,dev,test}_target/     the reconstruction target, only when it differs from the input
    labels/{train,dev,test}/     int16 frame labels aligned 1:1 with the input (-1 = none)
    utterances.tsv               utt_id, split, corpus, speaker, num_frames, labelled, keyword
    feature_config.json          the resolved feature settings (a released model carries a copy)

A representations folder (the extract stage), per split::

    {train,dev,test}/input/      the model input features (the probes' log-mel baseline)
    {train,dev,test}/layer_NN/   hidden state NN (00 = the input representation, i = layer i)

An alignments folder (the align stage) holds `frame_labels/`, the int16 class ids the featurize
stage copies into `labels/`. The same store names key the probes' results and metrics. Only the standard library here: the
report stages read names without loading numpy or torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# The three splits, in this order everywhere (folders, reports, metrics): every module imports it here.
SPLITS = ("train", "dev", "test")
INPUT_STORE = "input"
LAYER_PREFIX = "layer_"
TARGET_SUFFIX = "_target"
LABELS_DIR = "labels"
UTTERANCES_TABLE = "utterances.tsv"
FEATURE_CONFIG = "feature_config.json"
FRAME_LABELS = "frame_labels"
_LAYER_NAME = re.compile(rf"{LAYER_PREFIX}(\d{{2,}})")


def layer_store_name(index: int) -> str:
    """Store name of hidden state `index`: 0 -> "layer_00" (input representation), 12 -> "layer_12"."""
    if isinstance(index, bool) or index < 0:
        raise ValueError(f"hidden-state index must be an integer >= 0, got {index!r}")
    return f"{LAYER_PREFIX}{index:02d}"


def layer_index(name: str) -> int | None:
    """The hidden-state index a store name names ("layer_03" -> 3); None for any other name: the
    input, a head key (`weighted_sum`, `mlp:layer_03`, `layer_03@0.1`) or a malformed one
    (`layer_3`, `layer_003`), i.e. every name `layer_store_name` does not give."""
    match = _LAYER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    index = int(match.group(1))
    return index if layer_store_name(index) == name else None


def is_store_name(name: str) -> bool:
    """A representations store name: `input` or a hidden state's `layer_NN`."""
    return name == INPUT_STORE or layer_index(name) is not None


def layer_names(names: Iterable[str]) -> list[str]:
    """The hidden-state store names among `names`, in layer order."""
    return sorted((n for n in names if layer_index(n) is not None), key=layer_index)


def layer_indices(folder: str | Path) -> list[int]:
    """The hidden states stored in a representations split folder, sorted (none: [])."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(index for p in folder.iterdir() if (index := layer_index(p.name)) is not None)


def target_store(input_store: str | Path) -> Path:
    """The reconstruction-target store beside an input store: `features/train` -> `features/train_target`."""
    path = Path(input_store)
    return path.with_name(path.name + TARGET_SUFFIX)


def labels_dir(features: str | Path) -> Path:
    return Path(features) / LABELS_DIR


def labels_store(features: str | Path, split: str) -> Path:
    """The frame-label store of a split in a features folder."""
    return labels_dir(features) / split


def utterances_table(features: str | Path) -> Path:
    return Path(features) / UTTERANCES_TABLE


def feature_config_file(folder: str | Path) -> Path:
    """`feature_config.json` of a features folder (or of a released model directory)."""
    return Path(folder) / FEATURE_CONFIG


def frame_labels_store(alignments: str | Path) -> Path:
    """The frame-label store of an alignments folder."""
    return Path(alignments) / FRAME_LABELS
