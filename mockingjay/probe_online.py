"""Online probing: the frozen model runs on the fly, for corpora too large to extract.

At LibriSpeech scale the per-layer stores would take terabytes (960 h = 345M frames x 768 dims x
2 bytes = 530 GB a layer), so here the encoder is re-run on batches of feature-store utterances
and every layer's probes train on the resulting frames at once: one forward pass per batch feeds
all L x G heads (the cost of probing all layers is one model's forward plus cheap heads, where
s3prl reruns the model once per probed layer).

Passes over the data:

1. a statistics pass over every needed utterance: the exact per-layer mean/std of the train
   split's labelled frames (so the standardisation is the same as in extracted mode, not a
   running estimate that drifts while the heads train), and the mean representation of every
   utterance of every split for the speaker probe (N x H floats a layer: utterances are few
   next to frames, so these stay in RAM; the speaker probe then runs as in extracted mode);
2. each epoch: the labelled train utterances in length-bucketed batches (shuffled batch order);
   their labelled frames are pooled until `shuffle_frames` are held, the pool is shuffled and cut
   into mini-batches of `batch_size` frames (a length-sorted batch alone is too homogeneous: all
   digits or all long sentences); then a forward pass over dev scores every head;
3. a forward pass over test with each layer's chosen head.

Every pass encodes as extraction does (`extract.encode_batches`), an utterance longer than
`window_frames` window by window: its statistics are combined over the windows, and its labelled
frames are taken from the window that keeps them.

Representations are rounded to float16 exactly as the extracted stores are, so both modes see the
same numbers; they differ only in which frames share a mini-batch (here: frames of one pool,
in extracted mode: of the whole train split), so their accuracies agree closely but not bit for
bit. When the train split fits in one pool, the two modes train on equally well mixed batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mockingjay.extract import (
    DEFAULT_WINDOW_FRAMES,
    EncodedBatch,
    encode_batches,
    encoder_of,
    length_sorted_batches,
    resolve_layers,
)
from mockingjay.featstore import RaggedArray
from mockingjay.phones import PHONES
from mockingjay.probe_heads import (
    PHONE_PROBE,
    SPEAKER_PROBE,
    Batch,
    LayerHeads,
    ProbeConfig,
    ProbeError,
    RunningMoments,
    layer_report,
    predict,
    train_heads,
)
from mockingjay.probe_stores import labelled_frames
from mockingjay.probe_utterance import probe_utterances
from mockingjay.store_layout import INPUT_STORE, SPLITS, layer_store_name


class _FrameLabels:
    """Labelled frames of one split, sliceable per utterance: (frame positions, labels)."""

    def __init__(
        self,
        features: RaggedArray,
        labels: RaggedArray,
        split: str,
        num_classes: int,
        include: set[str] | None = None,
    ):
        rows, self.values = labelled_frames(features, labels, split, num_classes)
        if (
            include is not None
        ):  # only the selected utterances' frames (probe_plan.select_utterances)
            wanted = np.fromiter(
                (utt in include for utt in features.ids), dtype=bool, count=len(features)
            )
            keep = wanted[np.searchsorted(features.offsets, rows, side="right") - 1]
            rows, self.values = rows[keep], self.values[keep]
        total_rows = int(features.lengths.sum())
        # bounds[i]:bounds[i + 1] are item i's labelled frames (rows ascend, items are contiguous)
        self.bounds = np.searchsorted(rows, np.append(features.offsets, total_rows))
        item_of_row = np.searchsorted(features.offsets, rows, side="right") - 1
        self.positions = rows - features.offsets[item_of_row]
        self.labelled_items = np.flatnonzero(np.diff(self.bounds) > 0)

    def of_batch(self, batch: EncodedBatch, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(batch rows, frame positions in the row, labels) of the labelled frames of an encoded batch
        (whole items, or one window of an item: the frames it keeps, counted from its start)."""
        spans = [
            (row, self.bounds[item], self.bounds[item + 1])
            for row, item in enumerate(batch.indices)
        ]
        if batch.starts is not None:
            start, end = int(batch.starts[0]), int(batch.starts[0] + batch.lengths[0])
            ((row, first, last),) = spans
            positions = self.positions[first:last]
            first, last = (
                first + np.searchsorted(positions, start),
                first + np.searchsorted(positions, end),
            )
            spans = [(row, first, last)]
        else:
            start = 0
        batch_rows = np.concatenate([np.full(end - begin, row) for row, begin, end in spans])
        frames = np.concatenate([self.positions[begin:end] for _, begin, end in spans]) - start
        labels = np.concatenate([self.values[begin:end] for _, begin, end in spans]).astype(
            np.int64
        )
        return tuple(torch.from_numpy(a).to(device) for a in (batch_rows, frames, labels))  # type: ignore[return-value]


