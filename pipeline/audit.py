"""Can the score be trusted? An audit of a feature cache: label issues, near-duplicates, outliers, learning curve.

Everything works on the cached features (no TensorFlow). Label issues come from cleanlab's
confident learning on out-of-fold probabilities of a grouped-CV logistic regression over every
labelled image. Near-duplicates are pairs of images whose features are nearly identical; a pair
with one image in the test part and one in training is leakage. Outliers are images far from
every other image of their class. The learning curve says whether more images would help.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import (
    AUDIT_JSON,
    CLASS_BALANCE_PNG,
    LABEL_ISSUES_CSV,
    LEARNING_CURVE_PNG,
    NEAR_DUPLICATES_CSV,
    OUTLIERS_CSV,
)
from .errors import UserError, install_hint
from .neighbours import BLOCK_ROWS, DEFAULT_THRESHOLD, comparable_rows, pairs_above
from .params import Interval, check_params, define

logger = logging.getLogger(__name__)

OUTLIER_K = 5  # an image's outlier distance: cosine distance to its k-th nearest image of the same class
OUTLIER_CUTOFF = 3.5  # modified z-score above which it is an outlier (Iglewicz and Hoaglin's rule)
FIRST_SIZE = 5  # images per class of the learning curve's first point; then doubling
ASSUMED_EXPONENT = 0.5  # the learning curve's b when too few points fit all three parameters
PAIR_KINDS = ("cross_split", "conflicting_labels", "same_side")
define(threshold=[Interval(0.5, 1.0)])


def pair_kinds(i: np.ndarray, j: np.ndarray, labels: np.ndarray, in_test: np.ndarray) -> np.ndarray:
    """cross_split (one in the test part, one in training: leakage), else conflicting_labels, else same_side."""
    return np.where(
        in_test[i] != in_test[j], "cross_split", np.where(labels[i] != labels[j], "conflicting_labels", "same_side")
    )


def near_duplicates(
    comparable: np.ndarray,
    content_hash: Sequence[str],
    labels: np.ndarray,
    in_test: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[np.ndarray, ...]:
    """Pairs (i, j, cosine, kind) of comparable_rows at or above threshold, and how they were searched.

    Byte-identical files are counted as such (the split keeps them together), not again as pairs.
    """
    i, j, cosine, search = pairs_above(comparable, threshold)
    hashes = np.asarray(content_hash, dtype=object)
    distinct = hashes[i] != hashes[j]
    i, j, cosine = i[distinct], j[distinct], cosine[distinct]
    return i, j, cosine, pair_kinds(i, j, labels, in_test), search


def near_duplicates_counts(kinds: np.ndarray, threshold: float, search: str) -> dict[str, Any]:
    """What audit.json says of the pairs: threshold, count, count by kind, search method."""
    return {
        "threshold": float(threshold),
        "count": int(len(kinds)),
        "by_kind": {k: int(np.sum(kinds == k)) for k in PAIR_KINDS},
        "search": search,
    }


# -- outliers -------------------------------------------------------------------------------------
def kth_neighbour_distance(
    unit: np.ndarray, labels: np.ndarray, k: int = OUTLIER_K, block: int = BLOCK_ROWS
) -> np.ndarray:
    """Cosine distance of each unit row (of comparable_rows) to its k-th nearest row of the same class
    (the k-1-th in a class of k rows; NaN for a row alone in its class)."""
    distance = np.full(len(unit), np.nan)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        kk = min(k, len(rows) - 1)
        if kk < 1:
            continue
        members = unit[rows]
        for start in range(0, len(rows), block):
            sims = members[start : start + block] @ members.T
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # not its own neighbour
            distance[rows[start : start + block]] = 1 - np.partition(sims, -kk, axis=1)[:, -kk]
    return distance


def outlier_scores(distance: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Modified z-score of each distance within its class: 0.6745 (d - median) / MAD (NaN in classes under 3)."""
    score = np.full(len(distance), np.nan)
    for label in np.unique(labels):
        rows = np.flatnonzero((labels == label) & ~np.isnan(distance))
        if len(rows) < 3:
            continue
        d = distance[rows]
        median = np.median(d)
        spread = np.median(np.abs(d - median))
        if spread <= 0:  # over half the class at one distance (copies): fall back on the mean deviation
            spread = np.mean(np.abs(d - median)) * 1.2533 / 1.4826
        score[rows] = 0.6745 * (d - median) / spread if spread > 0 else 0.0
    return score


