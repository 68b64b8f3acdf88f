"""Extraction speed: the backbone alone on in-memory tensors vs `extract` from image files.

    python bench/extract_speed.py DATA_DIR --backbone PATH_OR_NAME [--layer NAME] [--batch-size 32]

Prints the figures and, as its last line, one JSON object with backbone_img_s, extract_img_s,
ratio (extract / backbone), runtime, decode_cpu_ms (per image, draft mode on), decode_cpu_ms_no_draft,
peak_rss_mb.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import backbone_parser, report  # noqa: E402 (sets the import path and environment)

from pipeline.backbones import BackboneConfig
from pipeline.extract import extract
from pipeline.images import ImageError, decode_image, scan_dataset
from pipeline.runtime import make_runtime


def decode_cpu_ms(paths: list[Path], size: int, draft: bool) -> float:
    """CPU milliseconds per image to decode and resize, one thread."""
    start = time.process_time()
    for path in paths:
        try:
            decode_image(path, size, draft=draft)
        except ImageError:
            pass
    return 1000 * (time.process_time() - start) / len(paths)


def main() -> None:
    parser = backbone_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--runtime", default="keras", choices=["auto", "keras", "tflite"], help="the same runtime measures (a) and (b)"
    )
    args = parser.parse_args()
    config = BackboneConfig(args.backbone, args.weights, args.layer, alpha=args.alpha).resolved()
    files = scan_dataset(args.data_dir).files

    tflite_dir = tempfile.mkdtemp()  # conversion (if any) is set-up, not extraction: done here, reused below
    atexit.register(shutil.rmtree, tflite_dir, True)
    runtime = make_runtime(config, args.runtime, tflite_dir=tflite_dir, log=lambda m: None)
    batch = np.random.default_rng(0).integers(
        0, 256, (args.batch_size, runtime.image_size, runtime.image_size, 3), dtype=np.uint8
    )
    n_batches = max(4, len(files) // args.batch_size)
    start = time.perf_counter()
    for _ in range(n_batches):
        runtime(batch)
    backbone_img_s = n_batches * args.batch_size / (time.perf_counter() - start)
    del runtime

    summary = extract(
        args.data_dir,
        config,
        cache=Path(tflite_dir) / "bench.h5",
        batch_size=args.batch_size,
        runtime=args.runtime,
        progress=False,
        log=lambda m: None,
    )
    extract_img_s = summary.images_per_s
    paths = [f.path for f in files]
    result = {
        "data_dir": args.data_dir,
        "backbone": args.backbone,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "runtime": summary.runtime,
        "images": summary.n_new,
        "backbone_img_s": round(backbone_img_s, 1),
        "extract_img_s": round(extract_img_s, 1),
        "ratio": round(extract_img_s / backbone_img_s, 3),
        "extract_wall_s": round(summary.seconds, 1),
        "decode_cpu_ms": round(decode_cpu_ms(paths, config.image_size, True), 2),
        "decode_cpu_ms_no_draft": round(decode_cpu_ms(paths, config.image_size, False), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpus": os.cpu_count(),
    }
    report(
        f"backbone alone {backbone_img_s:.1f} img/s, extract {extract_img_s:.1f} img/s "
        f"(ratio {result['ratio']:.2f}); decode {result['decode_cpu_ms']} CPU ms/img with draft, "
        f"{result['decode_cpu_ms_no_draft']} without; peak RSS {result['peak_rss_mb']} MB",
        result,
    )


if __name__ == "__main__":
    main()
