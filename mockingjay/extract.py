"""Frozen-encoder representations of a feature store: one float16 ragged store per layer.

`extract_representations` runs the encoder (eval mode, `torch.inference_mode`, bf16 autocast
on CUDA, fp32 on CPU) over a feature store and writes, under `out_dir`::

    input/       the model input features themselves (the log-mel baseline row of the probes)
    layer_00/    hidden state 0: the input representation (projection + positions + LayerNorm)
    layer_01/    output of encoder layer 1, ... up to layer_NN (N = number of layers)

Every store has the same ids, in the same order, with the same lengths as the feature store:
representations are brought back to the FEATURE frame rate (each of the ceil(T / R) steps is
repeated R times and the tail cropped to the utterance's frame count) so that frame phone labels,
which are aligned 1:1 with the features, line up with every layer. Index numbering follows the
encoder (s3prl#358): index 0 is the input representation, index i is layer i's output.

Memory stays bounded whatever the utterance length, too: an utterance longer than `window_frames`
is encoded in windows (`windows`): each keeps a core of frames and is encoded with `context`
frames of the neighbouring audio on each side where there is some (a window never exceeds
`window_frames`), and only its core is kept, so attention, activations and the states in memory are
bounded by the window, not by the utterance. Position encodings restart at each window: the model
sees each window as an utterance of its own, as in pretraining, where utterances are cropped to
`max_length`. An utterance no longer than the window is encoded whole, exactly as before windows.

Memory stays bounded whatever the corpus size: utterances are batched in length-sorted order
(little padding) with at most `batch_frames` padded frames per batch, and each batch's results go
straight to disk. Because every output store has exactly the feature store's row layout, item i
is written at the feature store's row offset of item i (`featstore.PresizedWriter`: preallocated
file, positioned writes): output order equals input order without holding the corpus, or a
reorder buffer, in memory. The store names are `store_layout.py`'s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mockingjay.device import autocast
from mockingjay.featstore import PresizedWriter, RaggedArray
from mockingjay.feature_config import frames_per_second
from mockingjay.model import upsample_to_frames
from mockingjay.store_layout import INPUT_STORE, layer_store_name

ProgressCallback = Callable[[int, int], None]  # (frames done, total frames)


class ExtractError(ValueError):
    """Extraction cannot run as asked (layer index out of range, feature dims mismatch)."""


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder of a `MockingjayForMAM` (or the encoder itself)."""
    return getattr(model, "encoder", model)


def resolve_layers(
    layers: Sequence[int] | None, num_layers: int, error: type[ValueError] = ExtractError
) -> list[int]:
    """Sorted, de-duplicated hidden-state indices; `None` = all of 0..num_layers."""
    if layers is None:
        return list(range(num_layers + 1))
    for index in layers:
        if (
            isinstance(index, bool)
            or not isinstance(index, (int, np.integer))
            or not 0 <= index <= num_layers
        ):
            raise error(
                f"layer index {index!r} out of range: valid layers are 0..{num_layers} "
                f"(0 = input representation, i = output of encoder layer i)"
            )
    return sorted({int(i) for i in layers})


def length_sorted_batches(
    lengths: np.ndarray, batch_frames: int, indices: np.ndarray | None = None
) -> list[np.ndarray]:
    """Item indices packed longest-first into batches of <= `batch_frames` padded frames.

    Sorting by length keeps padding (wasted compute) low; longest-first makes the biggest batch
    run first, so an out-of-memory error shows at once. An utterance longer than `batch_frames`
    gets a batch of its own. Deterministic: ties keep index order.
    """
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    indices = np.arange(len(lengths)) if indices is None else np.asarray(indices)
    order = indices[np.argsort(-np.asarray(lengths)[indices], kind="stable")]
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, batch_frames // longest)
        batches.append(order[start : start + size])
        start += size
    return batches


# A quarter of the window as context in all: 1/8 on each side (500 frames, 5 s at 10 ms, of a 4000-frame
# window: as much as pretraining's default crop), so a kept frame always has several seconds around it.
CONTEXT_DIVISOR = 8
DEFAULT_WINDOW_FRAMES = (
    4000  # 40 s at 10 ms: every LibriSpeech utterance (35 s at most) is encoded whole
)