# -- learning curve -------------------------------------------------------------------------------
def power_law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """acc(n) = c - a * n**(-b)."""
    return c - a * np.power(n, -b)


def fit_power_law(per_class: Sequence[float], accuracy: Sequence[float]) -> dict[str, float] | None:
    """a, b, c of acc(n) = c - a n^-b by bounded least squares (b fixed at 0.5 under four points); None under two."""
    from scipy.optimize import curve_fit

    n, acc = np.asarray(per_class, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if len(n) < 2:
        return None
    a0 = max((acc[-1] - acc[0]) / max(n[0] ** -ASSUMED_EXPONENT - n[-1] ** -ASSUMED_EXPONENT, 1e-9), 1e-3)
    c0 = min(acc[-1] + 0.01, 1.0)
    if len(n) >= 4:
        try:
            (a, b, c), _ = curve_fit(
                power_law, n, acc, p0=(a0, ASSUMED_EXPONENT, c0), bounds=([0, 0.01, 0], [np.inf, 3, 1]), maxfev=5000
            )
            return {"a": float(a), "b": float(b), "c": float(c)}
        except (RuntimeError, ValueError):
            pass  # fall through to the two-parameter fit
    try:
        (a, c), _ = curve_fit(
            lambda x, a, c: power_law(x, a, ASSUMED_EXPONENT, c),
            n,
            acc,
            p0=(a0, c0),
            bounds=([0, 0], [np.inf, 1]),
            maxfev=5000,
        )
    except (RuntimeError, ValueError):
        return None
    return {"a": float(a), "b": ASSUMED_EXPONENT, "c": float(c)}


def doubling_gain(fit: dict[str, float], n: float) -> float:
    """Accuracy points gained by going from n to 2n images per class, by the fitted curve."""
    return float(100 * (power_law(2 * n, **fit) - power_law(n, **fit)))


def learning_curve_answer(
    per_class: Sequence[int], accuracy: Sequence[float], fit: dict[str, float] | None
) -> tuple[float | None, str]:
    """The doubling gain and the sentence that says it."""
    if fit is None:
        return None, (
            "too few images per class for a learning curve: "
            f"CV accuracy {accuracy[-1]:.3f} at {per_class[-1]} per class."
        )
    n = per_class[-1]
    gain = doubling_gain(fit, n)
    text = (
        f"doubling the images per class (from {n} to {2 * n}) would add about {gain:.1f} points of "
        f"accuracy (fit: acc(n) = {fit['c']:.3f} - {fit['a']:.3f} n^-{fit['b']:.2f}"
        f"{', b assumed' if len(per_class) < 4 else ''})."
    )
    return gain, text


def _subsample(rows: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.permutation(rows[labels[rows] == c])[:per_class] for c in np.unique(labels[rows])]
    return np.sort(np.concatenate(picked))


def _fold_accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, C: float, seed: int) -> float:
    from .heads import make_pipeline

    model = make_pipeline("logreg", seed=seed).set_params(clf__C=C)
    model.fit(X[train], y[train])
    return float(np.mean(model.predict(X[val]) == y[val]))


