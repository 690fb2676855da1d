"""How the probe stage reports: the printed tables, compact metrics, the plots table, the
figures' extra lines, and the MLflow runs (a parent with every accuracy, a child per head)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mockingjay.atomic import write_text_atomically
from mockingjay.store_layout import INPUT_STORE, layer_index, layer_store_name


def result_rows(results: dict) -> list[dict]:
    rows = []
    for task, result in results.items():
        for name, layer in result["layers"].items():
            rows.append(
                {
                    "task": task,
                    "layer": name if name == INPUT_STORE else layer_index(name),
                    "accuracy": layer["accuracy"],
                    "macro_f1": layer["macro_f1"],
                    "majority_rate": layer["majority_rate"],
                }
            )
    return rows


def format_table(rows: list[dict], results: dict) -> str:
    layers = sorted(
        {r["layer"] for r in rows}, key=lambda v: (v != INPUT_STORE, v if v != INPUT_STORE else -1)
    )
    tasks = list(results)
    cell = {(r["task"], r["layer"]): r for r in rows}
    header = f"{'layer':<10}" + "".join(f"{t + ' acc':>13}{t + ' F1':>12}" for t in tasks)
    lines = [header, "-" * len(header)]
    for layer in layers:
        name = "log-mel" if layer == INPUT_STORE else f"{layer}"
        line = f"{name:<10}"
        for task in tasks:
            r = cell.get((task, layer))
            line += (
                f"{r['accuracy'] * 100:>12.1f}%{r['macro_f1'] * 100:>11.1f}%" if r else f"{'':>25}"
            )
        lines.append(line)
    majority = f"{'majority':<10}" + "".join(
        f"{next(r['majority_rate'] for r in rows if r['task'] == t) * 100:>12.1f}%{'':>12}"
        for t in tasks
    )
    lines.append(majority)
    counts = ", ".join(f"{t}: {results[t]['examples']['test']} test examples" for t in tasks)
    lines.append(f"({counts}; layer 0 = input representation)")
    return "\n".join(lines)


def extra_probes(result: dict) -> list[dict]:
    """Every probe of a task except the linear ones on all labels (those are `result["layers"]`)."""
    return [
        p for p in result.get("probes", []) if not (p["kind"] == "linear" and p["fraction"] == 1.0)
    ]


def figure_extras(results: dict) -> dict[str, dict[str, float]]:
    """task -> {"weighted sum": acc, "MLP, best layer": acc} at fraction 1, for the accuracy figure."""
    extras: dict[str, dict[str, float]] = {}
    for task, result in results.items():
        for probe in extra_probes(result):
            if probe["fraction"] != 1.0:
                continue
            if probe["kind"] == "weighted_sum":
                extras.setdefault(task, {})["weighted sum"] = probe["accuracy"]
            elif probe["kind"] == "mlp" and probe["layer"] != INPUT_STORE:
                best = extras.setdefault(task, {}).get("MLP, best layer", 0.0)
                extras[task]["MLP, best layer"] = max(best, probe["accuracy"])
    return extras


def probe_group(probe: dict) -> str:
    """Where a probe is filed beside the layers: mlp, weighted_sum, fraction_0.1, fraction_0.1.weighted_sum."""
    if probe["kind"] == "mlp":
        return "mlp"
    base = "" if probe["fraction"] == 1.0 else f"fraction_{probe['fraction']:g}"
    if probe["kind"] == "weighted_sum":
        return f"{base}.weighted_sum" if base else "weighted_sum"
    return base


def compact_metrics(results: dict) -> dict:
    """{task: {layer: metrics, "weighted_sum": metrics, "mlp": {layer: metrics},
    "fraction_0.1": {layer: metrics, "weighted_sum": metrics}}} (4 decimals)."""
    keys = ("accuracy", "macro_f1", "majority_rate")
    out = {}
    for task, result in results.items():
        out[task] = {
            name: {k: round(v, 4) for k, v in layer.items() if k in keys}
            for name, layer in result["layers"].items()
        }
        for probe in extra_probes(result):
            values = {k: round(probe[k], 4) for k in keys}
            group = probe_group(probe)
            if group == "weighted_sum":
                out[task]["weighted_sum"] = values
            elif group.endswith(".weighted_sum"):
                out[task].setdefault(group.split(".")[0], {})["weighted_sum"] = values
            else:
                out[task].setdefault(group, {})[probe["layer"]] = values
        for corpus, extra in result.get(
            "extra_tests", {}
        ).items():  # test-only corpora, linear heads
            out[task][f"test_corpus_{corpus}"] = {
                p["layer"]: {
                    "accuracy": round(p["accuracy"], 4),
                    "majority_rate": round(p["majority_rate"], 4),
                }
                for p in extra["heads"]
                if p["kind"] == "linear" and p["fraction"] == 1.0
            }
    return out


def format_extra(results: dict) -> str:
    """One line per probe beyond the linear table: kind, layer, fraction, accuracy, macro-F1."""
    lines = []
    for task, result in results.items():
        for probe in extra_probes(result):
            layer = "log-mel" if probe["layer"] == INPUT_STORE else probe["layer"]
            weights = ""
            if probe.get("layer_weights"):
                weights = "  weights " + " ".join(
                    f"{w:.2f}" for w in probe["layer_weights"].values()
                )
            lines.append(
                f"{task:<8} {probe['kind']:<13} {layer:<13} labels {probe['fraction']:>5g}  "
                f"{probe['accuracy'] * 100:5.1f}%  F1 {probe['macro_f1'] * 100:5.1f}%{weights}"
            )
        for corpus, extra in result.get("extra_tests", {}).items():
            for p in extra["heads"]:
                if p["fraction"] == 1.0:
                    lines.append(
                        f"{task:<8} {p['kind']:<13} {p['layer']:<13} on {corpus} ({extra['examples']} "
                        f"test examples, unseen corpus)  {p['accuracy'] * 100:5.1f}%"
                    )
    return "\n".join(lines)


def write_plot_table(path: Path, rows: list[dict], results: dict | None = None) -> None:
    """layer, phone, phone_logmel, [phone_weighted_sum,] speaker, ...: one line per layer, the
    baseline (and the weighted sum, one value per task) repeated so each draws as a flat line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in rows})
    baseline = {r["task"]: r["accuracy"] for r in rows if r["layer"] == INPUT_STORE}
    weighted = {
        task: p["accuracy"]
        for task, result in (results or {}).items()
        for p in extra_probes(result)
        if p["kind"] == "weighted_sum" and p["fraction"] == 1.0
    }
    layers = sorted({r["layer"] for r in rows if r["layer"] != INPUT_STORE})
    cell = {(r["task"], r["layer"]): r["accuracy"] for r in rows}
    header, getters = ["layer"], []
    for t in tasks:
        header += [t, f"{t}_logmel"]
        getters += [lambda layer, t=t: cell.get((t, layer)), lambda layer, t=t: baseline.get(t)]
        if t in weighted:
            header.append(f"{t}_weighted_sum")
            getters.append(lambda layer, t=t: weighted[t])
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    for layer in layers:
        values = [get(layer) for get in getters]
        writer.writerow([layer] + [f"{v:.4f}" if v is not None else "" for v in values])
    write_text_atomically(path, table.getvalue())


