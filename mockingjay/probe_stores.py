"""The stores the probes read: the extract stage's representations and the frame-label index.

`open_representations` opens `root/{split}/{input,layer_XX}` (names: `store_layout.py`);
`check_same_items` checks that the stores of one split describe the same utterances, and
`labelled_frames` indexes the labelled frames of a split. The extracted probes (`probe`,
`probe_utterance`) and the online probe (`probe_online`) share them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mockingjay.featstore import RaggedArray
from mockingjay.probe_heads import ProbeError
from mockingjay.store_layout import INPUT_STORE, SPLITS, layer_indices, layer_store_name

Representations = Mapping[str, Mapping[str, RaggedArray]]  # split -> store name -> store


def open_representations(
    root: str | Path,
    layers: Sequence[int] | None = None,
    include_input: bool = True,
    splits: Sequence[str] = SPLITS,
    input_root: str | Path | None = None,
) -> dict[str, dict[str, RaggedArray]]:
    """Open `root/{split}/{input,layer_XX}`; layers None = every extracted layer. `input_root`:
    take the input baseline from `input_root/{split}` instead (features made another way, e.g.
    with global CMVN; the probes check that ids and lengths match the layers').

    Raises ProbeError naming the valid range when a requested layer was not extracted.
    """
    root = Path(root)
    found = layer_indices(root / splits[0])
    if layers is None:
        layers = found
    for index in layers:
        if index not in found:
            if not found:
                valid = "none"
            elif found == list(range(found[0], found[-1] + 1)):
                valid = f"{found[0]}..{found[-1]}"
            else:
                valid = ", ".join(map(str, found))
            raise ProbeError(
                f"layer {index} out of range: {root / splits[0]} holds layers {valid} "
                f"(0 = input representation, i = output of encoder layer i)"
            )
    names = ([INPUT_STORE] if include_input else []) + [
        layer_store_name(i) for i in sorted(set(layers))
    ]

    def path(split: str, name: str) -> Path:
        return (
            Path(input_root) / split
            if name == INPUT_STORE and input_root is not None
            else root / split / name
        )

    # finite=True: one NaN or inf in a store gave a probe accuracy below the majority rate, exit 0
    return {
        split: {name: RaggedArray(path(split, name), finite=True) for name in names}
        for split in splits
    }


def check_same_items(
    stores: Mapping[str, RaggedArray], split: str, expected_names: Sequence[str] | None = None
) -> RaggedArray:
    """All layer stores of a split must list the same utterances with the same lengths."""
    if not stores:
        raise ProbeError(f"{split}: no representation stores selected")
    names = list(stores)
    if expected_names is not None and names != list(expected_names):
        raise ProbeError(
            f"{split}: stores {names} differ from the train split's {list(expected_names)}"
        )
    reference = stores[names[0]]
    for name in names[1:]:
        other = stores[name]
        if other.ids != reference.ids or not np.array_equal(other.lengths, reference.lengths):
            bad = next(
                (
                    a
                    for a, b, la, lb in zip(
                        reference.ids, other.ids, reference.lengths, other.lengths
                    )
                    if a != b or la != lb
                ),
                None,
            )
            where = f"utterance {bad!r}" if bad else f"{len(reference)} vs {len(other)} utterances"
            raise ProbeError(
                f"{split}: stores {names[0]} and {name} disagree at {where}; re-extract them together"
            )
    return reference


def labelled_frames(
    reference: RaggedArray, labels: RaggedArray, split: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows in the representation stores, labels) of every labelled frame (label >= 0).

    Labels must cover the same utterances as the representations, each with one label a frame.
    """
    extra = next((utt for utt in labels.ids if utt not in reference), None)
    if extra is not None:
        raise ProbeError(
            f"{split}: utterance {extra!r} has frame labels in {labels.path} but no representation "
            f"({len(labels)} labelled vs {len(reference)} represented utterances)"
        )
    rows, values = [], []
    for item, utt in enumerate(reference.ids):
        if utt not in labels:
            raise ProbeError(
                f"{split}: utterance {utt!r} has no frame labels in {labels.path} "
                f"({len(labels)} labelled vs {len(reference)} represented utterances)"
            )
        frame_labels = np.asarray(labels.get(utt)).reshape(-1)
        if len(frame_labels) != reference.lengths[item]:
            raise ProbeError(
                f"{split}: utterance {utt!r} has {reference.lengths[item]} representation frames "
                f"but {len(frame_labels)} frame labels; labels must be at the feature frame rate"
            )
        if frame_labels.size and frame_labels.max() >= num_classes:
            raise ProbeError(
                f"{split}: utterance {utt!r} has label {int(frame_labels.max())}, "
                f"but there are only {num_classes} classes"
            )
        keep = np.flatnonzero(frame_labels >= 0)
        rows.append(reference.offsets[item] + keep)
        values.append(frame_labels[keep].astype(np.int16))
    rows_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return rows_all, (np.concatenate(values) if values else np.zeros(0, dtype=np.int16))
