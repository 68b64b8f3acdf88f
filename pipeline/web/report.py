"""One self-contained HTML report of heads, runs, a study and an audit: tables, confusion matrices with
their images, galleries, the audit's findings and a map of the cached features.

Everything is read from the folders through pipeline.artifacts; images come from the dataset root
recorded in them and are embedded once each as small JPEG data URIs, so the page opens from disk
with no network. TensorFlow is never imported.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifacts import (
    AUDIT_JSON,
    CV_PREDICTIONS_CSV,
    HEAD_JSON,
    LEARNING_CURVES_PNG,
    METRICS_JSON,
    PREDICTIONS_CSV,
    REPORT_HTML,
    RUN_JSON,
    RUN_MODEL,
    SIDECAR_SUFFIX,
    Predictions,
    folder_kind,
    output_home,
    paired_outcomes,
    read_json,
    read_predictions,
    write_text,
)
from ..errors import UserError
from ..params import Interval, Options, check_params, define
from ..plots import new_figure
from ..study_report import STUDY_COLUMNS, table_cells
from ..study_results import StudyResults, read_study
from ..tables import ci_text
from .render import THUMBNAIL_PX, Thumbnails, figure_uri, file_uri, placeholder_uri, render

logger = logging.getLogger(__name__)

PROJECTIONS = ("tsne", "pca")
define(projection=[Options(PROJECTIONS)], thumb_px=[Interval(32, 256, integer=True)])
GALLERY_SIZE = 24  # images per gallery (confidently wrong, hesitant, each audit finding)
PER_CLASS = 4  # images per class in the per-class gallery
MAP_THUMBNAILS = 2000  # map points beyond this many (a random sample keeps them) show no thumbnail on hover
ALL_PAIRS_UP_TO = 4  # with more methods, each is tested against the most accurate one only


# -- images: each embedded once, referenced by index ----------------------------------------------
class ImageTable:
    """Every image the page shows, by absolute path (image_key); encoded to data URIs once, at the end."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def ref(self, root: str | os.PathLike, relpath: str) -> int:
        """The index of root/relpath in the page's image list."""
        return self.index.setdefault(image_key(root, relpath), len(self.index))

    def encode(self, thumbnails: Thumbnails) -> tuple[list[str], list[str]]:
        """(data URIs, '' for unreadable images; the unreadable paths with their reasons)."""
        thumbnails.start(self.index)
        results = [thumbnails.get(path) for path in self.index]
        return [uri for uri, _ in results], [problem for _, problem in results if problem]


def image_key(root: str | os.PathLike, relpath: str) -> str:
    """How a page names the image relpath of the dataset at root: the path its thumbnail is read from."""
    return str(Path(root) / relpath)


def _item(images: ImageTable, root: str, path: str, caption: list[str], wrong: bool = False) -> dict[str, Any]:
    """One thumbnail of a gallery: the image's index, its path and caption lines."""
    return {"img": images.ref(root, path), "path": path, "caption": caption, "wrong": wrong}


# -- methods: head and run folders ----------------------------------------------------------------
@dataclass
class Method:
    """A head or fine-tuning run folder, with what the report shows of it."""

    name: str
    folder: Path
    kind: str
    metrics: dict[str, Any]
    meta: dict[str, Any]  # head.json, or the run's run.json and model sidecar together
    predictions: Predictions | None = None
    cv_predictions: Predictions | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dataset_root(self) -> str:
        return str(self.meta.get("dataset_root") or self.metrics.get("dataset_root") or "")

    @property
    def cache_path(self) -> str | None:
        return self.meta.get("cache_path")


def load_method(folder: Path, name: str | None = None) -> Method:
    """A head or run folder: its metrics, what it was trained on, its per-image predictions when written."""
    kind = folder_kind(folder)
    if kind not in ("head", "run"):
        raise UserError(
            f"{folder} is not a head, run or study folder; give folders written by fit-head, finetune or study."
        )
    metrics = read_json(folder / METRICS_JSON, "it is written by fit-head and finetune")
    if kind == "head":
        meta = read_json(folder / HEAD_JSON, "it is written by fit-head")
    else:
        meta = {
            **read_json(folder / (RUN_MODEL + SIDECAR_SUFFIX), "it is written by finetune beside the model"),
            **(read_json(folder / RUN_JSON) if (folder / RUN_JSON).is_file() else {}),
        }
    method = Method(name or f"{folder.name} ({metrics.get('method', kind)})", folder, kind, metrics, meta)
    if (folder / PREDICTIONS_CSV).is_file():
        method.predictions = read_predictions(folder / PREDICTIONS_CSV)
    else:
        method.notes.append(
            f"{folder} has no {PREDICTIONS_CSV}: its confusion-matrix images, galleries and "
            "paired tests are left out; fit it again to write it."
        )
    if (folder / CV_PREDICTIONS_CSV).is_file():
        method.cv_predictions = read_predictions(folder / CV_PREDICTIONS_CSV)
    return method


