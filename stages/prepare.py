"""prepare: scan the configured corpora into a validated, split manifest.

Outputs (a directory): manifest.tsv, skipped.tsv, summary.json. With `on_error: fail`
(default) any bad file stops the stage before anything is written, and every bad file is
named; with `on_error: skip` bad files are left out and listed in skipped.tsv and MLflow.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import typer
from tqdm import tqdm

from mockingjay.config import ParamError, from_section, to_flat_dict
from mockingjay.corpora import read_corpus
from mockingjay.corpus_spec import UtteranceSource
from mockingjay.manifest import (
    ManifestRow,
    PrepareConfig,
    Problem,
    assign_splits,
    find_duplicate_ids,
    heldout_speakers,
    summarize,
    validate_utterance,
    write_tsv,
)

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    cli_errors,
    section,
    worker_count,
    write_json,
)


def _validate_one(
    item: tuple[UtteranceSource, bool],
    sample_rate: int,
    min_duration_sec: float,
    max_duration_sec: float | None,
):
    source, align = item
    return validate_utterance(source, align, sample_rate, min_duration_sec, max_duration_sec)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def validate_all(
    items: list[tuple[UtteranceSource, bool]], config: PrepareConfig
) -> list[ManifestRow | Problem]:
    check = partial(
        _validate_one,
        sample_rate=config.sample_rate,
        min_duration_sec=config.min_duration_ms / 1000,
        max_duration_sec=config.max_duration_s,
    )
    workers = min(worker_count(config.workers), max(1, len(items)))
    progress = dict(
        total=len(items), desc="prepare: validating audio", unit="file", file=sys.stderr
    )
    if workers == 1:
        return [check(item) for item in tqdm(items, **progress)]
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        return list(tqdm(pool.map(check, items, chunksize=16), **progress))


def _log_problems(mlflow, problems: list[Problem]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_tsv(Path(tmp) / "bad_files.tsv", problems, Problem)
        mlflow.log_artifact(str(Path(tmp) / "bad_files.tsv"))
    mlflow.log_metric("bad_files", len(problems))


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), help="output directory"),
    metrics: Path = typer.Option(
        None, "--metrics", help="write the summary JSON here (DVC metrics); default: none"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace --out even if this stage did not make it"
    ),
) -> None:
    """Scan corpora into a manifest: validate every file, resample/down-mix, split by seed."""
    config = from_section(PrepareConfig, section(params, "prepare"), "prepare")
    for i, spec in enumerate(config.corpora):
        if not Path(spec.path).exists():
            raise ParamError(
                f"prepare.corpora[{i}].path: {spec.path} does not exist (corpus {spec.name!r})"
            )
    check_output_dir(
        out, "prepare", force, inputs=[params, *(spec.path for spec in config.corpora)]
    )
    check_output_file(metrics, "--metrics")
    sources: list[tuple[UtteranceSource, bool]] = []
    for spec in config.corpora:
        sources.extend((utt, spec.align) for utt in read_corpus(spec))
    duplicates = find_duplicate_ids(s for s, _ in sources)
    duplicate_ids = {p.utt_id for p in duplicates}
    # The run covers the validation (the long part); a failed validation ends it FAILED, with the list.
    with tracking.stage_run("prepare", to_flat_dict(config)) as mlflow:
        checked = validate_all(
            [item for item in sources if item[0].utt_id not in duplicate_ids], config
        )
        rows = [r for r in checked if isinstance(r, ManifestRow)]
        problems = sorted(
            duplicates + [p for p in checked if isinstance(p, Problem)],
            key=lambda p: (p.path, p.reason),
        )
        if problems and config.on_error == "fail":
            _log_problems(mlflow, problems)
            lines = "\n".join(f"  {p.path}: {p.detail}" for p in problems)
            raise StageError(
                f"prepare: {len(problems)} bad file(s); nothing was written. Fix them, or set "
                f"prepare.on_error: skip to leave them out:\n{lines}"
            )
        if not rows:
            raise StageError("prepare: no usable utterances left after validation")
        by_speaker = [c.name for c in config.corpora if c.split_by == "speaker"]
        heldout = heldout_speakers(
            rows, by_speaker, config.dev_fraction, config.test_fraction, config.seed
        )
        rows = assign_splits(rows, config.dev_fraction, config.test_fraction, config.seed, heldout)
        summary = summarize(rows, problems, config.sample_rate)
        summary["heldout_speakers"] = {
            split: sum(1 for v in heldout.values() if v == split) for split in ("dev", "test")
        }
        with atomic_output_dir(out, "prepare", force) as tmp:
            write_tsv(tmp / "manifest.tsv", rows, ManifestRow)
            # which speakers pretraining and probe training never hear (test) or only as dev
            (tmp / "heldout_speakers.tsv").write_text(
                "speaker\tsplit\n"
                + "".join(f"{spk}\t{split}\n" for spk, split in sorted(heldout.items()))
            )
            write_tsv(tmp / "skipped.tsv", problems, Problem)
            write_json(tmp / "summary.json", summary)
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_metrics(
            {f"heldout_speakers_{k}": v for k, v in summary["heldout_speakers"].items()}
        )
        mlflow.log_metrics({f"split_{k}": v for k, v in summary["splits"].items()})
        mlflow.log_artifact(str(out / "summary.json"))
        mlflow.log_artifact(str(out / "skipped.tsv"))
    if metrics:
        write_json(metrics, {k: v for k, v in summary.items() if k != "corpora"})
    for p in problems:
        print(f"prepare: skipped {p.path}: {p.detail}", file=sys.stderr)
    print(
        f"prepare: {summary['utterances']} utterances, {summary['hours']:.3f} h, {summary['speakers']} speakers, "
        f"{summary['skipped']} skipped, {summary['resampled']} resampled, {summary['downmixed']} down-mixed -> {out}",
        file=sys.stderr,
    )
