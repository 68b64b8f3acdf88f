"""pipeline.calibration: temperature scaling fitted on held-out predictions lowers the ECE of an over-confident
model; ECE and the reliability table on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of 5 classes, and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, 5))
    p = softmax(logits)
    y = np.array([rng.choice(5, p=row) for row in p])
    return logits, y


def test_temperature_scaling_fixes_over_confident_logits() -> None:
    logits, y = calibrated_sample(6000, seed=0)
    over = softmax(3.0 * logits)  # three times too sharp
    fit_part, test_part = slice(0, 3000), slice(3000, None)
    temperature = fit_temperature(over[fit_part], y[fit_part])
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(over[test_part], y[test_part])
    after = expected_calibration_error(apply_temperature(over[test_part], temperature), y[test_part])
    assert before > 0.1 and after < 0.03 and after < before / 4


def test_temperature_keeps_the_ranking_and_sums_to_one() -> None:
    logits, _ = calibrated_sample(50, seed=1)
    p = softmax(logits)
    for t in (0.5, 1.0, 4.0):
        q = apply_temperature(p, t)
        np.testing.assert_allclose(q.sum(1), 1.0)
        np.testing.assert_array_equal(q.argmax(1), p.argmax(1))
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)


def test_ece_and_reliability_by_hand() -> None:
    # two images at confidence 0.9 (one right), two at 0.6 (both right): |0.5 - 0.9| and |1 - 0.6|, each half
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(proba, y) == pytest.approx(0.4)
    table = reliability(proba, y, bins=10)
    assert table["count"][6] == 2 and table["count"][9] == 2 and sum(table["count"]) == 4
    assert table["accuracy"][9] == pytest.approx(0.5) and table["confidence"][6] == pytest.approx(0.6)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0
