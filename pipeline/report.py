"""Metrics, tables and plots: the same report for every method (heads and fine-tuning)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import CONFUSION_PNG, METRICS_JSON, read_json, write_json

METRICS_FILE = METRICS_JSON  # the name tests and older callers know


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                           seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 with 95% intervals, per-class precision/recall/F1, confusion matrix.

    Intervals: Wilson for accuracy, a bootstrap over the test images (seeded) for the other two.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support)

    from .stats import metric_intervals

    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "n_test": int(len(y_true)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        **metric_intervals(np.asarray(y_true), np.asarray(y_pred), len(class_names), seed=seed),
    }


def ci_text(metrics: dict[str, Any], key: str) -> str:
    """'0.9845 [0.955, 0.995]': a metric with its 95% interval when it has one."""
    interval = metrics.get(f"{key}_ci")
    value = f"{metrics[key]:.4f}"
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


def metrics_table(metrics: dict[str, Any]) -> str:
    """The per-class table and the summary lines, as printed by fit-head and finetune."""
    width = max(12, *(len(n) for n in metrics["per_class"]))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} "
                     f"{row['support']:8d}")
    lines.append(f"test accuracy {ci_text(metrics, 'accuracy')}   balanced accuracy "
                 f"{ci_text(metrics, 'balanced_accuracy')}   macro F1 {ci_text(metrics, 'macro_f1')}   "
                 f"({metrics['n_test']} test images)   [95% intervals]")
    return "\n".join(lines)


def save_metrics(metrics: dict[str, Any], folder: str | os.PathLike) -> Path:
    """metrics.json and the confusion-matrix PNG in folder; returns the JSON path."""
    folder = Path(folder)
    path = write_json(folder / METRICS_JSON, metrics)
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), metrics["class_names"], folder / CONFUSION_PNG)
    return path


def load_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a head or run folder."""
    return read_json(Path(folder) / METRICS_JSON, "it is written by fit-head and finetune")


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of its own (no pyplot state: safe in a server's threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render fig to a PNG file, atomically."""
    from .artifacts import atomic_write

    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Counts with row-normalised colours (recall per true class)."""
    n = len(class_names)
    fig = new_figure(2.5 + 0.5 * n, 2 + 0.5 * n)
    ax = fig.subplots()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    save_figure(fig, path)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return "" if row.get(key) is None else fmt.format(row[key])


# (title, cell) per column of the comparison table; metrics carry their 95% interval when known
COMPARE_COLUMNS: list[tuple[str, Any]] = [
    ("method", lambda r: r["method"]),
    ("test acc [95% CI]", lambda r: ci_text(r, "accuracy")),
    ("balanced acc [95% CI]", lambda r: ci_text(r, "balanced_accuracy")),
    ("macro F1 [95% CI]", lambda r: ci_text(r, "macro_f1")),
    ("train s", lambda r: _cell(r, "train_seconds", "{:.1f}")),
    ("infer ms/img", lambda r: _cell(r, "inference_ms", "{:.2f}")),
    ("size MB", lambda r: _cell(r, "size_mb", "{:.2f}")),
    ("paired test vs the best (McNemar)", lambda r: r.get("paired_verdict") or ""),
]


def compare_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown row per method."""
    head = "| " + " | ".join(title for title, _ in COMPARE_COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COMPARE_COLUMNS) + "|"
    body = ["| " + " | ".join(cell(row) for _, cell in COMPARE_COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def plot_compare(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
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
    save_figure(fig, path)


def unknown_lines(metrics: dict[str, Any]) -> list[str]:
    """Calibration and the unknown detector in words, as fit-head prints them (empty for older metrics)."""
    lines = []
    if "ece" in metrics:
        lines.append(f"calibration: temperature {metrics['temperature']:.3f}; ECE (15 bins) on the test part "
                     f"{metrics['ece_uncalibrated']:.4f} -> {metrics['ece']:.4f}")
    unknown = metrics.get("unknown")
    if unknown:
        lines.append(f"unknown detector ({unknown['method']}): threshold {unknown['threshold']:.3f} accepts "
                     f"{unknown['accept']:.0%} of known training images (out of fold); on the test part "
                     f"{unknown['n_unknown']} of {unknown['n_unknown'] + unknown['n_accepted']} called unknown "
                     f"({unknown['test_unknown_rate']:.1%}), accuracy on the accepted {unknown['accepted_accuracy']:.4f}")
    return lines
