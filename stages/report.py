"""Study outputs a reader (or a check) can use without knowing the detailed layout.

* `mockingjay headline`: `metrics/headline.json`, the test accuracies of every task as fractions
  (log-mel, majority, each hidden state, weighted sum, best MLP) and the pretraining facts;
* `mockingjay release`: the final model as float16 safetensors + config + the feature settings
  it was trained on, small enough to commit (`mockingjay probe --checkpoint` and
  `export-checkpoint` read it like any model directory);
* `mockingjay results-table`: the README's results tables, generated from the metrics files
  between `<!-- results:NAME -->` markers (`--check` fails when the README disagrees).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from mockingjay.store_layout import INPUT_STORE, feature_config_file, layer_index, layer_names

from .common import StageError, cli_errors, write_json, write_text_atomically

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


def _percent(value) -> str:
    return "" if value is None else f"{value * 100:.1f}"


def study_table(headline: dict) -> str:
    """Markdown: one row per representation, one column per task, paper figures beside ours."""
    tasks = [t for t in TASK_ORDER if t in headline]
    depth = max(len(headline[t]["layers"]) for t in tasks)
    header = (
        "| representation | "
        + " | ".join(f"{t} (ours)" for t in tasks)
        + " | phone (paper) | speaker (paper) |"
    )
    lines = [header, "|" + "---|" * (len(tasks) + 3)]

    def row(name: str, values: list, paper: tuple[str, str] = ("", "")) -> None:
        lines.append(
            f"| {name} | "
            + " | ".join(_percent(v) for v in values)
            + f" | {paper[0]} | {paper[1]} |"
        )

    row("majority class", [headline[t]["majority"] for t in tasks])
    row(
        "log-mel (input, per-utterance CMVN as the model sees it)",
        [headline[t]["logmel"] for t in tasks],
        (_percent(PAPER["phone"]["logmel"]), _percent(PAPER["speaker"]["logmel"])),
    )
    if any(headline[t].get("logmel_global_cmvn") is not None for t in tasks):
        row("log-mel, global CMVN", [headline[t].get("logmel_global_cmvn") for t in tasks])
    for i in range(depth):
        name = "hidden state 0 (projection + position)" if i == 0 else f"layer {i}"
        row(
            name,
            [headline[t]["layers"][i] if i < len(headline[t]["layers"]) else None for t in tasks],
        )
    row("weighted sum of hidden states", [headline[t].get("weighted_sum") for t in tasks])
    row(
        "best single layer",
        [max(headline[t]["layers"]) for t in tasks],
        (
            f"{_percent(PAPER['phone']['best'])} (BASE)",
            f"{_percent(PAPER['speaker']['best'])} (BASE)",
        ),
    )
    if any(headline[t].get("mlp_best") is not None for t in tasks):
        row("MLP probe, log-mel", [headline[t].get("mlp_logmel") for t in tasks])
        row("MLP probe, best layer", [headline[t].get("mlp_best") for t in tasks])
    return "\n".join(lines)


def fraction_table(headline: dict, task: str = "phone") -> str:
    fractions = headline.get(task, {}).get("label_fractions")
    if not fractions:
        return ""
    lines = [
        "| labelled train utterances | log-mel | best layer | weighted sum |",
        "|---|---|---|---|",
    ]
    for fraction, values in fractions.items():
        lines.append(
            f"| {float(fraction) * 100:g}% | {_percent(values['logmel'])} | "
            f"{_percent(values['best_layer'])} | {_percent(values['weighted_sum'])} |"
        )
    return "\n".join(lines)


def curve_table(headline: dict) -> str:
    points = headline.get("curve")
    if not points:
        return ""
    tasks = [t for t in TASK_ORDER if any(t in p for p in points)]
    lines = [
        "| step | audio seen (h) | " + " | ".join(f"{t}, last layer" for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for p in points:
        lines.append(
            f"| {p['step']} | {p.get('audio_hours_seen', '')} | "
            + " | ".join(_percent(p.get(t)) for t in tasks)
            + " |"
        )
    return "\n".join(lines)


def runs_table(first: dict, second: dict, names: tuple[str, str]) -> str:
    """Markdown: two pretraining runs of a study side by side, task by task, each against the log-mel
    input it was trained on (test accuracy in %)."""
    tasks = [t for t in TASK_ORDER if t in first and t in second]
    lines = [
        "| representation | " + " | ".join(f"{t}, {n}" for t in tasks for n in names) + " |",
        "|" + "---|" * (2 * len(tasks) + 1),
    ]

    def row(label: str, pick) -> None:
        lines.append(
            f"| {label} | "
            + " | ".join(_percent(pick(run[t])) for t in tasks for run in (first, second))
            + " |"
        )

    row("log-mel input the model was trained on", lambda e: e["logmel"])
    depth = max(len(first[t]["layers"]) for t in tasks)
    for i in range(depth):
        row(
            "hidden state 0" if i == 0 else f"layer {i}",
            lambda e, i=i: e["layers"][i] if i < len(e["layers"]) else None,
        )
    row("weighted sum of hidden states", lambda e: e.get("weighted_sum"))
    row("best layer minus log-mel (points)", lambda e: max(e["layers"]) - e["logmel"])
    return "\n".join(lines)


def demo_table(probe_metrics: dict) -> str:
    """Markdown: accuracy and macro-F1 per layer and task (metrics/probe.json), in %."""
    tasks = [t for t in TASK_ORDER if t in probe_metrics]
    names = [n for n in probe_metrics[tasks[0]] if n == INPUT_STORE or layer_index(n) is not None]
    if any("weighted_sum" in probe_metrics[t] for t in tasks):
        names.append("weighted_sum")
    lines = [
        "| layer | " + " | ".join(f"{t} acc | {t} macro-F1" for t in tasks) + " |",
        "|" + "---|" * (2 * len(tasks) + 1),
    ]
    labels = {
        INPUT_STORE: "log-mel input (baseline)",
        "weighted_sum": "weighted sum of hidden states",
    }
    for name in names:
        label = labels.get(name) or (
            f"{layer_index(name)} (input representation)"
            if layer_index(name) == 0
            else str(layer_index(name))
        )
        cells = [probe_metrics[t].get(name, {}) for t in tasks]
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{_percent(c.get('accuracy'))} | {_percent(c.get('macro_f1'))}" for c in cells
            )
            + " |"
        )
    lines.append(
        "| majority class | "
        + " | ".join(
            f"{_percent(next(iter(probe_metrics[t].values()))['majority_rate'])} | " for t in tasks
        )
        + " |"
    )
    return "\n".join(lines)


def tables(root: Path) -> dict[str, str]:
    """Marker name -> generated markdown, from the committed metrics files under `root`."""
    out = {}
    demo = root / "metrics" / "probe.json"
    if demo.is_file():
        out["demo"] = demo_table(json.loads(demo.read_text()))
    for name, path in (
        ("demo-finetune", root / "metrics" / "finetune.json"),
        ("study-finetune", root / "studies" / "multispeaker" / "metrics" / "finetune.json"),
    ):
        if path.is_file():
            from .finetune_report import finetune_table

            out[name] = finetune_table(json.loads(path.read_text()))
    headline = root / "studies" / "multispeaker" / "metrics" / "headline.json"
    if headline.is_file():
        data = json.loads(headline.read_text())
        out["study"] = study_table(data)
        out["study-fractions"] = fraction_table(data)
        out["study-curve"] = curve_table(data)
        second = headline.with_name("headline_global.json")  # the second run (global.yaml)
        if second.is_file():
            out["study-runs"] = runs_table(
                data, json.loads(second.read_text()), ("per-utterance CMVN", "global CMVN")
            )
    return out


def render_readme(text: str, generated: dict[str, str]) -> str:
    for name, table in generated.items():
        pattern = re.compile(
            rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)", re.S
        )
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


@cli_errors
def table_main(
    readme: Path = typer.Option(
        Path("README.md"), help="the file with <!-- results:NAME --> markers"
    ),
    check: bool = typer.Option(
        False, "--check", help="only check that the file is up to date (exit 1 if not)"
    ),
) -> None:
    """Regenerate the README's result tables from the metrics files (or --check them)."""
    text = readme.read_text()
    rendered = render_readme(text, tables(readme.resolve().parent))
    if check:
        if rendered != text:
            raise StageError(
                f"{readme}: result tables differ from the metrics files; run mockingjay results-table"
            )
        return
    write_text_atomically(
        readme, rendered
    )  # a failed write (full disk) leaves the README as it was
