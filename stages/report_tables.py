"""`mockingjay results-table`: the README's results tables, generated from the metrics files
between `<!-- results:NAME -->` markers (`--check` fails when the README disagrees).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from mockingjay.store_layout import INPUT_STORE, layer_index

from .common import StageError, cli_errors, write_text_atomically
from .report import PAPER, TASK_ORDER


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
