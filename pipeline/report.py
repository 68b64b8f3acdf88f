"""Metrics, tables and plots: the same report for every method (heads and fine-tuning)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support)

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
    }


def metrics_table(metrics: dict[str, Any]) -> str:
    """The per-class table and the summary lines, as printed by fit-head and finetune."""
    width = max(12, *(len(n) for n in metrics["per_class"]))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} "
                     f"{row['support']:8d}")
    lines.append(f"test accuracy {metrics['accuracy']:.4f}   balanced accuracy "
                 f"{metrics['balanced_accuracy']:.4f}   macro F1 {metrics['macro_f1']:.4f}   "
                 f"({metrics['n_test']} test images)")
    return "\n".join(lines)


def save_metrics(metrics: dict[str, Any], folder: str | os.PathLike) -> Path:
    """metrics.json and the confusion-matrix PNG in folder; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2))
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), metrics["class_names"], folder / CONFUSION_PNG)
    return path


def load_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a head or run folder."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Counts with row-normalised colours (recall per true class)."""
    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * n, 2 + 0.5 * n))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMPARE_COLUMNS = [("method", "method", "{}"), ("accuracy", "test acc", "{:.4f}"),
                   ("balanced_accuracy", "balanced acc", "{:.4f}"), ("macro_f1", "macro F1", "{:.4f}"),
                   ("train_seconds", "train s", "{:.1f}"), ("inference_ms", "infer ms/img", "{:.2f}"),
                   ("size_mb", "size MB", "{:.2f}")]


def compare_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown row per method."""
    head = "| " + " | ".join(title for _, title, _ in COMPARE_COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COMPARE_COLUMNS) + "|"
    body = ["| " + " | ".join("" if row.get(key) is None else fmt.format(row[key])
                              for key, _, fmt in COMPARE_COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def plot_compare(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Bar chart of test accuracy, balanced accuracy and macro F1 per method."""
    plt = _pyplot()
    keys = ["accuracy", "balanced_accuracy", "macro_f1"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.5))
    for k, key in enumerate(keys):
        ax.bar(x + (k - 1) * 0.25, [r[key] for r in rows], 0.25, label=key.replace("_", " "))
    ax.set_xticks(x, [r["method"] for r in rows], rotation=20, ha="right")
    low = min(min(r[k] for k in keys) for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("test metrics per method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
