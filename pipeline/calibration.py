"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and the expected calibration error.

A head's probabilities become softmax(log(p) / T): for logistic regression log(p) is the logits
up to a constant, for the sigmoid-calibrated SVM it is log_sigmoid of the calibrated decision
values, so one formula (and one exported layer) covers every head. T, the single parameter, is fitted
by minimising the log loss of the out-of-fold predictions of the training part, never the test part.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
LOG_FLOOR = 1e-12  # probabilities of 0 (k-NN heads) would make log(p) infinite
TEMPERATURE_RANGE = (0.05, 20.0)


def log_probabilities(proba: np.ndarray) -> np.ndarray:
    """log(p), floored: the 'logits' temperature scaling divides."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), LOG_FLOOR, None))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), row by row."""
    z = log_probabilities(proba) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(proba: np.ndarray, y: np.ndarray, temperature: float) -> float:
    scaled = apply_temperature(proba, temperature)
    return float(-np.mean(np.log(np.clip(scaled[np.arange(len(y)), y], LOG_FLOOR, None))))


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the log loss of (proba, y): out-of-fold predictions of known labels."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(
        lambda t: _nll(proba, y, float(np.exp(t))), bounds=(low, high), method="bounded", options={"xatol": 1e-4}
    )
    return float(np.exp(found.x))


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin (equal width on [0, 1]): the mean top-1 confidence, accuracy and image count."""
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1) if len(proba) else np.zeros(0)
    correct = (proba.argmax(axis=1) == y) if len(proba) else np.zeros(0, bool)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct.astype(float), bins) / count
    return {
        "confidence": np.nan_to_num(mean_conf).tolist(),
        "accuracy": np.nan_to_num(accuracy).tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean |accuracy - confidence| over equal-width confidence bins (15 by default)."""
    table = reliability(proba, y, bins)
    count = np.asarray(table["count"], dtype=np.float64)
    if count.sum() == 0:
        return 0.0
    gap = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    return float((gap * count).sum() / count.sum())
