"""Linear probes of frozen representations: frame phone classification, utterance speaker ID.

The paper's representation evaluation: a linear softmax classifier on frozen features, trained
on the train split, its hyper-parameters (L2 weight decay, learning rate) chosen on dev, reported
on test, with the log-mel input as the baseline row. Training details (one pass for all layers,
per-layer standardisation with train-set statistics, best-epoch selection) are in
`mockingjay.probe_heads`.

Two ways to get representations:

* extracted (`probe_phones`, `probe_speakers`): the ragged stores written by
  `mockingjay.extract` (`root/{split}/{input,layer_XX}`), read through their memory maps;
* online (`probe_online`, in `mockingjay.probe_online`): the frozen model runs on the fly, for
  corpora too large to extract.

The frame-level phone probe is here; the utterance-level probe on pooled vectors, which the online
probe shares, is `mockingjay.probe_utterance.probe_utterances` (re-exported here).

Memory policy of the frame probe: the frame index (row and label of every labelled frame, 10 bytes
a frame) is always in RAM. The representations are loaded into RAM (float16, only the labelled
frames) when all selected layers of all splits fit in `max_ram_bytes` (the bundled corpus: about
150k frames x 768 dims x 2 bytes = 230 MB a layer); otherwise every mini-batch is gathered from
the memory maps with sorted fancy indexing, so memory stays flat whatever the corpus size. Both
paths hand the heads exactly the same numbers in the same order, so they give identical results.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mockingjay.featstore import RaggedArray
from mockingjay.phones import PHONES
from mockingjay.probe_heads import (
    PHONE_PROBE,
    SPEAKER_PROBE,
    MLPSettings,
    ProbeConfig,
    ProbeError,
    RunningMoments,
    predict,
    train_heads,
)
from mockingjay.probe_plan import (
    build_heads,
    extra_test_report,
    fraction_masks,
    fraction_members,
    head_reports,
    position_chunks,
)
from mockingjay.probe_utterance import probe_utterances
from mockingjay.store_layout import INPUT_STORE, layer_indices, layer_store_name

__all__ = [
    "PHONE_PROBE",
    "SPEAKER_PROBE",
    "ProbeConfig",
    "ProbeError",
    "open_representations",
    "probe_online",
    "probe_labels",
    "probe_phones",
    "probe_speakers",
    "probe_utterances",
    "read_speakers",
    "utterance_stats",
]

SPLITS = ("train", "dev", "test")
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


def read_speakers(utterances_tsv: str | Path) -> dict[str, str]:
    """utt_id -> speaker from the featurize stage's `utterances.tsv`."""
    with open(utterances_tsv, newline="", encoding="utf-8") as f:
        return {row["utt_id"]: row["speaker"] for row in csv.DictReader(f, delimiter="\t")}


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


class FrameSource:
    """One layer's labelled frames of each split, from RAM (float16) or from the memory map."""

    def __init__(
        self, stores: Mapping[str, RaggedArray], rows: Mapping[str, np.ndarray], in_ram: bool
    ):
        self.stores, self.rows = stores, rows
        self.cached = None
        if in_ram:  # rows ascend, so this is one sequential read of each memory map
            self.cached = {
                split: torch.from_numpy(np.asarray(stores[split].data[r]))
                for split, r in rows.items()
            }

    def gather(self, split: str, positions: np.ndarray) -> Tensor:
        """float16 [len(positions), H] (the heads standardise to float32 in one fused op); `positions`
        index the split's labelled frames, ascending."""
        if (
            self.cached is not None
        ):  # index_select: several times faster than a[index] on float16 rows
            return torch.index_select(self.cached[split], 0, torch.from_numpy(positions))
        return torch.from_numpy(np.asarray(self.stores[split].data[self.rows[split][positions]]))


def _item_of(reference: RaggedArray, rows: np.ndarray) -> np.ndarray:
    """The utterance (item) index of each store row."""
    return np.searchsorted(reference.offsets, rows, side="right") - 1


