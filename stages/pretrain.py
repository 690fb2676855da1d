"""pretrain: masked acoustic model (MAM) pretraining on the featurized corpus.

Reads `data/features/{train,dev}` (pretraining never sees the probes' test split, which serves
as the held-out set for the reconstruction loss). Writes::

    models/pretrain/model/          the final model: model.safetensors + config.json (what later stages read)
    models/checkpoints/config-<fingerprint>/
                                    resumable checkpoints of one configuration (git-ignored and not a DVC output,
                                    so kept between runs), and train_log.jsonl, the loss log of the whole run
    metrics/pretrain.json           (--metrics) held-out loss at initialisation and at the end, throughput, ...
    plots/pretrain_loss.tsv         (--plot) step, loss, learning_rate (a DVC plot)

Re-running after a crash resumes from the newest complete checkpoint of the same configuration,
feature settings and data (a fingerprint of the stores' indexes). Another configuration starts
afresh in its own folder; the others' state is kept (mockingjay/resume_state.py) until removed with
`mockingjay checkpoints remove`. A lock on the checkpoints folder refuses a second run on it.
SIGTERM/SIGINT: the current step is finished and checkpointed, the MLflow run ends KILLED, and the
same command resumes. Under torchrun every rank trains; rank 0 alone writes and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import typer

from mockingjay import resume_state
from mockingjay.config import ParamError, from_section, to_flat_dict
from mockingjay.featstore import RaggedArray
from mockingjay.feature_config import FeatureConfig
from mockingjay.resume_state import TRAIN_LOG
from mockingjay.store_layout import target_store
from mockingjay.train_config import TrainData

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    StageInterrupted,
    check_inputs_apart,
    check_output_file,
    cli_errors,
    read_feature_config,
    section,
    stop_signals_deferred,
    write_json,
)
from .pretrain_log import TrainingLog
from .pretrain_params import PretrainConfig, resolve_configs


def write_snapshots(checkpoints: Path, steps: list[int], out: Path) -> list[Path]:
    """Copy the weights and config of the checkpoints at `steps` to `out/step-NNNNNN/`: models of
    the run along the way (a DVC output, unlike the resume state), e.g. for a probe curve."""
    from mockingjay.checkpoint import CONFIG_FILE, MODEL_FILE, checkpoint_name, list_checkpoints

    found = dict(list_checkpoints(checkpoints))
    written = []
    for step in steps:
        if step not in found:
            raise StageError(f"pretrain.snapshots: no checkpoint of step {step} in {checkpoints}")
        target = out / checkpoint_name(step)
        target.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copyfile(found[step] / name, target / name)
        written.append(target)
    return written


def _check_folders(features: Path, out: Path, checkpoints: Path, force: bool) -> None:
    """Before any work: the model folder and the checkpoints folder are apart from the features and
    each other, and neither is a folder of the user's that this stage would write into or replace."""
    model_dir = out / "model"
    check_inputs_apart(checkpoints, [features], "--checkpoints")
    check_inputs_apart(model_dir, [features, checkpoints], "--out")
    for path, option in ((checkpoints, "--checkpoints"), (model_dir, "--out")):
        if path.exists() and not path.is_dir():
            raise StageError(f"{option} {path} is a file; the stage writes a folder there")
    if not force and checkpoints.is_dir() and not resume_state.is_checkpoints_folder(checkpoints):
        raise StageError(
            f"--checkpoints {checkpoints} holds files that are not resume state; the stage would write "
            "among them. Choose another folder, or pass --force to use it anyway"
        )
    if (
        not force
        and model_dir.is_dir()
        and any(model_dir.iterdir())
        and not resume_state.is_model_dir(model_dir)
    ):
        raise StageError(
            f"--out {out}: {model_dir} is a folder that is not a model directory; the stage would replace "
            "it and delete what it holds. Choose another --out, or pass --force to replace it"
        )


