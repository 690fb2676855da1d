"""What a fine-tuning task learns from: labelled utterances of the feature stores, per split.

A task's selection (which utterances of which corpora, speaker-independent or not) and its label
fractions are the probes' (`mockingjay.probe_plan.select_utterances`, `fraction_members`), so a
fine-tuned model is scored on exactly the utterances its probes are scored on, and the 1% set is
inside the 10% set. Classes:

* phone: the frame labels of `labels/{split}` (the aligner's phone ids; -1 = no label), every
  utterance with labels taking part;
* speaker, keyword: one class per utterance, the classes of the whole train selection (sorted),
  so the head has the same outputs at every fraction; dev/test utterances of a class absent from
  train cannot be scored and are left out (counted in `ignored`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mockingjay.batching import FeatureBatch
from mockingjay.featstore import RaggedArray
from mockingjay.phones import PHONES
from mockingjay.probe_plan import Utterance, fraction_members
from mockingjay.store_layout import SPLITS, labels_store

IGNORE = -1  # frame label of unlabelled frames and of padding: no loss, not scored


class LabelledDataset(Dataset):
    """Some utterances of one feature store with their labels: per frame (`frame_labels`, one
    int array per utterance) or per utterance (`utterance_labels`).

    Items are `(index, start, stop)` crops as `LengthBucketBatchSampler` yields them (a plain int
    is the whole utterance); the store is opened lazily and dropped when pickled (DataLoader
    workers map it themselves).
    """

    def __init__(
        self,
        store_path: str | Path,
        items: np.ndarray,
        frame_labels: Sequence[np.ndarray] | None = None,
        utterance_labels: np.ndarray | None = None,
    ):
        if (frame_labels is None) == (utterance_labels is None):
            raise ValueError("give frame_labels or utterance_labels")
        self.store_path = Path(store_path)
        self.items = np.asarray(items, dtype=np.int64)
        self.frame_labels = frame_labels
        self.utterance_labels = utterance_labels
        self._store: RaggedArray | None = None
        self.lengths = self.store.lengths[self.items]
        self.ids = [self.store.ids[i] for i in self.items]

    @property
    def store(self) -> RaggedArray:
        if self._store is None:
            self._store = RaggedArray(self.store_path)
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item) -> tuple[int, np.ndarray, np.ndarray | int]:
        if isinstance(item, (int, np.integer)):
            item = (int(item), 0, int(self.lengths[item]))
        index, start, stop = item
        rows = self.store[int(self.items[index])][start:stop]
        if self.frame_labels is not None:
            return index, rows, self.frame_labels[index][start:stop]
        return index, rows, int(self.utterance_labels[index])


def collate_labelled(items) -> FeatureBatch:
    """Pad into `FeatureBatch(inputs [B, T, D] float16, targets = labels, lengths, indices)`:
    labels int64 `[B, T]` padded with IGNORE (frame tasks) or `[B]` (utterance tasks)."""
    lengths = [rows.shape[0] for _, rows, _ in items]
    longest = max(lengths)
    inputs = np.zeros((len(items), longest, items[0][1].shape[1]), dtype=items[0][1].dtype)
    for b, (_, rows, _) in enumerate(items):
        inputs[b, : rows.shape[0]] = rows
    if isinstance(items[0][2], np.ndarray):
        labels = np.full((len(items), longest), IGNORE, dtype=np.int64)
        for b, (_, _, frame_labels) in enumerate(items):
            labels[b, : len(frame_labels)] = frame_labels
    else:
        labels = np.array([label for _, _, label in items], dtype=np.int64)
    return FeatureBatch(
        inputs=torch.from_numpy(inputs),
        targets=torch.from_numpy(labels),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        indices=torch.tensor([index for index, _, _ in items], dtype=torch.int64),
    )


@dataclass
class TaskData:
    """A task's datasets per split (train already cut to the label fraction) and its classes."""

    splits: dict[str, LabelledDataset]
    classes: list[str]
    ignored: dict[str, int] = field(default_factory=dict)  # split -> utterances left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def task_data(
    features: str | Path,
    task: str,
    utterances: Mapping[str, Utterance],
    selection: Mapping[str, set[str]],
    fraction: float = 1.0,
    seed: int = 0,
) -> TaskData:
    """The datasets of `task` over `selection` (split -> utterance ids), train cut to `fraction`."""
    features = Path(features)
    stores = {split: RaggedArray(features / split) for split in SPLITS}
    if task == "phone":
        label_stores = {split: RaggedArray(labels_store(features, split)) for split in SPLITS}
        # an utterance of a corpus without transcripts has a row of -1s: it takes no part
        wanted = {
            s: [
                u
                for u in stores[s].ids
                if u in selection[s]
                and u in label_stores[s]
                and bool((np.asarray(label_stores[s].get(u)) >= 0).any())
            ]
            for s in SPLITS
        }
        classes = list(PHONES)
    else:
        if task == "speaker":
            label_of = {u: info.speaker for u, info in utterances.items()}
        else:
            label_of = {u: info.keyword for u, info in utterances.items()}
        wanted = {
            s: [u for u in stores[s].ids if u in selection[s] and label_of.get(u)] for s in SPLITS
        }
        classes = sorted({label_of[u] for u in wanted["train"]})
    if not wanted["train"]:
        raise ValueError(f"{task}: no labelled train utterance in the selection")
    members = fraction_members(wanted["train"], [fraction], seed)[fraction]
    wanted["train"] = [u for u in wanted["train"] if u in members]
    splits, ignored = {}, {}
    for split in SPLITS:
        store = stores[split]
        ids = wanted[split]
        position = {u: i for i, u in enumerate(store.ids)}
        if task == "phone":
            per_frame = [np.asarray(label_stores[split].get(u)).reshape(-1) for u in ids]
            for utt, labels in zip(ids, per_frame):
                if len(labels) != store.lengths[position[utt]]:
                    raise ValueError(
                        f"{split}: utterance {utt!r} has {len(labels)} frame labels for "
                        f"{store.lengths[position[utt]]} frames"
                    )
            items = np.array([position[u] for u in ids], dtype=np.int64)
            splits[split] = LabelledDataset(
                store.path, items, frame_labels=[lab.astype(np.int64) for lab in per_frame]
            )
        else:
            class_of = {label: i for i, label in enumerate(classes)}
            known = [u for u in ids if label_of[u] in class_of]
            ignored[split] = len(ids) - len(known)
            items = np.array([position[u] for u in known], dtype=np.int64)
            splits[split] = LabelledDataset(
                store.path,
                items,
                utterance_labels=np.array([class_of[label_of[u]] for u in known], dtype=np.int64),
            )
    if len(classes) < 2:
        raise ValueError(f"{task}: {len(classes)} class(es) in train; fine-tuning needs at least 2")
    return TaskData(splits, classes, ignored)
