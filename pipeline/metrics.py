"""Metrics of a method on its test images: the numbers, with their intervals, and their file (metrics.json)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import METRICS_JSON, read_json, write_json


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 with 95% intervals, per-class precision/recall/F1, confusion matrix.

    Intervals: Wilson for accuracy, a bootstrap over the test images (seeded) for the other two.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    from .stats import metric_intervals

    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "n_test": int(len(y_true)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        **metric_intervals(np.asarray(y_true), np.asarray(y_pred), len(class_names), seed=seed),
    }


def save_metrics(metrics: dict[str, Any], folder: str | os.PathLike) -> Path:
    """metrics.json in folder (atomically); returns its path."""
    return write_json(Path(folder) / METRICS_JSON, metrics)


def load_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a head or run folder."""
    return read_json(Path(folder) / METRICS_JSON, "it is written by fit-head and finetune")
