"""Study outputs a reader (or a check) can use without knowing the detailed layout.

* `mockingjay headline`: `metrics/headline.json`, the test accuracies of every task as fractions
  (log-mel, majority, each hidden state, weighted sum, best MLP) and the pretraining facts;
* `mockingjay release`: the final model as float16 safetensors + config + the feature settings
  it was trained on, small enough to commit (`mockingjay probe --checkpoint` and
  `export-checkpoint` read it like any model directory);
* `mockingjay results-table` (`stages/report_tables.py`): the README's results tables, generated
  from the metrics files these write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from mockingjay.store_layout import INPUT_STORE, feature_config_file, layer_names

from .common import StageError, cli_errors, write_json

TASK_ORDER = ("phone", "speaker", "keyword")
# The paper's figures (Liu et al. 2020, LibriSpeech train-clean-360 pretraining, BASE): linear phone
# (72 MFA classes) and utterance speaker recognition. No keyword figure exists in the paper.
PAPER = {"phone": {"logmel": 0.491, "best": 0.609}, "speaker": {"logmel": 0.7006, "best": 0.9454}}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it first")
    return json.loads(path.read_text())


def headline_of(
    results: dict,
    pretrain: dict,
    curve: dict[int, dict] | None = None,
    baseline: dict | None = None,
) -> dict:
    """The compact record: {task: {logmel, majority, layers, weighted_sum, mlp_best}, pretrain: {...}}."""
    out: dict = {}
    for task in TASK_ORDER:
        if task not in results:
            continue
        result = results[task]
        layers = result["layers"]
        hidden = layer_names(layers)
        probes = result.get("probes", [])
        weighted = [p for p in probes if p["kind"] == "weighted_sum" and p["fraction"] == 1.0]
        mlp = [p["accuracy"] for p in probes if p["kind"] == "mlp" and p["layer"] != INPUT_STORE]
        entry = {
            "logmel": layers[INPUT_STORE]["accuracy"] if INPUT_STORE in layers else None,
            "majority": next(iter(layers.values()))["majority_rate"],
            "layers": [layers[n]["accuracy"] for n in hidden],
            "weighted_sum": weighted[0]["accuracy"] if weighted else None,
            "mlp_best": max(mlp) if mlp else None,
            "test_examples": result["examples"]["test"],
        }
        if (
            baseline and task in baseline and INPUT_STORE in baseline[task]
        ):  # log-mel with global CMVN
            entry["logmel_global_cmvn"] = baseline[task][INPUT_STORE]["accuracy"]
        mlp_input = [
            p["accuracy"] for p in probes if p["kind"] == "mlp" and p["layer"] == INPUT_STORE
        ]
        if mlp_input:
            entry["mlp_logmel"] = mlp_input[0]
        if weighted:
            entry["layer_weights"] = weighted[0].get("layer_weights")
        fractions = {}
        for p in probes:
            if p["fraction"] != 1.0 and p["kind"] == "linear":
                group = fractions.setdefault(f"{p['fraction']:g}", {"layers": {}})
                group["layers"][p["layer"]] = p["accuracy"]
            elif p["fraction"] != 1.0 and p["kind"] == "weighted_sum":
                fractions.setdefault(f"{p['fraction']:g}", {"layers": {}})["weighted_sum"] = p[
                    "accuracy"
                ]
        if fractions:
            fractions["1"] = {
                "layers": {n: layers[n]["accuracy"] for n in layers},
                "weighted_sum": entry["weighted_sum"],
            }
            entry["label_fractions"] = {
                f: {
                    "logmel": g["layers"].get(INPUT_STORE),
                    "best_layer": max(
                        (v for n, v in g["layers"].items() if n != INPUT_STORE), default=None
                    ),
                    "weighted_sum": g.get("weighted_sum"),
                }
                for f, g in sorted(fractions.items(), key=lambda kv: float(kv[0]))
            }
        out[task] = entry
    out["pretrain"] = {
        "audio_hours_seen": round(pretrain["audio_hours_seen"], 3)
        if pretrain.get("audio_hours_seen")
        else None,
        "train_seconds": round(pretrain["train_seconds"], 1)
        if pretrain.get("train_seconds")
        else None,
        "steps": pretrain.get("steps"),
        "device": pretrain.get("device"),
        "heldout_loss_initial": pretrain.get("heldout_loss_initial"),
        "heldout_loss_final": pretrain.get("heldout_loss_final"),
    }
    if curve:
        out["curve"] = [
            {
                "step": step,
                **{k: v for k, v in metrics.items() if k in TASK_ORDER or k == "audio_hours_seen"},
            }
            for step, metrics in sorted(curve.items())
        ]
    return out


def _curve_points(curve_dir: Path | None, steps_per_hour: float | None) -> dict[int, dict]:
    """step -> {task: last-layer accuracy, audio_hours_seen} from `step-NNNNNN.json` probe metrics."""
    points: dict[int, dict] = {}
    if curve_dir is None or not curve_dir.is_dir():
        return points
    for path in sorted(curve_dir.glob("step-*.json")):
        step = int(path.stem.split("-")[1])
        metrics = json.loads(path.read_text())
        point: dict = {}
        for task, layers in metrics.items():
            hidden = layer_names(layers)
            if hidden:
                point[task] = layers[hidden[-1]]["accuracy"]
        if steps_per_hour:
            point["audio_hours_seen"] = round(step / steps_per_hour, 3)
        points[step] = point
    return points


def _last_layer(results: dict) -> dict:
    """task -> accuracy of the last hidden state's linear head at fraction 1."""
    point = {}
    for task, result in results.items():
        if not isinstance(result, dict) or "layers" not in result:
            continue
        hidden = layer_names(result["layers"])
        if hidden:
            point[task] = result["layers"][hidden[-1]]["accuracy"]
    return point