def _resume_state(checkpoints: Path, record: dict) -> Path:
    """This configuration's folder in `checkpoints`: says whether it resumes, and lists the others."""
    moved = resume_state.adopt_older_layout(checkpoints)
    if moved is not None:
        print(
            f"pretrain: moved the resume state in {checkpoints} (older layout) to {moved}",
            file=sys.stderr,
        )
    decision = resume_state.resume_decision(checkpoints, record)
    if decision.latest is None:
        print(
            f"pretrain: no resume state for this configuration; starting afresh in {decision.state}",
            file=sys.stderr,
        )
    else:
        print(f"pretrain: resuming from {decision.latest}", file=sys.stderr)
    if decision.others:
        print(
            f"pretrain: kept the resume state of {len(decision.others)} other configuration(s), resumed when one "
            "comes back (`mockingjay checkpoints list`; `mockingjay checkpoints remove NAME` deletes one):",
            file=sys.stderr,
        )
        for other in decision.others:
            print(f"  {resume_state.describe(other)}", file=sys.stderr)
    if decision.aside is not None:
        print(
            f"pretrain: note: {decision.aside} holds state an older version moved aside; it is not resumed (move "
            f"its contents into {checkpoints} to adopt it)",
            file=sys.stderr,
        )
    return decision.state


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    features: Path = typer.Option(Path("data/features"), help="featurize stage output"),
    out: Path = typer.Option(Path("models/pretrain"), help="final model directory parent"),
    checkpoints: Path = typer.Option(
        Path("models/checkpoints"), help="resumable checkpoints, one folder per config"
    ),
    device: str = typer.Option(
        None, help="override pretrain.train.device (auto, cpu, cuda, cuda:N)"
    ),
    metrics: Path = typer.Option(
        None, "--metrics", help="write the metrics JSON here (DVC metrics); default: none"
    ),
    plot: Path = typer.Option(
        None, "--plot", help="write the loss table here (DVC plots); default: none"
    ),
    force: bool = typer.Option(
        False, "--force", help="use --out/--checkpoints folders this stage did not make"
    ),
) -> None:
    """Pretrain the masked acoustic model; resumes from the newest checkpoint after a crash."""
    check_output_file(metrics, "--metrics")
    check_output_file(plot, "--plot")
    _check_folders(features, out, checkpoints, force)
    feature_config = read_feature_config(features)
    settings = FeatureConfig(
        **{f.name: feature_config[f.name] for f in dataclasses.fields(FeatureConfig)}
    )
    pretrain_section = section(params, "pretrain")
    model_config, mask_config, train_config = resolve_configs(
        pretrain_section, settings.dim, settings.target_dim
    )
    if device:
        train_config = dataclasses.replace(train_config, device=device)
        try:
            train_config.validate()
        except ValueError as err:
            raise ParamError(f"--device: {err}") from err
    train_stores = [features / "train", features / "dev"]
    target_stores, heldout_target = None, None
    if settings.target == "linear":
        target_stores, heldout_target = (
            [target_store(store) for store in train_stores],
            target_store(features / "test"),
        )
    # Open every store now (fails naming the store if featurize did not finish or a value is NaN or
    # inf, which would only show up later as a NaN loss), and check that the longest utterance fits
    # one batch before any run starts, not when the trainer builds its sampler.
    stores = [RaggedArray(store, finite=True) for store in (*train_stores, features / "test")]
    for store in [*(target_stores or []), *([heldout_target] if heldout_target else [])]:
        RaggedArray(store, finite=True)
    longest = max((int(store.lengths.max()) for store in stores if len(store)), default=0)
    if train_config.max_length is not None:
        longest = min(longest, train_config.max_length)
    if longest > train_config.max_frames_per_batch:
        raise ParamError(
            f"pretrain.train.max_frames_per_batch: {train_config.max_frames_per_batch} is smaller than the longest "
            f"utterance ({longest} frames after cropping to max_length); raise it or lower pretrain.train.max_length"
        )
    rank = int(os.environ.get("RANK", "0"))
    # the model's config.json and every checkpoint record what it was trained on
    fingerprint = resume_state.data_fingerprint(train_stores + (target_stores or []))
    provenance = {"features": feature_config, "data": {"fingerprint": fingerprint}}
    record = resume_state.run_record(
        model_config.to_dict(), mask_config.to_dict(), train_config.to_dict(), provenance
    )
    flat = {
        **to_flat_dict({"model": model_config.to_dict(), "mask": mask_config.to_dict()}),
        **to_flat_dict({"train": train_config.to_dict()}),
        "preset": pretrain_section.get("preset", "tera-base"),
    }
    # Rank 0 locks the folder for the whole run: a second run would prune, rewrite and log into the same state.
    with resume_state.locked(checkpoints) if rank == 0 else contextlib.nullcontext():
        state = (
            _resume_state(checkpoints, record)
            if rank == 0
            else resume_state.state_dir(checkpoints, record)
        )
        # Under torchrun every rank trains; rank 0 alone tracks.
        run = (
            tracking.stage_run("pretrain", flat, system_metrics=True)
            if rank == 0
            else contextlib.nullcontext()
        )
        with run as mlflow:
            logger = TrainingLog(mlflow, state / TRAIN_LOG if rank == 0 else None)
            data = TrainData(
                train_stores,
                features / "test",
                target_stores,
                heldout_target,
                frame_rate=settings.frame_rate,
            )
            result = _train(
                model_config,
                mask_config,
                train_config,
                data,
                state,
                out / "model",
                logger,
                provenance,
            )
            if rank != 0:
                return
            config = from_section(PretrainConfig, pretrain_section, "pretrain")
            if config.snapshots:
                shutil.rmtree(out / "snapshots", ignore_errors=True)
                write_snapshots(state, config.snapshots, out / "snapshots")
            metrics_values = _metrics(result, logger)
            if metrics:
                write_json(metrics, metrics_values)
            if plot:
                _write_loss_plot(plot, logger.train)
            mlflow.log_metrics(
                {k: float(v) for k, v in metrics_values.items() if isinstance(v, (int, float))}
            )
            _log_figures(mlflow, out / "model", features, mask_config, logger.train, metrics_values)
            mlflow.log_artifact(str(out / "model" / "config.json"))
    speed = metrics_values["audio_seconds_per_second"]
    print(
        f"pretrain: {metrics_values['steps']} steps, held-out masked L1 {metrics_values['heldout_loss_initial']:.4f} -> "
        f"{metrics_values['heldout_loss_final']:.4f}, "
        f"{'no step trained in this run' if speed is None else f'{speed:.0f} audio-s/s'} -> {out / 'model'}",
        file=sys.stderr,
    )


