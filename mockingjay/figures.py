"""Figures for people: loss curves, a masked-reconstruction example, probe accuracy per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: stages run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .masking import MaskConfig, mask_batch  # noqa: E402
from .store_layout import INPUT_STORE, LAYER_PREFIX  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.inference_mode()
def reconstruction_example(
    model: torch.nn.Module,
    features: np.ndarray,
    mask_config: MaskConfig,
    downsample_rate: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input, masked input, reconstruction, time mask) of one utterance [T, D], model in eval mode."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))[None].to(device)
    lengths = torch.tensor([x.shape[1]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    masked = mask_batch(x, lengths, mask_config, downsample_rate, generator=generator)
    was_training = model.training
    model.eval()
    prediction = model(masked.inputs, lengths)[:, : x.shape[1]]
    model.train(was_training)
    time_mask = masked.time_mask[0]
    return (
        x[0].cpu().numpy(),
        masked.inputs[0].float().cpu().numpy(),
        prediction[0].float().cpu().numpy(),
        time_mask.cpu().numpy(),
    )


def plot_reconstruction(
    original: np.ndarray,
    masked: np.ndarray,
    reconstruction: np.ndarray,
    time_mask: np.ndarray,
    path: Path,
    title: str,
) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    dims = min(original.shape[1], reconstruction.shape[1])
    vmin, vmax = np.percentile(original[:, :dims], [1, 99])
    for ax, data, name in zip(
        axes,
        (original, masked, reconstruction),
        ("log-mel input (normalised)", "masked input", "reconstruction"),
    ):
        ax.imshow(
            data[:, :dims].T, origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="magma"
        )
        ax.set_ylabel(name, fontsize=8)
    spans = np.flatnonzero(np.diff(np.concatenate([[0], time_mask.astype(int), [0]])))
    for start, end in zip(spans[::2], spans[1::2]):
        axes[1].axvspan(start - 0.5, end - 0.5, ymin=0.97, ymax=1.0, color="cyan")
    axes[-1].set_xlabel("frame")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_loss_curve(
    steps: Sequence[int], losses: Sequence[float], path: Path, heldout: dict | None = None
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="training loss (masked L1)")
    for name, (step, value) in (heldout or {}).items():
        ax.scatter([step], [value], label=f"{name}: {value:.3f}", zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("L1 on masked frames")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_probe_accuracy(
    rows: list[dict], path: Path, extra: dict[str, dict[str, float]] | None = None
) -> Path:
    """One panel per task with its own axis: accuracy per layer (integer ticks), the log-mel input
    and the majority class as labelled lines. rows: {"task", "layer" (int or "input"), "accuracy",
    "majority_rate"}; extra: task -> {label: accuracy} drawn as dotted lines (weighted sum, MLP)."""
    tasks = sorted(
        {r["task"] for r in rows},
        key=lambda t: (
            ("phone", "speaker", "keyword").index(t) if t in ("phone", "speaker", "keyword") else 9
        ),
    )
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        layers = sorted(
            (r for r in rows if r["task"] == task and r["layer"] != INPUT_STORE),
            key=lambda r: r["layer"],
        )
        ax.plot(
            [r["layer"] for r in layers],
            [r["accuracy"] * 100 for r in layers],
            marker="o",
            color="C0",
            label="hidden state",
        )
        baseline = [r for r in rows if r["task"] == task and r["layer"] == INPUT_STORE]
        if baseline:
            ax.axhline(
                baseline[0]["accuracy"] * 100, linestyle="--", color="C3", label="log-mel input"
            )
        ax.axhline(
            rows[[r["task"] for r in rows].index(task)]["majority_rate"] * 100,
            linestyle=":",
            color="grey",
            label="majority class",
        )
        for i, (label, value) in enumerate(((extra or {}).get(task) or {}).items()):
            ax.axhline(value * 100, linestyle="-.", color=f"C{i + 4}", label=label)
        ax.set_xticks([r["layer"] for r in layers])
        ax.set_title(task)
        ax.set_xlabel("hidden state (0 = input representation)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_layer_weights(weights: dict[str, dict[str, float]], path: Path) -> Path:
    """The learnt softmax weights of each task's weighted-sum head, as bars per hidden state."""
    fig, axes = plt.subplots(1, len(weights), figsize=(3.6 * len(weights), 3.2), squeeze=False)
    for ax, (task, layer_weights) in zip(axes[0], weights.items()):
        names = list(layer_weights)
        ax.bar(range(len(names)), [layer_weights[n] for n in names], color="C2")
        ax.set_xticks(range(len(names)), [n.removeprefix(LAYER_PREFIX) for n in names])
        ax.set_title(f"{task}: weighted-sum layer weights")
        ax.set_xlabel("hidden state")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_curve(points: list[dict], tasks: Sequence[str], path: Path) -> Path:
    """Last-layer accuracy against pretraining audio seen (hours), one line per task."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task in tasks:
        xs = [p["audio_hours_seen"] for p in points if task in p]
        ax.plot(xs, [p[task] * 100 for p in points if task in p], marker="o", label=task)
    ax.set_xlabel("pretraining audio seen (hours)")
    ax.set_ylabel("test accuracy, last layer (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_finetune_fractions(table: dict[str, dict[str, dict[float, float]]], path: Path) -> Path:
    """Test accuracy against the label fraction (log scale), a panel per task, a line per variant
    (fine-tuned, frozen, from scratch, log-mel)."""
    fig, axes = plt.subplots(1, len(table), figsize=(4.4 * len(table), 3.4), squeeze=False)
    for ax, (task, variants) in zip(axes[0], table.items()):
        for variant, points in variants.items():
            fractions = sorted(points)
            ax.plot(
                [f * 100 for f in fractions],
                [points[f] * 100 for f in fractions],
                marker="o",
                label=variant,
            )
        ax.set_xscale("log")
        ax.set_xlabel("labels used (% of train)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across); class names on the
    axes when there are few enough to read."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 3.0 + 0.18 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    if len(classes) <= 60:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
