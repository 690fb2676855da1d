"""featurize: log-mel (+ deltas) features for every utterance, stored for memory-mapped training.

Output directory layout::

    features/{train,dev,test}/          float16 ragged stores of the model input (featstore.py)
    features/{train,dev,test}_target/   the reconstruction target, only when it differs (linear)
    features/labels/{train,dev,test}/   int16 frame phone labels aligned 1:1 with the input (-1 = none)
    features/utterances.tsv             utt_id, split, corpus, speaker, num_frames, labelled, keyword
    features/feature_config.json        the resolved feature settings (+ global CMVN stats)
    features/summary.json               counts of what was written (not how fast)

The computation (a pool of workers, long files block by block, global CMVN) is
mockingjay/featurize.py: write_features; this stage reads the params and the manifest, makes
the output folder beside its final place and publishes it whole, and tracks the run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from mockingjay.config import from_section, to_flat_dict
from mockingjay.feature_config import FeatureConfig, feature_config
from mockingjay.featurize import load_frame_labels, sort_rows, write_features
from mockingjay.manifest import read_manifest
from mockingjay.store_layout import feature_config_file

from . import tracking
from .common import (
    PARAMS_OPTION,
    atomic_output_dir,
    audio_folders,
    check_output_dir,
    check_output_file,
    cli_errors,
    section,
    worker_count,
    write_json,
)

# summary fields that describe the run (machine, wall clock): metrics and MLflow, not the output folder
RUN_FACTS = ("workers", "seconds", "real_time_factor")


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    manifest: Path = typer.Option(
        Path("data/prepared/manifest.tsv"), help="manifest from the prepare stage"
    ),
    alignments: Path = typer.Option(
        Path("data/alignments"), help="align stage output (frame labels)"
    ),
    no_labels: bool = typer.Option(False, "--no-labels", help="featurize without phone labels"),
    out: Path = typer.Option(Path("data/features"), help="output directory"),
    metrics: Path = typer.Option(
        None, "--metrics", help="write the summary JSON here (DVC metrics); default: none"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace --out even if this stage did not make it"
    ),
) -> None:
    """Compute log-mel (+ delta) features with CMVN into memory-mappable float16 stores."""
    config = from_section(FeatureConfig, feature_config(section(params, "featurize")), "featurize")
    rows = sort_rows(read_manifest(manifest))
    inputs = [params, manifest, None if no_labels else alignments, *audio_folders(rows)]
    check_output_dir(out, "featurize", force, inputs=inputs)
    check_output_file(metrics, "--metrics")
    labels = None if no_labels else load_frame_labels(alignments, config)
    workers = worker_count(config.workers)
    total_sec = sum(r.duration for r in rows)
    import mockingjay.features  # noqa: F401  torch loads now (~2 s), not in the timed part below

    with (
        tracking.stage_run("featurize", to_flat_dict(config)) as mlflow,
        atomic_output_dir(out, "featurize", force) as tmp,
    ):
        started = time.time()
        _, table = write_features(rows, config, tmp, workers, labels)
        elapsed = time.time() - started
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
        # The output folder holds what the features are, not how fast this machine made them: a
        # redo (after a kill, on another machine) must hash the same, or pretrain reruns for nothing.
        write_json(tmp / "summary.json", {k: v for k, v in summary.items() if k not in RUN_FACTS})
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        mlflow.log_artifact(str(tmp / "summary.json"))
        mlflow.log_artifact(str(feature_config_file(tmp)))
    if metrics:
        write_json(metrics, summary)
    print(
        f"featurize: {summary['utterances']} utterances, {summary['audio_hours']:.3f} h of audio at "
        f"{summary['real_time_factor']:.0f}x real time on {workers} worker(s), "
        f"{size / 1e6:.1f} MB -> {out}",
        file=sys.stderr,
    )