def _metrics(result: dict, logger: TrainingLog) -> dict:
    metrics = {
        k: result[k]
        for k in (
            "steps",
            "heldout_loss_initial",
            "heldout_loss_final",
            "train_loss_final",
            "skipped_batches",
            "audio_seconds_per_second",
            "train_seconds",
            "num_parameters",
        )
    }
    metrics["audio_hours_seen"] = result["audio_seconds_seen"] / 3600  # in this run
    metrics["device"] = result["device"]
    if result["steps_this_run"] == 0:  # resumed at the last step: nothing was trained in this run
        metrics["train_loss_final"] = logger.train[-1]["loss"] if logger.train else None
        metrics["audio_seconds_per_second"] = None
    metrics["heldout_loss_ratio"] = metrics["heldout_loss_final"] / metrics["heldout_loss_initial"]
    return metrics


def _train(
    model_config, mask_config, train_config, data, checkpoints, model_dir, logger, provenance
):
    from mockingjay.trainer import NonFiniteLossError, TrainingStopped, train

    # A stop signal only raises a flag here: the trainer finishes its step and checkpoints it first.
    with stop_signals_deferred() as stop_requested:
        try:
            return train(
                model_config,
                mask_config,
                train_config,
                data,
                checkpoints,
                model_dir,
                extra_config=provenance,
                callback=logger,
                should_stop=lambda: stop_requested() is not None,
            )
        except TrainingStopped as err:
            where = (
                f"wrote checkpoint {err.checkpoint}"
                if err.checkpoint
                else "no checkpoint could be written"
            )
            raise StageInterrupted(
                stop_requested(),
                f"pretrain stopped at step {err.step} and {where}; run the same "
                "command again (or `dvc repro pretrain`) to resume from it",
            ) from err
        except NonFiniteLossError as err:
            raise StageError(str(err)) from err
        except ValueError as err:
            raise ParamError(f"pretrain.train: {err}") from err


def _write_loss_plot(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["step", "loss", "learning_rate", "grad_norm"])
        for r in records:
            writer.writerow(
                [
                    r["step"],
                    f"{r['loss']:.6f}",
                    f"{r['learning_rate']:.6g}",
                    f"{r['grad_norm']:.4f}",
                ]
            )


def _log_figures(
    mlflow, model_dir: Path, features: Path, mask_config, records: list[dict], metrics: dict
) -> None:
    import tempfile

    from mockingjay.checkpoint import load_model_dir
    from mockingjay.figures import plot_loss_curve, plot_reconstruction, reconstruction_example

    model, config = load_model_dir(model_dir)
    heldout = RaggedArray(features / "test")
    # a 3-second utterance: long enough to show several spans, short enough to see them
    index = int(abs(heldout.lengths - 300).argmin()) if len(heldout) else 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if len(heldout):
            original, masked, recon, time_mask = reconstruction_example(
                model, heldout[index], mask_config, config.downsample_rate, seed=0
            )
            plot_reconstruction(
                original,
                masked,
                recon,
                time_mask,
                tmp / "reconstruction.png",
                f"held-out {heldout.ids[index]}: input, masked input, reconstruction",
            )
        final_step = metrics["steps"]
        plot_loss_curve(
            [r["step"] for r in records],
            [r["loss"] for r in records],
            tmp / "loss_curve.png",
            {
                "held-out at init": (0, metrics["heldout_loss_initial"]),
                "held-out at end": (final_step, metrics["heldout_loss_final"]),
            },
        )
        for png in tmp.glob("*.png"):
            mlflow.log_artifact(str(png))
