"""Feature computation of a whole corpus: a pool of workers, the stores of the featurize layout.

Output layout of `write_features` (the featurize stage's output folder)::

    {train,dev,test}/          float16 ragged stores of the model input (featstore.py)
    {train,dev,test}_target/   the reconstruction target, only when it differs (linear)
    labels/{train,dev,test}/   int16 frame phone labels aligned 1:1 with the input (-1 = none)
    utterances.tsv             utt_id, split, corpus, speaker, num_frames, labelled, keyword
    feature_config.json        the resolved feature settings (+ global CMVN stats)

How it runs (measured by benchmarks/featurize.py): a fork pool of `workers` processes, each
with torch limited to one thread, decodes, resamples (with a cached kernel per source rate),
computes features and CMVN, and returns float16 arrays in chunks of about `CHUNK_AUDIO_SEC`
seconds of audio; the main process writes them in manifest order while the workers go on.
At most `IN_FLIGHT_PER_WORKER` chunks per worker are outstanding, so memory stays flat
whatever the corpus size. Global-CMVN statistics are summed in the workers from the float32
values, before the conversion to float16.

A file longer than `audio.STREAM_ABOVE_SEC` is not sent to a worker (its arrays would be gigabytes,
pickled back whole): the main process computes it block by block when its turn comes
(features.py: stream_features) and writes each block as it comes, while the workers go on.

torch is imported where features are computed (features.py), not by importing this module.
"""

from __future__ import annotations

import collections
import csv
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from tqdm import tqdm

from mockingjay.atomic import write_json
from mockingjay.audio import STREAM_ABOVE_SEC, AudioError
from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.feature_config import FeatureConfig, num_frames
from mockingjay.manifest import ManifestRow
from mockingjay.store_layout import (
    SPLITS,
    feature_config_file,
    frame_labels_store,
    labels_dir,
    labels_store,
    target_store,
    utterances_table,
)

CHUNK_AUDIO_SEC = 60.0  # audio seconds per task sent to a worker (~25 ms of work); fewer, larger
# tasks cost the main process less, and small corpora still get >= 8 tasks per worker
IN_FLIGHT_PER_WORKER = 3  # outstanding tasks per worker: keeps workers busy, bounds memory

if TYPE_CHECKING:  # mockingjay.features imports torch: imported where features are computed
    from mockingjay.features import FeatureExtractor

_extractor: FeatureExtractor | None = None  # this worker's, made by init_worker


class FeaturizeError(RuntimeError):
    """The corpus cannot be featurized as it is (a file gone or changed since prepare, frame labels
    of other settings); the message says what to rerun."""


# One task: (path, source sample rate, whether to sum global-CMVN statistics, segment or None).
Task = tuple[str, int, bool, tuple[float, float] | None]


def init_worker(config: FeatureConfig) -> None:
    """Set up a worker process (or this process, for one worker): one torch thread, freed memory
    kept for reuse, and the worker's FeatureExtractor (`worker_extractor`)."""
    import torch

    from mockingjay.features import FeatureExtractor

    global _extractor
    torch.set_num_threads(1)
    keep_freed_memory()
    _extractor = FeatureExtractor(config)


def worker_extractor() -> FeatureExtractor | None:
    """The FeatureExtractor `init_worker` made in this process (None before it ran)."""
    return _extractor


