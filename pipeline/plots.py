"""Figures: matplotlib Figure objects of their own (no pyplot state), rendered to PNG files atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import CONFUSION_PNG, atomic_write


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of its own (no pyplot state: safe in a server's threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render fig to a PNG file, atomically."""
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Any:
    """Counts with row-normalised colours (recall per true class)."""
    n = len(class_names)
    fig = new_figure(2.5 + 0.5 * n, 2 + 0.5 * n)
    ax = fig.subplots()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    return fig


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """The confusion figure as a PNG file."""
    return save_figure(confusion_figure(matrix, class_names), path)


def write_confusion_png(metrics: dict[str, Any], folder: str | os.PathLike) -> Path:
    """confusion_matrix.png of a head or run folder, from its metrics."""
    path = Path(folder) / CONFUSION_PNG
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), metrics["class_names"], path)
    return path


def compare_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Bar chart of test accuracy, balanced accuracy and macro F1 per method."""
    keys = ["accuracy", "balanced_accuracy", "macro_f1"]
    x = np.arange(len(rows))
    fig = new_figure(max(5, 1.6 * len(rows)), 3.5)
    ax = fig.subplots()
    for k, key in enumerate(keys):
        ax.bar(x + (k - 1) * 0.25, [r[key] for r in rows], 0.25, label=key.replace("_", " "))
    ax.set_xticks(x, [r["method"] for r in rows], rotation=20, ha="right")
    low = min(min(r[k] for k in keys) for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("test metrics per method")
    return fig


def plot_compare(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The comparison bar chart as a PNG file."""
    return save_figure(compare_figure(rows), path)
