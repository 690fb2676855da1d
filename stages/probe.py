"""probe: linear phone and speaker probes of every layer, with the log-mel input as the baseline.

`mockingjay probe` (the DVC stage) probes the extracted representations of all layers in one
pass; `mockingjay probe --layer 3` probes one layer, `--layer input` the log-mel baseline;
`--checkpoint DIR` probes any model directory by running it on the fly over the features
(online mode, also what to use when a corpus is too large to extract).

The stage writes (when asked with --metrics/--report/--plot, as dvc.yaml does) a compact
`metrics/probe.json`, a DVC plots table of accuracy per layer, and a report folder with the
full results (confusion matrices) and a PNG. MLflow gets a parent run carrying the pretraining
params beside the probe accuracies (one comparison view shows both), and a child run per task
and layer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import typer

from mockingjay.config import ParamError, from_section, to_flat_dict
from mockingjay.featstore import RaggedArray
from mockingjay.manifest import SPLITS

from . import tracking
from .common import (PARAMS_OPTION, StageError, atomic_output_dir, check_model_features, check_output_dir, check_output_file,
                     cli_errors, section, write_json)
from .extract import resolve_device

TASKS = ("phone", "speaker")


@dataclass(frozen=True)
class ProbeTaskConfig:
    epochs: int = 20
    batch_size: int = 1024  # 0 = full batch
    learning_rates: list[float] = field(default_factory=lambda: [2e-3])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size: must be >= 0, got {self.batch_size}")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates: need at least one, all > 0, got {self.learning_rates}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError(f"weight_decays: need at least one, all >= 0, got {self.weight_decays}")

    def to_probe_config(self):
        from mockingjay.probe import ProbeConfig

        return ProbeConfig(epochs=self.epochs, batch_size=self.batch_size, learning_rates=tuple(self.learning_rates),
                           weight_decays=tuple(self.weight_decays), seed=self.seed)


@dataclass(frozen=True)
class ProbeStageConfig:
    """The `probe` section of params.yaml."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    layers: str = "all"  # all | input | a hidden-state index
    mode: Literal["extracted", "online"] = "extracted"
    device: str = "auto"
    phone: ProbeTaskConfig = field(default_factory=ProbeTaskConfig)
    speaker: ProbeTaskConfig = field(
        default_factory=lambda: ProbeTaskConfig(epochs=300, batch_size=0, learning_rates=[1e-2])
    )

    def validate(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks: must be a non-empty subset of {list(TASKS)}, got {self.tasks}")


def parse_layer(value: str, num_layers: int) -> tuple[list[int] | None, bool]:
    """(--layer) all -> every hidden state + input; input -> the baseline only; N -> hidden state N."""
    value = str(value).strip().lower()
    if value == "all":
        return list(range(num_layers + 1)), True
    if value == "input":
        return [], True
    try:
        index = int(value)
    except ValueError:
        raise ParamError(f"--layer: expected all, input or a layer index, got {value!r}") from None
    if not 0 <= index <= num_layers:
        raise ParamError(
            f"--layer: {index} is out of range; this model has hidden states 0..{num_layers} "
            f"(0 = input representation, {num_layers} = last layer), or use 'input' / 'all'"
        )
    return [index], False


def _stored_layers(representations: Path) -> int:
    names = [p.name for p in (representations / "train").glob("layer_*")]
    if not names:
        raise StageError(f"{representations}/train holds no layer stores; run the extract stage first")
    return max(int(n.split("_")[1]) for n in names)


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    layer: str = typer.Option(None, "--layer", help="all | input | a layer index (default: probe.layers)"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="probe this model directory (runs it on the fly)"),
    mode: str = typer.Option(None, help="extracted | online (default: probe.mode; --checkpoint implies online)"),
    representations: Path = typer.Option(Path("data/representations"), help="extract stage output"),
    features: Path = typer.Option(Path("data/features"), help="featurize stage output (labels, speakers)"),
    model: Path = typer.Option(Path("models/pretrain/model"), help="the pipeline's model (for its params)"),
    metrics: Path = typer.Option(None, help="write compact metrics JSON here (DVC metrics)"),
    plot: Path = typer.Option(None, help="write the accuracy-per-layer table here (DVC plots)"),
    report: Path = typer.Option(None, help="write full results and a PNG figure into this folder"),
    force: bool = typer.Option(False, "--force", help="replace --report even if this stage did not make it"),
) -> None:
    """Linear phone (frame) and speaker (utterance) probes per layer; prints a result table."""
    config = from_section(ProbeStageConfig, section(params, "probe"), "probe")
    model_dir = checkpoint or model
    if report:
        check_output_dir(report, "probe", force, inputs=[params, representations, features, model_dir], option="--report")
    check_output_file(metrics, "--metrics")
    check_output_file(plot, "--plot")
    mode = mode or ("online" if checkpoint else config.mode)
    if mode not in ("extracted", "online"):
        raise ParamError(f"--mode: expected extracted or online, got {mode!r}")
    if mode == "online" or checkpoint:
        check_model_features(model_dir, features)
        from mockingjay.checkpoint import load_config

        num_layers = load_config(model_dir)["model"]["num_layers"]
    else:
        num_layers = _stored_layers(representations)
    layers, include_input = parse_layer(layer or config.layers, num_layers)
    labels = {split: RaggedArray(features / "labels" / split) for split in SPLITS}
    from mockingjay.probe import ProbeError, read_speakers

    speakers = read_speakers(features / "utterances.tsv")
    run_params = {**to_flat_dict(config), "mode": mode, "layer": layer or config.layers, "model": str(model_dir)}
    run_params.update(_pretrain_params(model_dir))
    with tracking.stage_run("probe", run_params) as mlflow:
        try:
            results = _run_probes(config, mode, model_dir, features, representations, layers, include_input,
                                  labels, speakers)
        except ProbeError as err:
            raise StageError(str(err)) from err
        rows = result_rows(results)
        print(format_table(rows, results))
        _log_runs(mlflow, results, rows)
        if metrics:
            write_json(metrics, compact_metrics(results))
        if plot:
            write_plot_table(plot, rows)
        if report:
            with atomic_output_dir(report, "probe", force) as tmp:
                write_json(tmp / "results.json", results)
                from mockingjay.figures import plot_probe_accuracy

                plot_probe_accuracy(rows, tmp / "probe_accuracy.png")
            mlflow.log_artifact(str(report / "probe_accuracy.png"))
            mlflow.log_artifact(str(report / "results.json"))