def _ci(metrics: dict[str, Any], key: str) -> str:
    return ci_text(metrics, key) if isinstance(metrics.get(key), (int, float)) else ""


def near_duplicate_leaks(method: Method, audit_folder: Path | None) -> str:
    """Beside an older head's accuracy: how many of its test images have a near-duplicate in its training part,
    by the audit's pairs ('' when the head grouped near-duplicates itself, or no audit was given)."""
    if audit_folder is None or method.predictions is None or method.metrics.get("near_duplicate_threshold"):
        return ""
    audit = read_json(audit_folder / AUDIT_JSON, "give a folder written by `audit`")
    near = audit.get("near_duplicates") or {}
    tested = set(method.predictions.paths)
    pairs = _csv_rows(audit_folder, near, 10**9)
    leaked = {
        a if a in tested else b
        for a, b in ((r["path_a"], r["path_b"]) for r in pairs)
        if (a in tested) != (b in tested)
    }
    if not leaked:
        return ""
    return (
        f"{len(leaked)} test images have a near-duplicate in training (audit, cosine >= {near.get('threshold')}): "
        "this score is optimistic; fit again (near-duplicates are grouped by default now)"
    )


def summary_rows(methods: Sequence[Method], audit_folder: Path | None = None) -> list[dict[str, str]]:
    """One table row per method: test metrics with 95% intervals, CV score, training seconds; with an audit,
    the near-duplicate leaks beside the accuracy of heads that did not group them."""
    rows = []
    for m in methods:
        x = m.metrics
        rows.append(
            {
                "method": m.name,
                "kind": m.kind,
                "accuracy": _ci(x, "accuracy"),
                "accuracy_note": near_duplicate_leaks(m, audit_folder),
                "balanced_accuracy": _ci(x, "balanced_accuracy"),
                "macro_f1": _ci(x, "macro_f1"),
                "n_test": str(x.get("n_test", "")),
                "cv": f"{x['cv_score']:.4f}" if isinstance(x.get("cv_score"), (int, float)) else "",
                "train_s": f"{x['train_seconds']:.1f}" if isinstance(x.get("train_seconds"), (int, float)) else "",
            }
        )
    return rows


def paired_rows(methods: Sequence[Method]) -> list[dict[str, Any]]:
    """Exact McNemar tests on the test images two methods share: all pairs, or each against the best."""
    from ..stats import format_p, mcnemar_exact, paired_verdict

    scored = [m for m in methods if m.predictions is not None and len(m.predictions)]
    if len(scored) < 2:
        return []
    if len(scored) <= ALL_PAIRS_UP_TO:
        pairs = list(combinations(scored, 2))
    else:
        best = max(scored, key=lambda m: m.predictions.correct.mean())
        pairs = [(m, best) for m in scored if m is not best]
    rows = []
    for a, b in pairs:
        ca, cb = paired_outcomes(a.predictions, b.predictions)
        if not len(ca):
            rows.append({"a": a.name, "b": b.name, "n": 0, "verdict": "no common test images: not comparable"})
            continue
        test = mcnemar_exact(ca, cb)
        rows.append(
            {
                "a": a.name,
                "b": b.name,
                "n": test["n"],
                "a_only": test["a_only"],
                "b_only": test["b_only"],
                "p": format_p(test["p_value"]),
                "verdict": paired_verdict(a.name, b.name, ca, cb),
            }
        )
    return rows


