"""finetune: the pretrained encoder and a downstream head trained jointly on labelled tasks, beside
the baselines that say what it is worth.

For each task of `finetune.tasks` (phone: frame level; speaker, keyword: utterance level), each
label fraction and each variant (`finetuned`, `frozen`, `scratch`, `logmel`:
mockingjay/finetune_config.py), one run of the shared training loop. Writes::

    models/finetune/<task>/<variant>[@<fraction>]/   the model: model.safetensors (encoder.* + head.*)
                                                     + config.json; `mockingjay probe --checkpoint`,
                                                     extract and export-checkpoint read its encoder
    models/finetune_checkpoints/<task>/<run>/config-<fingerprint>/
                                                     resumable checkpoints (git-ignored, kept between runs)
    metrics/finetune.json      (--metrics) test accuracy and macro-F1 per task, variant and fraction
    plots/finetune_accuracy.tsv (--plot) test accuracy per task and label fraction, a column per variant
    reports/finetune/          (--report) results.json (dev and test scores, confusion matrices,
                               layer weights, the run's settings) and figures

A stop signal finishes the current step, checkpoints it and ends the MLflow run KILLED; the same
command resumes (the runs already finished are resumed at their last step, so only scored again).
MLflow: a parent run with the section's params and the test accuracies, a child run per
(task, variant, fraction) with its loss curve, dev accuracy and the confusion matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import typer

from mockingjay import resume_state
from mockingjay.config import ParamError, from_section, to_flat_dict
from mockingjay.finetune_config import (
    TASK_LEVELS,
    VARIANTS,
    AugmentConfig,
    FinetuneConfig,
    HeadConfig,
)
from mockingjay.train_config import TrainConfig

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    StageInterrupted,
    atomic_output_dir,
    check_inputs_apart,
    check_output_dir,
    check_output_file,
    cli_errors,
    read_feature_config,
    section,
    stop_signals_deferred,
)
from .finetune_report import fraction_label, run_name, write_outputs


class _NoTracking:
    """What ranks other than 0 log to: nothing (every call a no-op, usable as a context)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: contextlib.nullcontext()


@dataclass(frozen=True)
class FinetuneTaskSection:
    """`finetune.phone` / `.speaker` / `.keyword`: which utterances, and the task's own training
    settings over `finetune.train`."""

    corpora: list[str] = field(default_factory=list)  # empty: every corpus with the task's labels
    speaker_independent: bool = False  # dev/test only on speakers with no train utterance
    train: dict = field(default_factory=dict)  # TrainConfig fields over finetune.train


