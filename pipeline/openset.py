"""'Not one of my classes': an unknown score per image and a threshold, fitted on the training part only.

Two signals, each good where the other fails (bench/open_set.py measures them):
- the calibrated head's hesitation, log(1 - max p) (from the maximum softmax probability): it notices
  an image that looks like two of the known classes at once (a held-out flower species);
- the cosine distance from the image's L2-normalised features to its k-th nearest training image:
  it notices an image unlike every training image (a bank note, an X-ray), which a linear head may
  still place far on one side of its boundaries, with 99% confidence.
Each is turned into a z-score against its own out-of-fold distribution on the known training images
(the head's out-of-fold probabilities; each training image's neighbours among the others, its
duplicates left out), and the combined score is their sum. The threshold is the `accept` quantile
of the combined out-of-fold scores: that share of known images is accepted.

Why these choices (bench/open_set.py, Lite0 features): 1 - max p itself is heavy-tailed (most known
images near 0, a few hesitant ones at 0.5), so its z-scores let a hesitant flower outrank a bank note;
the log makes it about as spread as the distance. The larger of the two z-scores lost 0.02 AUROC on
held-out flower species to the head's confidence alone; the sum lost nothing on either protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .neighbours import unit_rows

METHODS = ("combined", "msp", "knn")
DEFAULT_METHOD = "combined"
DEFAULT_ACCEPT = 0.95
DEFAULT_K = 5
# log(1 - max p + floor): certain images all score log(floor) instead of -inf, and float32 rounding of
# p near 1 (6e-8, in an exported model) moves the log by less than 0.001
CONFIDENCE_FLOOR = 1e-4
# the smallest standard deviation each signal's z-score divides by: training features are stored in float16
# (cosines to about 1e-3), and a head certain of every training image (spread 0) would otherwise turn
# rounding into huge z-scores
SPREAD_FLOOR = {"msp": 0.1, "knn": 1e-3}
BLOCK_ROWS = 2048  # query rows per product with the training features (2048 x n floats at a time)


def knn_distance(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    groups_q: np.ndarray | None = None,
    groups_ref: np.ndarray | None = None,
) -> np.ndarray:
    """Cosine distance from each unit query row to its k-th nearest unit reference row.

    With groups, a reference row of the query's own group (itself, its identical copies) is skipped:
    the out-of-fold distance of a training image, as a new image would see the training set.
    """
    k = max(1, min(k, len(reference) - (1 if groups_q is not None else 0)))
    out = np.empty(len(queries), dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float32)
    for start in range(0, len(queries), BLOCK_ROWS):
        sims = np.asarray(queries[start : start + BLOCK_ROWS], dtype=np.float32) @ ref.T
        if groups_q is not None:
            sims[groups_q[start : start + BLOCK_ROWS, None] == groups_ref[None, :]] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        out[start : start + BLOCK_ROWS] = 1.0 - kth
    return out


def confidence_score(proba: np.ndarray) -> np.ndarray:
    """log(1 - the top class probability): high for an image the head hesitates on."""
    return np.log(1.0 - np.asarray(proba, dtype=np.float64).max(axis=1) + CONFIDENCE_FLOOR)


def accept_threshold(known_scores: np.ndarray, accept: float) -> float:
    """The smallest score at or below which at least `accept` of the known scores lie."""
    return float(np.quantile(np.asarray(known_scores, dtype=np.float64), accept, method="inverted_cdf"))


@dataclass
class Detector:
    """What predict, serve and export need to compute an unknown score and decide."""

    method: str
    k: int
    accept: float
    threshold: float
    # mean and standard deviation of each signal's out-of-fold scores on known training images
    norm: dict[str, tuple[float, float]]
    train_unit: np.ndarray = field(repr=False)  # (n_train, d) L2-normalised training features
    # the combined scores of the known images the threshold was set on: the training images' out-of-fold ones
    # (a head), or the held-out validation images' (a fine-tuning run)
    oof_scores: np.ndarray = field(repr=False)

    def signals(self, features: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
        """Each signal's z-score (knn, msp) for raw features and calibrated probabilities."""
        raw = {"msp": confidence_score(proba)}
        if self.method != "msp":
            raw["knn"] = knn_distance(unit_rows(features), self.train_unit, self.k)
        return {name: (value - self.norm[name][0]) / self.norm[name][1] for name, value in raw.items()}

    def score(self, features: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """The unknown score: higher is less like the training images; above `threshold` is unknown."""
        z = self.signals(features, proba)
        return combine(z, self.method)

    def threshold_for(self, accept: float) -> float:
        """The threshold that accepts `accept` of the known images it was fitted on (out of fold, or held out)."""
        return accept_threshold(self.oof_scores, accept)

    def digest(self) -> str:
        """A digest of the stored arrays (recorded in head.json, so the fingerprint covers them)."""
        import hashlib

        blob = self.train_unit.astype(np.float16).tobytes() + self.oof_scores.astype(np.float32).tobytes()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The head.json entry: method, threshold, accept rate and normalisation (arrays live in their file)."""
        return {
            "method": self.method,
            "k": self.k,
            "accept": self.accept,
            "threshold": self.threshold,
            "norm": {name: list(v) for name, v in self.norm.items()},
            "n_train": len(self.oof_scores),
            "digest": self.digest(),
        }


def combine(z: dict[str, np.ndarray], method: str) -> np.ndarray:
    """One score from the signals' z-scores: their sum, or the one the method names."""
    if method == "combined":
        return z["msp"] + z["knn"]
    return z[method]


def _norm(values: np.ndarray, signal: str) -> tuple[float, float]:
    return float(np.mean(values)), max(float(np.std(values)), SPREAD_FLOOR[signal])


def fit_detector(
    train_features: np.ndarray,
    groups: np.ndarray,
    oof_proba: np.ndarray,
    *,
    accept: float = DEFAULT_ACCEPT,
    method: str = DEFAULT_METHOD,
    k: int = DEFAULT_K,
) -> Detector:
    """Fit the detector on the training part: its features, groups and calibrated out-of-fold probabilities."""
    unit = unit_rows(train_features)
    reference = as_stored(unit)
    raw = {"msp": confidence_score(oof_proba)}
    if method != "msp":
        groups = np.asarray(groups)
        _, codes = np.unique(groups, return_inverse=True)
        raw["knn"] = knn_distance(unit, reference, k, codes, codes)
    return _fitted(reference, raw, accept, method, k)


def fit_detector_held_out(
    train_features: np.ndarray,
    held_features: np.ndarray,
    held_proba: np.ndarray,
    *,
    accept: float = DEFAULT_ACCEPT,
    method: str = DEFAULT_METHOD,
    k: int = DEFAULT_K,
) -> Detector:
    """Fit the detector from known images kept out of training (a fine-tuning run's validation part): the
    training features are the reference, the held-out images' signals (their calibrated probabilities, their
    distance to the training features, as a new image's) set the z-scores and the threshold."""
    reference = as_stored(unit_rows(train_features))
    raw = {"msp": confidence_score(held_proba)}
    if method != "msp":
        raw["knn"] = knn_distance(unit_rows(held_features), reference, k)
    return _fitted(reference, raw, accept, method, k)


def as_stored(unit: np.ndarray) -> np.ndarray:
    """The training features as a saved detector keeps them (float16 values, as float32). The known images'
    distances are measured to these, as a new image's are: with the knn spread near its floor, distances to the
    unrounded features moved the scores of a fine-tuned model's validation images by 0.04 against the threshold."""
    return unit.astype(np.float16).astype(np.float32)


def _fitted(reference: np.ndarray, raw: dict[str, np.ndarray], accept: float, method: str, k: int) -> Detector:
    """The detector from the known images' raw signals: each z-scored, combined, the threshold their quantile."""
    norm = {name: _norm(values, name) for name, values in raw.items()}
    known = combine({name: (values - norm[name][0]) / norm[name][1] for name, values in raw.items()}, method)
    stored = reference if method != "msp" else np.zeros((0, reference.shape[1]), np.float32)
    return Detector(method, k, accept, accept_threshold(known, accept), norm, stored, known.astype(np.float32))


def save_detector(detector: Detector, path: Path) -> None:
    """The arrays to an .npz file (training features in float16: half the size, cosines to 1e-3)."""
    with open(path, "wb") as handle:
        np.savez(
            handle, train_unit=detector.train_unit.astype(np.float16), oof_scores=detector.oof_scores.astype(np.float32)
        )


def load_detector(entry: dict[str, Any], path: Path) -> Detector:
    """The detector a head.json "unknown" entry describes, with its arrays from path (checked by digest)."""
    from .errors import UserError

    try:
        with np.load(path, allow_pickle=False) as arrays:
            train_unit, oof = arrays["train_unit"].astype(np.float32), arrays["oof_scores"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path} is missing or damaged ({exc}); fit the head again.") from None
    detector = Detector(
        entry["method"],
        int(entry["k"]),
        float(entry["accept"]),
        float(entry["threshold"]),
        {name: (float(v[0]), float(v[1])) for name, v in entry["norm"].items()},
        train_unit,
        oof,
    )
    if entry.get("digest") and detector.digest() != entry["digest"]:
        raise UserError(f"{path} does not match its head.json (digest differs); fit the head again.")
    return detector