def keep_freed_memory() -> None:
    """Let glibc reuse freed blocks instead of returning them to the kernel after every file:
    the per-file arrays (a few MB) otherwise come back as fresh pages, and the page faults cost
    ~3% of a worker's time. Bounded: a worker keeps at most about its largest file's working set."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks up to 64 MB come from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MB of free heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def featurize_chunk(tasks: list[Task]) -> list:
    """Features of a few files: (float16 features, float16 target or None, stats or None) each.
    A file that cannot be read raises AudioError, which travels back from the worker. Runs in a
    process set up by `init_worker`."""
    from mockingjay.features import GlobalCMVN, featurize_wave, load_wave

    assert _extractor is not None
    config = _extractor.config
    results = []
    for path, source_rate, want_stats, segment in tasks:
        stats = (GlobalCMVN(config.dim), GlobalCMVN(config.target_dim)) if want_stats else None
        wave = load_wave(path, _extractor, source_rate, segment)
        feats, target = featurize_wave(wave, _extractor, np.float16, stats)
        results.append((feats, target, stats))
    return results


class Streamed:
    """A long file's features as they are computed: `blocks` yields (features, None) and (None,
    target) float16 blocks; `stats` holds its global-CMVN sums once they are consumed."""

    def __init__(self, row: ManifestRow, extractor, collect: bool):
        from mockingjay.features import GlobalCMVN, stream_features

        config = extractor.config
        self.stats = (GlobalCMVN(config.dim), GlobalCMVN(config.target_dim)) if collect else None
        self._blocks = stream_features(row.path, extractor, row.segment, np.float16, self.stats)

    def blocks(self):
        try:
            yield from self._blocks
        except AudioError as err:
            raise FeaturizeError(f"{err}; the manifest is stale, rerun prepare") from err


def chunks(
    rows: list[ManifestRow], chunk_sec: float, stream_above_sec: float = STREAM_ABOVE_SEC
) -> Iterator[list[ManifestRow]]:
    """Rows in tasks of about `chunk_sec` seconds; a row over `stream_above_sec` is a chunk of its own."""
    chunk, seconds = [], 0.0
    for row in rows:
        if row.duration > stream_above_sec:
            if chunk:
                yield chunk
                chunk, seconds = [], 0.0
            yield [row]
            continue
        chunk.append(row)
        seconds += row.duration
        if seconds >= chunk_sec:
            yield chunk
            chunk, seconds = [], 0.0
    if chunk:
        yield chunk


def compute_features(
    rows: list[ManifestRow],
    config: FeatureConfig,
    workers: int,
    chunk_sec: float = CHUNK_AUDIO_SEC,
    in_flight_per_worker: int = IN_FLIGHT_PER_WORKER,
    stream_above_sec: float = STREAM_ABOVE_SEC,
):
    """Yield (row, float16 features, float16 target or None, GlobalCMVN pair or None) in manifest
    order, computed on `workers` processes (1: in this process); a row over `stream_above_sec`
    comes as (row, Streamed, None, None), computed in this process while it is consumed."""
    collect = config.cmvn == "global"
    streaming: list = []  # this process's extractor, made on the first long file

    def streamed(row: ManifestRow):
        if not streaming:
            from mockingjay.features import FeatureExtractor

            streaming.append(FeatureExtractor(config))
        yield row, Streamed(row, streaming[0], collect and row.split == "train"), None, None

    def task(row: ManifestRow) -> Task:
        return (row.path, row.sample_rate, collect and row.split == "train", row.segment)

    def unpack(chunk: list[ManifestRow], results: Callable[[], list]):
        try:
            computed = results()
        except AudioError as err:
            raise FeaturizeError(f"{err}; the manifest is stale, rerun prepare") from err
        for row, result in zip(chunk, computed):
            yield (row, *result)

    def is_long(chunk: list[ManifestRow]) -> bool:
        return chunk[0].duration > stream_above_sec

    if workers == 1:
        init_worker(config)
        for chunk in chunks(rows, chunk_sec, stream_above_sec):
            if is_long(chunk):
                yield from streamed(chunk[0])
            else:
                yield from unpack(chunk, lambda: featurize_chunk([task(r) for r in chunk]))
        return
    chunk_sec = min(
        chunk_sec, max(1.0, sum(r.duration for r in rows) / (8 * workers))
    )  # balance the tail
    # fork: the workers inherit the imported torch instead of importing it again (~2 s each)
    import mockingjay.features  # noqa: F401

    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=init_worker, initargs=(config,)
    ) as pool:
        pending: collections.deque = collections.deque()

        def take():
            done_chunk, future = pending.popleft()
            return streamed(done_chunk[0]) if future is None else unpack(done_chunk, future.result)

        for chunk in chunks(rows, chunk_sec, stream_above_sec):
            if len(pending) >= workers * in_flight_per_worker:
                yield from take()
            pending.append(
                (
                    chunk,
                    None
                    if is_long(chunk)
                    else pool.submit(featurize_chunk, [task(r) for r in chunk]),
                )
            )
        while pending:
            yield from take()


def load_frame_labels(alignments: Path | None, config: FeatureConfig) -> RaggedArray | None:
    """The align stage's frame-label store in `alignments` (None: featurize without labels); it must
    have been made at the features' hop and sample rate."""
    if alignments is None:
        return None
    store_path = frame_labels_store(alignments)
    labels = RaggedArray(store_path)
    hop = labels.attrs.get("hop_length")
    if hop != config.hop_length or labels.attrs.get("sample_rate") != config.sample_rate:
        raise FeaturizeError(
            f"{store_path}: frame labels were made for hop_length={hop} at {labels.attrs.get('sample_rate')} Hz, "
            f"but featurize uses hop_length={config.hop_length} at {config.sample_rate} Hz; rerun align"
        )
    return labels


def normalize_in_place(
    store_path: Path, mean: np.ndarray, std: np.ndarray, chunk_rows: int = 1 << 16
) -> None:
    """Apply global CMVN, (x - mean) / std, to a written float16 store, `chunk_rows` rows at a time."""
    store = RaggedArray(store_path, mode="r+")
    for start in range(0, store.data.shape[0], chunk_rows):
        block = store.data[start : start + chunk_rows].astype(np.float32)
        store.data[start : start + chunk_rows] = ((block - mean) / std).astype(store.dtype)
    if isinstance(store.data, np.memmap):
        store.data.flush()
    store.check_finite()  # a band of near-zero deviation can overflow float16 here, after the writer's check


