"""scikit-learn heads on cached features: honest splits, C chosen by grouped CV, persistence with metadata.

No TensorFlow here: fitting a head on a cache takes seconds, not a TensorFlow start-up.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .cache import FeatureCache, load
from .errors import UserError
from .params import Interval, Options, as_number, check_params
from .report import classification_metrics, save_metrics
from .splits import Split, cv_splits, split_rows

CLASSIFIERS = ("logreg", "svm", "rbf-svm", "knn")
HEAD_FORMAT_VERSION = 2  # 2: head.skops; 1: head.joblib (a pickle)
# The hyper-parameter each classifier sweeps, and its grid (log-spaced; for knn, the neighbour count k).
GRIDS: dict[str, tuple[str, list[float]]] = {
    "logreg": ("clf__C", np.logspace(-4, 2, 9).tolist()),
    "svm": ("clf__estimator__C", np.logspace(-6, 0, 9).tolist()),
    "rbf-svm": ("clf__C", np.logspace(-1, 3, 9).tolist()),
    "knn": ("clf__n_neighbors", [1, 3, 5, 7, 9, 15, 21, 31]),
}
HEAD_CONSTRAINTS = {
    "clf": [Options(CLASSIFIERS)],
    "cv": [Interval(2, 50, integer=True)],
    "n_jobs": [Interval(-1, -1, integer=True), Interval(1, 256, integer=True)],
    "class_weight": [Options(("balanced",)), None],
    "seed": [Interval(0, 2**32 - 1, integer=True)],
    "test_size": [Interval(0.01, 0.9)],
    "group_near_duplicates": [Interval(0.5, 1.0), None],
    "accept": [Interval(0.01, 1.0), None],
}


def make_pipeline(clf: str, l2_normalize: bool = True, class_weight: str | None = None, seed: int = 0):
    """The scikit-learn Pipeline for one classifier: [L2 normalisation], StandardScaler, classifier.

    Solvers are chosen for small n and wide features: multinomial logistic regression by L-BFGS;
    the linear SVM is one-vs-rest libsvm with a linear kernel (its cost does not explode at large C
    on separable data the way liblinear's dual solver does); probabilities for SVMs come from
    sigmoid calibration at the final fit (see fit_head).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import SVC

    estimator = {
        "logreg": lambda: LogisticRegression(max_iter=2000, tol=1e-4, class_weight=class_weight),
        "svm": lambda: OneVsRestClassifier(SVC(kernel="linear", class_weight=class_weight, random_state=seed)),
        "rbf-svm": lambda: SVC(kernel="rbf", gamma="scale", class_weight=class_weight, random_state=seed),
        "knn": lambda: KNeighborsClassifier(weights="distance"),
    }[clf]()
    steps = ([("l2", Normalizer())] if l2_normalize else []) + [("scale", StandardScaler()), ("clf", estimator)]
    return Pipeline(steps)


def best_index(score: np.ndarray, tie_break: np.ndarray | None) -> int:
    """The grid point with the best mean CV score; ties go to the best tie_break score, else the middle one.

    Separable features give many grid points the same accuracy; the smallest C among them would
    be the most regularised head, with needlessly flat probabilities.
    """
    tied = np.flatnonzero(score >= score.max() - 1e-12)
    if tie_break is not None:
        return int(tied[np.argmax(tie_break[tied])])
    return int(tied[len(tied) // 2])


# -- fitting on arrays ----------------------------------------------------------------------------
@dataclass
class FittedHead:
    """A head fitted on arrays: the pipeline, the value CV chose, and the out-of-fold evidence."""

    model: Any
    clf: str
    options: dict[str, Any]
    best_params: dict[str, float]
    cv_score: float
    cv_scoring: str
    cv_folds: int
    cv_grid: list[float]
    cv_proba: np.ndarray | None  # out-of-fold probabilities of the training rows at the chosen value
    fit_seconds: float
    temperature: float | None = None  # calibration: probabilities are softmax(log(p) / temperature)
    detector: Any = None  # openset.Detector, or None when fitted with accept=None
    unknown_seconds: float = 0.0  # of fit_seconds, the time calibration and the detector took

    def calibrate(self, proba: np.ndarray) -> np.ndarray:
        """The model's probabilities, calibrated (unchanged without a temperature)."""
        from .calibration import apply_temperature

        return proba if self.temperature is None else apply_temperature(proba, self.temperature)


def _score(y_true: np.ndarray, y_pred: np.ndarray, balanced: bool) -> float:
    if not balanced:
        return float(np.mean(y_true == y_pred))
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


# Where each SVM pipeline's kernel is set.
KERNEL_PARAM = {"svm": "estimator__kernel", "rbf-svm": "kernel"}
# A fold's training kernel matrix is computed whole up to this size (float64: about 8,000 training
# images); above it libsvm evaluates the kernel itself, within its own bounded cache, as it always could.
KERNEL_MATRIX_BYTES = 512 << 20


def svm_kernel_matrices(clf: str, train_x: np.ndarray, val_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel of make_pipeline's SVM for clf, as (train x train, val x train) matrices in float64
    (what libsvm computes in): linear, or RBF with SVC's gamma="scale" taken from train_x."""
    a, b = train_x.astype(np.float64), val_x.astype(np.float64)
    if clf == "svm":
        return a @ a.T, b @ a.T
    from sklearn.metrics.pairwise import rbf_kernel

    variance = a.var()
    gamma = 1.0 / (a.shape[1] * variance) if variance != 0 else 1.0
    return rbf_kernel(a, a, gamma=gamma), rbf_kernel(b, a, gamma=gamma)


def _fold_sweep(clf: str, X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, grid: list[float],
                n_classes: int, l2_normalize: bool, class_weight: str | None, seed: int) -> list[np.ndarray]:
    """One fold: the transform fitted once, then every grid value; returns, per value, the validation
    probabilities (n_val, n_classes) for logreg and knn, or for SVMs the predicted labels (n_val,) and
    decision values (for the out-of-fold probabilities that calibration and the unknown detector need).

    Logistic regression walks the grid from strong to weak regularisation, each fit warm-started from
    the previous coefficients (the regularisation path, as LogisticRegressionCV does). SVMs get their
    kernel matrix computed once per fold: libsvm would evaluate the same kernel afresh for every value
    and every one-vs-rest class (the same predictions, 8x faster on 800 images x 1280 features).
    """
    pipeline = make_pipeline(clf, l2_normalize, class_weight, seed)
    transform, estimator = pipeline[:-1], pipeline.steps[-1][1]
    train_x = transform.fit_transform(X[train])
    val_x = transform.transform(X[val])
    outputs = []
    if clf == "logreg":
        estimator.set_params(warm_start=True)
    if clf in KERNEL_PARAM and 8 * len(train) ** 2 <= KERNEL_MATRIX_BYTES:
        train_x, val_x = svm_kernel_matrices(clf, train_x, val_x)
        estimator.set_params(**{KERNEL_PARAM[clf]: "precomputed"})
    param = GRIDS[clf][0].split("__", 1)[1]
    for value in grid:
        estimator.set_params(**{param: value})
        estimator.fit(train_x, y[train])
        if clf in ("logreg", "knn"):
            proba = np.zeros((len(val), n_classes))
            proba[:, estimator.classes_] = estimator.predict_proba(val_x)
            outputs.append(proba)
        else:
            outputs.append((estimator.predict(val_x), estimator.decision_function(val_x)))
    return outputs


def sigmoid_calibrated_proba(calibrated: Any, decision: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities of decision values through a fitted CalibratedClassifierCV's sigmoids, normalised as
    scikit-learn does (binary: p0 = 1 - p1; otherwise divided by their sum)."""
    calibrators = calibrated.calibrated_classifiers_[0].calibrators
    d = np.asarray(decision, dtype=np.float64).reshape(len(decision), -1)
    if n_classes == 2:
        p1 = calibrators[0].predict(d[:, 0])
        return np.stack([1 - p1, p1], axis=1)
    proba = np.stack([c.predict(d[:, k]) for k, c in enumerate(calibrators)], axis=1)
    total = proba.sum(axis=1, keepdims=True)
    return np.divide(proba, total, out=np.full_like(proba, 1 / n_classes), where=total != 0)


def fit_arrays(X: np.ndarray, y: np.ndarray, groups: np.ndarray, class_names: Sequence[str], clf: str = "logreg",
               *, cv: int = 5, n_jobs: int = -1, class_weight: str | None = None, seed: int = 0,
               l2_normalize: bool = True, accept: float | None = 0.95,
               log: Callable[[str], None] = print) -> FittedHead:
    """Choose C (or k) by grouped, stratified CV on (X, y), then refit on all of it. No file is touched.

    groups: rows of one group (identical files, near-duplicates) stay in one fold. From the out-of-fold
    probabilities, a temperature calibrates the head, and (unless accept is None) an unknown detector
    is fitted whose threshold accepts that share of known images (pipeline.openset).
    """
    check_params(dict(clf=clf, cv=cv, n_jobs=n_jobs, class_weight=class_weight, seed=seed, accept=accept),
                 HEAD_CONSTRAINTS)
    from joblib import Parallel, delayed
    from sklearn import linear_model, model_selection, multiclass, neighbors, svm  # noqa: F401
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()  # after the imports: fit_seconds is the fit, not scikit-learn's one-off import
    folds = cv_splits(y, groups, cv, seed, class_names, log)
    param, grid = GRIDS[clf]
    if clf == "knn":  # k cannot exceed the smallest training fold
        grid = [k for k in grid if k <= min(len(tr) for tr, _ in folds)]
    n_classes = len(class_names)
    balanced = class_weight == "balanced"
    workers = min(n_jobs if n_jobs > 0 else os.cpu_count() or 1, len(folds))
    has_proba = clf in ("logreg", "knn")
    # threads: the solvers spend their time in BLAS and Fortran with the GIL released, and threads
    # spare the process start-up and the copy of X that worker processes would cost. BLAS runs on one
    # thread throughout, refit included: the folds are the parallelism, and on a head's small matrices
    # BLAS threads of its own only spin (OpenBLAS on 2 threads made a 200-image logreg sweep 6x slower)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        per_fold = Parallel(n_jobs=workers, prefer="threads")(
            delayed(_fold_sweep)(clf, X, y, tr, va, grid, n_classes, l2_normalize, class_weight, seed)
            for tr, va in folds)
        scores = np.zeros((len(folds), len(grid)))
        log_loss = np.zeros((len(folds), len(grid)))
        for f, ((_, va), outputs) in enumerate(zip(folds, per_fold)):
            for g, out in enumerate(outputs):
                predicted = out.argmax(1) if has_proba else out[0]
                scores[f, g] = _score(y[va], predicted, balanced)
                if has_proba:
                    log_loss[f, g] = -np.mean(np.log(np.clip(out[np.arange(len(va)), y[va]], 1e-15, None)))
        best = best_index(scores.mean(0), -log_loss.mean(0) if has_proba else None)
        model = make_pipeline(clf, l2_normalize, class_weight, seed).set_params(**{param: grid[best]})
        if clf in ("svm", "rbf-svm"):
            from sklearn.calibration import CalibratedClassifierCV

            # probabilities: one SVM on the whole training part, sigmoid-calibrated on cross-validated scores
            calibrated = CalibratedClassifierCV(model.steps[-1][1], method="sigmoid", cv=folds, ensemble=False)
            model.steps[-1] = ("clf", calibrated)
        model.fit(X, y)
    cv_proba = np.zeros((len(y), n_classes))
    for (_, va), outputs in zip(folds, per_fold):
        cv_proba[va] = outputs[best] if has_proba else \
            sigmoid_calibrated_proba(model.steps[-1][1], outputs[best][1], n_classes)
    unknown_started = time.perf_counter()
    temperature, detector = fit_unknown(X, groups, y, cv_proba, accept)
    options = dict(clf=clf, l2_normalize=l2_normalize, class_weight=class_weight, seed=seed, cv=cv)
    ended = time.perf_counter()
    return FittedHead(model, clf, options, {param.split("__")[-1]: grid[best]}, float(scores.mean(0)[best]),
                      "balanced_accuracy" if balanced else "accuracy", len(folds), [float(v) for v in grid],
                      cv_proba, ended - started, temperature, detector, ended - unknown_started)


def fit_unknown(X: np.ndarray, groups: np.ndarray, y: np.ndarray, oof_proba: np.ndarray,
                accept: float | None) -> tuple[float, Any]:
    """The temperature fitted on out-of-fold probabilities, and the unknown detector (None if accept is None).

    The one place every head gets both (fit-head, the study's winner, and any caller of fit_arrays).
    """
    from .calibration import apply_temperature, fit_temperature
    from .openset import fit_detector

    temperature = fit_temperature(oof_proba, y)
    if accept is None:
        return temperature, None
    return temperature, fit_detector(X, groups, apply_temperature(oof_proba, temperature), accept=accept)


# -- fit-head: a cache in, a head folder out -------------------------------------------------------
@dataclass
class HeadResult:
    """What fit_head produced."""

    folder: Path
    metrics: dict[str, Any]
    split: Split


def default_head_dir(cache_path: Path, clf: str) -> Path:
    """heads/<cache name>-<clf>/"""
    return Path("heads") / f"{Path(cache_path).stem}-{clf}"


def near_duplicate_links(cache: FeatureCache, threshold: float) -> list[tuple[int, int]]:
    """Row pairs whose features are nearly identical (cosine >= threshold), to keep on one side."""
    from .neighbours import near_duplicate_pairs

    i, j, _ = near_duplicate_pairs(cache.features, threshold)
    return list(zip(i.tolist(), j.tolist()))


def fit_head(cache_path: str | os.PathLike, clf: str = "logreg", *, cv: int = 5, n_jobs: int = -1,
             class_weight: str | None = None, seed: int = 0, test_size: float = 0.2,
             l2_normalize: bool = True, group_near_duplicates: float | None = None,
             accept: float | str | None = 0.95,
             out: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> HeadResult:
    """Choose the classifier's C (or k) by grouped CV on the training part, refit, evaluate on the test part.

    The head is calibrated, and gets an unknown detector accepting `accept` of known images (None: none).
    """
    accept = as_number("accept", accept)
    check_params(dict(clf=clf, cv=cv, n_jobs=n_jobs, class_weight=class_weight, seed=seed, test_size=test_size,
                      group_near_duplicates=group_near_duplicates, accept=accept), HEAD_CONSTRAINTS)
    cache = load(cache_path)
    if len(cache) == 0:
        raise UserError(f"{cache_path} holds no features; run extract on a folder with readable images.")
    links = near_duplicate_links(cache, group_near_duplicates) if group_near_duplicates is not None else ()
    split = split_rows(cache, test_size, seed, links)
    if len(split.test) == 0:
        raise UserError("no test images: every class has a single image (or group of identical images).")
    X, y = cache.features, cache.labels
    fitted = fit_arrays(X[split.train], y[split.train], split.group[split.train], cache.class_names, clf, cv=cv,
                        n_jobs=n_jobs, class_weight=class_weight, seed=seed, l2_normalize=l2_normalize,
                        accept=accept, log=log)
    fitted.options.update(test_size=test_size, group_near_duplicates=group_near_duplicates)
    test_proba = fitted.model.predict_proba(X[split.test])
    folder = Path(out) if out else default_head_dir(Path(cache_path), clf)
    metrics = save_head(folder, fitted, cache, split, test_proba,
                        {"near_duplicate_links": len(links)} if group_near_duplicates is not None else {},
                        test_features=X[split.test])
    return HeadResult(folder, metrics, split)


# -- persistence ----------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import sklearn

    return {"cnncodes": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def rows_digest(cache: FeatureCache, rows: np.ndarray) -> str:
    """A digest of which images (content, label, split) a head was trained and tested on."""
    import hashlib

    blob = "\n".join(f"{cache.content_hash[i]} {cache.labels[i]} {cache.split[i]}" for i in np.sort(rows))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibration_metrics(fitted: FittedHead, raw_test_proba: np.ndarray, y_test: np.ndarray,
                        test_features: np.ndarray | None) -> dict[str, Any]:
    """ECE before and after calibration, the reliability table, and the unknown rate on the test part."""
    from .calibration import expected_calibration_error, reliability

    proba = fitted.calibrate(raw_test_proba)
    out: dict[str, Any] = {
        "ece_uncalibrated": expected_calibration_error(raw_test_proba, y_test),
        "ece": expected_calibration_error(proba, y_test), "temperature": fitted.temperature,
        "reliability": reliability(proba, y_test), "reliability_uncalibrated": reliability(raw_test_proba, y_test),
    }
    if fitted.detector is not None and test_features is not None:
        unknown = fitted.detector.score(test_features, proba) > fitted.detector.threshold
        correct = proba.argmax(1) == y_test
        out["unknown"] = {"method": fitted.detector.method, "accept": fitted.detector.accept,
                          "threshold": fitted.detector.threshold, "test_unknown_rate": float(unknown.mean()),
                          "n_unknown": int(unknown.sum()), "n_accepted": int((~unknown).sum()),
                          "accepted_accuracy": float(correct[~unknown].mean()) if (~unknown).any() else 0.0}
        out["unknown_seconds"] = fitted.unknown_seconds
    return out


def save_head(folder: str | os.PathLike, fitted: FittedHead, cache: FeatureCache, split: Split,
              test_proba: np.ndarray, extra_metrics: dict[str, Any] | None = None,
              test_features: np.ndarray | None = None) -> dict[str, Any]:
    """Write a head folder whole (staged, then swapped in): head.json, head.skops, metrics.json, the
    per-image test predictions, the out-of-fold training predictions, the unknown detector's arrays, the PNG.

    test_proba is the model's own; what is written is calibrated. Returns the metrics."""
    import skops.io

    from .artifacts import (CV_PREDICTIONS_CSV, HEAD_JSON, HEAD_MODEL, PREDICTIONS_CSV, UNKNOWN_NPZ,
                            chain_fingerprint, predictions_from_rows, staged_folder, write_json, write_predictions)

    y_test = cache.labels[split.test]
    calibration = calibration_metrics(fitted, test_proba, y_test, test_features)
    test_proba = fitted.calibrate(test_proba)
    metrics = classification_metrics(y_test, test_proba.argmax(1), cache.class_names, seed=fitted.options["seed"])
    metrics.update({
        "method": f"{fitted.clf} head", "clf": fitted.clf, "best_params": fitted.best_params,
        "cv_score": fitted.cv_score, "cv_scoring": fitted.cv_scoring, "cv_folds": fitted.cv_folds,
        "cv_grid": fitted.cv_grid, "fit_seconds": fitted.fit_seconds, "train_seconds": fitted.fit_seconds,
        "n_train": int(len(split.train)), "split": split.source, "split_notes": split.notes,
        "duplicate_groups": split.duplicate_groups, "leaked_groups": split.leaked_groups,
        "seed": fitted.options["seed"], **calibration, **(extra_metrics or {}),
    })
    cache_fingerprint = cache.attrs["fingerprint"]
    detector = fitted.detector.describe() if fitted.detector is not None else None
    fingerprint = chain_fingerprint(cache_fingerprint, options=fitted.options,
                                    rows=rows_digest(cache, np.concatenate([split.train, split.test])),
                                    **({"temperature": fitted.temperature} if fitted.temperature else {}),
                                    **({"unknown": detector} if detector else {}))
    metrics["fingerprint"] = fingerprint
    meta = {
        "format_version": HEAD_FORMAT_VERSION, "kind": "head", "fingerprint": fingerprint,
        "cache_fingerprint": cache_fingerprint, "classes": cache.class_names, "identity": cache.identity,
        "backbone_config": json.loads(cache.attrs["config_json"]),
        "feature_dim": int(cache.features.shape[1]), "cache_path": str(Path(cache.path).resolve()),
        "dataset_root": cache.attrs.get("dataset_root", ""), "options": fitted.options,
        "metrics": {k: metrics[k] for k in ("accuracy", "accuracy_ci", "balanced_accuracy", "macro_f1",
                                            "cv_score", "best_params")},
        "versions": _versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # optional keys: heads written before them load as uncalibrated and without a detector
    if fitted.temperature is not None:
        meta["calibration"] = {"method": "temperature", "temperature": fitted.temperature,
                               "fitted_on": "out-of-fold predictions of the training part",
                               "ece_uncalibrated": calibration["ece_uncalibrated"], "ece": calibration["ece"]}
    if detector is not None:
        meta["unknown"] = {**detector, "file": UNKNOWN_NPZ}
    rows = dict(paths=cache.paths, content_hash=cache.content_hash, split=cache.split, labels=cache.labels,
                class_names=cache.class_names)
    with staged_folder(folder) as stage:
        skops.io.dump(fitted.model, stage / HEAD_MODEL)
        write_json(stage / HEAD_JSON, meta)
        write_predictions(stage / PREDICTIONS_CSV, predictions_from_rows(split.test, test_proba, **rows))
        if fitted.cv_proba is not None:
            write_predictions(stage / CV_PREDICTIONS_CSV,
                              predictions_from_rows(split.train, fitted.calibrate(fitted.cv_proba), **rows))
        if fitted.detector is not None:
            from .openset import save_detector

            save_detector(fitted.detector, stage / UNKNOWN_NPZ)
        save_metrics(metrics, stage)
    return metrics


@dataclass
class Head:
    """A fitted head and the facts it was trained on."""

    folder: Path
    model: Any
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def check_features(self, identity: dict[str, Any], dim: int, source: str) -> None:
        """Refuse features from another backbone, layer, pooling, size or width."""
        from .cache import describe_mismatch

        if dim != self.meta["feature_dim"] or identity != self.meta["identity"]:
            differences = describe_mismatch(self.meta["identity"], identity)
            if dim != self.meta["feature_dim"]:
                differences = f"feature width: {self.meta['feature_dim']} -> {dim}; " + differences
            raise UserError(f"head {self.folder} was trained on other features than {source} "
                            f"({differences.rstrip('; ')}). Fit a head on a cache of this configuration.")

    @property
    def temperature(self) -> float | None:
        """The calibration's temperature; None for heads saved before calibration existed."""
        return self.meta.get("calibration", {}).get("temperature")

    @property
    def detector(self) -> Any:
        """The unknown detector (openset.Detector, loaded once), or None: a head saved without one."""
        if "unknown" not in self.meta:
            return None
        if "_detector" not in self.__dict__:
            from .artifacts import UNKNOWN_NPZ
            from .openset import load_detector

            self.__dict__["_detector"] = load_detector(self.meta["unknown"], self.folder / UNKNOWN_NPZ)
        return self.__dict__["_detector"]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (calibrated when the head has a temperature), after checking the feature width."""
        if features.ndim != 2 or features.shape[1] != self.meta["feature_dim"]:
            raise UserError(f"head {self.folder} expects {self.meta['feature_dim']} features per image, "
                            f"got shape {features.shape}.")
        proba = self.model.predict_proba(features)
        if self.temperature is None:
            return proba
        from .calibration import apply_temperature

        return apply_temperature(proba, self.temperature)

    def unknown_scores(self, features: np.ndarray, proba: np.ndarray) -> np.ndarray | None:
        """The unknown score of each image from its features and calibrated probabilities; None: no detector."""
        detector = self.detector
        return None if detector is None else detector.score(features, proba)


# Every type a head pipeline may hold; a head.skops asking for anything else is refused unread.
TRUSTED_TYPES = frozenset({
    "sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.Normalizer",
    "sklearn.preprocessing._data.StandardScaler", "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.multiclass.OneVsRestClassifier", "sklearn.svm._classes.SVC",
    "sklearn.neighbors._classification.KNeighborsClassifier", "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
    "sklearn.preprocessing._label.LabelBinarizer", "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree", "builtins.slice",
})


def _load_skops(path: Path) -> Any:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged or foreign file: skops raises zip, JSON and key errors
        raise UserError(f"{path} is not a readable skops head ({type(exc).__name__}: {exc}); fit the head again.") \
            from None
    refused = sorted(set(untrusted) - TRUSTED_TYPES)
    if refused:
        raise UserError(f"{path} asks to load types a head never holds ({', '.join(refused)}); refused. "
                        "Fit the head again with `fit-head`.")
    return skops.io.load(path, trusted=sorted(untrusted))


def load_head(folder: str | os.PathLike, trust_pickle: bool = False) -> Head:
    """Load a head folder: head.json and head.skops (types checked against TRUSTED_TYPES).

    A format-1 head (head.joblib, a pickle that can run code when loaded) loads only with trust_pickle.
    """
    from .artifacts import HEAD_JSON, HEAD_MODEL, LEGACY_HEAD_MODEL, read_json, recover_folder

    folder = Path(folder)
    recover_folder(folder)
    meta_path = folder / HEAD_JSON
    meta = read_json(meta_path, "--head must be a folder written by `fit-head`")
    version = meta.get("format_version")
    if version == 1:
        model_path = folder / LEGACY_HEAD_MODEL
        if not trust_pickle:
            raise UserError(f"{folder} is an old head saved as a pickle ({LEGACY_HEAD_MODEL}), which can run "
                            "code when loaded. Fit it again, or pass --trust-pickle if you made it yourself.")
    elif version == HEAD_FORMAT_VERSION:
        model_path = folder / HEAD_MODEL
    else:
        raise UserError(f"{folder} has head format {version!r}; expected {HEAD_FORMAT_VERSION}. Fit the head again.")
    if not model_path.is_file():
        raise UserError(f"{model_path} is missing; --head must be a folder written by `fit-head`.")
    trained_with = meta.get("versions", {}).get("scikit-learn")
    if trained_with and trained_with != _versions()["scikit-learn"]:
        warnings.warn(f"head {folder} was saved with scikit-learn {trained_with}, this is "
                      f"{_versions()['scikit-learn']}; predictions may differ or fail.", stacklevel=2)
    if version == 1:
        import joblib

        model = joblib.load(model_path)
    else:
        model = _load_skops(model_path)
    if list(getattr(model, "classes_", range(len(meta["classes"])))) != list(range(len(meta["classes"]))):
        raise UserError(f"{model_path} does not match {meta_path} (classes differ); fit the head again.")
    return Head(folder, model, meta)
