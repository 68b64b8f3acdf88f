"""Cached augmented views: do they help a frozen-feature head? With and without `--views K` on one split.

    python bench/views.py DATASET [DATASET ...] [--views 4] [--clf logreg] [--work DIR]

DATASET is a folder, or a name under ../shared/datasets. A seeded 80/20 split is materialised as
WORK/split/{train,val} (../shared/peers/split_folders.py, as bench/vs_recipe.py does), then, from a
cold feature cache (the backbone's TFLite conversion warm: converted once beforehand), Lite0 avg_pool:
(a) `extract` + `fit-head`; (b) `extract --views K` + `fit-head --views`. Both test on the val folder.
Prints the command lines, per dataset and side: test accuracy with its 95% interval, CV accuracy,
extraction seconds (whole process) and the cache size on disk; as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from common import SHARED, report  # noqa: E402 (sets the import path and environment)
from first_batch import ensure_conversion
from vs_recipe import LITE0, PEERS, run


def disk_bytes(folder: Path) -> int:
    """Bytes of every file under folder (the caches, their shards, the views cache)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix != ".tflite")


def one_side(split: Path, work: Path, clf: str, views: int) -> dict[str, Any]:
    """extract (cold cache; with views, the views too) and fit-head on the split's val folder."""
    name = f"views{views}" if views else "plain"
    folder, head = work / name, work / f"head-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(head, ignore_errors=True)
    folder.mkdir(parents=True)
    for conversion in (work / "cache").glob("*.tflite"):  # the warm conversion, beside the cache
        shutil.copy2(conversion, folder / conversion.name)
    cache = folder / "features.h5"
    extract_s, _, _ = run(
        [
            sys.executable,
            "cli.py",
            "extract",
            str(split),
            "--backbone",
            str(LITE0),
            "--layer",
            "avg_pool",
            "--cache",
            str(cache),
            "--no-progress",
        ]
        + (["--views", str(views)] if views else []),
        "extract",
    )
    run(
        [sys.executable, "cli.py", "fit-head", str(cache), "--clf", clf, "--out", str(head)]
        + (["--views"] if views else []),
        "fit-head",
    )
    m = json.loads((head / "metrics.json").read_text())
    return {
        "views": views,
        "accuracy": m["accuracy"],
        "ci": m["accuracy_ci"],
        "cv": m["cv_score"],
        "n_test": m["n_test"],
        "n_train": m["n_train"],
        "extract_s": extract_s,
        "cache_mb": disk_bytes(folder) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--clf", default="logreg")
    parser.add_argument("--work", default="/tmp/cnncodes_views")
    args = parser.parse_args()
    results, lines = (
        {},
        [
            f"{'dataset':18s} {'views':>5s} {'test accuracy [95% CI]':>26s} {'CV':>7s} "
            f"{'extract s':>9s} {'cache MB':>8s}"
        ],
    )
    for given in args.datasets:
        data = Path(given) if Path(given).is_dir() else SHARED / "datasets" / given
        work = Path(args.work) / data.name
        split = work / "split"
        shutil.rmtree(split, ignore_errors=True)
        run([sys.executable, str(PEERS / "split_folders.py"), str(data), str(split)], "split_folders")
        ensure_conversion(
            argparse.Namespace(backbone=str(LITE0), weights="imagenet", layer="avg_pool", alpha=None), work / "cache"
        )
        sides = [one_side(split, work, args.clf, v) for v in (0, args.views)]
        results[data.name] = sides
        for s in sides:
            lines.append(
                f"{data.name:18s} {s['views']:5d} {s['accuracy']:9.4f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
                f"{'':1s} {s['cv']:7.4f} {s['extract_s']:9.1f} {s['cache_mb']:8.1f}"
            )
        print("\n".join(lines[-2:]), flush=True)  # each dataset as it is done
    lines.append(
        f"Lite0 avg_pool, {args.clf}; test = the val folder of split_folders.py "
        f"({results[next(iter(results))][0]['n_test']} images on the first dataset); extract s: the whole "
        "process from a cold feature cache (warm TFLite conversion)"
    )
    report("\n".join(lines), {"clf": args.clf, "views": args.views, "results": results})


if __name__ == "__main__":
    main()
