"""Classification metrics (pure functions) and the confusion-matrix figure.

Names follow SPEC §3: ``accuracy`` = correct / all; ``balanced_accuracy`` = mean of the per-class
recalls over the classes present in the reference labels. (Seed 000 calls these "UA" and "WA"
respectively; seeds 002-004 use the opposite convention -- we use neither abbreviation.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Class indices: a list or a 1-D integer array.
Labels = Sequence[int] | np.ndarray


def confusion_matrix(y_true: Labels, y_pred: Labels, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are the true class, columns the predicted class."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def accuracy(y_true: Labels, y_pred: Labels) -> float:
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    if true.size == 0:
        return float("nan")
    return float((true == pred).mean())


def per_class_recall(y_true: Labels, y_pred: Labels, n_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class absent from ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(y_true: Labels, y_pred: Labels, n_classes: int) -> float:
    recalls = per_class_recall(y_true, y_pred, n_classes)
    present = recalls[~np.isnan(recalls)]
    return float(present.mean()) if present.size else float("nan")


def summarize(y_true: Labels, y_pred: Labels, classes: Sequence[str]) -> dict:
    """JSON-ready metric block: accuracy, balanced_accuracy, per-class recall, confusion matrix."""
    n = len(classes)
    recalls = per_class_recall(y_true, y_pred, n)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, n),
        "per_class_recall": {
            c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recalls, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, n).tolist(),
    }


def save_confusion_png(
    cm: np.ndarray | list, classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix with counts, written as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.0, 1.1 * n + 1.6), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(
                j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=8, color=colour
            )
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