def log_runs(mlflow, results: dict, rows: list[dict]) -> None:
    summary = {}
    for r in rows:
        name = INPUT_STORE if r["layer"] == INPUT_STORE else layer_store_name(r["layer"])
        summary[f"{r['task']}_accuracy.{name}"] = r["accuracy"]
    best = {}
    for task in results:
        layer_rows = [r for r in rows if r["task"] == task and r["layer"] != INPUT_STORE]
        if layer_rows:
            top = max(layer_rows, key=lambda r: r["accuracy"])
            best[f"{task}_accuracy.best_layer"] = top["accuracy"]
    extra = {}
    for task, result in results.items():
        for probe in extra_probes(result):
            group = probe_group(probe)
            key = group if group.endswith("weighted_sum") else f"{group}.{probe['layer']}"
            extra[f"{task}_accuracy.{key}"] = probe["accuracy"]
    mlflow.log_metrics({**summary, **best, **extra})
    for task, result in results.items():
        for probe in extra_probes(result):
            name = f"{probe['kind']}/{probe['layer']}@{probe['fraction']:g}"
            with mlflow.start_run(
                run_name=f"{task}/{name}",
                nested=True,
                tags={
                    "mockingjay.stage": "probe",
                    "probe.task": task,
                    "probe.layer": probe["layer"],
                    "probe.kind": probe["kind"],
                    "probe.fraction": f"{probe['fraction']:g}",
                },
            ):
                mlflow.log_params(
                    {
                        "task": task,
                        "layer": probe["layer"],
                        "kind": probe["kind"],
                        "label_fraction": probe["fraction"],
                        "learning_rate": probe["learning_rate"],
                        "weight_decay": probe["weight_decay"],
                        "best_epoch": probe["best_epoch"],
                    }
                )
                mlflow.log_metrics(
                    {
                        k: float(probe[k])
                        for k in ("accuracy", "macro_f1", "majority_rate", "dev_accuracy")
                    }
                )
                if probe.get("layer_weights"):
                    mlflow.log_metrics(
                        {f"layer_weight.{k}": v for k, v in probe["layer_weights"].items()}
                    )
                mlflow.log_dict(probe["confusion"], "confusion.json")
        for name, layer in result["layers"].items():
            with mlflow.start_run(
                run_name=f"{task}/{name}",
                nested=True,
                tags={"mockingjay.stage": "probe", "probe.task": task, "probe.layer": name},
            ):
                mlflow.log_params(
                    {
                        "task": task,
                        "layer": name,
                        "learning_rate": layer["learning_rate"],
                        "weight_decay": layer["weight_decay"],
                        "best_epoch": layer["best_epoch"],
                    }
                )
                mlflow.log_metrics(
                    {
                        k: float(layer[k])
                        for k in ("accuracy", "macro_f1", "majority_rate", "dev_accuracy")
                    }
                )
                mlflow.log_dict(layer["confusion"], "confusion.json")
