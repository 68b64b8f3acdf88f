"""Side-by-side comparison of heads and fine-tuned runs: one row per method, measured the same way."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .backbones import BackboneConfig, build_backbone
from .cache import load
from .errors import UserError
from .extract import stream_features
from .heads import META_FILE, MODEL_FILE, load_head
from .images import ImageFile
from .report import compare_markdown, load_metrics, plot_compare
from .runtime import KerasRuntime, load_model_file

TIMING_IMAGES = 64


def _test_images(cache_path: str, n: int) -> tuple[list[ImageFile], str]:
    """Up to n image files of a cache's dataset (spread over the rows), for timing."""
    cache = load(cache_path)
    root = Path(cache.attrs["dataset_root"])
    rows = np.linspace(0, len(cache) - 1, min(n, len(cache))).astype(int)
    files = [ImageFile(root / cache.paths[i], cache.paths[i]) for i in rows if (root / cache.paths[i]).is_file()]
    return files, json.loads(cache.attrs["config_json"]).get("resize", "bilinear")


def _time_ms(runtime: Any, files: list[ImageFile], resize: str, after: Callable[[np.ndarray], Any]) -> float:
    """Milliseconds per image: decode, run, then `after` on the outputs (the head, for heads)."""
    start, count = time.perf_counter(), 0
    for batch in stream_features(files, runtime, resize):
        after(batch.features)
        count += len(batch.files)
    return 1000 * (time.perf_counter() - start) / max(count, 1)


def describe(path: str | os.PathLike, timing_images: int = TIMING_IMAGES) -> dict[str, Any]:
    """One comparison row for a head folder or a fine-tuning run folder."""
    path = Path(path)
    is_head = (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()
    if not (is_head or (path / "model.keras").is_file()) or not (path / "metrics.json").is_file():
        raise UserError(f"{path} is neither a head folder (head.json) nor a fine-tuning run (model.keras) "
                        "with its metrics.json.")
    metrics = load_metrics(path)
    row = {key: metrics.get(key) for key in ("method", "accuracy", "balanced_accuracy", "macro_f1",
                                             "train_seconds", "n_test")}
    row["path"] = str(path)
    if is_head:
        head = load_head(path)
        backbone = build_backbone(BackboneConfig(**head.meta["backbone_config"]).resolved())
        runtime, after = KerasRuntime(backbone), head.predict_proba
        files, resize = _test_images(head.meta["cache_path"], timing_images)
        row["size_mb"] = backbone.count_params() * 4 / 1e6 + (path / MODEL_FILE).stat().st_size / 1e6
    else:
        runtime, meta = load_model_file(path / "model.keras")
        after = lambda outputs: outputs  # noqa: E731 - the model's outputs are the probabilities
        files, resize = _test_images(meta["cache_path"], timing_images)
        row["size_mb"] = runtime.model.count_params() * 4 / 1e6
    runtime(np.zeros((1, runtime.image_size, runtime.image_size, 3), np.uint8))  # warm-up
    row["inference_ms"] = _time_ms(runtime, files, resize, after) if files else None
    return row


def compare(paths: Sequence[str | os.PathLike], out: str | os.PathLike = "compare",
            log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], Path]:
    """Rows for every head or run; writes compare.md, compare.json and compare.png in out."""
    rows = []
    for path in paths:
        log(f"measuring {path}")
        rows.append(describe(path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(compare_markdown(rows) + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot_compare(rows, out / "compare.png")
    return rows, out
