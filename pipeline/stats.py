"""How sure is a test score? Confidence intervals of test metrics and paired tests between two methods.

Test sets here are small (46 to 193 images), so one image moves accuracy by half a point or more:
every score carries a 95% interval, and two methods are compared on the same images (McNemar).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Metric = str | Callable[[np.ndarray, np.ndarray], float]
VECTOR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _z(confidence: float) -> float:
    from scipy.stats import norm

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n; (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the formula's bound is the proportion itself, up to rounding
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return float(low), float(high)


def _confusions(y_true: np.ndarray, y_pred: np.ndarray, rows: np.ndarray, n_classes: int) -> np.ndarray:
    """(R, K, K) confusion counts, one per resample; rows is (R, n) indices into the test images."""
    n_resamples = rows.shape[0]
    cell = y_true[rows] * n_classes + y_pred[rows]
    flat = cell + (np.arange(n_resamples) * n_classes * n_classes)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_resamples * n_classes * n_classes)
    return counts.reshape(n_resamples, n_classes, n_classes)


def _metric_from_confusions(confusion: np.ndarray, metric: str) -> np.ndarray:
    """A metric per confusion matrix, as report.classification_metrics computes it (classes with support)."""
    diagonal = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    support = confusion.sum(axis=2)
    total = support.sum(axis=1)
    if metric == "accuracy":
        return diagonal.sum(axis=1) / np.maximum(total, 1)
    present = support > 0
    n_present = np.maximum(present.sum(axis=1), 1)
    if metric == "balanced_accuracy":
        recall = np.divide(diagonal, support, out=np.zeros_like(diagonal), where=present)
        return recall.sum(axis=1) / n_present
    if metric == "macro_f1":
        predicted = confusion.sum(axis=1)
        denominator = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
        f1 = np.divide(2 * diagonal, denominator, out=np.zeros_like(diagonal), where=denominator > 0)
        return (f1 * present).sum(axis=1) / n_present
    raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(VECTOR_METRICS)} or a callable")


def _resample_rows(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metric: Metric,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_classes: int | None = None,
) -> list[float]:
    """Percentile bootstrap interval of metric over test images resampled with replacement.

    metric: "accuracy", "balanced_accuracy" or "macro_f1" (vectorised over resamples), or any
    callable(y_true, y_pred) -> float (called once per resample). [0, 1] for an empty test set.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        return [0.0, 1.0]
    rows = _resample_rows(len(y_true), n_resamples, seed)
    if callable(metric):
        values = np.array([metric(y_true[r], y_pred[r]) for r in rows], dtype=np.float64)
    else:
        k = n_classes if n_classes is not None else int(max(y_true.max(), y_pred.max())) + 1
        values = _metric_from_confusions(_confusions(y_true, y_pred, rows, k), metric)
    return _percentiles(values, confidence)


def metric_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
) -> dict[str, list[float]]:
    """95% intervals for metrics.json: Wilson for accuracy, one shared bootstrap for the other two."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    correct = int((y_true == y_pred).sum())
    intervals = {"accuracy_ci": list(wilson_interval(correct, len(y_true), confidence))}
    if len(y_true) == 0:
        return {**intervals, "balanced_accuracy_ci": [0.0, 1.0], "macro_f1_ci": [0.0, 1.0]}
    confusion = _confusions(y_true, y_pred, _resample_rows(len(y_true), n_resamples, seed), n_classes)
    for name in ("balanced_accuracy", "macro_f1"):
        intervals[f"{name}_ci"] = _percentiles(_metric_from_confusions(confusion, name), confidence)
    return intervals


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test on paired outcomes: two-sided binomial test of a_only vs b_only at 1/2.

    n is the number of paired images; only the discordant ones (a_only + b_only) carry evidence.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be 1-D of one length, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    p_value = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"a_only": a_only, "b_only": b_only, "n": int(len(a)), "p_value": float(min(1.0, p_value))}


def format_p(p_value: float) -> str:
    """Two decimals, or two significant digits below 0.01."""
    return f"{p_value:.2f}" if p_value >= 0.01 else f"{p_value:.2g}"


def paired_verdict(name_a: str, name_b: str, correct_a: np.ndarray, correct_b: np.ndarray, alpha: float = 0.05) -> str:
    """One line: 'fine-tune vs logreg: +1 image of 193, p = 1.00: no evidence'."""
    test = mcnemar_exact(correct_a, correct_b)
    gain = test["a_only"] - test["b_only"]
    images = "image" if abs(gain) == 1 else "images"
    verdict = "evidence of a difference" if test["p_value"] < alpha else "no evidence"
    return f"{name_a} vs {name_b}: {gain:+d} {images} of {test['n']}, p = {format_p(test['p_value'])}: {verdict}"
