"""Linear probes of frozen representations: frame phone classification, utterance speaker ID.

The paper's representation evaluation: a linear softmax classifier on frozen features, trained
on the train split, its hyper-parameters (L2 weight decay, learning rate) chosen on dev, reported
on test, with the log-mel input as the baseline row. Training details (one pass for all layers,
per-layer standardisation with train-set statistics, best-epoch selection) are in
`mockingjay.probe_heads`.

Two ways to get representations:

* extracted (`probe_phones` here, `probe_utterance.probe_speakers`): the ragged stores written by
  `mockingjay.extract` (`root/{split}/{input,layer_XX}`), read through their memory maps;
* online (`mockingjay.probe_online`): the frozen model runs on the fly, for corpora too large to
  extract.

The frame-level phone probe is here; opening the stores and indexing their labelled frames is
`mockingjay.probe_stores`; the utterance-level probes on pooled vectors (`probe_speakers`,
`probe_labels`, and `probe_utterances`, which the online probe shares) are
`mockingjay.probe_utterance`.

Memory policy of the frame probe: the frame index (row and label of every labelled frame, 10 bytes
a frame) is always in RAM. The representations are loaded into RAM (float16, only the labelled
frames) when all selected layers of all splits fit in `max_ram_bytes` (the bundled corpus: about
150k frames x 768 dims x 2 bytes = 230 MB a layer); otherwise every mini-batch is gathered from
the memory maps with sorted fancy indexing, so memory stays flat whatever the corpus size. Both
paths hand the heads exactly the same numbers in the same order, so they give identical results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mockingjay.featstore import RaggedArray
from mockingjay.phones import PHONES
from mockingjay.probe_heads import (
    PHONE_PROBE,
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
from mockingjay.probe_stores import Representations, check_same_items, labelled_frames
from mockingjay.store_layout import SPLITS


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