@dataclass(frozen=True)
class FinetuneStageConfig:
    """The `finetune` section of params.yaml."""

    tasks: list[str] = field(default_factory=lambda: ["phone", "speaker"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    fraction_seed: int = 0  # ranks the train utterances for the nested label fractions
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    encoder_learning_rate: float = 1e-4
    freeze_encoder_steps: int = 0
    freeze_input_representation: bool = False
    encoder_dropout: float | None = None
    train: dict = field(default_factory=dict)  # TrainConfig fields; learning_rate is the head's
    phone: FinetuneTaskSection = field(default_factory=FinetuneTaskSection)
    speaker: FinetuneTaskSection = field(default_factory=FinetuneTaskSection)
    keyword: FinetuneTaskSection = field(default_factory=FinetuneTaskSection)

    def validate(self) -> None:
        for name, values, allowed in (
            ("tasks", self.tasks, TASK_LEVELS),
            ("variants", self.variants, VARIANTS),
        ):
            if not values or sorted(set(values) - set(allowed)) or len(set(values)) != len(values):
                raise ValueError(
                    f"{name}: must be a non-empty list of distinct values from "
                    f"{list(allowed)}, got {values}"
                )
        fractions = self.label_fractions
        if (
            not fractions
            or not all(0 < f <= 1 for f in fractions)
            or len(set(fractions)) != len(fractions)
        ):
            raise ValueError(
                f"label_fractions: need distinct fractions in (0, 1], got {self.label_fractions}"
            )


def train_config_of(config: FinetuneStageConfig, task: str, device: str | None) -> TrainConfig:
    merged = {**config.train, **getattr(config, task).train}
    if device:
        merged["device"] = device
    name = f"finetune.{task}.train" if getattr(config, task).train else "finetune.train"
    return from_section(TrainConfig, merged, name)


def run_config(config: FinetuneStageConfig, task: str, variant: str, num_classes: int):
    return FinetuneConfig(
        task=task,
        variant=variant,
        num_classes=num_classes,
        head=config.head,
        augment=config.augment,
        encoder_learning_rate=config.encoder_learning_rate,
        freeze_encoder_steps=config.freeze_encoder_steps,
        freeze_input_representation=config.freeze_input_representation,
        encoder_dropout=config.encoder_dropout,
    )


def resolve(params: Path, device: str | None) -> tuple[FinetuneStageConfig, dict]:
    """The section and each task's TrainConfig, every error naming `finetune.<...>`, torch-free."""
    config = from_section(FinetuneStageConfig, section(params, "finetune"), "finetune")
    trains = {task: train_config_of(config, task, device) for task in config.tasks}
    for task in config.tasks:
        for variant in config.variants:
            try:
                run_config(config, task, variant, num_classes=2)
            except ValueError as err:
                raise ParamError(f"finetune.{err}") from err
    return config, trains


def _weights_digest(model_dir: Path) -> str:
    from mockingjay.checkpoint import MODEL_FILE

    digest = hashlib.sha256()
    with open(model_dir / MODEL_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    features: Path = typer.Option(Path("data/features"), help="featurize stage output"),
    model: Path = typer.Option(
        Path("models/pretrain/model"), help="the pretrained model directory to fine-tune"
    ),
    out: Path = typer.Option(Path("models/finetune"), help="fine-tuned models, one per run"),
    checkpoints: Path = typer.Option(
        Path("models/finetune_checkpoints"), help="resumable checkpoints, one folder per run"
    ),
    device: str = typer.Option(
        None, help="override finetune.train.device (auto, cpu, cuda, cuda:N)"
    ),
    metrics: Path = typer.Option(None, "--metrics", help="write the metrics JSON here"),
    plot: Path = typer.Option(None, "--plot", help="write the accuracy table here (DVC plots)"),
    report: Path = typer.Option(None, "--report", help="write results.json and figures here"),
    force: bool = typer.Option(
        False, "--force", help="replace --out/--report folders this stage did not make"
    ),
) -> None:
    """Fine-tune the pretrained encoder with a head on each task, beside frozen, from-scratch and
    log-mel baselines; resumes after a crash."""
    config, trains = resolve(params, device)
    check_output_file(metrics, "--metrics")
    check_output_file(plot, "--plot")
    check_output_dir(out, "finetune", force, inputs=[params, features, model])
    if report is not None:
        check_output_dir(
            report, "finetune", force, inputs=[params, features, model, out], option="--report"
        )
    check_inputs_apart(checkpoints, [features, model, out], "--checkpoints")
    if checkpoints.exists() and not checkpoints.is_dir():
        raise StageError(f"--checkpoints {checkpoints} is a file; the stage writes a folder there")
    from mockingjay.feature_config import frames_per_second

    from .runtime import check_model_features

    feature_config = check_model_features(model, features)
    frame_rate = frames_per_second(read_feature_config(features))
    from mockingjay.checkpoint import load_config
    from mockingjay.featstore import RaggedArray
    from mockingjay.finetune_data import task_data
    from mockingjay.model_config import ModelConfig
    from mockingjay.probe_plan import read_utterances, select_utterances
    from mockingjay.store_layout import SPLITS, utterances_table

    model_config = ModelConfig.from_dict(load_config(model)["model"])
    for split in SPLITS:  # fails naming the store if featurize did not finish or holds NaN/inf
        RaggedArray(features / split, finite=True)
    utterances = read_utterances(utterances_table(features))
    datasets = {}
    for task in config.tasks:
        settings = getattr(config, task)
        try:
            selection = select_utterances(
                utterances,
                settings.corpora,
                settings.speaker_independent,
                need_keyword=task == "keyword",
            )
            for fraction in sorted(config.label_fractions, reverse=True):
                datasets[task, fraction] = task_data(
                    features, task, utterances, selection, fraction, config.fraction_seed
                )
        except ValueError as err:
            raise StageError(f"finetune.{task}: {err}") from err
    provenance = {
        "frame_rate": frame_rate,
        "features": feature_config,
        "pretrained": {"path": str(model), "weights_sha256": _weights_digest(model)},
    }
    flat = to_flat_dict(dataclasses.asdict(config))
    results = {}
    # Under torchrun every rank trains; rank 0 alone locks, tracks, scores and writes.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with (
        resume_state.locked(checkpoints) if main_rank else contextlib.nullcontext(),
        tracking.stage_run("finetune", flat, system_metrics=True)
        if main_rank
        else contextlib.nullcontext(_NoTracking()) as mlflow,
        atomic_output_dir(out, "finetune", force)
        if main_rank
        else tempfile.TemporaryDirectory() as out_tmp,
    ):
        out_tmp = Path(out_tmp)
        for task in config.tasks:
            for fraction in sorted(config.label_fractions, reverse=True):
                data = datasets[task, fraction]
                for variant in config.variants:
                    results[task, variant, fraction] = _run(
                        mlflow,
                        run_config(config, task, variant, data.num_classes),
                        trains[task],
                        model_config,
                        data,
                        fraction,
                        model,
                        out_tmp,
                        checkpoints,
                        provenance,
                    )
                    if not main_rank:
                        continue
                    results[task, variant, fraction]["model_dir"] = str(
                        out
                        / Path(results[task, variant, fraction]["model_dir"]).relative_to(out_tmp)
                    )
        if not main_rank:
            return
        summary = write_outputs(results, datasets, metrics, plot, report, force, mlflow)
    print(summary, file=sys.stderr)


def _run(
    mlflow, config, train, model_config, data, fraction, pretrained, out, checkpoints, provenance
) -> dict:
    """One (task, variant, fraction): train (or resume), then score dev and test."""
    import numpy as np

    from mockingjay import scores
    from mockingjay.finetune import FineTuner, predict
    from mockingjay.training_loop import NonFiniteLossError, TrainingStopped

    name = run_name(config.task, config.variant, fraction)
    record = {
        "model": model_config.to_dict(),
        "finetune": config.to_dict(),
        "training": resume_state.training_record(train.to_dict()),
        "label_fraction": fraction,
        "data": {
            "train_ids": hashlib.sha256("\n".join(data.splits["train"].ids).encode()).hexdigest()
        },
        **provenance,
    }
    state = resume_state.state_dir(checkpoints / config.task / name.split("/", 1)[1], record)
    print(
        f"finetune: {name} ({len(data.splits['train'])} train utterances) -> {state}",
        file=sys.stderr,
    )
    curve = []

    def callback(event: dict) -> None:
        if event.get("event") == "train":
            curve.append({"step": event["step"], "loss": event["loss"]})
            mlflow.log_metrics({"loss": float(event["loss"])}, step=int(event["step"]))
        elif event.get("event") == "eval":
            mlflow.log_metrics(
                {"dev_loss": event["heldout_loss"], "dev_accuracy": event["dev_accuracy"]},
                step=int(event["step"]),
            )
        elif event.get("event") == "resume":
            print(f"finetune: {name}: resumed at step {event['step']}", file=sys.stderr)

    model_dir = out / config.task / name.split("/", 1)[1]
    tags = {
        "mockingjay.stage": "finetune",
        "finetune.task": config.task,
        "finetune.variant": config.variant,
        "finetune.fraction": fraction_label(fraction),
    }
    with (
        mlflow.start_run(run_name=name, nested=True, tags=tags),
        stop_signals_deferred() as stop_requested,
    ):
        mlflow.log_params(
            {
                **to_flat_dict({"finetune": config.to_dict()}),
                **to_flat_dict({"train": train.to_dict()}),
                "label_fraction": fraction,
            }
        )
        tuner = FineTuner(
            model_config,
            config,
            train,
            data.splits["train"],
            data.splits["dev"],
            state,
            model_dir,
            pretrained_dir=pretrained,
            frame_rate=provenance["frame_rate"],
            extra_config={
                **{k: v for k, v in provenance.items() if k != "frame_rate"},
                "label_fraction": fraction,
                "classes": data.classes,
            },
            callback=callback,
            should_stop=lambda: stop_requested() is not None,
        )
        try:
            result = tuner.fit()
        except TrainingStopped as err:
            raise StageInterrupted(
                stop_requested(),
                f"finetune stopped in {name} at step {err.step} (checkpoint {err.checkpoint}); "
                "run the same command again (or `dvc repro finetune`) to resume",
            ) from err
        except NonFiniteLossError as err:
            raise StageError(f"{name}: {err}") from err
        if not tuner.dist.is_main:
            return {}
        scored = {}
        for split in ("dev", "test"):
            truth, predicted = predict(tuner.model, data.splits[split], train, tuner.device)
            scored[split] = {
                "accuracy": scores.accuracy(truth, predicted),
                "macro_f1": scores.macro_f1(truth, predicted),
                "examples": int(len(truth)),
            }
            if split == "test":
                confusion = scores.confusion_matrix(truth, predicted, data.num_classes)
                majority = (
                    int(np.bincount(truth, minlength=data.num_classes).argmax())
                    if len(truth)
                    else 0
                )
                scored[split]["majority_rate"] = (
                    float(np.mean(truth == majority)) if len(truth) else 0.0
                )
        mlflow.log_metrics({f"{s}_{k}": float(v) for s, d in scored.items() for k, v in d.items()})
        mlflow.log_dict(
            {"classes": data.classes, "confusion": confusion.tolist()}, "confusion_matrix.json"
        )
    return {
        **scored,
        "steps": result["steps"],
        "train_seconds": result["train_seconds"],
        "train_utterances": len(data.splits["train"]),
        "confusion": confusion.tolist(),
        "layer_weights": tuner.model.head.softmax_layer_weights(),
        "curve": curve,
        "model_dir": str(model_dir),
    }
