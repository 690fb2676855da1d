"""align: phone labels for every utterance of a corpus marked `align: true`.

Forced alignment with pocketsphinx (offline; CMUdict ARPAbet without stress, plus SIL), or
labels imported from existing files (`align.imports`: our `.lab`, MFA TextGrid, or the
CPC/s3prl `converted_aligned_phones.txt`). Output directory::

    alignments/lab/<utt_id>.lab      start_sec end_sec PHONE, one segment per line
    alignments/frame_labels/         int16 class ids at the feature frame rate (featstore), -1 = none
    alignments/failures.tsv          every utterance that could not be labelled, and why
    alignments/summary.json

Frame t is centred at t * hop (torchaudio's centred STFT) and takes the phone whose
segment contains that centre; see `mockingjay.phones.segments_to_frame_labels`.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import typer
from tqdm import tqdm

from mockingjay.align import AlignmentError, align_in_process
from mockingjay.audio import AudioError, read_audio
from mockingjay.config import from_section, to_flat_dict
from mockingjay.featstore import RaggedWriter
from mockingjay.feature_config import FeatureConfig, feature_config, num_frames
from mockingjay.manifest import ManifestRow, Problem, read_manifest, write_tsv
from mockingjay.phones import (
    PHONES,
    LabelError,
    Segment,
    read_cpc_alignments,
    read_lab,
    read_textgrid,
    resample_frame_labels,
    segments_to_frame_labels,
    write_lab,
)
from mockingjay.store_layout import frame_labels_store

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    atomic_output_dir,
    audio_folders,
    check_output_dir,
    check_output_file,
    cli_errors,
    section,
    worker_count,
    write_json,
)


@dataclass(frozen=True)
class LabelImport:
    """Read a corpus's phone labels from files instead of aligning it."""

    corpus: str
    format: Literal["lab", "textgrid", "cpc"]
    path: str  # folder of <native id>.lab / .TextGrid files, or the CPC alignment file
    tier: str = "phones"  # TextGrid tier
    hop_ms: float = 10.0  # frame rate of CPC labels

    def validate(self) -> None:
        if self.hop_ms <= 0:
            raise ValueError(f"hop_ms: must be positive, got {self.hop_ms}")