@cli_errors
def headline_main(
    results: Path = typer.Option(
        Path("reports/probe/results.json"), help="probe stage --report results.json"
    ),
    pretrain_metrics: Path = typer.Option(
        Path("metrics/pretrain.json"), help="pretrain stage metrics"
    ),
    curve: Path = typer.Option(
        None, help="folder of step-NNNNNN.json probe metrics of checkpoints"
    ),
    baseline: Path = typer.Option(
        None, help="probe metrics of the log-mel input made another way (global CMVN)"
    ),
    out: Path = typer.Option(Path("metrics/headline.json"), help="where to write the headline"),
    figures: Path = typer.Option(
        None, help="also write the README's figures here (accuracy, layer weights, curve)"
    ),
) -> None:
    """Write the compact headline metrics of a study (test accuracies as fractions)."""
    probe_results, pretrain = _read_json(results), _read_json(pretrain_metrics)
    per_hour = (
        (pretrain["steps"] / pretrain["audio_hours_seen"])
        if pretrain.get("audio_hours_seen")
        else None
    )
    points = _curve_points(curve, per_hour)
    if points and pretrain.get("steps") not in points:  # the final model: its last-layer probe row
        points[pretrain["steps"]] = {
            **_last_layer(probe_results),
            "audio_hours_seen": round(pretrain["audio_hours_seen"], 3),
        }
    payload = headline_of(
        probe_results, pretrain, points, _read_json(baseline) if baseline else None
    )
    write_json(out, payload)
    if figures:
        import shutil

        from mockingjay.figures import plot_curve

        figures.mkdir(parents=True, exist_ok=True)
        for name in ("probe_accuracy.png", "layer_weights.png"):
            if (results.parent / name).is_file():
                shutil.copy(results.parent / name, figures / name)
        if payload.get("curve"):
            plot_curve(
                payload["curve"],
                [t for t in TASK_ORDER if t in probe_results],
                figures / "curve.png",
            )
    print(
        json.dumps({k: v for k, v in payload.items() if k != "curve"}, indent=1)[:2000],
        file=sys.stderr,
    )


@cli_errors
def release_main(
    model: Path = typer.Option(Path("models/pretrain/model"), help="model directory to release"),
    features: Path = typer.Option(
        Path("data/features"), help="the features it was trained on (their settings travel)"
    ),
    out: Path = typer.Option(
        ..., help="release directory (replaced when it holds an earlier release)"
    ),
) -> None:
    """Copy a model as float16 safetensors + config.json + feature_config.json (for committing)."""
    from mockingjay.checkpoint import release_model_dir

    feature_config = _read_json(feature_config_file(features))
    path = release_model_dir(model, out, feature_config)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"release: {path} ({size / 1e6:.1f} MB, float16)", file=sys.stderr)
