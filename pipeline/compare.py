"""Side-by-side comparison of heads and fine-tuned runs: one row per method, measured the same way.

Everything comes from the folders themselves (metrics.json, predictions.csv, the model): the
paired test compares the methods on the very same test images, and no cache is needed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import (
    COMPARE_JSON,
    COMPARE_MD,
    COMPARE_PNG,
    HEAD_MODEL,
    PREDICTIONS_CSV,
    RUN_MODEL,
    Predictions,
    folder_kind,
    output_dir,
    paired_outcomes,
    read_predictions,
    sample_images,
    staged_folder,
    write_json,
    write_text,
)
from .errors import UserError
from .heads import load_head
from .images import ImageFile
from .metrics import load_metrics
from .plots import plot_compare
from .runtime import KerasRuntime, load_model_file
from .sources import build_feature_model, head_sources
from .stream import stream_features
from .tables import compare_markdown

logger = logging.getLogger(__name__)

TIMING_IMAGES = 64


def _time_ms(runtime: Any, files: list[ImageFile], resize: str, after: Callable[[np.ndarray], Any]) -> float:
    """Milliseconds per image: decode, run, then `after` on the outputs (the head, for heads)."""
    start, count = time.perf_counter(), 0
    for batch in stream_features(files, runtime, resize):
        after(batch.features)
        count += len(batch.files)
    return 1000 * (time.perf_counter() - start) / max(count, 1)


def comparable_kind(path: Path) -> str:
    """The folder's kind, "head" or "run"; anything else is refused, naming the folder."""
    kind = folder_kind(path)
    if kind not in ("head", "run"):
        raise UserError(
            f"{path} is neither a head folder (head.json) nor a fine-tuning run (model.keras) with its metrics.json."
        )
    return kind


def describe(path: str | os.PathLike, timing: int = TIMING_IMAGES) -> tuple[dict[str, Any], Predictions]:
    """One comparison row for a head folder or a fine-tuning run folder, and its test predictions."""
    path = Path(path)
    kind = comparable_kind(path)
    metrics = load_metrics(path)
    predictions = read_predictions(path / PREDICTIONS_CSV)
    row = {
        key: metrics.get(key)
        for key in (
            "method",
            "accuracy",
            "accuracy_ci",
            "balanced_accuracy",
            "balanced_accuracy_ci",
            "macro_f1",
            "macro_f1_ci",
            "train_seconds",
            "n_test",
        )
    }
    row["path"] = str(path)
    if kind == "head":
        head = load_head(path)
        sources = head_sources(head.meta)
        backbone = build_feature_model(sources)
        runtime, after = KerasRuntime(backbone), head.predict_proba
        root, resize = head.meta["dataset_root"], sources[0].identity["resize"]
        row["size_mb"] = backbone.count_params() * 4 / 1e6 + (path / HEAD_MODEL).stat().st_size / 1e6
    else:
        runtime, meta = load_model_file(path / RUN_MODEL)
        after = lambda outputs: outputs  # noqa: E731 - the model's outputs are the probabilities
        root, resize = meta.get("dataset_root", ""), meta.get("resize", "bilinear")
        row["size_mb"] = runtime.model.count_params() * 4 / 1e6
    files = sample_images(predictions, root, timing)
    runtime(np.zeros((1, runtime.image_size, runtime.image_size, 3), np.uint8))  # warm-up
    row["inference_ms"] = _time_ms(runtime, files, resize, after) if files else None
    return row, predictions


def paired_tests(rows: list[dict[str, Any]], predictions: list[Predictions]) -> None:
    """Each method against the most accurate one, on the test images both were scored on (exact McNemar)."""
    from .stats import mcnemar_exact, paired_verdict

    best = int(np.argmax([r["accuracy"] for r in rows]))
    for k, (row, pred) in enumerate(zip(rows, predictions)):
        if k == best:
            row["paired_verdict"] = "(the best)"
            continue
        a, b = paired_outcomes(pred, predictions[best])
        if not len(a):
            row["paired_verdict"] = "no common test images: not comparable"
            continue
        row["paired_test"] = {"against": rows[best]["method"], **mcnemar_exact(a, b)}
        row["paired_verdict"] = paired_verdict(row["method"], rows[best]["method"], a, b)


def compare(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, log: Callable[[str], None] = logger.info
) -> tuple[list[dict[str, Any]], Path]:
    """Rows for every head or run, with paired tests; writes compare.md, compare.json and compare.png in out."""
    for path in paths:  # every folder checked before any is measured: a typo costs no backbone build
        comparable_kind(Path(path))
    rows, predictions = [], []
    for path in paths:
        log(f"measuring {path}")
        row, pred = describe(path)
        rows.append(row)
        predictions.append(pred)
    paired_tests(rows, predictions)
    out = Path(out) if out is not None else output_dir("compare")
    with staged_folder(out) as stage:
        write_text(stage / COMPARE_MD, compare_markdown(rows) + "\n")
        write_json(stage / COMPARE_JSON, rows)
        plot_compare(rows, stage / COMPARE_PNG)
    return rows, out