def _pretrain_params(model_dir: Path) -> dict:
    """The model's own record of how it was pretrained, as `pretrain.*` params (none without a model)."""
    from mockingjay.checkpoint import load_config

    if not (model_dir / "config.json").is_file():
        return {}
    stored = load_config(model_dir)
    wanted = {k: stored[k] for k in ("model", "mask", "training") if k in stored}
    return {f"pretrain.{k}": v for k, v in to_flat_dict(wanted).items()}


def _run_probes(config, mode, model_dir, features, representations, layers, include_input, labels, speakers) -> dict:
    device = resolve_device(config.device)
    phone_config, speaker_config = config.phone.to_probe_config(), config.speaker.to_probe_config()
    if mode == "online":
        from mockingjay.probe import probe_online

        from mockingjay.checkpoint import load_model_dir

        network, _ = load_model_dir(model_dir, device=device)
        stores = {split: RaggedArray(features / split) for split in SPLITS}
        online = probe_online(network, stores, labels if "phone" in config.tasks else None,
                              speakers if "speaker" in config.tasks else None, layers=layers or [],
                              include_input=include_input, device=device, phone_config=phone_config,
                              speaker_config=speaker_config)
        return {task: online[task] for task in config.tasks}
    from mockingjay.probe import open_representations, probe_phones, probe_speakers

    reps = open_representations(representations, layers=layers, include_input=include_input)
    results = {}
    if "phone" in config.tasks:
        results["phone"] = probe_phones(reps, labels, phone_config, device=device)
    if "speaker" in config.tasks:
        results["speaker"] = probe_speakers(reps, speakers, speaker_config, device=device)
    return results