def learning_curve(
    X: np.ndarray,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    cv_proba: np.ndarray,
    C: float,
    seed: int = 0,
    n_jobs: int = -1,
) -> dict[str, Any]:
    """CV accuracy at 5, 10, 20... training images per class (per fold, a seeded subsample), up to all.

    The last point ("all") reuses the out-of-fold probabilities already computed at the same C.
    """
    from joblib import Parallel, delayed

    counts = [np.bincount(y[train], minlength=y.max() + 1) for train, _ in folds]
    full = int(np.median(np.concatenate([c[c > 0] for c in counts])))
    sizes = []
    while FIRST_SIZE * 2 ** len(sizes) < full:
        sizes.append(FIRST_SIZE * 2 ** len(sizes))
    rng = np.random.default_rng(seed)
    jobs = [(size, f, _subsample(train, y, size, rng), val) for size in sizes for f, (train, val) in enumerate(folds)]
    from sklearn.exceptions import ConvergenceWarning

    # Tiny subsamples may not converge fully and the curve tolerates it. The filter is set here, on the main
    # thread, around the worker threads (catch_warnings is process-wide state, not safe to enter in a thread).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        scores = Parallel(n_jobs=n_jobs, prefer="threads")(
            delayed(_fold_accuracy)(X, y, train, val, C, seed) for _, _, train, val in jobs
        )
    per_size = np.array(scores, dtype=np.float64).reshape(len(sizes), len(folds))
    full_scores = [float(np.mean(cv_proba[val].argmax(1) == y[val])) for _, val in folds]
    accuracy = [float(v) for v in per_size.mean(1)] + [float(np.mean(full_scores))]
    std = [float(v) for v in per_size.std(1)] + [float(np.std(full_scores))]
    per_class = sizes + [full]
    fit = fit_power_law(per_class, accuracy)
    gain, answer = learning_curve_answer(per_class, accuracy, fit)
    return {
        "per_class": per_class,
        "cv_accuracy": accuracy,
        "cv_std": std,
        "fit": fit,
        "doubling_gain_points": gain,
        "answer": answer,
        "file": LEARNING_CURVE_PNG,
    }


