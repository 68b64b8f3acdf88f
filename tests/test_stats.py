"""Intervals of test metrics and paired tests between two methods, on cases with known answers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from pipeline.stats import bootstrap_interval, mcnemar_exact, metric_intervals, paired_verdict, wilson_interval


def test_wilson_known_case():
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)


@pytest.mark.parametrize("n", [1, 10, 193])
def test_wilson_edges_are_not_empty(n):
    low, high = wilson_interval(0, n)
    assert low == 0.0 and 0 < high < 1
    low, high = wilson_interval(n, n)
    assert 0 < low < 1 and high == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_narrows_with_n_and_confidence():
    wide, narrow = wilson_interval(9, 10), wilson_interval(900, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson_interval(90, 100, 0.99)[0] < wilson_interval(90, 100, 0.90)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def predictions(n=200, k=12, accuracy=0.85, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return y, np.where(rng.random(n) < accuracy, y, rng.integers(0, k, n))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize(
    "name, sklearn_metric",
    [
        ("balanced_accuracy", balanced_accuracy_score),
        ("macro_f1", lambda t, p: f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0)),
    ],
)
def test_vectorised_bootstrap_matches_sklearn_on_every_resample(name, sklearn_metric):
    y, p = predictions()
    fast = bootstrap_interval(y, p, name, n_resamples=50, seed=3, n_classes=12)
    slow = bootstrap_interval(y, p, sklearn_metric, n_resamples=50, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_metric_intervals_contain_the_point_and_are_fast():
    y, p = predictions()
    seconds = []
    for _ in range(3):  # the best of three: the machine is shared
        started = time.perf_counter()
        intervals = metric_intervals(y, p, 12, seed=0)
        seconds.append(time.perf_counter() - started)
    assert min(seconds) < 0.3
    assert set(intervals) == {"accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci"}
    points = {
        "accuracy_ci": np.mean(y == p),
        "balanced_accuracy_ci": balanced_accuracy_score(y, p),
        "macro_f1_ci": f1_score(y, p, average="macro"),
    }
    for key, (low, high) in intervals.items():
        assert low < points[key] < high, key
        assert 0.03 < high - low < 0.2, key  # about +-5 points for 200 images
    assert metric_intervals(y, p, 12, seed=0) == intervals  # seeded
    assert intervals["accuracy_ci"] == list(wilson_interval(int(np.sum(y == p)), len(y)))


def test_metric_intervals_of_perfect_and_empty_predictions():
    y = np.repeat(np.arange(3), 10)
    perfect = metric_intervals(y, y, 3)
    assert perfect["balanced_accuracy_ci"] == [1.0, 1.0] and perfect["accuracy_ci"][1] == 1.0
    assert perfect["accuracy_ci"][0] < 1.0  # 30 of 30 does not prove 100%
    assert metric_intervals(np.array([], int), np.array([], int), 3)["macro_f1_ci"] == [0.0, 1.0]


@pytest.mark.parametrize(
    "a_only, b_only, p",
    [(1, 0, 1.0), (10, 0, 0.001953125), (0, 10, 0.001953125), (0, 0, 1.0), (5, 5, 1.0), (8, 2, 0.109375)],
)
def test_mcnemar_known_tables(a_only, b_only, p):
    both, neither = 150, 7
    correct_a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, bool)
    correct_b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, bool)
    result = mcnemar_exact(correct_a, correct_b)
    assert result == {"a_only": a_only, "b_only": b_only, "n": len(correct_a), "p_value": pytest.approx(p)}


def test_mcnemar_refuses_unpaired_outcomes():
    with pytest.raises(ValueError):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def test_paired_verdict_wording():
    a = np.array([True] * 190 + [False] * 3)
    b = np.array([True] * 189 + [False] * 4)
    assert paired_verdict("fine-tune", "logreg", a, b) == "fine-tune vs logreg: +1 image of 193, p = 1.00: no evidence"
    worse = np.array([True] * 180 + [False] * 13)
    assert (
        paired_verdict("logreg", "svm", worse, a)
        == "logreg vs svm: -10 images of 193, p = 0.002: evidence of a difference"
    )
    assert paired_verdict("a", "b", a, a).startswith("a vs b: +0 images of 193, p = 1.00: no evidence")
