"""Fine-tuning vs the logreg and svm heads, with EfficientNet-Lite0, printed as the compare table.

    python bench/finetune.py [--datasets usd_bills_kaggle oxford_flowers12] [finetune options as key=value]

For each dataset: extract (cache/bench/, incremental), fit-head logreg and svm, finetune from the
logreg head at the default settings, then compare. Run folders go to runs/bench/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import ROOT, SHARED  # noqa: E402 (sets the import path and environment)

from pipeline.backbones import BackboneConfig
from pipeline.compare import compare
from pipeline.extract import extract
from pipeline.finetune import finetune
from pipeline.heads import fit_head
from pipeline.tables import compare_markdown

LITE0 = BackboneConfig(str(SHARED / "keras-models/efficientnet_lite0_imagenet.keras"), layer="avg_pool")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["usd_bills_kaggle", "oxford_flowers12"])
    parser.add_argument("--out", default=str(ROOT / "runs/bench"))
    args = parser.parse_args()
    for dataset in args.datasets:
        data = SHARED / "datasets" / dataset
        out = Path(args.out) / dataset
        summary = extract(data, LITE0, cache_dir=ROOT / "cache/bench", progress=False, log=lambda m: None)
        heads = [
            fit_head(summary.cache_path, clf, out=out / f"head-{clf}", log=lambda m: None).folder
            for clf in ("logreg", "svm")
        ]
        start = time.perf_counter()
        run = finetune(data, LITE0, init_head=heads[0], cache=summary.cache_path, out=out / "finetune")
        minutes = (time.perf_counter() - start) / 60
        rows, _ = compare([*heads, run.folder], out / "compare", log=lambda m: None)
        print(
            f"\n## {dataset}: fine-tuning took {minutes:.1f} min "
            f"({run.metrics['epochs_run']} epochs, best epoch {run.metrics['best_params']['best_epoch']})"
        )
        print("command: python " + " ".join(sys.argv))
        print(compare_markdown(rows), flush=True)


if __name__ == "__main__":
    main()