def sort_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    """Manifest rows in output order: train, dev, test, each by utterance id."""
    order = {split: i for i, split in enumerate(SPLITS)}
    return sorted(rows, key=lambda r: (order[r.split], r.utt_id))


def write_features(
    rows: list[ManifestRow],
    config: FeatureConfig,
    out: Path,
    workers: int,
    labels: RaggedArray | None = None,
    progress: bool = True,
    chunk_sec: float = CHUNK_AUDIO_SEC,
    stream_above_sec: float = STREAM_ABOVE_SEC,
) -> tuple[dict, list[tuple]]:
    """Compute and write every store of the layout above into the (existing, empty) folder `out`
    (the caller makes it beside its final place and publishes it whole). `labels`: the frame
    labels (`load_frame_labels`); `progress`: a tqdm bar of audio seconds on stderr.

    Returns the resolved feature settings (feature_config.json) and the utterance table rows.
    Raises FeaturizeError for a file that no longer matches the manifest or mismatched labels.
    """
    from mockingjay.features import GlobalCMVN

    attrs = {"feature_config": config.to_dict(), "kind": "input"}
    labels_dir(out).mkdir()
    writers = {s: RaggedWriter(out / s, config.dim, "float16", attrs) for s in SPLITS}
    target_writers = (
        {
            s: RaggedWriter(
                target_store(out / s), config.target_dim, "float16", {**attrs, "kind": "target"}
            )
            for s in SPLITS
        }
        if config.target == "linear"
        else {}
    )
    label_writers = {
        s: RaggedWriter(labels_store(out, s), 1, "int16", {"hop_length": config.hop_length})
        for s in SPLITS
    }
    cmvn, target_cmvn = GlobalCMVN(config.dim), GlobalCMVN(config.target_dim)
    table = []
    bar = tqdm(
        total=round(sum(r.duration for r in rows), 1),
        desc="featurize",
        unit="audio-s",
        file=sys.stderr,
        disable=not progress,
    )
    for row, feats, target, stats in compute_features(
        rows, config, workers, chunk_sec, stream_above_sec=stream_above_sec
    ):
        streamed = isinstance(feats, Streamed)
        if streamed:  # a long file: each block is written as it comes
            for block, target_block in feats.blocks():
                if block is not None:
                    writers[row.split].extend(block)
                    bar.update(round(len(block) * config.hop_sec, 1))
                if target_block is not None:
                    target_writers[row.split].extend(target_block)
            frames = writers[row.split].end_item(row.utt_id)
            if target_writers:
                target_writers[row.split].end_item(row.utt_id)
            stats = feats.stats
        else:
            frames = feats.shape[0]
        expected = num_frames(row.num_samples, config.hop_length)
        if frames != expected:
            raise FeaturizeError(
                f"{row.path}: {frames} frames, expected {expected}; manifest is stale, rerun prepare"
            )
        if not streamed:
            writers[row.split].append(row.utt_id, feats)
            if target is not None:
                target_writers[row.split].append(row.utt_id, target)
        if stats is not None:
            cmvn.merge(stats[0])
            target_cmvn.merge(stats[1])
        frame_labels = np.full(frames, -1, dtype=np.int16)
        if labels is not None and row.utt_id in labels:
            aligned = labels.get(row.utt_id)[:, 0]
            if len(aligned) != frames:
                raise FeaturizeError(
                    f"{row.utt_id}: {len(aligned)} frame labels for {frames} frames; rerun align"
                )
            frame_labels = np.asarray(aligned, dtype=np.int16)
        label_writers[row.split].append(row.utt_id, frame_labels)
        table.append(
            (
                row.utt_id,
                row.split,
                row.corpus,
                row.speaker,
                frames,
                int((frame_labels >= 0).any()),
                row.keyword,
            )
        )
        if not streamed:
            bar.update(round(row.duration, 1))
    bar.close()
    for writer in (*writers.values(), *target_writers.values(), *label_writers.values()):
        writer.close()
    resolved = config.to_dict()
    if config.cmvn == "global":
        mean, std = cmvn.stats()
        resolved["global_cmvn"] = {"mean": mean.tolist(), "std": std.tolist()}
        for split in SPLITS:
            normalize_in_place(out / split, mean, std)
        if target_writers:
            t_mean, t_std = target_cmvn.stats()
            resolved["global_cmvn_target"] = {"mean": t_mean.tolist(), "std": t_std.tolist()}
            for split in SPLITS:
                normalize_in_place(target_store(out / split), t_mean, t_std)
    # the bytes of stages.common.write_json; `out` is published whole, so no file of it needs a rename
    write_json(feature_config_file(out), resolved)
    with open(utterances_table(out), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["utt_id", "split", "corpus", "speaker", "num_frames", "labelled", "keyword"]
        )
        writer.writerows(table)
    return resolved, table