# -- plots ----------------------------------------------------------------------------------------
def _png(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_learning_curve(curve: dict[str, Any], path: Path) -> None:
    """CV accuracy per images per class (log axis) with the fitted power law carried on to twice the data."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    n = np.asarray(curve["per_class"], dtype=np.float64)
    ax.errorbar(n, curve["cv_accuracy"], yerr=curve["cv_std"], fmt="o", capsize=3, label="CV accuracy (± sd)")
    if curve["fit"]:
        grid = np.geomspace(n[0], 2 * n[-1], 100)
        ax.plot(grid, power_law(grid, **curve["fit"]), "-", label="fit c - a n^-b")
        ax.axvline(n[-1], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ticks = [int(v) for v in n] + ([2 * int(n[-1])] if curve["fit"] else [])
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("accuracy")
    ax.set_title("learning curve (grouped CV, logreg)")
    ax.legend(loc="lower right", fontsize=8)
    _png(fig, path)


def plot_class_balance(balance: dict[str, int], path: Path) -> None:
    """Images per class, as horizontal bars."""
    from matplotlib.figure import Figure

    names = list(balance)
    fig = Figure(figsize=(5.5, 1.2 + 0.25 * len(names)))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), [balance[k] for k in names])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("class balance")
    _png(fig, path)


# -- label issues ---------------------------------------------------------------------------------
def label_issues(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows whose given label looks wrong, most suspicious first; every row's label quality; cleanlab's count.

    proba: out-of-fold probabilities. Listed: the rows cleanlab's find_label_issues flags (prune_by_class:
    per class, as many of its lowest-scoring rows as the confident joint estimates are mislabelled; on
    planted faults it found more of them than the default, prune_by_noise_rate, and fewer false ones),
    and every row the model puts in another class. The estimate runs short (41 of 48 moved images, 20
    of 24, 15 of 16) while the ranking does not (each time every moved image came first but for a few),
    so the list goes on beyond it. Quality: cleanlab's self-confidence, the probability of the given label.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, proba, method="self_confidence")
    flagged = find_label_issues(labels, proba, filter_by="prune_by_class", n_jobs=1)
    candidates = np.flatnonzero(flagged | (proba.argmax(1) != labels))
    return candidates[np.argsort(quality[candidates], kind="stable")], quality, int(flagged.sum())


def blas_on_one_thread() -> Any:
    """A context with BLAS on one thread. The CV folds already run in threads, and OpenBLAS's own
    threads spin-wait when the cores are busy: on the shared 2-core machine the whole audit took
    2 to 4 times the CPU without this (the whitening's eigh alone 6 to 30 s instead of 2)."""
    import scipy.optimize  # noqa: F401  (threadpoolctl limits only the BLAS libraries already loaded)
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# -- the audit ------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """Where the audit went, what audit.json holds, and the summary lines."""

    folder: Path
    report: dict[str, Any]
    summary: list[str] = field(default_factory=list)


def default_audit_dir(cache_path: str | os.PathLike) -> Path:
    """audits/<cache name>/ in the output home."""
    from .artifacts import output_dir

    return output_dir("audits") / Path(cache_path).stem


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _check_cache(cache: Any) -> None:
    """Refuse caches the audit cannot cross-validate, naming the class and the fix."""
    from .splits import content_groups

    if len(cache) == 0:
        raise UserError(f"{cache.path} holds no features; run extract on a folder with readable images.")
    present = np.unique(cache.labels)
    if len(present) < 2:
        only = cache.class_names[int(present[0])]
        raise UserError(f"{cache.path} holds one class ({only}); an audit needs at least two classes.")
    group, _ = content_groups(cache.content_hash)
    for label in present:
        distinct = len(np.unique(group[cache.labels == label]))
        if distinct < 2:
            raise UserError(
                f"class {cache.class_names[int(label)]} in {cache.path} has {distinct} distinct image; "
                "the audit's cross-validation needs at least 2 per class (add images or remove "
                "the class folder)."
            )


def _head_test_rows(cache: Any, head: str | os.PathLike, log: Callable[[str], None]) -> tuple[np.ndarray, dict]:
    """The rows the head was tested on (its predictions.csv), after checking it was fitted on this cache."""
    from .artifacts import HEAD_JSON, PREDICTIONS_CSV, read_json, read_predictions
    from .metrics import load_metrics
    from .sources import head_sources

    meta = read_json(Path(head) / HEAD_JSON, "--head must be a folder written by `fit-head`")
    fingerprints = {s.cache_fingerprint or cache.attrs["fingerprint"] for s in head_sources(meta)}
    if cache.attrs["fingerprint"] not in fingerprints:  # a head on several caches: any one of them
        raise UserError(
            f"head {head} was fitted on another cache (fingerprint {meta.get('cache_fingerprint')}, "
            f"this is {cache.attrs['fingerprint']}); audit the head's own cache {meta.get('cache_path')}."
        )
    tested = read_predictions(Path(head) / PREDICTIONS_CSV)
    wanted = set(zip(tested.paths, tested.content_hash))
    rows = np.array([r for r, key in enumerate(zip(cache.paths, cache.content_hash)) if key in wanted], np.int64)
    if len(rows) == 0:
        raise UserError(
            f"none of the {len(wanted)} test images of head {head} are in {cache.path}; audit the head's own cache."
        )
    if len(rows) < len(wanted):
        log(f"note: {len(wanted) - len(rows)} of the head's {len(wanted)} test images are no longer in the cache.")
    return rows, load_metrics(head)


def audit(
    cache_path: str | os.PathLike,
    head: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    cv: int = 5,
    n_jobs: int = -1,
    log: Callable[[str], None] = logger.info,
) -> AuditResult:
    """Audit a cache: label issues, near-duplicates (leakage), outliers, learning curve, balance; write a folder."""
    check_params(dict(threshold=threshold, seed=seed, cv=cv, n_jobs=n_jobs))
    try:
        import cleanlab
    except ImportError:
        raise UserError(f"the audit needs cleanlab: {install_hint('audit')}") from None
    from .artifacts import staged_folder, write_json
    from .cache import load
    from .heads import fit_arrays
    from .splits import content_groups, cv_splits, split_rows

    started = time.perf_counter()
    cache = load(cache_path)
    _check_cache(cache)
    X, y, names, paths = cache.features, cache.labels.astype(np.int64), cache.class_names, cache.paths
    split = split_rows(cache, 0.2, seed)
    head_metrics = None
    if head is not None:
        test_rows, head_metrics = _head_test_rows(cache, head, log)
        split_source = f"the test images of head {head}"
    else:
        test_rows, split_source = split.test, split.source
    in_test = np.zeros(len(y), bool)
    in_test[test_rows] = True
    side = np.where(in_test, "test", "train")

    with blas_on_one_thread():
        comparable = comparable_rows(X)
        i, j, cosine, kinds, search = near_duplicates(comparable, cache.content_hash, y, in_test, threshold)

        # out-of-fold probabilities of every labelled image (byte-identical files share a fold)
        fitted = fit_arrays(X, y, split.group, names, "logreg", cv=cv, n_jobs=n_jobs, seed=seed, accept=None, log=log)
        folds = cv_splits(y, split.group, cv, seed, names, log=lambda _: None)  # the folds fit_arrays used
        curve = learning_curve(X, y, folds, fitted.cv_proba, fitted.best_params["C"], seed, n_jobs)
        ranked, quality, n_flagged = label_issues(y, fitted.cv_proba)
        suggested = fitted.cv_proba.argmax(1)

        scores = outlier_scores(kth_neighbour_distance(comparable, y), y)
        outliers = np.flatnonzero(np.nan_to_num(scores, nan=-np.inf) > OUTLIER_CUTOFF)
        outliers = outliers[np.argsort(-scores[outliers], kind="stable")]

    _, duplicates = content_groups(cache.content_hash)
    balance = {name: int(np.sum(y == c)) for c, name in enumerate(names)}
    report = {
        "cache": str(cache_path),
        "cache_fingerprint": cache.attrs["fingerprint"],
        "dataset_root": cache.attrs.get("dataset_root", ""),
        "n_images": int(len(y)),
        "class_names": list(names),
        "class_balance": balance,
        "duplicates": {
            "byte_identical_groups": len(duplicates),
            "files_in_groups": int(sum(len(rows) for rows in duplicates.values())),
        },
        "split": split_source,
        "label_issues": {
            "count": int(len(ranked)),
            "estimated_mislabelled": n_flagged,
            "file": LABEL_ISSUES_CSV,
            "method": (
                f"out-of-fold probabilities of a logistic regression ({fitted.cv_folds}-fold grouped CV "
                f"over every image, C={fitted.best_params['C']:.3g}); listed: every image the model puts "
                f"in another class, and those cleanlab {cleanlab.__version__} find_label_issues "
                "(prune_by_class) flags; estimated_mislabelled: how many cleanlab flags. score = "
                "cleanlab's self-confidence, the probability of the given label: lower is more suspicious"
            ),
        },
        "near_duplicates": {**near_duplicates_counts(kinds, threshold, search), "file": NEAR_DUPLICATES_CSV},
        "outliers": {
            "count": int(len(outliers)),
            "file": OUTLIERS_CSV,
            "method": (
                f"cosine distance (whitened features, as for near-duplicates) to the {OUTLIER_K}th "
                "nearest image of the same class; score = "
                "its modified z-score within the class, 0.6745 (d - median) / MAD; "
                f"outlier above {OUTLIER_CUTOFF}"
            ),
        },
        "learning_curve": curve,
        "cv_accuracy": fitted.cv_score,
    }
    summary = _summary(report, cache, ranked, suggested, head, head_metrics)
    report["summary"] = summary

    folder = Path(out) if out else default_audit_dir(cache_path)
    with staged_folder(folder) as stage:
        (stage / LABEL_ISSUES_CSV).write_text(
            _csv(
                ("path", "given", "suggested", "score"),
                [(paths[r], names[y[r]], names[suggested[r]], f"{quality[r]:.6g}") for r in ranked],
            ),
            encoding="utf-8",
        )
        (stage / NEAR_DUPLICATES_CSV).write_text(
            _csv(
                ("path_a", "path_b", "cosine", "split_a", "split_b", "label_a", "label_b", "kind"),
                [
                    (paths[a], paths[b], f"{c:.6f}", side[a], side[b], names[y[a]], names[y[b]], k)
                    for a, b, c, k in zip(i, j, cosine, kinds)
                ],
            ),
            encoding="utf-8",
        )
        (stage / OUTLIERS_CSV).write_text(
            _csv(
                ("path", "label", "split", "score"),
                [(paths[r], names[y[r]], side[r], f"{scores[r]:.4g}") for r in outliers],
            ),
            encoding="utf-8",
        )
        plot_learning_curve(curve, stage / LEARNING_CURVE_PNG)
        plot_class_balance(balance, stage / CLASS_BALANCE_PNG)
        report["seconds"] = round(time.perf_counter() - started, 2)
        write_json(stage / AUDIT_JSON, report)
    return AuditResult(folder, report, summary)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def label_issues_line(
    label: dict[str, Any],
    ranked: np.ndarray,
    suggested: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    paths: Sequence[str],
) -> str:
    """The label issues in one sentence: how many, cleanlab's estimate, the most suspicious image."""
    line = (
        f"label issues: {_count(label['count'], 'image')} whose label looks wrong to the out-of-fold model; "
        f"cleanlab estimates {label['estimated_mislabelled']} "
        f"{'is' if label['estimated_mislabelled'] == 1 else 'are'} mislabelled"
    )
    if len(ranked):
        top = ranked[0]
        line += f" (most suspicious: {paths[top]}, given {names[labels[top]]}, looks like {names[suggested[top]]})"
    return line


def near_duplicates_line(near: dict[str, Any]) -> str:
    """The near-duplicate pairs in one sentence, by kind (cross_split is leakage)."""
    kinds = near["by_kind"]
    return (
        f"near-duplicates (cosine >= {near['threshold']:g}, {near['search']} search): {near['count']} pairs: "
        f"{kinds['cross_split']} cross_split (leakage: a test image with a near-copy in training), "
        f"{kinds['conflicting_labels']} conflicting_labels, {kinds['same_side']} same_side"
    )


def _summary(
    report: dict[str, Any],
    cache: Any,
    ranked: np.ndarray,
    suggested: np.ndarray,
    head: str | os.PathLike | None,
    head_metrics: dict | None,
) -> list[str]:
    names, paths, y = cache.class_names, cache.paths, cache.labels
    balance = report["class_balance"]
    duplicates = report["duplicates"]
    lines = [
        f"{report['n_images']} images, {len(names)} classes ({min(balance.values())} to "
        f"{max(balance.values())} per class); {_count(duplicates['byte_identical_groups'], 'group')} of "
        f"byte-identical files ({duplicates['files_in_groups']} files)"
    ]
    if head_metrics is not None:
        from .tables import ci_text

        lines.append(
            f"head {head}: test accuracy {ci_text(head_metrics, 'accuracy')} on "
            f"{head_metrics.get('n_test', '?')} images (95% interval)"
        )
    lines.append(
        label_issues_line(report["label_issues"], ranked, suggested, y, names, paths) + f" -> {LABEL_ISSUES_CSV}"
    )
    lines.append(near_duplicates_line(report["near_duplicates"]) + f" -> {NEAR_DUPLICATES_CSV}")
    lines.append(
        f"outliers: {_count(report['outliers']['count'], 'image')} far from the rest of their class -> {OUTLIERS_CSV}"
    )
    curve = report["learning_curve"]
    lines.append(
        f"learning curve: CV accuracy {curve['cv_accuracy'][0]:.3f} at {curve['per_class'][0]} images "
        f"per class, {curve['cv_accuracy'][-1]:.3f} at {curve['per_class'][-1]}; {curve['answer']}"
    )
    return lines
