"""train: a folder of images to a trusted head in one process (extract, fit-head, audit headline, report, export).

Each stage is the function its own command runs (pipeline.extract.extract, pipeline.heads.fit_head,
pipeline.web.report.build_report, pipeline.export.export_head; the audit's near-duplicate and label-issue
functions); this module only strings them together, so `train` writes the same cache, head, report and
model as the separate commands, and pays for starting Python and importing the libraries once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import CV_PREDICTIONS_CSV, REPORT_HTML, exported_model_name, output_dir
from .audit import (
    blas_on_one_thread,
    label_issues,
    label_issues_line,
    near_duplicates,
    near_duplicates_counts,
    near_duplicates_line,
)
from .backbones import BackboneConfig
from .errors import install_hint
from .export import FORMATS, LINEAR_HEADS  # and export's option table (--quantize, --verify), which train takes
from .extract import ExtractSummary, extract
from .heads import NEAR_DUPLICATES, HeadResult
from .neighbours import DEFAULT_THRESHOLD
from .params import Options, ParamError, check_params, define
from .runtime import require_tensorflow
from .views import ViewRecipe
from .web.report import Thumbnails, build_report, report_images

logger = logging.getLogger(__name__)

AUDIT_INSTALL = install_hint("audit")
define(export=[Options(FORMATS), None])


@dataclass
class TrainResult:
    """Where train put everything, what it measured, and how long each stage took (seconds, by stage name)."""

    extract: ExtractSummary
    head: HeadResult
    audit: dict[str, Any]
    report: Path | None
    model: Path | None
    export_check: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def default_model_dir(cache_path: Path, clf: str) -> Path:
    """models/<cache name>-<clf>/ in the output home: one head folder per cache and classifier, beside heads/ of
    fit-head."""
    return output_dir("models") / f"{cache_path.stem}-{clf}"


def audit_headline(head: HeadResult, cache_path: Path, threshold: float) -> dict[str, Any]:
    """What the audit's headline needs, through the audit's own functions, from what fit-head already computed:
    cross-split near-duplicates against the head's own split, and label issues among its training images from
    its out-of-fold probabilities (cv_predictions.csv; logreg and knn heads). The rest of the audit (outliers,
    learning curve, issues among the test images) is `cnncodes audit`."""
    from .artifacts import read_predictions
    from .cache import load
    from .neighbours import comparable_rows

    cache = load(cache_path)
    in_test = np.zeros(len(cache), bool)
    in_test[head.split.test] = True
    with blas_on_one_thread():
        *_, kinds, search = near_duplicates(
            comparable_rows(cache.features), cache.content_hash, cache.labels, in_test, threshold
        )
    found: dict[str, Any] = {"near_duplicates": near_duplicates_counts(kinds, threshold, search)}
    if not (head.folder / CV_PREDICTIONS_CSV).is_file():
        found["label_issues_skipped"] = (
            f"a {head.metrics['clf']} head has no out-of-fold probabilities; `cnncodes audit` finds them"
        )
        return found
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        found["label_issues_skipped"] = f"they need cleanlab: {AUDIT_INSTALL}"
        return found
    cv = read_predictions(head.folder / CV_PREDICTIONS_CSV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab's notes on classes too small for its estimates
        ranked, _, n_flagged = label_issues(cv.y_true, cv.proba)
    found.update(
        label_issues={"count": int(len(ranked)), "estimated_mislabelled": n_flagged},
        label_issue_rows=(ranked, cv.proba.argmax(1), cv.y_true, cv.class_names, cv.paths),
    )
    return found


# What the stages after extraction import, loaded on a thread while extraction runs: the cores have idle
# moments then (scanning, hashing, the interpreter's load, waits between decoded batches), and these
# imports are most of what fitting a head on a few hundred images costs.
LATER_IMPORTS = (
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.decomposition",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "cleanlab.filter",
    "cleanlab.rank",
    "jinja2",
)


def _import_later_stages(extra: tuple[str, ...]) -> None:
    import importlib

    from .lean_imports import import_skops_io

    for name in LATER_IMPORTS + extra:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # a missing extra is reported by the stage that needs it
    import_skops_io()


def train(
    data_dir: str | os.PathLike,
    config: BackboneConfig = BackboneConfig(),
    *,
    clf: str = "logreg",
    cache: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    workers: int | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    cv: int = 5,
    n_jobs: int = -1,
    class_weight: str | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    l2_normalize: bool = True,
    group_near_duplicates: float | None = NEAR_DUPLICATES,
    threshold: float = DEFAULT_THRESHOLD,
    projection: str = "pca",
    thumb_px: int = 96,
    export: str | None = None,
    quantize: str = "none",
    verify: int = 64,
    out: str | os.PathLike | None = None,
    accept: float | str | None = 0.95,
    storage_options: str | dict[str, Any] | None = None,
    progress: bool = True,
    views: ViewRecipe | None = None,
    log: Callable[[str], None] = logger.info,
) -> TrainResult:
    """Extract data_dir into the usual cache, fit the head into out (staged and swapped in whole, as fit-head
    does), then write out/report.html and, with export, out/model.<format>; return where each went.

    views: also cache augmented views of every image (pipeline.views.view_recipe) and train on those of the
    training images, as extract --views K and fit-head --views do."""
    from .heads import fit_head

    check_params(
        dict(
            batch_size=batch_size,
            chunk_size=chunk_size,
            workers=workers,
            threads=threads,
            runtime=runtime,
            clf=clf,
            cv=cv,
            n_jobs=n_jobs,
            class_weight=class_weight,
            seed=seed,
            test_size=test_size,
            group_near_duplicates=group_near_duplicates,
            projection=projection,
            thumb_px=thumb_px,
            export=export,
            quantize=quantize,
            verify=verify,
            threshold=threshold,
        )
    )
    if export is not None:
        if clf not in LINEAR_HEADS:
            raise ParamError(
                f"{{}} needs a linear head ({{}} {' or '.join(LINEAR_HEADS)}); {clf} does not fold into a model.",
                "export",
                "clf",
            )
        require_tensorflow(f"--export {export}")
    elif quantize != "none":
        raise ParamError("{} applies to {} tflite only.", "quantize", "export")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    extra = (("sklearn.calibration",) if clf in ("svm", "rbf-svm") else ()) + (
        ("sklearn.manifold",) if projection == "tsne" else ()
    )
    importer = threading.Thread(target=_import_later_stages, args=(extra,), name="cnncodes-imports", daemon=True)
    importer.start()
    summary = extract(
        data_dir,
        config,
        cache=cache,
        cache_dir=cache_dir,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        runtime=runtime,
        threads=threads,
        progress=progress,
        storage_options=storage_options,
        log=log,
        views=views,
    )
    seconds["extract: decoding + inference (overlapped)"] = summary.extract_seconds
    seconds["extract: scan, hashing, runtime load, cache commit"] = (
        time.perf_counter() - started - summary.extract_seconds
    )
    if summary.interrupted:
        log("interrupted: the cache holds everything extracted so far; run the same command to resume.")
        raise KeyboardInterrupt
    folder = Path(out) if out else default_model_dir(summary.cache_path, clf)
    started = time.perf_counter()
    importer.join()
    seconds["imports left after extraction"] = time.perf_counter() - started
    early = report_images(summary.cache_path)
    with Thumbnails(thumb_px, workers=1) as thumbnails:
        # decoding the report's images again costs about as much as the fit: start it now, on the core
        # the fit leaves idle (a report of a bigger dataset picks a sample and decodes it on every core)
        thumbnails.start(early)
        started = time.perf_counter()
        head = fit_head(
            summary.cache_path,
            clf,
            cv=cv,
            n_jobs=n_jobs,
            class_weight=class_weight,
            seed=seed,
            test_size=test_size,
            l2_normalize=l2_normalize,
            group_near_duplicates=group_near_duplicates,
            accept=accept,
            views=views is not None,
            out=folder,
            log=log,
        )
        seconds["fit-head: CV sweep + refit"] = head.metrics["fit_seconds"]
        seconds["fit-head: load, evaluate, save"] = time.perf_counter() - started - head.metrics["fit_seconds"]
        started = time.perf_counter()
        headline = audit_headline(head, summary.cache_path, threshold)
        seconds["audit headline"] = time.perf_counter() - started
        started = time.perf_counter()
        report = build_report(
            [folder],
            None,
            folder / REPORT_HTML,
            projection=projection,
            thumb_px=thumb_px,
            seed=seed,
            thumbnails=thumbnails if early else None,
            log=log,
        )
        seconds["report"] = time.perf_counter() - started
    model, check = None, {}
    if export is not None:
        from .export import export_head

        started = time.perf_counter()
        model, check = export_head(
            folder, folder / exported_model_name(export), format=export, quantize=quantize, verify=verify
        )
        seconds["export"] = time.perf_counter() - started
    return TrainResult(summary, head, headline, report, model, check, seconds)


def summary_lines(result: TrainResult) -> list[str]:
    """What train tells the user: the test accuracy with its interval, the audit's headline, where each file
    went, and the commands to run next."""
    from .artifacts import HEAD_JSON, HEAD_MODEL
    from .tables import ci_text

    m, folder = result.head.metrics, result.head.folder
    params = ", ".join(f"{k}={v:.3g}" for k, v in m["best_params"].items())
    lines = [
        f"{m['n_train']} train / {m['n_test']} test images ({m['split']}); {m['clf']} with {params} chosen by "
        f"{m['cv_folds']}-fold CV ({m['cv_scoring']} {m['cv_score']:.4f})",
        f"test accuracy {ci_text(m, 'accuracy')} (95% interval), balanced accuracy "
        f"{ci_text(m, 'balanced_accuracy')}, macro F1 {ci_text(m, 'macro_f1')}",
    ]
    if result.export_check:
        check = result.export_check
        lines.append(
            f"exported model on {check['images']} test images: top-1 agreement with the head "
            f"{check['top1_agreement']:.4f}, max |p_export - p_head| {check['max_abs_prob_diff']:.2e}"
        )
    lines.append("audit headline (`cnncodes audit` for outliers and the learning curve):")
    audit = result.audit
    if "label_issues" in audit:
        ranked, suggested, labels, names, paths = audit["label_issue_rows"]
        lines.append(
            "  "
            + label_issues_line(audit["label_issues"], ranked, suggested, labels, names, paths).replace(
                "label issues:", "label issues among the training images:", 1
            )
        )
    else:
        lines.append(f"  label issues: not looked for ({audit['label_issues_skipped']})")
    lines.append("  " + near_duplicates_line(audit["near_duplicates"]))
    lines += [
        "files:",
        f"  features  {result.extract.cache_path} ({result.extract.n_rows} images; {result.extract.n_new} new)",
        f"  head      {folder}/ ({HEAD_JSON}, {HEAD_MODEL}, metrics and per-image predictions)",
    ]
    if result.report is not None:
        lines.append(f"  report    {result.report}")
    if result.model is not None:
        lines.append(f"  model     {result.model} (+ {result.model.name}.json)")
    lines += ["next:", f"  cnncodes serve --head {folder}", f"  cnncodes predict IMAGE_OR_FOLDER --head {folder}"]
    if result.model is not None:
        lines.append(f"  cnncodes serve --model {result.model}")
    lines.append("took: " + "; ".join(f"{name} {s:.2f} s" for name, s in result.seconds.items()))
    return lines