def windows(
    length: int, window_frames: int, downsample_rate: int = 1
) -> list[tuple[int, int, int, int]]:
    """How an utterance of `length` frames is encoded: (seen start, seen end, kept start, kept end) per
    window, frames [seen start, seen end) go through the model and [kept start, kept end) are kept.

    One window (the whole utterance) when it fits. Otherwise kept cores of `window_frames - 2 x
    context` frames tile the utterance, each seen with up to `context` frames more on either side;
    every boundary is a multiple of `downsample_rate`, so the steps of a window are steps of the
    whole utterance (the model stacks R frames per step).
    """
    if length <= window_frames:
        return [(0, length, 0, length)]
    rate = downsample_rate
    context = -(-(window_frames // CONTEXT_DIVISOR) // rate) * rate
    core = (window_frames - 2 * context) // rate * rate
    if core < rate:
        raise ExtractError(
            f"window_frames: {window_frames} is too small for downsample_rate {rate}"
        )
    return [
        (
            max(0, start - context),
            min(length, start + core + context),
            start,
            min(length, start + core),
        )
        for start in range(0, length, core)
    ]


def check_window_frames(window_frames: int, downsample_rate: int = 1) -> None:
    """A window must keep at least one step after its context (names the parameter)."""
    if (
        isinstance(window_frames, bool)
        or not isinstance(window_frames, int)
        or window_frames < 16 * downsample_rate
    ):
        raise ExtractError(
            f"window_frames: must be an integer >= {16 * downsample_rate} "
            f"(16 x downsample_rate {downsample_rate}), got {window_frames!r}"
        )


class EncodedBatch(NamedTuple):
    """One batch of utterances (or one window of a long one) after the encoder, at the feature frame rate.

    indices: item indices in the feature store; lengths: frames per row ([B] long, CPU);
    states: store name ("input", "layer_XX") -> [B, T_max, dim] float16 on the model's device
    (rows past a row's length are padding); starts: the first frame of each row in its item (0 for a
    whole utterance; a window's kept start otherwise: windows of an item come in order, and the last
    is the one that ends at the item's length).
    """

    indices: np.ndarray
    lengths: Tensor
    states: dict[str, Tensor]
    starts: np.ndarray | None = None

    def row_starts(self) -> np.ndarray:
        return np.zeros(len(self.indices), dtype=np.int64) if self.starts is None else self.starts


def encode_batches(
    model: nn.Module,
    feature_store: RaggedArray,
    batches: Sequence[np.ndarray],
    layers: Sequence[int],
    device: str | torch.device = "cpu",
    include_input: bool = True,
    window_frames: int | None = DEFAULT_WINDOW_FRAMES,
) -> Iterator[EncodedBatch]:
    """Run the frozen encoder over `batches` of feature-store items, yielding float16 states.

    States are rounded to float16 here, as they are stored by extraction, so that probing on the
    fly sees the same numbers as probing extracted stores. Items longer than `window_frames` (None:
    no limit) are taken out of their batch and encoded window by window after it (module doc).
    """
    device = torch.device(device)
    encoder = encoder_of(model)
    config = encoder.config
    if feature_store.dim != config.input_dim:
        raise ExtractError(
            f"{feature_store.path}: features have {feature_store.dim} dims but the model expects "
            f"input_dim={config.input_dim}; featurize with the model's feature settings"
        )
    if window_frames is not None:
        check_window_frames(window_frames, config.downsample_rate)
    layers = resolve_layers(layers, config.num_layers)
    was_training = encoder.training
    encoder.eval()

    def encode(features: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        states: dict[str, Tensor] = {}
        if include_input:
            states[INPUT_STORE] = features.to(torch.float16)
        if layers:
            with autocast(device):
                output = encoder.extract_features(features, lengths.to(device), layers=layers)
            for index, hidden in zip(layers, output.hidden_states):
                hidden = upsample_to_frames(hidden, config.downsample_rate, features.size(1))
                states[layer_store_name(index)] = hidden.to(torch.float16)
        return states

    try:
        for indices in batches:
            indices = np.asarray(indices)
            lengths_all = feature_store.lengths[indices].astype(np.int64)
            fits = (
                np.ones(len(indices), bool)
                if window_frames is None
                else lengths_all <= window_frames
            )
            whole = indices[fits]
            if len(whole):
                # The inference-mode block closes before the yield: a generator suspended inside it
                # would leave the consumer's code running in inference mode too.
                with torch.inference_mode():
                    lengths = torch.from_numpy(lengths_all[fits])
                    states = encode(
                        padded_batch(feature_store, whole, lengths.numpy(), device), lengths
                    )
                yield EncodedBatch(whole, lengths, states)
            for item in indices[~fits]:
                rows = feature_store[int(item)]
                for seen_start, seen_end, keep_start, keep_end in windows(
                    len(rows), window_frames, config.downsample_rate
                ):
                    with torch.inference_mode():
                        seen = torch.from_numpy(
                            np.asarray(rows[seen_start:seen_end], dtype=np.float32)
                        )[None]
                        states = encode(seen.to(device), torch.tensor([seen_end - seen_start]))
                        kept = slice(keep_start - seen_start, keep_end - seen_start)
                        states = {name: state[:, kept] for name, state in states.items()}
                    yield EncodedBatch(
                        np.array([item]),
                        torch.tensor([keep_end - keep_start]),
                        states,
                        np.array([keep_start]),
                    )
    finally:
        encoder.train(was_training)


def padded_batch(
    store: RaggedArray, indices: np.ndarray, lengths: np.ndarray, device: torch.device
) -> Tensor:
    """[B, longest, D] float32 on `device`: items `indices` of `store` (their `lengths`), zero past
    each length (pinned for async copy to CUDA). The model input of one batch; public for the
    extraction benchmark, which times this copy apart from the forward pass."""
    padded = np.zeros((len(indices), int(lengths.max()), store.dim), dtype=np.float32)
    for row, item in enumerate(indices):
        padded[row, : lengths[row]] = store[int(item)]
    features = torch.from_numpy(padded)
    if device.type == "cuda":
        features = features.pin_memory()
    return features.to(device, non_blocking=True)


def _progress_reporter(
    progress: bool | ProgressCallback, total_frames: int
) -> tuple[ProgressCallback, Callable[[], None]]:
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, total: None), lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total_frames, desc="extract", unit="frame", unit_scale=True, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def extract_representations(
    model: nn.Module,
    feature_store: RaggedArray,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    batch_frames: int = 32_000,
    include_input: bool = True,
    progress: bool | ProgressCallback = True,
    frame_rate: float | None = None,
    window_frames: int | None = DEFAULT_WINDOW_FRAMES,
) -> dict:
    """Write per-layer float16 stores of `feature_store` under `out_dir`; return a summary.

    layers: hidden-state indices (0 = input representation, i = layer i); None = all 0..N.
    batch_frames: cap on padded frames (batch size x longest utterance) per forward pass.
    include_input: also write the input features as `out_dir/input` (the probes' baseline).
    window_frames: longest utterance encoded whole; longer ones are encoded in windows (module doc).
    progress: True = tqdm bar on stderr, False = silent, or a callback(frames done, total frames).
    frame_rate: feature frames per second of audio; None = from the store's recorded feature
        settings (featurize writes them into its attrs). A store that records none, and no
        frame_rate, gives audio_seconds_per_second None rather than a guessed rate.

    Summary keys: items, frames, stores, layers, hidden_size, batches, bytes_written, seconds,
    audio_seconds_per_second (seconds of audio per wall-clock second), device.
    """
    if frame_rate is None and "feature_config" in feature_store.attrs:
        frame_rate = frames_per_second(feature_store.attrs["feature_config"])
    device = torch.device(device)
    encoder = encoder_of(model)
    config = encoder.config
    layers = resolve_layers(layers, config.num_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = length_sorted_batches(feature_store.lengths, batch_frames)
    common = {
        "source": str(feature_store.path),
        "frame_rate": "features",
        "downsample_rate": config.downsample_rate,
        "model_config": config.to_dict(),
    }
    writers: dict[str, PresizedWriter] = {}
    if include_input:
        writers[INPUT_STORE] = PresizedWriter(
            out_dir / INPUT_STORE,
            feature_store,
            feature_store.dim,
            {**common, "kind": "input", "layer": None},
        )
    for index in layers:
        name = layer_store_name(index)
        writers[name] = PresizedWriter(
            out_dir / name,
            feature_store,
            config.hidden_size,
            {**common, "kind": "representation", "layer": index},
        )
    total_frames = int(feature_store.lengths.sum())
    report, finish = _progress_reporter(progress, total_frames)
    started = time.perf_counter()
    frames_done = 0
    try:
        for batch in encode_batches(
            model, feature_store, batches, layers, device, include_input, window_frames
        ):
            host = {name: states.cpu().numpy() for name, states in batch.states.items()}
            for row, (item, start) in enumerate(zip(batch.indices, batch.row_starts())):
                length = int(batch.lengths[row])
                for name, states in host.items():
                    writers[name].write(int(item), states[row, :length], int(start))
                frames_done += length
            report(frames_done, total_frames)
        paths = [writer.close() for writer in writers.values()]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        finish()
    seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for p in paths for f in p.iterdir() if f.is_file())
    return {
        "items": len(feature_store),
        "frames": total_frames,
        "stores": list(writers),
        "layers": layers,
        "hidden_size": config.hidden_size,
        "batches": len(batches),
        "bytes_written": int(written),
        "seconds": round(seconds, 3),
        "audio_seconds_per_second": (
            None if frame_rate is None else round(total_frames / frame_rate / max(seconds, 1e-9), 1)
        ),
        "device": str(device),
    }
