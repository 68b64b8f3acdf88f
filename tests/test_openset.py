"""pipeline.openset: the threshold accepts the asked share of known images (out of fold), far-away images
score above it, a training image's own copies are left out of its neighbours, and the stored arrays are
checked against head.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.openset import (
    accept_threshold,
    fit_detector,
    fit_detector_held_out,
    knn_distance,
    load_detector,
    save_detector,
    unit_rows,
)


def known_world(n: int = 300, dim: int = 24, seed: int = 0):
    """Three tight clusters of features, and probabilities that are mostly confident."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, dim)) + 4 * np.eye(3, dim)
    y = np.arange(n) % 3
    X = centres[y] + rng.normal(0, 0.3, (n, dim))
    top = rng.uniform(0.5, 1.0, n)
    proba = np.tile(((1 - top) / 2)[:, None], (1, 3))
    proba[np.arange(n), y] = top
    return X.astype(np.float32), y, np.arange(n), proba


@pytest.mark.parametrize("accept", [0.8, 0.9, 0.95, 0.99])
def test_threshold_accepts_the_asked_share_of_known_images(accept: float) -> None:
    X, _, groups, proba = known_world()
    detector = fit_detector(X, groups, proba, accept=accept)
    accepted = np.mean(detector.oof_scores <= detector.threshold)
    assert accept <= accepted <= accept + 1 / len(X) + 1e-9
    for other in (0.5, 0.7):
        assert other <= np.mean(detector.oof_scores <= detector.threshold_for(other)) <= other + 1 / len(X) + 1e-9


def test_accept_threshold_is_a_quantile() -> None:
    scores = np.arange(100, dtype=float)
    assert accept_threshold(scores, 0.95) == 94.0 and accept_threshold(scores, 1.0) == 99.0


def test_far_images_score_above_the_threshold_and_confident_known_ones_below() -> None:
    X, _, groups, proba = known_world()
    detector = fit_detector(X, groups, proba, accept=0.95)
    rng = np.random.default_rng(1)
    far = rng.normal(0, 1, (50, X.shape[1])).astype(np.float32) - 4 * np.eye(1, X.shape[1])
    confident = np.full((50, 3), 0.005)
    confident[:, 0] = 0.99  # even a confident head is overruled by the distance
    assert (detector.score(far, confident) > detector.threshold).all()
    near = X[:50] + np.random.default_rng(2).normal(0, 0.05, (50, X.shape[1])).astype(np.float32)
    assert np.mean(detector.score(near, proba[:50]) <= detector.threshold) >= 0.9


def test_held_out_detector_sets_its_threshold_on_the_held_out_images() -> None:
    """A fine-tuning run's detector: the training features are the reference, the held-out known images'
    scores (as new images would score) set the threshold, and far images still score above it."""
    X, _, _, proba = known_world()
    train, held = X[:240], X[240:]
    detector = fit_detector_held_out(train, held, proba[240:], accept=0.9)
    assert detector.train_unit.shape == train.shape and len(detector.oof_scores) == len(held)
    assert np.mean(detector.oof_scores <= detector.threshold) == pytest.approx(54 / 60)  # ceil(0.9 * 60)
    # the stored scores are what the detector gives those images afterwards (training features in float16)
    np.testing.assert_allclose(detector.score(held, proba[240:]), detector.oof_scores, atol=0.05)
    far = np.random.default_rng(1).normal(0, 1, (50, X.shape[1])).astype(np.float32) - 4 * np.eye(1, X.shape[1])
    assert (detector.score(far, proba[:50]) > detector.threshold).all()


def test_out_of_fold_neighbours_leave_out_the_image_and_its_copies() -> None:
    X, _, _, _ = known_world(n=60)
    X = np.vstack([X, X[:1]])  # row 60 is a byte-identical copy of row 0
    groups = np.r_[np.arange(60), 0]
    unit = unit_rows(X)
    with_self = knn_distance(unit, unit, 1)
    assert np.allclose(with_self, 0, atol=1e-5)
    without = knn_distance(unit, unit, 1, groups, groups)
    assert (without[[0, 60]] > 1e-3).all() and (without > 1e-4).all()


def test_detector_round_trip_and_digest(tmp_path: Path) -> None:
    X, _, groups, proba = known_world()
    detector = fit_detector(X, groups, proba)
    path = tmp_path / "unknown.npz"
    save_detector(detector, path)
    loaded = load_detector(detector.describe(), path)
    np.testing.assert_array_equal(loaded.score(X[:10], proba[:10]), detector.score(X[:10], proba[:10]))
    other = fit_detector(X[:200], groups[:200], proba[:200])
    save_detector(other, path)
    with pytest.raises(UserError, match="does not match its head.json"):
        load_detector(detector.describe(), path)
    path.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="missing or damaged"):
        load_detector(detector.describe(), path)