class _Passes:
    """Forward passes of the frozen model over batches of one split's utterances (counted)."""

    def __init__(
        self,
        model: nn.Module,
        features: Mapping[str, RaggedArray],
        layer_ids: list[int],
        device: torch.device,
        include_input: bool,
        batch_frames: int,
        window_frames: int | None,
    ):
        self.model, self.features, self.layer_ids = model, features, layer_ids
        self.device, self.include_input, self.batch_frames = device, include_input, batch_frames
        self.window_frames = window_frames
        self.count = 0

    def batches(self, split: str, items: np.ndarray) -> list[np.ndarray]:
        return length_sorted_batches(self.features[split].lengths, self.batch_frames, items)

    def run(self, split: str, batches: Sequence[np.ndarray]) -> Iterator[EncodedBatch]:
        self.count += 1
        return encode_batches(
            self.model,
            self.features[split],
            batches,
            self.layer_ids,
            self.device,
            self.include_input,
            self.window_frames,
        )


def _statistics_pass(
    passes: _Passes,
    names: list[str],
    frame_labels: dict[str, _FrameLabels] | None,
    want_means: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, RunningMoments]]:
    """Utterance means of every split (speaker probe) and train labelled-frame moments (phone probe)."""
    device = passes.device
    means: dict[str, dict[str, np.ndarray]] = {}
    moments: dict[str, RunningMoments] = {}
    for split in SPLITS:
        store = passes.features[split]
        if want_means:
            items = np.arange(len(store))
        elif split == "train" and frame_labels is not None:
            items = frame_labels["train"].labelled_items
        else:
            continue
        means[split] = {}
        windowed: dict[
            str, tuple[Tensor, Tensor, Tensor]
        ] = {}  # name -> (count, mean, M2) of the windows so far
        for batch in passes.run(split, passes.batches(split, items)):
            lengths = batch.lengths.to(device)
            steps = batch.states[names[0]].size(1)
            mask = (torch.arange(steps, device=device) < lengths[:, None])[..., None]
            selection = None
            if split == "train" and frame_labels is not None:
                selection = frame_labels["train"].of_batch(batch, device)
            for name, states in batch.states.items():
                if (
                    want_means
                ):  # statistics pooling (mean, std), as `probe_utterance.utterance_stats`
                    _pool(means[split], windowed, name, states, lengths, mask, batch, store)
                if selection is not None:
                    moments.setdefault(name, RunningMoments(states.size(-1)))
                    moments[name].update(states[selection[0], selection[1]].float())
    return means, moments


def _pool(
    means: dict[str, np.ndarray],
    windowed: dict[str, tuple[Tensor, Tensor, Tensor]],
    name: str,
    states: Tensor,
    lengths: Tensor,
    mask: Tensor,
    batch: EncodedBatch,
    store: RaggedArray,
) -> None:
    """Mean and std of each utterance of a batch into `means[name]`; a window of a long utterance is
    combined with its earlier windows (`windowed`) and stored with the last one."""
    values = states.double()
    count = lengths[:, None].double()
    mean = (values * mask).sum(1) / lengths[:, None]
    m2 = ((values - mean[:, None]) ** 2 * mask).sum(1)
    if batch.starts is not None:
        if name in windowed:
            count, mean, m2 = _combine(*windowed.pop(name), count, mean, m2)
        if int(batch.starts[0] + batch.lengths[0]) < int(store.lengths[batch.indices[0]]):
            windowed[name] = (count, mean, m2)
            return
    pooled = torch.cat([mean, (m2 / count).sqrt()], 1).float()
    means.setdefault(name, np.zeros((len(store), 2 * states.size(-1)), np.float32))
    means[name][batch.indices] = pooled.cpu().numpy()


