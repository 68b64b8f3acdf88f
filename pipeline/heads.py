"""scikit-learn heads on cached features: honest splits, C chosen by grouped CV, persistence with metadata.

No TensorFlow here: fitting a head on a cache takes seconds, not a TensorFlow start-up.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .cache import FeatureCache
from .errors import UserError
from .lean_imports import import_skops_io
from .metrics import classification_metrics, save_metrics
from .params import Interval, Options, as_number, check_params, define
from .splits import Split, cv_splits, rows_of_hash_pairs, split_rows

logger = logging.getLogger(__name__)

CLASSIFIERS = ("logreg", "svm", "rbf-svm", "knn")
HEAD_FORMAT_VERSION = 2  # 2: head.skops; 1: head.joblib (a pickle)
# What head.json must hold, key -> (the JSON type, required); load_head checks it before anything else.
# Keys not named here are allowed (later versions add their own: calibration, an unknown detector).
HEAD_SCHEMA: dict[str, tuple[type, bool]] = {
    "format_version": (int, True),
    "classes": (list, True),
    "backbone_config": (dict, True),
    "identity": (dict, True),
    "feature_dim": (int, True),
    "options": (dict, True),
    "cache_path": (str, True),
    "dataset_root": (str, True),
    "fingerprint": (str, True),
    "cache_fingerprint": (str, False),
    "kind": (str, False),
    "metrics": (dict, False),
    "versions": (dict, False),
    "written_at": (str, False),
    # sha256 of head.skops and of the class names, one per line (heads saved before them have neither)
    "model_sha256": (str, False),
    "classes_sha256": (str, False),
}
# The hyper-parameter each classifier sweeps, and its grid (log-spaced; for knn, the neighbour count k).
GRIDS: dict[str, tuple[str, list[float]]] = {
    "logreg": ("clf__C", np.logspace(-4, 2, 9).tolist()),
    "svm": ("clf__estimator__C", np.logspace(-6, 0, 9).tolist()),
    "rbf-svm": ("clf__C", np.logspace(-1, 3, 9).tolist()),
    "knn": ("clf__n_neighbors", [1, 3, 5, 7, 9, 15, 21, 31]),
}
define(
    clf=[Options(CLASSIFIERS)],
    class_weight=[Options(("balanced",)), None],
    group_near_duplicates=[Interval(0, 0), Interval(0.5, 1.0), None],
    accept=[Interval(0.01, 1.0), None],
)
# fit-head and study keep near-duplicates on one side of the split by default: the audit's whitened
# cosine at its threshold (see pipeline/neighbours.py); 0 or None turns the grouping off.
NEAR_DUPLICATES = 0.55
# Narrower features are not searched: unrelated whitened rows have cosines spread about 1/sqrt(width),
# so below 64 dimensions chance pairs pass 0.55 (4.4 spreads at 64, 14 at Lite0's 1280).
NEAR_DUPLICATE_MIN_WIDTH = 64


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


def _fold_sweep(
    clf: str,
    X: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    grid: list[float],
    n_classes: int,
    l2_normalize: bool,
    class_weight: str | None,
    seed: int,
) -> list[np.ndarray]:
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


def _report_convergence(
    caught: Sequence[warnings.WarningMessage], n_sweep: int, clf: str, log: Callable[[str], None]
) -> None:
    """Say when the solver stopped before converging: in how many CV fits, and whether in the final fit."""
    from sklearn.exceptions import ConvergenceWarning

    flags = [issubclass(w.category, ConvergenceWarning) for w in caught]
    in_sweep, in_refit = sum(flags[:n_sweep]), any(flags[n_sweep:])
    if in_sweep or in_refit:
        where = " and ".join(
            part for part, hit in ((f"{in_sweep} CV fit(s)", in_sweep), ("the final fit", in_refit)) if hit
        )
        log(
            f"warning: the {clf} solver stopped before converging in {where}; its scores may be slightly off "
            "(unscaled or nearly separable features usually cause it)."
        )


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


def fit_arrays(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    clf: str = "logreg",
    *,
    cv: int = 5,
    n_jobs: int = -1,
    class_weight: str | None = None,
    seed: int = 0,
    l2_normalize: bool = True,
    accept: float | None = 0.95,
    scored: np.ndarray | None = None,
    log: Callable[[str], None] = logger.info,
) -> FittedHead:
    """Choose C (or k) by grouped, stratified CV on (X, y), then refit on all of it. No file is touched.

    groups: rows of one group (identical files, near-duplicates, an image's augmented views) stay in one fold.
    scored: a mask of the rows CV scores (the clean images, not their augmented views); default all. From the
    out-of-fold probabilities of the scored rows, a temperature calibrates the head, and (unless accept is
    None) an unknown detector is fitted whose threshold accepts that share of known images (pipeline.openset).
    """
    check_params(dict(clf=clf, cv=cv, n_jobs=n_jobs, class_weight=class_weight, seed=seed, accept=accept))
    from joblib import Parallel, delayed
    from sklearn import linear_model, model_selection, multiclass, neighbors, svm  # noqa: F401
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()  # after the imports: fit_seconds is the fit, not scikit-learn's one-off import
    folds = cv_splits(y, groups, cv, seed, class_names, log)
    if scored is not None:  # train on every row of the other folds, score on the clean rows of this one
        folds = [(tr, va[scored[va]]) for tr, va in folds]
    param, grid = GRIDS[clf]
    if clf == "knn":  # k cannot exceed the smallest training fold
        smallest = min(len(tr) for tr, _ in folds)
        if max(grid) > smallest:
            log(f"note: knn's k is swept up to {smallest}, the smallest training fold, not to {max(grid)}")
        grid = [k for k in grid if k <= smallest]
    n_classes = len(class_names)
    balanced = class_weight == "balanced"
    workers = min(n_jobs if n_jobs > 0 else os.cpu_count() or 1, len(folds))
    has_proba = clf in ("logreg", "knn")
    # threads: the solvers spend their time in BLAS and Fortran with the GIL released, and threads
    # spare the process start-up and the copy of X that worker processes would cost. BLAS runs on one
    # thread throughout, refit included: the folds are the parallelism, and on a head's small matrices
    # BLAS threads of its own only spin (OpenBLAS on 2 threads made a 200-image logreg sweep 6x slower)
    # Warnings are recorded here, on the main thread, around the worker threads (catch_warnings is process-wide
    # state): scikit-learn's small-fold notices stay quiet, a solver that did not converge is reported below.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always")
        per_fold = Parallel(n_jobs=workers, prefer="threads")(
            delayed(_fold_sweep)(clf, X, y, tr, va, grid, n_classes, l2_normalize, class_weight, seed)
            for tr, va in folds
        )
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
        n_sweep_warnings = len(caught)
        model.fit(X, y)
    _report_convergence(caught, n_sweep_warnings, clf, log)
    cv_proba = np.zeros((len(y), n_classes))
    for (_, va), outputs in zip(folds, per_fold):
        cv_proba[va] = (
            outputs[best] if has_proba else sigmoid_calibrated_proba(model.steps[-1][1], outputs[best][1], n_classes)
        )
    unknown_started = time.perf_counter()
    rows = scored if scored is not None else np.ones(len(y), bool)  # augmented views have no OOF predictions
    temperature, detector = fit_unknown(X[rows], groups[rows], y[rows], cv_proba[rows], accept)
    options = dict(clf=clf, l2_normalize=l2_normalize, class_weight=class_weight, seed=seed, cv=cv)
    ended = time.perf_counter()
    return FittedHead(
        model,
        clf,
        options,
        {param.split("__")[-1]: grid[best]},
        float(scores.mean(0)[best]),
        "balanced_accuracy" if balanced else "accuracy",
        len(folds),
        [float(v) for v in grid],
        cv_proba,
        ended - started,
        temperature,
        detector,
        ended - unknown_started,
    )


def fit_unknown(
    X: np.ndarray | None,
    groups: np.ndarray | None,
    y: np.ndarray,
    oof_proba: np.ndarray,
    accept: float | None,
    held_out_features: np.ndarray | None = None,
) -> tuple[float, Any]:
    """The temperature fitted on out-of-fold probabilities, and the unknown detector (None if accept is None).

    The one place a head, the study's winner and a fine-tuning run get both. A fine-tuning run has no
    out-of-fold predictions: it gives its validation part's (y, oof_proba) and features (held_out_features),
    and X, the training part's features, is then only the detector's reference (groups unused; X may be None
    when accept is None).
    """
    from .calibration import apply_temperature, fit_temperature
    from .openset import fit_detector, fit_detector_held_out

    temperature = fit_temperature(oof_proba, y)
    if accept is None:
        return temperature, None
    proba = apply_temperature(oof_proba, temperature)
    if held_out_features is not None:
        return temperature, fit_detector_held_out(X, held_out_features, proba, accept=accept)
    return temperature, fit_detector(X, groups, proba, accept=accept)


# -- fit-head: a cache in, a head folder out -------------------------------------------------------
@dataclass
class HeadResult:
    """What fit_head produced."""

    folder: Path
    metrics: dict[str, Any]
    split: Split


def default_head_dir(cache_path: Path, clf: str) -> Path:
    """heads/<cache name>-<clf>/ in the output home."""
    from .artifacts import output_dir

    return output_dir("heads") / f"{Path(cache_path).stem}-{clf}"


def near_duplicate_hash_pairs(
    features: np.ndarray, content_hash: Sequence[str], threshold: float | None
) -> list[tuple[str, str]]:
    """Content-hash pairs of images whose features are near-duplicates (the audit's whitened cosine >= threshold);
    none when threshold is 0 or None, or the features are narrower than NEAR_DUPLICATE_MIN_WIDTH. As hashes, the
    pairs apply to any other features of the same images."""
    if not threshold or features.shape[1] < NEAR_DUPLICATE_MIN_WIDTH:
        return []
    from .neighbours import near_duplicate_pairs

    i, j, _ = near_duplicate_pairs(features, threshold)
    return [
        (content_hash[a], content_hash[b]) for a, b in zip(i.tolist(), j.tolist()) if content_hash[a] != content_hash[b]
    ]


def near_duplicate_note(threshold: float | None, split: Split, width: int) -> str:
    """What the near-duplicate grouping did, in one line (printed by fit-head and study)."""
    if not threshold:
        return "near-duplicates not grouped (--group-near-duplicates 0): the test score may be optimistic."
    if width < NEAR_DUPLICATE_MIN_WIDTH:
        return f"near-duplicates not searched: {width} features are too few to tell them from chance."
    where = (
        "left as the folders put them (see LEAKAGE)"
        if split.source.startswith("folders")
        else "kept on one side of the split and of every CV fold"
    )
    return (
        f"near-duplicates (whitened cosine >= {threshold:g}): {split.near_duplicate_groups} groups {where}; "
        "--group-near-duplicates 0 turns this off."
    )


def split_with_test(
    cache: FeatureCache, test_size: float, seed: int, near_pairs: Sequence[tuple[str, str]] = ()
) -> Split:
    """The train/test split fit-head and the study use (near-duplicate pairs kept on one side); UserError when
    no image is left to test on."""
    split = split_rows(cache, test_size, seed, rows_of_hash_pairs(cache.content_hash, near_pairs))
    if len(split.test) == 0:
        raise UserError("no test images: every class has a single image (or group of identical images).")
    return split


def fit_on_split(
    cache: FeatureCache,
    split: Split,
    clf: str,
    views: np.ndarray | None = None,
    *,
    cv: int,
    n_jobs: int,
    seed: int,
    class_weight: str | None = None,
    l2_normalize: bool = True,
    accept: float | None = 0.95,
    log: Callable[[str], None] = logger.info,
) -> FittedHead:
    """The head of fit-head and of each study row: CV on the training part (with its augmented views, an
    (n_train, K, D) array, when given), calibration and the unknown detector; out-of-fold rows of the clean
    training images only."""
    X_fit, y_fit, g_fit, scored = training_rows(cache.features, cache.labels, split.group, split.train, views)
    fitted = fit_arrays(
        X_fit,
        y_fit,
        g_fit,
        cache.class_names,
        clf,
        cv=cv,
        n_jobs=n_jobs,
        class_weight=class_weight,
        seed=seed,
        l2_normalize=l2_normalize,
        accept=accept,
        scored=scored,
        log=log,
    )
    if fitted.cv_proba is not None:
        fitted.cv_proba = fitted.cv_proba[: len(split.train)]
    return fitted


def fit_head(
    cache_path: str | os.PathLike | Sequence[str | os.PathLike],
    clf: str = "logreg",
    *,
    cv: int = 5,
    n_jobs: int = -1,
    class_weight: str | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    l2_normalize: bool = True,
    group_near_duplicates: float | None = NEAR_DUPLICATES,
    views: bool = False,
    accept: float | str | None = 0.95,
    out: str | os.PathLike | None = None,
    log: Callable[[str], None] = logger.info,
) -> HeadResult:
    """Choose the classifier's C (or k) by grouped CV on the training part, refit, evaluate on the test part.

    cache_path: one cache, or several (their rows joined by content hash, see pipeline.sources).
    group_near_duplicates: keep near-duplicates (as the audit finds them, on the first source's features)
    on one side of the split and of every fold; 0 or None: byte-identical files only.
    views: also train on the cached augmented views of the training images (extract --views K); CV scores and
    the test part use the clean images only.
    accept: the share of known images the unknown detector's threshold accepts (None: no detector; the head is
    calibrated either way).
    """
    accept = as_number("accept", accept)
    check_params(
        dict(
            clf=clf,
            cv=cv,
            n_jobs=n_jobs,
            class_weight=class_weight,
            seed=seed,
            test_size=test_size,
            group_near_duplicates=group_near_duplicates,
            accept=accept,
        )
    )
    from .sources import join_caches

    paths = [cache_path] if isinstance(cache_path, (str, os.PathLike)) else list(cache_path)
    cache, sources = join_caches(paths, log)
    if len(cache) == 0:
        raise UserError(f"{paths[0]} holds no features; run extract on a folder with readable images.")
    threshold = group_near_duplicates or 0.0
    pairs = near_duplicate_hash_pairs(cache.features[:, : sources[0].feature_dim], cache.content_hash, threshold)
    split = split_with_test(cache, test_size, seed, pairs)
    split.notes.append(near_duplicate_note(threshold, split, sources[0].feature_dim))
    block, recipe = None, None
    if views:
        from .views import load_view_features

        block, recipe = load_view_features(paths, [cache.content_hash[i] for i in split.train])
        split.notes.append(
            f"augmented views: {recipe.k} per training image ({recipe.k * len(split.train)} rows) "
            "trained on, each in its image's CV fold; CV and test scores on the clean images only."
        )
    fitted = fit_on_split(
        cache,
        split,
        clf,
        block,
        cv=cv,
        n_jobs=n_jobs,
        class_weight=class_weight,
        seed=seed,
        l2_normalize=l2_normalize,
        accept=accept,
        log=log,
    )
    fitted.options.update(
        test_size=test_size,
        group_near_duplicates=threshold,
        **({"views": recipe.k, "views_recipe": recipe.to_json()} if recipe else {}),
    )
    X = cache.features
    test_proba = fitted.model.predict_proba(X[split.test])
    name = "+".join(Path(p).stem for p in paths)
    folder = Path(out) if out else default_head_dir(Path(name), clf)
    metrics = save_head(
        folder,
        fitted,
        cache,
        split,
        test_proba,
        {**near_duplicate_metrics(threshold, pairs, split), "views": recipe.k if recipe else 0},
        test_features=X[split.test],
        sources=sources,
    )
    return HeadResult(folder, metrics, split)


def training_rows(
    X: np.ndarray, y: np.ndarray, group: np.ndarray, train: np.ndarray, views: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(X, y, groups, scored) to fit on: the training rows, then, with views (n_train, K, D) of those rows,
    each view as a row in its image's group (one side of the split, one CV fold); scored marks the clean rows."""
    if views is None:
        return X[train], y[train], group[train], None
    k = views.shape[1]
    scored = np.concatenate([np.ones(len(train), bool), np.zeros(len(train) * k, bool)])
    return (
        np.vstack([X[train], views.reshape(len(train) * k, -1)]),
        np.concatenate([y[train], np.repeat(y[train], k)]),
        np.concatenate([group[train], np.repeat(group[train], k)]),
        scored,
    )


def near_duplicate_metrics(threshold: float, pairs: Sequence[tuple[str, str]], split: Split) -> dict[str, Any]:
    """What metrics.json records of the near-duplicate grouping."""
    return {
        "near_duplicate_threshold": threshold,
        "near_duplicate_links": len(pairs),
        "near_duplicate_groups": split.near_duplicate_groups,
    }


# -- persistence ----------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import sklearn

    return {"cnncodes": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def rows_digest(cache: FeatureCache, rows: np.ndarray) -> str:
    """A digest of which images (content, label, split) a head was trained and tested on."""
    import hashlib

    blob = "\n".join(f"{cache.content_hash[i]} {cache.labels[i]} {cache.split[i]}" for i in np.sort(rows))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibration_metrics(
    temperature: float | None,
    detector: Any,
    raw_test_proba: np.ndarray,
    y_test: np.ndarray,
    test_features: np.ndarray | None,
    unknown_seconds: float = 0.0,
) -> dict[str, Any]:
    """ECE before and after calibration, the reliability table, and the unknown rate on the test part."""
    from .calibration import apply_temperature, expected_calibration_error, reliability

    proba = raw_test_proba if temperature is None else apply_temperature(raw_test_proba, temperature)
    out: dict[str, Any] = {
        "ece_uncalibrated": expected_calibration_error(raw_test_proba, y_test),
        "ece": expected_calibration_error(proba, y_test),
        "temperature": temperature,
        "reliability": reliability(proba, y_test),
        "reliability_uncalibrated": reliability(raw_test_proba, y_test),
    }
    if detector is not None and test_features is not None:
        unknown = detector.score(test_features, proba) > detector.threshold
        correct = proba.argmax(1) == y_test
        out["unknown"] = {
            "method": detector.method,
            "accept": detector.accept,
            "threshold": detector.threshold,
            "test_unknown_rate": float(unknown.mean()),
            "n_unknown": int(unknown.sum()),
            "n_accepted": int((~unknown).sum()),
            "accepted_accuracy": float(correct[~unknown].mean()) if (~unknown).any() else 0.0,
        }
        out["unknown_seconds"] = unknown_seconds
    return out


def save_head(
    folder: str | os.PathLike,
    fitted: FittedHead,
    cache: FeatureCache,
    split: Split,
    test_proba: np.ndarray,
    extra_metrics: dict[str, Any] | None = None,
    test_features: np.ndarray | None = None,
    sources: Sequence[Any] = (),
) -> dict[str, Any]:
    """Write a head folder whole (staged, then swapped in): head.json, head.skops, metrics.json, the
    per-image test predictions, the out-of-fold training predictions, the unknown detector's arrays.

    test_proba is the model's own; what is written is calibrated. sources: the pipeline.sources.Source list
    of a head on several caches (head.json lists them; the single-source keys then describe the first).
    Returns the metrics."""
    from .artifacts import (
        CV_PREDICTIONS_CSV,
        HEAD_JSON,
        HEAD_MODEL,
        PREDICTIONS_CSV,
        UNKNOWN_NPZ,
        chain_fingerprint,
        predictions_from_rows,
        staged_folder,
        write_json,
        write_predictions,
    )
    from .images import file_sha256

    y_test = cache.labels[split.test]
    calibration = calibration_metrics(
        fitted.temperature, fitted.detector, test_proba, y_test, test_features, fitted.unknown_seconds
    )
    test_proba = fitted.calibrate(test_proba)
    metrics = classification_metrics(y_test, test_proba.argmax(1), cache.class_names, seed=fitted.options["seed"])
    metrics.update(
        {
            "method": f"{fitted.clf} head",
            "clf": fitted.clf,
            "best_params": fitted.best_params,
            "cv_score": fitted.cv_score,
            "cv_scoring": fitted.cv_scoring,
            "cv_folds": fitted.cv_folds,
            "cv_grid": fitted.cv_grid,
            "fit_seconds": fitted.fit_seconds,
            "train_seconds": fitted.fit_seconds,
            "n_train": int(len(split.train)),
            "split": split.source,
            "split_notes": split.notes,
            "duplicate_groups": split.duplicate_groups,
            "leaked_groups": split.leaked_groups,
            "seed": fitted.options["seed"],
            **calibration,
            **(extra_metrics or {}),
        }
    )
    cache_fingerprint = cache.attrs["fingerprint"]
    detector = fitted.detector.describe() if fitted.detector is not None else None
    fingerprint = chain_fingerprint(
        cache_fingerprint,
        options=fitted.options,
        rows=rows_digest(cache, np.concatenate([split.train, split.test])),
        **({"temperature": fitted.temperature} if fitted.temperature else {}),
        **({"unknown": detector} if detector else {}),
    )
    metrics["fingerprint"] = fingerprint
    meta = {
        "format_version": HEAD_FORMAT_VERSION,
        "kind": "head",
        "fingerprint": fingerprint,
        "cache_fingerprint": cache_fingerprint,
        "classes": cache.class_names,
        "identity": cache.identity,
        "backbone_config": json.loads(cache.attrs["config_json"]),
        "feature_dim": int(cache.features.shape[1]),
        "cache_path": str(Path(cache.path).resolve()),
        "dataset_root": cache.attrs.get("dataset_root", ""),
        "options": fitted.options,
        "metrics": {
            k: metrics[k]
            for k in ("accuracy", "accuracy_ci", "balanced_accuracy", "macro_f1", "cv_score", "best_params")
        },
        "versions": _versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # optional keys: heads written before them load as uncalibrated and without a detector
    if fitted.temperature is not None:
        meta["calibration"] = {
            "method": "temperature",
            "temperature": fitted.temperature,
            "fitted_on": "out-of-fold predictions of the training part",
            "ece_uncalibrated": calibration["ece_uncalibrated"],
            "ece": calibration["ece"],
        }
    if detector is not None:
        meta["unknown"] = {**detector, "file": UNKNOWN_NPZ}
    if len(sources) > 1:
        from .sources import SOURCES_KEY

        meta.update(cache_path=sources[0].cache_path, **{SOURCES_KEY: [s.to_json() for s in sources]})
    rows = dict(
        paths=cache.paths,
        content_hash=cache.content_hash,
        split=cache.split,
        labels=cache.labels,
        class_names=cache.class_names,
    )
    skops_io = import_skops_io()
    with staged_folder(folder) as stage:
        skops_io.dump(fitted.model, stage / HEAD_MODEL)
        meta.update(model_sha256=file_sha256(stage / HEAD_MODEL), classes_sha256=classes_digest(cache.class_names))
        write_json(stage / HEAD_JSON, meta)
        write_predictions(stage / PREDICTIONS_CSV, predictions_from_rows(split.test, test_proba, **rows))
        if fitted.cv_proba is not None:
            write_predictions(
                stage / CV_PREDICTIONS_CSV,
                predictions_from_rows(split.train, fitted.calibrate(fitted.cv_proba), **rows),
            )
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
            raise UserError(
                f"head {self.folder} was trained on other features than {source} "
                f"({differences.rstrip('; ')}). Fit a head on a cache of this configuration."
            )

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
            raise UserError(
                f"head {self.folder} expects {self.meta['feature_dim']} features per image, got shape {features.shape}."
            )
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
TRUSTED_TYPES = frozenset(
    {
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._data.Normalizer",
        "sklearn.preprocessing._data.StandardScaler",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.multiclass.OneVsRestClassifier",
        "sklearn.svm._classes.SVC",
        "sklearn.neighbors._classification.KNeighborsClassifier",
        "sklearn.calibration.CalibratedClassifierCV",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.preprocessing._label.LabelBinarizer",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neighbors._ball_tree.BallTree",
        "builtins.slice",
    }
)


def _load_skops(path: Path) -> Any:
    skops_io = import_skops_io()
    try:
        untrusted = skops_io.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged or foreign file: skops raises zip, JSON and key errors
        raise UserError(
            f"{path} is not a readable skops head ({type(exc).__name__}: {exc}); fit the head again."
        ) from None
    refused = sorted(set(untrusted) - TRUSTED_TYPES)
    if refused:
        raise UserError(
            f"{path} asks to load types a head never holds ({', '.join(refused)}); refused. "
            "Fit the head again with `fit-head`."
        )
    try:
        return skops_io.load(path, trusted=sorted(untrusted))
    except Exception as exc:  # noqa: BLE001 (e.g. an object array in a .npy member: numpy refuses, as it should)
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{path} is not a readable skops head ({type(exc).__name__}: {reason}); fit the head again."
        ) from None


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def check_head_meta(meta: Any, path: Path) -> None:
    """UserError naming path and the first way meta is not a head.json that HEAD_SCHEMA allows."""
    from .backbones import BackboneConfig

    def refuse(problem: str) -> UserError:
        return UserError(f"{path} is not a head description ({problem}); fit the head again with `cnncodes fit-head`.")

    if not isinstance(meta, dict):
        raise refuse(f"it holds {_json_type(meta)}, not an object")
    for key, (kind, required) in HEAD_SCHEMA.items():
        if key not in meta:
            if required:
                raise refuse(f"no {key!r}")
        elif not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise refuse(f"{key!r} is {_json_type(meta[key])}, expected {_json_type(kind())}")
    classes = meta["classes"]
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise refuse("'classes' must list two or more class names")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise refuse(f"class names listed twice: {', '.join(repeated)}")
    if meta["feature_dim"] < 1:
        raise refuse(f"'feature_dim' is {meta['feature_dim']}")
    if meta["options"].get("clf") not in CLASSIFIERS:
        raise refuse(f"options.clf is {meta['options'].get('clf')!r}, expected one of {', '.join(CLASSIFIERS)}")
    try:
        BackboneConfig(**meta["backbone_config"])
    except TypeError as exc:
        raise refuse(f"'backbone_config' does not describe a backbone: {exc}") from None


def classes_digest(classes: Sequence[str]) -> str:
    """The sha256 of class names, one per line: binds head.json's names, in order, to the fitted model."""
    import hashlib

    return hashlib.sha256("\n".join(classes).encode()).hexdigest()


def _check_binding(meta: dict[str, Any], model_path: Path, meta_path: Path) -> None:
    """Refuse a head whose head.skops or class names are not the ones fit-head saved together."""
    from .images import file_sha256

    recorded = meta.get("model_sha256")
    if recorded is not None and file_sha256(model_path) != recorded:
        raise UserError(
            f"{model_path} is not the model {meta_path} was saved with (its sha256 differs from "
            "model_sha256); restore the head folder or fit the head again."
        )
    recorded = meta.get("classes_sha256")
    if recorded is not None and classes_digest(meta["classes"]) != recorded:
        raise UserError(
            f"the class names in {meta_path} were changed after the head was fitted (they no longer "
            "match classes_sha256), so predictions would be mislabelled; restore head.json or fit "
            "the head again."
        )


def load_head(folder: str | os.PathLike, trust_pickle: bool | None = None) -> Head:
    """Load a head folder: head.json (checked against HEAD_SCHEMA, bound to head.skops) and head.skops
    (types checked against TRUSTED_TYPES).

    A format-1 head (head.joblib, a pickle that can run code when loaded) loads only with trust_pickle;
    None means the calling command has no --trust-pickle option (the refusal then offers none).
    """
    from .artifacts import HEAD_JSON, HEAD_MODEL, LEGACY_HEAD_MODEL, read_json, recover_folder

    folder = Path(folder)
    recover_folder(folder)
    meta_path = folder / HEAD_JSON
    meta = read_json(meta_path, "--head must be a folder written by `fit-head`")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version == 1:
        model_path = folder / LEGACY_HEAD_MODEL
        if not trust_pickle:
            offer = ", or pass --trust-pickle if you made it yourself" if trust_pickle is False else ""
            raise UserError(
                f"{folder} is an old head saved as a pickle ({LEGACY_HEAD_MODEL}), which can run "
                f"code when loaded. Fit it again with `cnncodes fit-head`{offer}."
            )
    elif version == HEAD_FORMAT_VERSION:
        model_path = folder / HEAD_MODEL
    elif isinstance(meta, dict) and "format_version" in meta:
        raise UserError(f"{folder} has head format {version!r}; expected {HEAD_FORMAT_VERSION}. Fit the head again.")
    check_head_meta(meta, meta_path)
    if not model_path.is_file():
        raise UserError(f"{model_path} is missing; --head must be a folder written by `fit-head`.")
    _check_binding(meta, model_path, meta_path)
    trained_with = meta.get("versions", {}).get("scikit-learn")
    if trained_with and trained_with != _versions()["scikit-learn"]:
        warnings.warn(
            f"head {folder} was saved with scikit-learn {trained_with}, this is "
            f"{_versions()['scikit-learn']}; predictions may differ or fail.",
            stacklevel=2,
        )
    if version == 1:
        import joblib

        model = joblib.load(model_path)
    else:
        model = _load_skops(model_path)
    if list(getattr(model, "classes_", range(len(meta["classes"])))) != list(range(len(meta["classes"]))):
        raise UserError(f"{model_path} does not match {meta_path} (classes differ); fit the head again.")
    return Head(folder, model, meta)