@dataclass(frozen=True)
class AlignConfig:
    """The `align` section of params.yaml."""

    imports: list[LabelImport] = field(default_factory=list)
    workers: int = 0  # 0 = one per CPU core

    def validate(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")


def _align_row(item: tuple[ManifestRow, str | None]) -> tuple[str, list[Segment] | Problem]:
    row, lexicon = item
    try:
        audio = read_audio(row.path, segment=row.segment)
        return row.utt_id, align_in_process(
            audio.samples, row.transcript, audio.sample_rate, lexicon
        )
    except (AlignmentError, AudioError) as err:
        reason = type(err).__name__
        return row.utt_id, Problem(
            row.utt_id, row.path, reason, str(err).replace(f"{row.path}: ", "")
        )


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def align_rows(
    rows: list[ManifestRow], workers: int, lexicons: dict[str, str] | None = None
) -> dict[str, list[Segment] | Problem]:
    """Align every row; `lexicons` maps a corpus to its own CMUdict-format lexicon."""
    items = [(row, (lexicons or {}).get(row.corpus)) for row in rows]
    progress = dict(total=len(rows), desc="align: pocketsphinx", unit="utt", file=sys.stderr)
    if workers == 1 or len(rows) <= 1:
        return dict(tqdm(map(_align_row, items), **progress))
    with ProcessPoolExecutor(min(workers, len(rows)), initializer=_init_worker) as pool:
        return dict(tqdm(pool.map(_align_row, items, chunksize=4), **progress))


def import_labels(
    spec: LabelImport, rows: list[ManifestRow], features: FeatureConfig
) -> dict[str, list[Segment] | np.ndarray | Problem]:
    """Labels of `rows` (one corpus) from existing files: segments, or frame arrays for CPC."""
    root = Path(spec.path)
    if not root.exists():
        raise StageError(
            f"align.imports: label path {root} for corpus {spec.corpus!r} does not exist"
        )
    native = {row.utt_id: row.utt_id[len(spec.corpus) + 1 :] for row in rows}
    results: dict[str, list[Segment] | np.ndarray | Problem] = {}
    if spec.format == "cpc":
        table = read_cpc_alignments(root)
        for row in rows:
            frames = table.get(native[row.utt_id], table.get(row.utt_id))
            if frames is None:
                results[row.utt_id] = Problem(
                    row.utt_id, row.path, "no_labels", f"no line for it in {root}"
                )
            else:
                count = num_frames(row.num_samples, features.hop_length)
                results[row.utt_id] = resample_frame_labels(
                    frames, spec.hop_ms / 1000, features.hop_sec, count
                )
        return results
    suffix = ".lab" if spec.format == "lab" else ".TextGrid"
    for row in rows:
        path = root / f"{native[row.utt_id]}{suffix}"
        if not path.is_file():
            results[row.utt_id] = Problem(
                row.utt_id, row.path, "no_labels", f"label file {path} not found"
            )
            continue
        try:
            results[row.utt_id] = (
                read_lab(path) if spec.format == "lab" else read_textgrid(path, spec.tier)
            )
        except LabelError as err:
            results[row.utt_id] = Problem(row.utt_id, row.path, "bad_labels", str(err))
    return results


def corpus_lexicons(params: Path) -> dict[str, str]:
    """corpus -> its `lexicon` file, from the prepare section's corpora (where corpora are defined)."""
    from mockingjay.manifest import PrepareConfig

    prepare = from_section(PrepareConfig, section(params, "prepare"), "prepare")
    return {spec.name: spec.lexicon for spec in prepare.corpora if spec.lexicon}


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    manifest: Path = typer.Option(
        Path("data/prepared/manifest.tsv"), help="manifest from the prepare stage"
    ),
    out: Path = typer.Option(Path("data/alignments"), help="output directory"),
    metrics: Path = typer.Option(
        None, "--metrics", help="write the summary JSON here (DVC metrics); default: none"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace --out even if this stage did not make it"
    ),
) -> None:
    """Forced-align transcripts to phones (pocketsphinx) or import existing labels."""
    config = from_section(AlignConfig, section(params, "align"), "align")
    features = from_section(
        FeatureConfig, feature_config(section(params, "featurize")), "featurize"
    )
    rows = [r for r in read_manifest(manifest) if r.align]
    corpora = {r.corpus for r in read_manifest(manifest)}
    for spec in config.imports:
        if spec.corpus not in corpora:
            raise StageError(
                f"align.imports: corpus {spec.corpus!r} is not in the manifest (have {sorted(corpora)})"
            )
    check_output_dir(
        out,
        "align",
        force,
        inputs=[params, manifest, *audio_folders(rows), *(s.path for s in config.imports)],
    )
    check_output_file(metrics, "--metrics")
    imported = {spec.corpus: spec for spec in config.imports}
    results: dict[str, list[Segment] | np.ndarray | Problem] = {}
    for spec in config.imports:
        results.update(import_labels(spec, [r for r in rows if r.corpus == spec.corpus], features))
    to_align = [r for r in rows if r.corpus not in imported]
    workers = worker_count(config.workers)
    failures: list[Problem] = []
    params_flat = {
        **to_flat_dict(config),
        "featurize.hop_length": features.hop_length,
        "to_align": len(to_align),
    }
    with (
        tracking.stage_run("align", params_flat) as mlflow,
        atomic_output_dir(out, "align", force) as tmp,
    ):
        results.update(align_rows(to_align, workers, corpus_lexicons(params)))
        (tmp / "lab").mkdir()
        attrs = {
            "hop_length": features.hop_length,
            "sample_rate": features.sample_rate,
            "phones": list(PHONES),
        }
        with RaggedWriter(frame_labels_store(tmp), 1, "int16", attrs) as writer:
            for row in sorted(rows, key=lambda r: r.utt_id):
                result = results[row.utt_id]
                count = num_frames(row.num_samples, features.hop_length)
                if isinstance(result, Problem):
                    failures.append(result)
                    continue
                if isinstance(result, np.ndarray):
                    frames = result
                else:
                    write_lab(tmp / "lab" / f"{row.utt_id}.lab", result)
                    try:
                        frames = segments_to_frame_labels(result, count, features.hop_sec)
                    except LabelError as err:
                        failures.append(Problem(row.utt_id, row.path, "bad_labels", str(err)))
                        continue
                writer.append(row.utt_id, frames.astype(np.int16))
        write_tsv(tmp / "failures.tsv", failures, Problem)
        labelled = len(rows) - len(failures)
        summary = {
            "to_label": len(rows),
            "labelled": labelled,
            "aligned_with_pocketsphinx": sum(
                1 for r in to_align if not isinstance(results[r.utt_id], Problem)
            ),
            "imported": sum(
                1
                for r in rows
                if r.corpus in imported and not isinstance(results[r.utt_id], Problem)
            ),
            "failed": len(failures),
            "hop_length": features.hop_length,
        }
        write_json(tmp / "summary.json", summary)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        mlflow.log_artifact(str(tmp / "failures.tsv"))
        mlflow.log_artifact(str(tmp / "summary.json"))
    if metrics:
        write_json(metrics, summary)
    for problem in failures:
        print(f"align: failed {problem.path}: {problem.detail}", file=sys.stderr)
    print(
        f"align: {labelled}/{len(rows)} utterances labelled, {len(failures)} failed -> {out}",
        file=sys.stderr,
    )