def probe_phones(
    representations: Representations,
    labels: Mapping[str, RaggedArray],
    config: ProbeConfig = PHONE_PROBE,
    class_names: Sequence[str] = PHONES,
    device: str | torch.device = "cpu",
    max_ram_bytes: int = 2 << 30,
    progress: bool = True,
    include: Mapping[str, set[str]] | None = None,
    kinds: Sequence[str] = ("linear",),
    fractions: Sequence[float] = (1.0,),
    mlp: MLPSettings = MLPSettings(),
    extra_tests: Mapping[str, set[str]] | None = None,
) -> dict:
    """Frame-level phone probe of every store in `representations` ({split: {name: store}}).

    Trains on the labelled train frames, picks each head by dev accuracy, reports on test.
    `labels` holds the int16 frame-label stores per split (-1 = unlabelled frame). `include`
    (split -> utterance ids, see `probe_plan.select_utterances`) restricts each split; `kinds`
    and `fractions` say which heads to train (`probe_plan.build_heads`). `extra_tests` (name ->
    test utterance ids, e.g. a corpus pretraining never saw) are scored beside the test split.
    """
    started = time.perf_counter()
    device = torch.device(device)
    names = list(representations["train"])
    frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    items: dict[str, np.ndarray] = {}
    references = {}
    # evaluation sets: the three splits, then each extra test set (frames of the test stores)
    sets = {split: (split, include[split] if include is not None else None) for split in SPLITS}
    sets.update({f"test:{name}": ("test", chosen) for name, chosen in (extra_tests or {}).items()})
    for key, (split, wanted_ids) in sets.items():
        if split not in references:
            references[split] = check_same_items(representations[split], split, names)
        reference = references[split]
        rows, values = labelled_frames(reference, labels[split], split, len(class_names))
        item = _item_of(reference, rows)
        if wanted_ids is not None:
            wanted = np.fromiter(
                (utt in wanted_ids for utt in reference.ids), dtype=bool, count=len(reference)
            )
            keep = wanted[item]
            rows, values, item = rows[keep], values[keep], item[keep]
        frames[key], items[key] = (rows, values), item
        if len(rows) == 0:
            raise ProbeError(
                f"{key}: no labelled frames (every label is -1); the phone probe needs labels "
                f"in train, dev and test"
            )
    rows = {key: frames[key][0] for key in sets}
    targets = {key: torch.from_numpy(frames[key][1].astype(np.int64)) for key in sets}
    ram_bytes = sum(
        len(rows[k]) * representations[s][n].dim * 2 for k, (s, _) in sets.items() for n in names
    )
    in_ram = ram_bytes <= max_ram_bytes
    sources = {
        name: FrameSource({k: representations[s][name] for k, (s, _) in sets.items()}, rows, in_ram)
        for name in names
    }
    train_ids = references["train"].ids
    labelled_train = sorted({train_ids[i] for i in np.unique(items["train"])})
    members = fraction_members(labelled_train, fractions, config.seed)
    masks = {
        f: torch.from_numpy(m)
        for f, m in fraction_masks(members, train_ids, items["train"]).items()
    }

    def batches(split: str, position_batches: Iterator[np.ndarray]) -> Iterator[tuple]:
        for positions in position_batches:
            index = torch.from_numpy(positions)
            batch_masks = (
                {f: m[index].to(device) for f, m in masks.items()} if split == "train" else {}
            )
            yield (
                targets[split][positions].to(device),
                {
                    name: source.gather(split, positions).to(device)
                    for name, source in sources.items()
                },
                batch_masks,
            )

    moments = {}
    for name, source in sources.items():
        running = RunningMoments(representations["train"][name].dim)
        for positions in position_chunks(len(rows["train"]), 65_536):
            running.update(source.gather("train", positions))
        moments[name] = running.mean_std()
    heads, epochs, described = build_heads(
        names, moments, len(class_names), config, device, kinds, fractions, mlp
    )

    # One generator for the batch order: the same frames in the same order whatever the layers.
    generator = torch.Generator().manual_seed(config.seed)
    train_count = len(rows["train"])
    batch_size = config.batch_size or train_count

    def train_batches(epoch: int) -> Iterator[tuple]:
        order = torch.randperm(train_count, generator=generator).numpy()
        # sorted within the batch: sequential memory-map reads, and the same summation order in RAM
        return batches(
            "train", (np.sort(order[i : i + batch_size]) for i in range(0, train_count, batch_size))
        )

    def dev_batches() -> Iterator[tuple]:
        return batches("dev", position_chunks(len(rows["dev"]), config.eval_batch))

    train_heads(heads, epochs, train_batches, dev_batches, progress, "phone probe")
    truth, predicted = predict(
        heads, batches("test", position_chunks(len(rows["test"]), config.eval_batch))
    )
    majority = int(np.bincount(frames["train"][1], minlength=len(class_names)).argmax())
    layers, probes = head_reports(
        heads, described, config, mlp, truth, predicted, majority, class_names
    )
    extra = {}
    for name in extra_tests or {}:
        key = f"test:{name}"
        extra_truth, extra_predicted = predict(
            heads, batches(key, position_chunks(len(rows[key]), config.eval_batch))
        )
        extra[name] = extra_test_report(heads, described, extra_truth, extra_predicted, majority)
    return {
        **({"extra_tests": extra} if extra else {}),
        "task": "phone",
        "classes": list(class_names),
        "examples": {split: int(len(rows[split])) for split in SPLITS},
        "utterances": {split: int(len(np.unique(items[split]))) for split in SPLITS},
        "fraction_utterances": {f"{f:g}": len(m) for f, m in members.items()},
        "majority_class": class_names[majority],
        "config": config.to_dict(),
        "standardisation": "per layer, mean/std of the train split's labelled frames",
        "data_in_ram": in_ram,
        "layers": layers,
        "probes": probes,
        "seconds": round(time.perf_counter() - started, 3),
    }


