"""Classification scores of a probe's predictions: accuracy, macro-F1 and the confusion matrix.

numpy only, so that probing does not import scikit-learn (2 s per command); the definitions and
the floating-point operations are scikit-learn's (`accuracy_score`, `f1_score(average="macro",
zero_division=0)`, `confusion_matrix(labels=...)`), so the figures are the same to the last bit
(tests/test_probe.py compares them).
"""

from __future__ import annotations

import numpy as np


def accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The fraction of predictions equal to the truth; NaN when there is nothing to score."""
    return (
        float(np.average(np.asarray(truth) == np.asarray(predicted)))
        if len(truth)
        else float("nan")
    )


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """F1 averaged over the classes that occur in `truth` or `predicted` (each class weighs the
    same, however rare); NaN when there is nothing to score."""
    if not len(truth):
        return float("nan")
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labels, codes = np.unique(np.concatenate([truth, predicted]), return_inverse=True)
    true_code, predicted_code = codes[: len(truth)], codes[len(truth) :]
    hits = np.bincount(true_code[true_code == predicted_code], minlength=len(labels))
    true_count = np.bincount(true_code, minlength=len(labels))
    predicted_count = np.bincount(predicted_code, minlength=len(labels))
    # 2 tp / (2 tp + fp + fn) = 2 tp / (true + predicted), as scikit-learn computes it (beta 1)
    denominator = 1.0 * true_count.astype(np.float64) + predicted_count.astype(np.float64)
    f1 = (1.0 + 1.0) * hits.astype(np.float64) / np.where(denominator == 0, 1.0, denominator)
    return float(np.mean(np.where(denominator == 0, 0.0, f1)))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] over the classes 0 .. num_classes - 1 (int64)."""
    truth, predicted = np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    counts = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)
