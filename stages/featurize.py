"""featurize: log-mel (+ deltas) features for every utterance, stored for memory-mapped training.

Output directory layout::

    features/{train,dev,test}/          float16 ragged stores of the model input (featstore.py)
    features/{train,dev,test}_target/   the reconstruction target, only when it differs (linear)
    features/labels/{train,dev,test}/   int16 frame phone labels aligned 1:1 with the input (-1 = none)
    features/utterances.tsv             utt_id, split, corpus, speaker, num_frames, labelled
    features/feature_config.json        the resolved feature settings (+ global CMVN stats)
"""

from __future__ import annotations

import csv
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import typer
from tqdm import tqdm

from mockingjay.config import from_section, to_flat_dict
from mockingjay.featstore import RaggedArray, RaggedWriter
from mockingjay.features import FeatureConfig, FeatureExtractor, GlobalCMVN, feature_config, featurize_file, num_frames
from mockingjay.manifest import SPLITS, ManifestRow, read_manifest

from . import tracking
from .common import PARAMS_OPTION, StageError, atomic_output_dir, cli_errors, section, worker_count, write_json

_extractor: FeatureExtractor | None = None


def _init_worker(config: FeatureConfig) -> None:
    import torch

    global _extractor
    torch.set_num_threads(1)
    _extractor = FeatureExtractor(config)


def _featurize(path: str):
    assert _extractor is not None
    return featurize_file(path, _extractor)


def compute_features(rows: list[ManifestRow], config: FeatureConfig, workers: int):
    """Yield (row, features, target) in manifest order, computed on `workers` processes."""
    paths = [r.path for r in rows]
    if workers == 1:
        _init_worker(config)
        yield from zip(rows, map(_featurize, paths))
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(config,)) as pool:
        yield from zip(rows, pool.map(_featurize, paths, chunksize=8))


def load_frame_labels(alignments: Path | None, config: FeatureConfig) -> RaggedArray | None:
    if alignments is None:
        return None
    store_path = alignments / "frame_labels"
    labels = RaggedArray(store_path)
    hop = labels.attrs.get("hop_length")
    if hop != config.hop_length or labels.attrs.get("sample_rate") != config.sample_rate:
        raise StageError(
            f"{store_path}: frame labels were made for hop_length={hop} at {labels.attrs.get('sample_rate')} Hz, "
            f"but featurize uses hop_length={config.hop_length} at {config.sample_rate} Hz; rerun align"
        )
    return labels