def utterance_stats(store: RaggedArray) -> np.ndarray:
    """[items, 2 * dim] float32: each utterance's mean and standard deviation (statistics pooling,
    as x-vectors do; accumulated in float64). The mean alone is no baseline for log-mel: under
    per-utterance CMVN every utterance's mean is zero."""
    stats = np.zeros((len(store), 2 * store.dim), dtype=np.float32)
    for item in range(len(store)):
        if store.lengths[item]:
            rows = np.asarray(store[item], dtype=np.float64)
            stats[item, : store.dim] = rows.mean(0)
            stats[item, store.dim :] = rows.std(0)
    return stats


def probe_speakers(
    representations: Representations,
    speakers: Mapping[str, str],
    config: ProbeConfig = SPEAKER_PROBE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **options,
) -> dict:
    """Utterance-level speaker probe on statistics-pooled representations (speakers: utt_id -> speaker)."""
    return probe_labels(representations, speakers, "speaker", config, device, progress, **options)


def probe_labels(
    representations: Representations,
    utterance_labels: Mapping[str, str],
    task: str,
    config: ProbeConfig = SPEAKER_PROBE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **options,
) -> dict:
    """Utterance-level probe (speaker, keyword) of statistics-pooled representations."""
    vectors, ids = pooled_utterances(representations)
    return probe_utterances(
        vectors, ids, utterance_labels, config, device, progress, task=task, **options
    )


def pooled_utterances(representations: Representations) -> tuple[dict, dict]:
    """({split: {name: [N, 2H] statistics}}, {split: ids}): pooled once, for every utterance task."""
    names = list(representations["train"])
    ids = {split: check_same_items(representations[split], split, names).ids for split in SPLITS}
    vectors = {
        split: {name: utterance_stats(store) for name, store in representations[split].items()}
        for split in SPLITS
    }
    return vectors, ids


def probe_online(*args, **kwargs) -> dict:
    """Probe with the frozen model running on the fly; see `mockingjay.probe_online.probe_online`."""
    from mockingjay.probe_online import probe_online as run

    return run(*args, **kwargs)
