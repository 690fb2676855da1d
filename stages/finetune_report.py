"""What the finetune stage writes: the compact metrics, the DVC plots table, the report folder
(full results, figures) and the parent MLflow run's summary metrics."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from mockingjay.finetune_config import VARIANTS

from .common import atomic_output_dir, write_json


def fraction_label(fraction: float) -> str:
    return f"{fraction:g}"


def run_name(task: str, variant: str, fraction: float) -> str:
    """`phone/finetuned` at fraction 1, `phone/finetuned@0.1` below: the run's MLflow name and,
    after the task, its model folder."""
    return (
        f"{task}/{variant}" if fraction == 1.0 else f"{task}/{variant}@{fraction_label(fraction)}"
    )


def _table(results: dict) -> dict[str, dict[str, dict[float, float]]]:
    """task -> variant -> fraction -> test accuracy."""
    table: dict = {}
    for (task, variant, fraction), result in results.items():
        table.setdefault(task, {}).setdefault(variant, {})[fraction] = result["test"]["accuracy"]
    return table


def compact_metrics(results: dict) -> dict:
    metrics: dict = {}
    for (task, variant, fraction), result in results.items():
        entry = metrics.setdefault(task, {})
        entry["majority_rate"] = result["test"]["majority_rate"]
        entry["test_examples"] = result["test"]["examples"]
        entry.setdefault(variant, {})[fraction_label(fraction)] = {
            "accuracy": result["test"]["accuracy"],
            "macro_f1": result["test"]["macro_f1"],
            "dev_accuracy": result["dev"]["accuracy"],
        }
    return metrics


def write_plot(path: Path, results: dict) -> None:
    """One row per label fraction; a column `<task>_<variant>` of test accuracy per run kind."""
    table = _table(results)
    columns = [(t, v) for t in table for v in VARIANTS if v in table[t]]
    fractions = sorted({f for (_, _, f) in results})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["label_fraction", *(f"{t}_{v}" for t, v in columns)])
        for fraction in fractions:
            writer.writerow(
                [
                    fraction_label(fraction),
                    *(
                        f"{table[t][v][fraction]:.6f}" if fraction in table[t][v] else ""
                        for t, v in columns
                    ),
                ]
            )


def _figures(folder: Path, results: dict, datasets: dict) -> list[Path]:
    from mockingjay.figures import plot_confusion, plot_finetune_fractions

    written = [plot_finetune_fractions(_table(results), folder / "accuracy_by_label_fraction.png")]
    for task in {t for (t, _, _) in results}:
        runs = [(f, r) for (t, v, f), r in results.items() if t == task and v == "finetuned"]
        if not runs:
            continue
        fraction, result = max(runs, key=lambda run: run[0])
        classes = datasets[task, fraction].classes
        written.append(
            plot_confusion(
                result["confusion"],
                classes,
                folder / f"confusion_{task}.png",
                f"{task}, fine-tuned on {fraction_label(fraction)} of the labels: "
                f"test accuracy {result['test']['accuracy']:.3f}",
            )
        )
    return written


def summary_line(results: dict) -> str:
    parts = [f"{run_name(t, v, f)} {r['test']['accuracy']:.3f}" for (t, v, f), r in results.items()]
    return "finetune: test accuracy: " + ", ".join(parts)


def write_outputs(
    results, datasets, metrics: Path | None, plot: Path | None, report, force: bool, mlflow
) -> str:
    compact = compact_metrics(results)
    if metrics:
        write_json(metrics, compact)
    if plot:
        write_plot(plot, results)
    full = {
        f"{t}/{v}@{fraction_label(f)}": {
            **{k: r[k] for k in r},
            "classes": datasets[t, f].classes,
            "ignored": datasets[t, f].ignored,
        }
        for (t, v, f), r in results.items()
    }
    if report:
        with atomic_output_dir(report, "finetune", force) as tmp:
            write_json(tmp / "results.json", full)
            _figures(tmp, results, datasets)
        for png in sorted(Path(report).glob("*.png")):
            mlflow.log_artifact(str(png))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for png in _figures(Path(tmp), results, datasets):
                mlflow.log_artifact(str(png))
    mlflow.log_metrics(
        {
            f"{t}_accuracy.{v}.fraction_{fraction_label(f)}": r["test"]["accuracy"]
            for (t, v, f), r in results.items()
        }
    )
    return summary_line(results)


VARIANT_LABELS = {
    "finetuned": "fine-tuned",
    "frozen": "frozen encoder",
    "scratch": "same encoder from scratch",
    "logmel": "log-mel",
}


def finetune_table(metrics: dict) -> str:
    """Markdown: test accuracy (%) per task and label fraction, a column per variant
    (metrics/finetune.json)."""
    variants = [v for v in VARIANTS if any(v in metrics[t] for t in metrics)]
    lines = [
        "| task | labels used | "
        + " | ".join(VARIANT_LABELS[v] for v in variants)
        + " | majority class |",
        "|" + "---|" * (len(variants) + 3),
    ]
    for task, entry in metrics.items():
        fractions = sorted({f for v in variants for f in entry.get(v, {})}, key=float)
        for fraction in fractions:
            cells = [entry.get(v, {}).get(fraction, {}).get("accuracy") for v in variants]
            lines.append(
                f"| {task} | {float(fraction) * 100:g}% | "
                + " | ".join("" if c is None else f"{c * 100:.1f}" for c in cells)
                + f" | {entry['majority_rate'] * 100:.1f} |"
            )
    return "\n".join(lines)