def normalize_in_place(store_path: Path, mean: np.ndarray, std: np.ndarray, chunk_rows: int = 1 << 16) -> None:
    store = RaggedArray(store_path, mode="r+")
    for start in range(0, store.data.shape[0], chunk_rows):
        block = store.data[start : start + chunk_rows].astype(np.float32)
        store.data[start : start + chunk_rows] = ((block - mean) / std).astype(store.dtype)
    store.data.flush()


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    manifest: Path = typer.Option(Path("data/prepared/manifest.tsv"), help="manifest from the prepare stage"),
    alignments: Path = typer.Option(Path("data/alignments"), help="align stage output (frame labels)"),
    no_labels: bool = typer.Option(False, "--no-labels", help="featurize without phone labels"),
    out: Path = typer.Option(Path("data/features"), help="output directory"),
) -> None:
    """Compute log-mel (+ delta) features with CMVN into memory-mappable float16 stores."""
    config = from_section(FeatureConfig, feature_config(section(params, "featurize")), "featurize")
    rows = read_manifest(manifest)
    labels = None if no_labels else load_frame_labels(alignments, config)
    workers = worker_count(config.workers)
    order = {split: i for i, split in enumerate(SPLITS)}
    rows = sorted(rows, key=lambda r: (order[r.split], r.utt_id))
    total_sec = sum(r.duration for r in rows)
    attrs = {"feature_config": config.to_dict(), "kind": "input"}
    with tracking.stage_run("featurize", to_flat_dict(config)) as mlflow, atomic_output_dir(out) as tmp:
        (tmp / "labels").mkdir()
        writers = {s: RaggedWriter(tmp / s, config.dim, "float16", attrs) for s in SPLITS}
        target_writers = (
            {s: RaggedWriter(tmp / f"{s}_target", config.target_dim, "float16", {**attrs, "kind": "target"}) for s in SPLITS}
            if config.target == "linear"
            else {}
        )
        label_writers = {s: RaggedWriter(tmp / "labels" / s, 1, "int16", {"hop_length": config.hop_length}) for s in SPLITS}
        cmvn, target_cmvn = GlobalCMVN(config.dim), GlobalCMVN(config.target_dim)
        table = []
        started = time.time()
        bar = tqdm(total=round(total_sec, 1), desc="featurize", unit="audio-s", file=sys.stderr)
        for row, (feats, target) in compute_features(rows, config, workers):
            expected = num_frames(row.num_samples, config.hop_length)
            if feats.shape[0] != expected:
                raise StageError(f"{row.path}: {feats.shape[0]} frames, expected {expected}; manifest is stale, rerun prepare")
            writers[row.split].append(row.utt_id, feats)
            if target is not None:
                target_writers[row.split].append(row.utt_id, target)
            if row.split == "train" and config.cmvn == "global":
                cmvn.update(feats)
                if target is not None:
                    target_cmvn.update(target)
            frame_labels = np.full(feats.shape[0], -1, dtype=np.int16)
            if labels is not None and row.utt_id in labels:
                aligned = labels.get(row.utt_id)[:, 0]
                if len(aligned) != feats.shape[0]:
                    raise StageError(f"{row.utt_id}: {len(aligned)} frame labels for {feats.shape[0]} frames; rerun align")
                frame_labels = np.asarray(aligned, dtype=np.int16)
            label_writers[row.split].append(row.utt_id, frame_labels)
            table.append((row.utt_id, row.split, row.corpus, row.speaker, feats.shape[0], int((frame_labels >= 0).any())))
            bar.update(round(row.duration, 1))
        bar.close()
        for writer in (*writers.values(), *target_writers.values(), *label_writers.values()):
            writer.close()
        resolved = config.to_dict()
        if config.cmvn == "global":
            mean, std = cmvn.stats()
            resolved["global_cmvn"] = {"mean": mean.tolist(), "std": std.tolist()}
            for split in SPLITS:
                normalize_in_place(tmp / split, mean, std)
            if target_writers:
                t_mean, t_std = target_cmvn.stats()
                resolved["global_cmvn_target"] = {"mean": t_mean.tolist(), "std": t_std.tolist()}
                for split in SPLITS:
                    normalize_in_place(tmp / f"{split}_target", t_mean, t_std)
        elapsed = time.time() - started
        write_json(tmp / "feature_config.json", resolved)
        with open(tmp / "utterances.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["utt_id", "split", "corpus", "speaker", "num_frames", "labelled"])
            writer.writerows(table)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        summary = {
            "utterances": len(table),
            "frames": int(sum(t[4] for t in table)),
            "audio_hours": round(total_sec / 3600, 4),
            "labelled_utterances": int(sum(t[5] for t in table)),
            "dim": config.dim,
            "workers": workers,
            "seconds": round(elapsed, 2),
            "real_time_factor": round(total_sec / max(elapsed, 1e-9), 1),
            "bytes_written": size,
        }
        write_json(tmp / "summary.json", summary)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        mlflow.log_artifact(str(tmp / "summary.json"))
        mlflow.log_artifact(str(tmp / "feature_config.json"))
    write_json(Path("metrics") / "featurize.json", summary)
    print(
        f"featurize: {summary['utterances']} utterances, {summary['audio_hours']:.3f} h of audio at "
        f"{summary['real_time_factor']:.0f}x real time on {workers} worker(s), "
        f"{size / 1e6:.1f} MB -> {out}",
        file=sys.stderr,
    )
