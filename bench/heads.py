"""Heads on every dataset in ../shared/datasets, for two backbones: test accuracy and fit seconds.

    python bench/heads.py [--datasets oxford_flowers12 cats_vs_dogs ...] [--clf logreg svm rbf-svm knn]

Backbones: EfficientNet-Lite0 (../shared/keras-models/efficientnet_lite0_imagenet.keras, layer
avg_pool) and MobileNet alpha 0.25 with ImageNet weights read offline through KERAS_HOME. Caches go
to cache/bench/ and are reused on later runs (extract is incremental). Split: default 80/20, seed 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from common import ROOT, SHARED  # noqa: E402 (sets the import path and environment)

from pipeline.backbones import BackboneConfig
from pipeline.extract import extract
from pipeline.heads import CLASSIFIERS, fit_head

BACKBONES = {
    "efficientnet_lite0": BackboneConfig(
        str(SHARED / "keras-models/efficientnet_lite0_imagenet.keras"), layer="avg_pool"
    ),
    "mobilenet_0.25": BackboneConfig("MobileNet", "imagenet", alpha=0.25, image_size=224),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="*", default=sorted(p.name for p in (SHARED / "datasets").iterdir() if p.is_dir())
    )
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    parser.add_argument("--clf", nargs="*", default=list(CLASSIFIERS))
    parser.add_argument("--cache-dir", default=str(ROOT / "cache/bench"))
    args = parser.parse_args()
    rows = []
    for backbone in args.backbones:
        for dataset in args.datasets:
            summary = extract(
                SHARED / "datasets" / dataset,
                BACKBONES[backbone],
                cache_dir=args.cache_dir,
                progress=False,
                log=lambda m: None,
            )
            for clf in args.clf:
                with tempfile.TemporaryDirectory() as out:
                    m = fit_head(summary.cache_path, clf, out=out, log=lambda m: None).metrics
                rows.append(
                    (
                        dataset,
                        backbone,
                        clf,
                        m["n_train"],
                        m["n_test"],
                        m["accuracy"],
                        m["balanced_accuracy"],
                        m["fit_seconds"],
                        m["best_params"],
                        m["split_notes"],
                    )
                )
                print(*rows[-1][:8], flush=True, sep="\t")
    print("\ncommand: python " + " ".join(sys.argv))
    print("| dataset | backbone | clf | train | test | test acc | balanced acc | fit s | chosen |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for d, b, c, ntr, nte, acc, bal, sec, best, _ in rows:
        chosen = ", ".join(f"{k}={v:.3g}" for k, v in best.items())
        print(f"| {d} | {b} | {c} | {ntr} | {nte} | {acc:.4f} | {bal:.4f} | {sec:.1f} | {chosen} |")
    notes = {(d, b): n for d, b, *_, n in rows if n}
    for (d, b), n in notes.items():
        print(f"note {d} / {b}: " + " ".join(n))


if __name__ == "__main__":
    main()