def result_rows(results: dict) -> list[dict]:
    rows = []
    for task, result in results.items():
        for name, layer in result["layers"].items():
            rows.append({"task": task, "layer": "input" if name == "input" else int(name.split("_")[1]),
                         "accuracy": layer["accuracy"], "macro_f1": layer["macro_f1"],
                         "majority_rate": layer["majority_rate"]})
    return rows


def format_table(rows: list[dict], results: dict) -> str:
    layers = sorted({r["layer"] for r in rows}, key=lambda v: (v != "input", v if v != "input" else -1))
    tasks = list(results)
    cell = {(r["task"], r["layer"]): r for r in rows}
    header = f"{'layer':<10}" + "".join(f"{t + ' acc':>13}{t + ' F1':>12}" for t in tasks)
    lines = [header, "-" * len(header)]
    for layer in layers:
        name = "log-mel" if layer == "input" else f"{layer}"
        line = f"{name:<10}"
        for task in tasks:
            r = cell.get((task, layer))
            line += f"{r['accuracy'] * 100:>12.1f}%{r['macro_f1'] * 100:>11.1f}%" if r else f"{'':>25}"
        lines.append(line)
    majority = f"{'majority':<10}" + "".join(
        f"{next(r['majority_rate'] for r in rows if r['task'] == t) * 100:>12.1f}%{'':>12}" for t in tasks)
    lines.append(majority)
    counts = ", ".join(f"{t}: {results[t]['examples']['test']} test examples" for t in tasks)
    lines.append(f"({counts}; layer 0 = input representation)")
    return "\n".join(lines)


def compact_metrics(results: dict) -> dict:
    out = {}
    for task, result in results.items():
        out[task] = {name: {k: round(v, 4) for k, v in layer.items() if k in ("accuracy", "macro_f1", "majority_rate")}
                     for name, layer in result["layers"].items()}
    return out


def write_plot_table(path: Path, rows: list[dict]) -> None:
    """layer, phone, phone_logmel, speaker, speaker_logmel: one line per layer, baseline repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in rows})
    baseline = {r["task"]: r["accuracy"] for r in rows if r["layer"] == "input"}
    layers = sorted({r["layer"] for r in rows if r["layer"] != "input"})
    cell = {(r["task"], r["layer"]): r["accuracy"] for r in rows}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["layer"] + [c for t in tasks for c in (t, f"{t}_logmel")])
        for layer in layers:
            writer.writerow([layer] + [f"{v:.4f}" if v is not None else "" for t in tasks
                                       for v in (cell.get((t, layer)), baseline.get(t))])


def _log_runs(mlflow, results: dict, rows: list[dict]) -> None:
    summary = {}
    for r in rows:
        name = "input" if r["layer"] == "input" else f"layer_{r['layer']:02d}"
        summary[f"{r['task']}_accuracy.{name}"] = r["accuracy"]
    best = {}
    for task in results:
        layer_rows = [r for r in rows if r["task"] == task and r["layer"] != "input"]
        if layer_rows:
            top = max(layer_rows, key=lambda r: r["accuracy"])
            best[f"{task}_accuracy.best_layer"] = top["accuracy"]
    mlflow.log_metrics({**summary, **best})
    for task, result in results.items():
        for name, layer in result["layers"].items():
            with mlflow.start_run(run_name=f"{task}/{name}", nested=True,
                                  tags={"mockingjay.stage": "probe", "probe.task": task, "probe.layer": name}):
                mlflow.log_params({"task": task, "layer": name, "learning_rate": layer["learning_rate"],
                                   "weight_decay": layer["weight_decay"], "best_epoch": layer["best_epoch"]})
                mlflow.log_metrics({k: float(layer[k]) for k in ("accuracy", "macro_f1", "majority_rate",
                                                                 "dev_accuracy")})
                mlflow.log_dict(layer["confusion"], "confusion.json")