def summary_figure(methods: Sequence[Method]) -> str | None:
    """Test accuracy of each method with its 95% interval, as an SVG data URI."""
    shown = [m for m in methods if isinstance(m.metrics.get("accuracy"), (int, float))]
    if not shown:
        return None
    fig = new_figure(6.5, 0.9 + 0.45 * len(shown))
    ax = fig.subplots()
    y = np.arange(len(shown))[::-1]
    acc = np.array([m.metrics["accuracy"] for m in shown])
    ci = np.array([m.metrics.get("accuracy_ci") or [a, a] for m, a in zip(shown, acc)])
    ax.errorbar(acc, y, xerr=[acc - ci[:, 0], ci[:, 1] - acc], fmt="o", color="#1f77b4", capsize=4)
    ax.set_yticks(y, [m.name for m in shown], fontsize=8)
    ax.set_xlabel("test accuracy (95% interval)")
    ax.set_xlim(max(0.0, float(ci[:, 0].min()) - 0.05), 1.0)
    ax.grid(axis="x", alpha=0.3)
    return figure_uri(fig, "svg")


def reliability_figure(metrics: dict[str, Any]) -> str | None:
    """The reliability diagram (accuracy against confidence per bin, before and after calibration), as SVG."""
    if "reliability" not in metrics:
        return None
    fig = new_figure(4.2, 3.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
    for key, label, colour in (
        ("reliability_uncalibrated", f"uncalibrated, ECE {metrics['ece_uncalibrated']:.3f}", "#d62728"),
        ("reliability", f"calibrated, ECE {metrics['ece']:.3f}", "#1f77b4"),
    ):
        table = metrics[key]
        count = np.asarray(table["count"])
        used = count > 0
        ax.plot(
            np.asarray(table["confidence"])[used],
            np.asarray(table["accuracy"])[used],
            "o-",
            ms=3,
            color=colour,
            label=label,
        )
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return figure_uri(fig, "svg")


def unknown_facts(metrics: dict[str, Any]) -> list[str]:
    """The accepted / unknown split of the test part, in words (empty without a detector)."""
    unknown = metrics.get("unknown")
    if not unknown:
        return ["This head has no unknown detector (fitted before they existed, or with --no-unknown)."]
    total = unknown["n_accepted"] + unknown["n_unknown"]
    fitted_on = unknown.get("fitted_on", "known images (the training part's out-of-fold scores)")
    return [
        f"Unknown detector ({unknown['method']}), threshold {unknown['threshold']:.3f}: set to accept "
        f"{unknown['accept']:.0%} of {fitted_on}.",
        f"Test part: {unknown['n_accepted']} of {total} accepted ({1 - unknown['test_unknown_rate']:.1%}), "
        f"{unknown['n_unknown']} called unknown ({unknown['test_unknown_rate']:.1%}); accuracy on the accepted "
        f"{unknown['accepted_accuracy']:.4f} (on all {metrics['accuracy']:.4f}).",
    ]


# -- per-method sections: confusion matrix with its images, galleries ---------------------------------
def _caption(p: Predictions, k: int) -> list[str]:
    names, pred = p.class_names, int(p.y_pred[k])
    return [p.paths[k], f"true {names[p.y_true[k]]}", f"predicted {names[pred]} {p.proba[k, pred]:.2f}"]


def method_section(m: Method, images: ImageTable, seed: int) -> dict[str, Any]:
    """The confusion matrix (each cell with its images) and the galleries of one method's test predictions."""
    p, root = m.predictions, m.dataset_root
    names, n = p.class_names, len(p.class_names)
    y_pred = p.y_pred
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for k in range(len(p)):
        t, q = int(p.y_true[k]), int(y_pred[k])
        cells.setdefault((t, q), []).append(_item(images, root, p.paths[k], _caption(p, k), t != q))
    counts = np.zeros((n, n), int)
    for (t, q), items in cells.items():
        counts[t, q] = len(items)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    matrix = [
        [
            {
                "count": int(counts[t, q]),
                "rate": float(rates[t, q]),
                "id": f"{t}-{q}",
                "title": f"true {names[t]}, predicted {names[q]}: {counts[t, q]} images",
            }
            for q in range(n)
        ]
        for t in range(n)
    ]
    top = np.sort(p.proba, axis=1)[:, ::-1]
    confidence = top[:, 0]
    margin = top[:, 0] - (top[:, 1] if n > 1 else 0)
    wrong = np.flatnonzero(~p.correct)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:GALLERY_SIZE]
    hesitant = np.argsort(margin, kind="stable")[:GALLERY_SIZE]
    rng = np.random.default_rng(seed)
    per_class = [int(k) for c in range(n) for k in np.sort(rng.permutation(np.flatnonzero(p.y_true == c))[:PER_CLASS])]

    def gallery(rows: Sequence[int], extra: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
        return [
            _item(
                images, root, p.paths[k], _caption(p, k) + ([extra(k)] if extra else []), bool(p.y_true[k] != y_pred[k])
            )
            for k in rows
        ]

    curves = m.folder / LEARNING_CURVES_PNG
    return {
        "name": m.name,
        "classes": names,
        "matrix": matrix,
        "reliability": reliability_figure(m.metrics),
        "unknown": unknown_facts(m.metrics) if m.kind == "head" or "unknown" in m.metrics else [],
        "curves": file_uri(curves) if m.kind == "run" and curves.is_file() else None,
        "cells": {f"{t}-{q}": items for (t, q), items in cells.items()},
        "galleries": [
            {
                "title": "Confidently wrong",
                "note": f"misclassified test images, most confident first ({len(np.flatnonzero(~p.correct))} in all)",
                "items": gallery(wrong),
            },
            {
                "title": "Hesitant",
                "note": "the smallest margin between the two most probable classes",
                "items": gallery(hesitant, lambda k: f"margin {margin[k]:.2f}"),
            },
            {
                "title": "A few per class",
                "note": f"up to {PER_CLASS} test images of each class, drawn by seed {seed}",
                "items": gallery(per_class),
            },
        ],
    }


# -- study -----------------------------------------------------------------------------------------


def study_section(folder: Path, study: StudyResults, images: ImageTable) -> dict[str, Any]:
    """The study's table (the winner marked), its advice, skipped configurations and the ImageNet checkout."""
    winner = study.winner.name if study.winner else None
    rows = [{"cells": table_cells(r), "winner": r.name == winner} for r in study.rows]
    root = study.dataset_root
    checkout = []
    for backbone, part in study.checkout.items():
        grid = part.get("grid_png")
        checkout.append(
            {
                "backbone": backbone,
                "grid": file_uri(folder / grid) if grid and (folder / grid).is_file() else None,
                "likeness": [
                    {"class": c, "top1": v.get("mean_top1"), "entropy": v.get("mean_entropy")}
                    for c, v in part.get("likeness", {}).items()
                ],
                "samples": [
                    _item(
                        images,
                        root,
                        s["path"],
                        [s["path"], f"class {s.get('class', '')}"]
                        + [f"{label} {prob:.2f}" for label, prob in s.get("top5", [])[:3]],
                    )
                    for s in part.get("samples", [])[:GALLERY_SIZE]
                ],
            }
        )
    return {
        "columns": [title for _, title, _ in STUDY_COLUMNS],
        "rows": rows,
        "advice": study.advice,
        "advice_text": study.advice.get("text", []),
        "skipped": study.skipped,
        "checkout": checkout,
        "interrupted": study.interrupted,
        "facts": {k: getattr(study, k) for k in ("dataset_root", "n_images", "seed", "seconds")},
        "finetune": study.finetune.to_json() if study.finetune else None,
    }


# -- audit -----------------------------------------------------------------------------------------
def _csv_rows(folder: Path, part: dict[str, Any] | None, limit: int) -> list[dict[str, str]]:
    """The first rows of a CSV an audit section names (most suspicious first, as the audit writes them)."""
    name = (part or {}).get("file")
    if not name or not (folder / name).is_file():
        return []
    with open(folder / name, newline="", encoding="utf-8") as handle:
        return [row for _, row in zip(range(limit), csv.DictReader(handle))]


def audit_section(folder: Path, images: ImageTable) -> dict[str, Any]:
    """The audit's summary, label issues, near-duplicate pairs, outliers and learning curve."""
    audit = read_json(folder / AUDIT_JSON, "give a folder written by `audit`")
    root = audit.get("dataset_root", "")
    issues = [
        _item(
            images,
            root,
            r["path"],
            [
                r["path"],
                f"given {r.get('given', '')}",
                f"suggested {r.get('suggested', '')}",
                f"label quality {float(r.get('score', 'nan')):.3f}",
            ],
            True,
        )
        for r in _csv_rows(folder, audit.get("label_issues"), GALLERY_SIZE)
    ]
    pairs = [
        {
            "a": _item(images, root, r["path_a"], [r["path_a"], f"{r.get('label_a', '')} ({r.get('split_a', '')})"]),
            "b": _item(images, root, r["path_b"], [r["path_b"], f"{r.get('label_b', '')} ({r.get('split_b', '')})"]),
            "cosine": float(r.get("cosine", "nan")),
            "kind": r.get("kind", ""),
        }
        for r in _csv_rows(folder, audit.get("near_duplicates"), GALLERY_SIZE)
    ]
    outliers = [
        _item(
            images,
            root,
            r["path"],
            [r["path"], f"label {r.get('label', '')}", f"score {float(r.get('score', 'nan')):.3f}"],
        )
        for r in _csv_rows(folder, audit.get("outliers"), GALLERY_SIZE)
    ]
    curve = audit.get("learning_curve") or {}
    curve_png = curve.get("file")
    return {
        "summary": audit.get("summary", []),
        "n_images": audit.get("n_images"),
        "label_issues": audit.get("label_issues") or {},
        "issues": issues,
        "near_duplicates": audit.get("near_duplicates") or {},
        "pairs": pairs,
        "outliers_info": audit.get("outliers") or {},
        "outliers": outliers,
        "curve": curve,
        "curve_png": file_uri(folder / curve_png) if curve_png and (folder / curve_png).is_file() else None,
    }


# -- the embedding map -----------------------------------------------------------------------------
def project(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, 2) coordinates of L2-normalised features: PCA, or t-SNE on the first 50 principal components."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if len(x) < 3:
        return np.zeros((len(x), 2))
    if method == "pca" or len(x) < 10:
        return PCA(2, random_state=seed).fit_transform(x)
    from threadpoolctl import threadpool_limits

    reduced = PCA(min(50, *x.shape), random_state=seed).fit_transform(x)
    # one OpenMP thread: on a busy machine t-SNE's spinning threads made it 5x slower (57 s vs 10 s for 960
    # images with other jobs running), and on a quiet one the loss is small
    with threadpool_limits(1):
        return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(reduced)


def class_colours(n: int) -> list[str]:
    """A distinct colour per class: matplotlib's tab20 with its ten strong colours first, then evenly spaced hues."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, to_hex

    if n <= 20:
        return [to_hex(colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1)) for i in range(n)]
    return [to_hex(hsv_to_rgb((i / n, 0.65, 0.85))) for i in range(n)]


def map_section(
    method: Method, images: ImageTable, projection: str, seed: int, log: Callable[[str], None]
) -> tuple[dict[str, Any] | None, str | None]:
    """The 2-D map of the method's cached features, or None and the reason it is left out."""
    from ..cache import load

    cache_path = method.cache_path
    if not cache_path or not Path(cache_path).is_file():
        return None, (
            f"embedding map left out: the feature cache of {method.name} ({cache_path or 'not recorded'}) "
            "is gone; run extract again to draw it."
        )
    cache = load(cache_path)
    if len(cache) == 0:
        return None, f"embedding map left out: {cache_path} holds no features."
    log(f"projecting {len(cache)} cached features ({projection})")
    xy = project(cache.features.astype(np.float64), projection, seed)
    span = np.maximum(xy.max(0) - xy.min(0), 1e-12)
    width, height, pad = 760, 520, 14
    sx = pad + (xy[:, 0] - xy.min(0)[0]) / span[0] * (width - 2 * pad)
    sy = pad + (xy[:, 1] - xy.min(0)[1]) / span[1] * (height - 2 * pad)
    predicted: dict[str, str] = {}
    for p in (method.cv_predictions, method.predictions):
        if p is not None:
            predicted.update(zip(p.paths, (p.class_names[i] for i in p.y_pred)))
    root = method.dataset_root or str(cache.attrs.get("dataset_root", ""))
    rng = np.random.default_rng(seed)
    with_thumbnail = set(rng.permutation(len(cache))[:MAP_THUMBNAILS].tolist())
    colours = class_colours(len(cache.class_names))
    points = []
    for k in range(len(cache)):
        label = cache.class_names[cache.labels[k]]
        pred = predicted.get(cache.paths[k])
        points.append(
            {
                "x": round(float(sx[k]), 1),
                "y": round(float(sy[k]), 1),
                "colour": colours[cache.labels[k]],
                "wrong": pred is not None and pred != label,
                "path": cache.paths[k],
                "label": label,
                "pred": pred,
                "split": cache.split[k],
                "img": images.ref(root, cache.paths[k]) if k in with_thumbnail else -1,
            }
        )
    points.sort(key=lambda p: p["wrong"])  # misclassified points drawn last, on top
    n_wrong = sum(p["wrong"] for p in points)
    return {
        "width": width,
        "height": height,
        "points": points,
        "projection": projection,
        "legend": list(zip(cache.class_names, colours)),
        "cache": str(cache_path),
        "n_wrong": n_wrong,
        "sampled": len(cache) > MAP_THUMBNAILS,
    }, None


def report_images(cache_path: str | os.PathLike) -> list[str]:
    """The images (image_key) a report of a head on this cache shows, when it shows every one of them: up
    to MAP_THUMBNAILS images, each point of the map has its thumbnail. Empty for a bigger cache, whose map
    shows a sample, and for a dataset in an object store."""
    from ..cache import load
    from ..storage import is_url

    cache = load(cache_path)
    root = str(cache.attrs.get("dataset_root", ""))
    if not root or is_url(root) or len(cache) > MAP_THUMBNAILS:
        return []
    return [image_key(root, path) for path in cache.paths]


# -- the whole report ------------------------------------------------------------------------------
def build_report(
    folders: Sequence[str | os.PathLike],
    audit: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    projection: str = "tsne",
    thumb_px: int = THUMBNAIL_PX,
    seed: int = 0,
    thumbnails: Thumbnails | None = None,
    log: Callable[[str], None] = logger.info,
) -> Path:
    """Write one self-contained HTML report of head, run and study folders (and an audit folder).

    out defaults to report.html in the output home. thumbnails: a pool of thumb_px thumbnails the caller
    started early (the caller closes it); by default the report encodes its own.
    """
    check_params(dict(projection=projection, thumb_px=thumb_px, seed=seed))
    if not folders:
        raise UserError("give at least one head, run or study folder.")
    if audit is not None and not (Path(audit) / AUDIT_JSON).is_file():
        raise UserError(f"--audit {audit} has no {AUDIT_JSON}; give a folder written by `audit`.")
    started = time.perf_counter()
    images = ImageTable()
    methods: list[Method] = []
    studies = []
    for given in map(Path, folders):
        if not given.is_dir():
            raise UserError(f"{given} is not a folder; give head, run or study folders.")
        if folder_kind(given) == "study":
            study = read_study(given)
            studies.append({"folder": str(given), **study_section(given, study, images)})
            winner = study.winner.head_dir if study.winner else None
            if winner and folder_kind(given / winner) in ("head", "run"):
                methods.append(load_method(given / winner, f"{given.name}: winner ({winner})"))
        else:
            methods.append(load_method(given))
    notes = [note for m in methods for note in m.notes]
    sections = [method_section(m, images, seed) for m in methods if m.predictions is not None and len(m.predictions)]
    roots = {m.dataset_root for m in methods if m.predictions is not None}
    if "" in roots:
        notes.append("a folder records no dataset root: its images are shown as placeholders.")
    embedding, note = map_section(methods[0], images, projection, seed, log) if methods else (None, None)
    if note:
        notes.append(note)
    audit_part = audit_section(Path(audit), images) if audit is not None else None
    log(f"embedding {len(images.index)} thumbnails")
    given = thumbnails is not None and thumbnails.px == thumb_px
    with nullcontext(thumbnails) if given else Thumbnails(thumb_px) as pool:
        uris, missing = images.encode(pool)
    if missing:
        notes.append(
            f"{len(missing)} images could not be read and are shown as a grey placeholder; first: "
            + "; ".join(missing[:3])
        )
    html = render(
        "report.html",
        title="cnncodes report",
        generated=time.strftime("%Y-%m-%d %H:%M"),
        sources=[str(f) for f in folders] + ([f"audit: {audit}"] if audit else []),
        notes=notes,
        summary=summary_rows(methods, Path(audit) if audit is not None else None),
        figure=summary_figure(methods),
        paired=paired_rows(methods),
        studies=studies,
        sections=sections,
        audit=audit_part,
        embedding=embedding,
        data={"images": uris, "placeholder": placeholder_uri()},
        thumb_px=thumb_px,
    )
    path = write_text(out if out is not None else output_home() / REPORT_HTML, html)
    log(
        f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB, {len(uris)} thumbnails) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return path