def _combine(
    n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations of two parts together (Chan et al.'s update)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta**2 * n_a * n_b / n


def _phone_probe(
    passes: _Passes,
    names: list[str],
    frame_labels: dict[str, _FrameLabels],
    moments: Mapping[str, RunningMoments],
    config: ProbeConfig,
    class_names: Sequence[str],
    shuffle_frames: int,
    progress: bool,
) -> dict:
    device, grid = passes.device, config.grid()
    heads = {
        name: LayerHeads(*moments[name].mean_std(), len(class_names), grid, device)
        for name in names
    }
    generator = torch.Generator().manual_seed(config.seed)
    labelled = {
        split: passes.batches(split, frame_labels[split].labelled_items) for split in SPLITS
    }

    def labelled_states(
        split: str, batches: Sequence[np.ndarray]
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """(labels, name -> float16 states) of the labelled frames of each encoder batch."""
        for batch in passes.run(split, batches):
            rows, frames, targets = frame_labels[split].of_batch(batch, device)
            yield targets, {name: states[rows, frames] for name, states in batch.states.items()}

    def mini_batches(
        targets: Tensor, inputs: Mapping[str, Tensor], order: Tensor, size: int
    ) -> Iterator[Batch]:
        for start in range(0, len(targets), size):
            chosen = order[start : start + size]
            yield targets[chosen], {name: x[chosen] for name, x in inputs.items()}

    def train_batches(epoch: int) -> Iterator[Batch]:
        # Length-sorted encoder batches are homogeneous (all short digits, or all long sentences),
        # so frames are pooled over several batches, in shuffled batch order, and the pool is
        # shuffled before it is cut into mini-batches. The pool is counted in frames, not bytes,
        # so that its composition does not depend on which layers are probed.
        order = torch.randperm(len(labelled["train"]), generator=generator).tolist()
        pool: list[tuple[Tensor, dict[str, Tensor]]] = []
        pooled = 0
        for targets, inputs in labelled_states("train", [labelled["train"][i] for i in order]):
            pool.append((targets, inputs))
            pooled += len(targets)
            if pooled >= shuffle_frames:
                yield from shuffled_pool(pool)
                pool, pooled = [], 0
        if pool:
            yield from shuffled_pool(pool)

    def shuffled_pool(pool: list[tuple[Tensor, dict[str, Tensor]]]) -> Iterator[Batch]:
        targets = torch.cat([t for t, _ in pool])
        inputs = {name: torch.cat([x[name] for _, x in pool]) for name in names}
        pool.clear()  # the concatenated copies replace the pieces
        shuffled = torch.randperm(len(targets), generator=generator).to(device)
        yield from mini_batches(targets, inputs, shuffled, config.batch_size or len(targets))

    def in_order(split: str) -> Iterator[Batch]:
        for targets, inputs in labelled_states(split, labelled[split]):
            yield from mini_batches(
                targets, inputs, torch.arange(len(targets), device=device), config.eval_batch
            )

    def dev_batches() -> Iterator[Batch]:
        return in_order("dev")

    train_heads(heads, config.epochs, train_batches, dev_batches, progress, "online phone probe")
    truth, predicted = predict(heads, in_order("test"))
    majority = int(np.bincount(frame_labels["train"].values, minlength=len(class_names)).argmax())
    return {
        "task": "phone",
        "classes": list(class_names),
        "examples": {split: int(len(frame_labels[split].values)) for split in SPLITS},
        "majority_class": class_names[majority],
        "config": config.to_dict(),
        "standardisation": "per layer, exact mean/std of the train split's labelled frames (statistics pass)",
        "layers": {
            name: layer_report(heads[name], grid, truth, predicted[name], majority, class_names)
            for name in names
        },
    }


def probe_online(
    model: nn.Module,
    features: Mapping[str, RaggedArray],
    labels: Mapping[str, RaggedArray] | None = None,
    speakers: Mapping[str, str] | None = None,
    layers: Sequence[int] | None = None,
    include_input: bool = True,
    device: str | torch.device = "cpu",
    phone_config: ProbeConfig = PHONE_PROBE,
    speaker_config: ProbeConfig = SPEAKER_PROBE,
    batch_frames: int = 32_000,
    window_frames: int | None = DEFAULT_WINDOW_FRAMES,
    shuffle_frames: int = 65_536,
    class_names: Sequence[str] = PHONES,
    progress: bool = True,
    phone_include: Mapping[str, set[str]] | None = None,
    utterance_tasks: Mapping[str, tuple[Mapping[str, str], ProbeConfig, dict]] | None = None,
) -> dict:
    """Phone and/or speaker probes of every selected layer, running `model` on the fly.

    phone_include: split -> utterance ids the phone probe uses (None: all). utterance_tasks: task ->
    (utt_id -> class, config, keyword options of `probe_utterances`: include, kinds, fractions, ...),
    probed on the pooled statistics of the one statistics pass (given, `speakers` is not used).

    features: split -> feature store; labels: split -> frame-label store (None: no phone probe);
    speakers: utt_id -> speaker (None: no speaker probe); layers: hidden-state indices (None = all
    0..N; 0 = input representation); include_input: also probe the input features (baseline).
    batch_frames: padded frames per forward pass. window_frames: longest utterance encoded whole
    (longer: in windows, as extraction does). shuffle_frames: labelled train frames pooled
    (float16, on `device`: shuffle_frames x sum of probed dims x 2 bytes, 0.4 GB for 65,536
    frames of input + 4 layers of 768) and shuffled together before they are cut into mini-batches.
    Returns {"phone": ..., "speaker": ..., "mode": "online", "forward_passes": ...}, each task's
    result shaped as in `probe.probe_phones` / `probe_utterance.probe_speakers`.
    """
    started = time.perf_counter()
    device = torch.device(device)
    encoder = encoder_of(model)
    layer_ids = resolve_layers(layers, encoder.config.num_layers, error=ProbeError)
    names = ([INPUT_STORE] if include_input else []) + [layer_store_name(i) for i in layer_ids]
    if not names:
        raise ProbeError("nothing to probe: no layers selected and include_input is False")
    if speakers is not None and utterance_tasks is None:
        utterance_tasks = {"speaker": (speakers, speaker_config, {})}
    if labels is None and not utterance_tasks:
        raise ProbeError(
            "nothing to probe: give frame labels (phone probe) and/or speakers (speaker probe)"
        )
    frame_labels = None
    if labels is not None:
        frame_labels = {
            split: _FrameLabels(
                features[split],
                labels[split],
                split,
                len(class_names),
                phone_include[split] if phone_include is not None else None,
            )
            for split in SPLITS
        }
        for split in SPLITS:
            if len(frame_labels[split].values) == 0:
                raise ProbeError(
                    f"{split}: no labelled frames (every label is -1); the phone probe needs labels "
                    f"in train, dev and test"
                )
    passes = _Passes(model, features, layer_ids, device, include_input, batch_frames, window_frames)
    means, moments = _statistics_pass(passes, names, frame_labels, bool(utterance_tasks))
    result: dict = {"mode": "online"}
    if frame_labels is not None:
        result["phone"] = _phone_probe(
            passes,
            names,
            frame_labels,
            moments,
            phone_config,
            class_names,
            shuffle_frames,
            progress,
        )
    ids = {split: features[split].ids for split in SPLITS}
    for task, (classes, config, options) in (utterance_tasks or {}).items():
        result[task] = probe_utterances(
            means, ids, classes, config, device, progress, task=task, **options
        )
    result["forward_passes"] = passes.count
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
