"""Keras vs TFLite (XNNPACK) runtime, end to end through `extract` into fresh caches.

    python bench/runtime.py DATA_DIR --backbone PATH_OR_NAME [--layer NAME] [--batch-size 32]

Prints the figures and, as its last line, one JSON object with keras_img_s, tflite_img_s,
speedup and min_cosine (per image, the two caches matched by content hash).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import backbone_parser, report  # noqa: E402 (sets the import path and environment)

from pipeline.backbones import BackboneConfig
from pipeline.cache import load
from pipeline.extract import extract


def main() -> None:
    parser = backbone_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    config = BackboneConfig(args.backbone, args.weights, args.layer, alpha=args.alpha)
    result, caches = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in ("keras", "tflite"):
            start = time.perf_counter()
            summary = extract(
                args.data_dir,
                config,
                cache=Path(tmp) / runtime / "features.h5",
                runtime=runtime,
                batch_size=args.batch_size,
                progress=False,
                log=lambda m: None,
            )
            result[f"{runtime}_img_s"] = round(summary.images_per_s, 1)
            result[f"{runtime}_setup_s"] = round(summary.seconds - summary.extract_seconds, 1)
            result[f"{runtime}_wall_s"] = round(time.perf_counter() - start, 1)
            caches[runtime] = load(summary.cache_path)
    keras_rows = {h: i for i, h in enumerate(caches["keras"].content_hash)}
    tflite = caches["tflite"]
    a = caches["keras"].features[[keras_rows[h] for h in tflite.content_hash]]
    b = tflite.features
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result.update(
        speedup=round(result["tflite_img_s"] / result["keras_img_s"], 2),
        min_cosine=float(cosine.min()),
        max_abs_diff=float(np.abs(a - b).max()),
        images=len(b),
        data_dir=args.data_dir,
        backbone=args.backbone,
        layer=args.layer,
        batch_size=args.batch_size,
        runtimes_recorded=sorted(set(tflite.runtime)),
    )
    report(
        f"keras {result['keras_img_s']} img/s, tflite {result['tflite_img_s']} img/s: speedup "
        f"{result['speedup']}x, min cosine {result['min_cosine']:.7f} over {len(b)} images "
        f"(setup: keras {result['keras_setup_s']} s, tflite incl. conversion {result['tflite_setup_s']} s)",
        result,
    )


if __name__ == "__main__":
    main()
