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
from .params import Interval, Options, check_params
from .report import classification_metrics, save_metrics
from .splits import Split, cv_splits, split_rows

CLASSIFIERS = ("logreg", "svm", "rbf-svm", "knn")
HEAD_FORMAT_VERSION = 1
MODEL_FILE, META_FILE = "head.joblib", "head.json"
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


def best_index(results: dict[str, Any], tie_break: str | None) -> int:
    """The grid point with the best mean CV score; ties go to the best tie_break score, else the middle one.

    Separable features give many grid points the same accuracy; the smallest C among them would
    be the most regularised head, with needlessly flat probabilities.
    """
    score = np.asarray(results["mean_test_score"])
    tied = np.flatnonzero(score >= score.max() - 1e-12)
    if tie_break is not None:
        return int(tied[np.argmax(np.asarray(results[f"mean_test_{tie_break}"])[tied])])
    return int(tied[len(tied) // 2])


# -- fitting --------------------------------------------------------------------------------------
@dataclass
class HeadResult:
    """What fit_head produced."""

    folder: Path
    metrics: dict[str, Any]
    split: Split


def default_head_dir(cache_path: Path, clf: str) -> Path:
    """heads/<cache name>-<clf>/"""
    return Path("heads") / f"{Path(cache_path).stem}-{clf}"


def fit_head(cache_path: str | os.PathLike, clf: str = "logreg", *, cv: int = 5, n_jobs: int = -1,
             class_weight: str | None = None, seed: int = 0, test_size: float = 0.2,
             l2_normalize: bool = True, out: str | os.PathLike | None = None,
             log: Callable[[str], None] = print) -> HeadResult:
    """Choose the classifier's C (or k) by grouped CV on the training part, refit, evaluate on the test part."""
    check_params(dict(clf=clf, cv=cv, n_jobs=n_jobs, class_weight=class_weight, seed=seed, test_size=test_size),
                 HEAD_CONSTRAINTS)
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV

    started = time.perf_counter()
    cache = load(cache_path)
    if len(cache) == 0:
        raise UserError(f"{cache_path} holds no features; run extract on a folder with readable images.")
    split = split_rows(cache, test_size, seed)
    if len(split.test) == 0:
        raise UserError("no test images: every class has a single image (or group of identical images).")
    X, y = cache.features, cache.labels
    folds = cv_splits(y[split.train], split.group[split.train], cv, seed, cache.class_names, log)
    param, grid = GRIDS[clf]
    if clf == "knn":  # k cannot exceed the smallest training fold
        grid = [k for k in grid if k <= min(len(tr) for tr, _ in folds)]
    scoring = "balanced_accuracy" if class_weight == "balanced" else "accuracy"
    # heads with probabilities during the sweep break accuracy ties by CV log-loss
    tie_break = "log_loss" if clf in ("logreg", "knn") else None
    scorers = {"score": scoring, **({"log_loss": "neg_log_loss"} if tie_break else {})}
    search = GridSearchCV(make_pipeline(clf, l2_normalize, class_weight, seed), {param: grid}, cv=folds,
                          scoring=scorers, n_jobs=n_jobs, refit=False, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        search.fit(X[split.train], y[split.train])
    best = best_index(search.cv_results_, tie_break)
    best_value, cv_score = grid[best], float(search.cv_results_["mean_test_score"][best])
    model = make_pipeline(clf, l2_normalize, class_weight, seed).set_params(**{param: best_value})
    if clf in ("svm", "rbf-svm"):
        # probabilities: one SVM on the whole training part, sigmoid-calibrated on cross-validated scores
        calibrated = CalibratedClassifierCV(model.steps[-1][1], method="sigmoid", cv=folds, ensemble=False)
        model.steps[-1] = ("clf", calibrated)
    model.fit(X[split.train], y[split.train])
    fit_seconds = time.perf_counter() - started
    y_pred = model.predict(X[split.test])
    metrics = classification_metrics(y[split.test], y_pred, cache.class_names)
    metrics.update({
        "method": f"{clf} head", "clf": clf, "best_params": {param.split("__")[-1]: best_value},
        "cv_score": cv_score, "cv_scoring": scoring, "cv_folds": len(folds),
        "cv_grid": [float(v) for v in grid], "fit_seconds": fit_seconds, "train_seconds": fit_seconds,
        "n_train": int(len(split.train)), "split": split.source, "split_notes": split.notes,
        "duplicate_groups": split.duplicate_groups, "leaked_groups": split.leaked_groups, "seed": seed,
    })
    folder = Path(out) if out else default_head_dir(Path(cache_path), clf)
    save_head(folder, model, cache, metrics, dict(clf=clf, l2_normalize=l2_normalize, class_weight=class_weight,
                                                    seed=seed, test_size=test_size, cv=cv))
    return HeadResult(folder, metrics, split)


# -- persistence ----------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import sklearn

    return {"cnncodes": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def save_head(folder: Path, model: Any, cache: FeatureCache, metrics: dict[str, Any],
              options: dict[str, Any]) -> None:
    """head.joblib (the fitted pipeline), head.json (what it was trained on), metrics.json, the PNG."""
    import joblib

    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, folder / MODEL_FILE)
    meta = {
        "format_version": HEAD_FORMAT_VERSION, "classes": cache.class_names, "identity": cache.identity,
        "fingerprint": cache.attrs["fingerprint"], "backbone_config": json.loads(cache.attrs["config_json"]),
        "feature_dim": int(cache.features.shape[1]), "cache_path": str(Path(cache.path).resolve()),
        "dataset_root": cache.attrs.get("dataset_root", ""), "options": options,
        "metrics": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "cv_score", "best_params")},
        "versions": _versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    save_metrics(metrics, folder)


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

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities, after checking the feature width."""
        if features.ndim != 2 or features.shape[1] != self.meta["feature_dim"]:
            raise UserError(f"head {self.folder} expects {self.meta['feature_dim']} features per image, "
                            f"got shape {features.shape}.")
        return self.model.predict_proba(features)


def load_head(folder: str | os.PathLike) -> Head:
    """Load a head folder the user pointed to. joblib unpickles: only load heads you trust."""
    import joblib

    folder = Path(folder)
    meta_path, model_path = folder / META_FILE, folder / MODEL_FILE
    for path in (meta_path, model_path):
        if not path.is_file():
            raise UserError(f"{path} is missing; --head must be a folder written by `fit-head`.")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise UserError(f"{meta_path} is not valid JSON ({exc}).") from None
    if meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise UserError(f"{folder} has head format {meta.get('format_version')!r}; expected "
                        f"{HEAD_FORMAT_VERSION}. Fit the head again.")
    trained_with = meta.get("versions", {}).get("scikit-learn")
    if trained_with and trained_with != _versions()["scikit-learn"]:
        warnings.warn(f"head {folder} was saved with scikit-learn {trained_with}, this is "
                      f"{_versions()['scikit-learn']}; predictions may differ or fail.", stacklevel=2)
    model = joblib.load(model_path)
    if list(getattr(model, "classes_", range(len(meta["classes"])))) != list(range(len(meta["classes"]))):
        raise UserError(f"{model_path} does not match {meta_path} (classes differ); fit the head again.")
    return Head(folder, model, meta)


def linear_weights(head: Head) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(W, b, activation, l2) with probabilities = activation(l2(x) @ W + b), scaler folded in."""
    pipeline = head.model
    steps = dict(pipeline.steps)
    scaler, clf = steps["scale"], steps["clf"]
    mean = scaler.mean_ if scaler.with_mean else 0.0
    scale = scaler.scale_ if scaler.with_std else 1.0
    n_classes = len(head.classes)
    if head.meta["options"]["clf"] == "logreg":
        coef, intercept = clf.coef_.T, clf.intercept_
        if n_classes == 2:  # binary logistic regression: p1 = sigmoid(z) = softmax([0, z])[1]
            coef, intercept = np.hstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        activation = "softmax"
    else:
        calibrated = clf.calibrated_classifiers_[0]
        machines = calibrated.estimator.estimators_
        coef = np.stack([m.coef_.ravel() for m in machines], axis=1)
        intercept = np.array([m.intercept_[0] for m in machines])
        a = np.array([c.a_ for c in calibrated.calibrators])
        b = np.array([c.b_ for c in calibrated.calibrators])
        coef, intercept = -a * coef, -(a * intercept + b)  # g = -(a f + b)
        if n_classes == 2:  # one machine for class 1: p1 = sigmoid(g), p0 = sigmoid(-g)
            coef, intercept = np.hstack([-coef, coef]), np.concatenate([-intercept, intercept])
        activation = "log_sigmoid"
    weights = coef / np.asarray(scale)[:, None] if np.ndim(scale) else coef / scale
    bias = intercept - np.asarray(mean) @ weights if np.ndim(mean) else intercept
    return weights.astype(np.float32), bias.astype(np.float32), activation, "l2" in steps
