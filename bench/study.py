"""`study` on three datasets with the three ImageNet backbones in ../shared: each table and its wall time.

    python bench/study.py [--datasets oxford_flowers12 usd_bills_kaggle brain_mri_tumor] [--cache-dir DIR]
                          [--out DIR] [--finetune]

Backbones: EfficientNet-Lite0 and Lite2 (.keras files with their ImageNet top) and MobileNet alpha 0.25
(ImageNet weights through KERAS_HOME); layers top + auto (two earlier stages) + one hypercolumn
(auto+top); heads logreg and svm. Without --cache-dir the caches (and TFLite conversions) start cold
in a fresh folder: the first dataset pays every conversion, the next ones reuse them. Checks that the
winner's test accuracy is at least the default configuration's (Lite0, top, logreg) or inside its interval.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED  # noqa: E402 (sets the import path and environment)

from pipeline.study import study
from pipeline.study_report import table_markdown

MODELS = SHARED / "keras-models"
BACKBONES = (
    f"{MODELS / 'efficientnet_lite0_imagenet.keras'},{MODELS / 'efficientnet_lite2_imagenet.keras'},"
    "MobileNet:alpha=0.25"
)
DEFAULT = ("efficientnet_lite0_imagenet", "top", "logreg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["oxford_flowers12", "usd_bills_kaggle", "brain_mri_tumor"])
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (cold caches)")
    parser.add_argument("--out", default=str(ROOT / "studies/bench"))
    parser.add_argument("--finetune", action="store_true")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="study-bench-cache-"))
    print("command: python " + " ".join(sys.argv), f"\ncache folder: {cache_dir}", flush=True)
    for dataset in args.datasets:
        start = time.perf_counter()

        def progress(message: str, start: float = start) -> None:
            print(f"  [{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

        result = study(
            SHARED / "datasets" / dataset,
            BACKBONES,
            "auto,auto+top",
            "logreg,svm",
            finetune=args.finetune,
            cache_dir=cache_dir,
            out=Path(args.out) / dataset,
            log=progress,
        )
        wall = time.perf_counter() - start
        data = result.data
        print(f"\n## {dataset}: {wall:.0f} s wall ({len(data.rows)} configurations)\n")
        print(table_markdown(data.rows) + "\n")
        for label, info in data.backbones.items():
            print(*(f"- {label}: {note}" for note in info["notes"]), sep="\n")
        print(*(f"- {line}" for line in data.advice["text"]), sep="\n")
        print(*(f"- skipped {s['config']}: {s['reason']}" for s in data.skipped), sep="\n")
        default = next((r for r in data.rows if (r.backbone, r.layer, r.head) == DEFAULT), None)
        winner = data.winner
        if default and winner:
            ok = (
                winner.test_accuracy >= default.test_accuracy
                or default.test_ci[0] <= winner.test_accuracy <= default.test_ci[1]
            )
            print(
                f"check: winner test {winner.test_accuracy:.4f} vs default (Lite0 top logreg) "
                f"{default.test_accuracy:.4f} [{default.test_ci[0]:.3f}, {default.test_ci[1]:.3f}]: "
                + ("ok" if ok else "FAIL"),
                flush=True,
            )


if __name__ == "__main__":
    main()
