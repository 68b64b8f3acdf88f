"""Open-set recognition on cached features: does the head say "not one of my classes" when it should?

    flock /tmp/cnncodes-bench.lock python bench/open_set.py [--cache-dir /tmp/openset-cache] [--clf logreg]

Features: EfficientNet-Lite0 (../shared/keras-models/efficientnet_lite0_imagenet.keras, layer avg_pool) of
every dataset in ../shared/datasets, extracted once into --cache-dir (keep it outside ../shared).
For each main dataset (oxford_flowers12, and --second):
- far-OOD: a head on its training part (80/20 split, seed 0); knowns: its test part; unknowns: every
  image of each other dataset, one set at a time;
- near-OOD: for each of --draws seeded draws, 2 classes held out whole; a head on the training part
  of the others; knowns: their test part; unknowns: every image of the 2 held-out classes.
Heads are fitted by pipeline.heads.fit_arrays (calibration and detector included). For each method:
AUROC (unknown vs known test images), the share of unknowns accepted at the threshold that accepts 95%
of known test images, the accuracy on the accepted known images, and the share of knowns and unknowns
accepted at the head's own threshold (fixed at fit time from out-of-fold scores, --accept).
Methods: msp (the top calibrated probability, as log(1 - p)), knn (cosine distance to the 5th nearest
training feature), combined (the detector: the sum of the two z-scores), and max (the larger of the two
z-scores, an alternative).
Also the flowers head's ECE on its test part before and after calibration, what calibration and the
detector add to the fit (seconds inside fit_arrays), and what they add per image at predict time
(temperature + score on the test part's features, in batches of 1 and of 32).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import SHARED, report

from pipeline.backbones import BackboneConfig
from pipeline.cache import load
from pipeline.calibration import expected_calibration_error
from pipeline.heads import fit_arrays
from pipeline.openset import combine
from pipeline.splits import content_groups, grouped_stratified_split

DATASETS = ("oxford_flowers12", "cats_vs_dogs", "usd_bills_kaggle", "brain_mri_tumor", "rps_moroney_28px")
METHODS = ("msp", "knn", "combined", "max")
LITE0 = BackboneConfig(str(SHARED / "keras-models/efficientnet_lite0_imagenet.keras"), layer="avg_pool")


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown > score of a known), ties counted half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def method_scores(fitted, features: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every method's unknown score, and the calibrated probabilities, of some feature rows."""
    proba = fitted.calibrate(fitted.model.predict_proba(features))
    z = fitted.detector.signals(features, proba)
    knn_raw = z["knn"] * fitted.detector.norm["knn"][1] + fitted.detector.norm["knn"][0]
    return {
        "msp": z["msp"],
        "knn": knn_raw,
        "combined": combine(z, "combined"),
        "max": np.maximum(z["msp"], z["knn"]),
    }, proba


def oof_threshold(fitted, method: str) -> float | None:
    """The head's own fit-time threshold, for the method the detector implements (else None)."""
    return fitted.detector.threshold if method == "combined" else None


def evaluate(fitted, known_x: np.ndarray, known_y: np.ndarray, unknown_x: np.ndarray) -> dict[str, dict[str, float]]:
    """Per method: AUROC, unknowns accepted and known accuracy at 95% known acceptance, and at the fit threshold."""
    known, proba = method_scores(fitted, known_x)
    unknown, _ = method_scores(fitted, unknown_x)
    correct = proba.argmax(1) == known_y
    out = {}
    for method in METHODS:
        cut = np.quantile(known[method], 0.95, method="inverted_cdf")
        accepted = known[method] <= cut
        row = {
            "auroc": auroc(known[method], unknown[method]),
            "unknown_accepted_at_95": float(np.mean(unknown[method] <= cut)),
            "accuracy_accepted": float(correct[accepted].mean()),
        }
        fixed = oof_threshold(fitted, method)
        if fixed is not None:
            row["known_accepted_at_fit"] = float(np.mean(known[method] <= fixed))
            row["unknown_accepted_at_fit"] = float(np.mean(unknown[method] <= fixed))
        out[method] = row
    return out


def fit_known(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    names: list[str],
    rows: np.ndarray,
    clf: str,
    seed: int,
    accept: float,
):
    """A head (with its calibration and detector) on the given rows, by the same code fit-head runs."""
    return fit_arrays(
        features[rows], labels[rows], groups[rows], names, clf, seed=seed, accept=accept, log=lambda _: None
    )


def predict_cost_ms(fitted, features: np.ndarray, batch: int) -> float:
    """Milliseconds per image that calibration and the unknown score add to a prediction."""
    raw = fitted.model.predict_proba(features)
    fitted.detector.score(features[:1], fitted.calibrate(raw[:1]))  # warm-up: first-call costs are not per image
    started = time.perf_counter()
    for start in range(0, len(features), batch):
        proba = fitted.calibrate(raw[start : start + batch])
        fitted.detector.score(features[start : start + batch], proba)
    return 1000 * (time.perf_counter() - started) / len(features)


def protocols(name: str, caches: dict, args: argparse.Namespace) -> list[dict]:
    """The far- and near-OOD rows of one main dataset."""
    cache = caches[name]
    groups, _ = content_groups(cache.content_hash)
    in_test = grouped_stratified_split(cache.labels, groups, 0.2, args.seed)
    train, test = np.flatnonzero(~in_test), np.flatnonzero(in_test)
    started = time.perf_counter()
    fitted = fit_known(cache.features, cache.labels, groups, cache.class_names, train, args.clf, args.seed, args.accept)
    rows = [
        {
            "dataset": name,
            "protocol": "calibration",
            "unknowns": "-",
            "fit_seconds": fitted.fit_seconds,
            "unknown_seconds": fitted.unknown_seconds,
            "temperature": fitted.temperature,
            "predict_ms_batch1": predict_cost_ms(fitted, cache.features[test], 1),
            "predict_ms_batch32": predict_cost_ms(fitted, cache.features[test], 32),
            "ece_before": expected_calibration_error(
                fitted.model.predict_proba(cache.features[test]), cache.labels[test]
            ),
            "ece_after": expected_calibration_error(
                fitted.calibrate(fitted.model.predict_proba(cache.features[test])), cache.labels[test]
            ),
        }
    ]
    for other in DATASETS:
        if other != name:
            rows.append(
                {
                    "dataset": name,
                    "protocol": "far",
                    "unknowns": other,
                    **evaluate(fitted, cache.features[test], cache.labels[test], caches[other].features),
                }
            )
    n_classes = len(cache.class_names)
    for draw in range(args.draws):
        held = np.sort(np.random.default_rng(1000 + draw).choice(n_classes, 2, replace=False))
        known_classes = np.setdiff1d(np.arange(n_classes), held)
        relabel = np.full(n_classes, -1)
        relabel[known_classes] = np.arange(len(known_classes))
        labels = relabel[cache.labels]
        known_train = train[labels[train] >= 0]
        known_test = test[labels[test] >= 0]
        near = fit_known(
            cache.features,
            labels,
            groups,
            [cache.class_names[c] for c in known_classes],
            known_train,
            args.clf,
            args.seed + draw,
            args.accept,
        )
        rows.append(
            {
                "dataset": name,
                "protocol": "near",
                "unknowns": "+".join(cache.class_names[c] for c in held),
                **evaluate(near, cache.features[known_test], labels[known_test], cache.features[labels < 0]),
            }
        )
    rows[0]["protocol_seconds"] = time.perf_counter() - started
    return rows


def mean_row(rows: list[dict], dataset: str, protocol: str) -> dict:
    """The mean over the near-OOD draws."""
    picked = [r for r in rows if r["dataset"] == dataset and r["protocol"] == protocol]
    out = {"dataset": dataset, "protocol": f"{protocol} (mean of {len(picked)})", "unknowns": "-"}
    for method in METHODS:
        out[method] = {k: float(np.mean([r[method][k] for r in picked])) for k in picked[0][method]}
    return out


def table(rows: list[dict]) -> str:
    """One line per protocol and unknown set; per method AUROC / unknowns accepted at 95% / accepted accuracy."""
    head = (
        f"{'dataset':17s} {'protocol':16s} {'unknowns':28s} "
        + " ".join(f"{m + ' AUROC/acc95/accKn':>24s}" for m in METHODS)
        + f" {'fit-thr kn/unk':>15s}"
    )
    lines = [head]
    for r in rows:
        if r["protocol"] == "calibration":
            lines.append(
                f"{r['dataset']:17s} {'calibration':16s} ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f} "
                f"(T={r['temperature']:.3f}); fit {r['fit_seconds']:.2f} s of which calibration + "
                f"detector {r['unknown_seconds']:.3f} s ({r['unknown_seconds'] / r['fit_seconds']:.1%}); "
                f"at predict time +{r['predict_ms_batch1']:.3f} ms/image (batch 1), "
                f"+{r['predict_ms_batch32']:.3f} ms/image (batch 32)"
            )
            continue
        cells = " ".join(
            f"{r[m]['auroc']:8.4f} {r[m]['unknown_accepted_at_95']:6.3f} {r[m]['accuracy_accepted']:6.3f}   "
            for m in METHODS
        )
        fit = r["combined"]
        fixed = (
            f"{fit['known_accepted_at_fit']:.3f}/{fit['unknown_accepted_at_fit']:.3f}"
            if "known_accepted_at_fit" in fit
            else ""
        )
        lines.append(f"{r['dataset']:17s} {r['protocol']:16s} {r['unknowns'][:28]:28s} {cells} {fixed:>15s}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="/tmp/openset-cache")
    parser.add_argument("--second", default="usd_bills_kaggle", help="The second main dataset.")
    parser.add_argument("--clf", default="logreg")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accept", type=float, default=0.95)
    args = parser.parse_args()
    from pipeline.extract import extract

    caches = {}
    for name in DATASETS:
        path = f"{args.cache_dir}/{name}.h5"
        extract(SHARED / "datasets" / name, LITE0, cache=path, log=lambda _: None)  # a no-op once cached
        caches[name] = load(path)
    rows = []
    for name in ("oxford_flowers12", args.second):
        rows += protocols(name, caches, args)
    shown = []
    for name in ("oxford_flowers12", args.second):
        shown += [r for r in rows if r["dataset"] == name and r["protocol"] != "near"]
        shown += [r for r in rows if r["dataset"] == name and r["protocol"] == "near"]
        shown.append(mean_row(rows, name, "near"))
    far = [r for r in rows if r["protocol"] == "far"]
    near = [mean_row(rows, name, "near") for name in ("oxford_flowers12", args.second)]
    checks = {
        "far_auroc_min": min(r["combined"]["auroc"] for r in far),
        "far_unknown_accepted_at_95_max": max(r["combined"]["unknown_accepted_at_95"] for r in far),
        "near_auroc_minus_best_baseline": [
            r["combined"]["auroc"] - max(r["msp"]["auroc"], r["knn"]["auroc"]) for r in near
        ],
        "flowers_ece_after": rows[0]["ece_after"],
        "flowers_fit_share": rows[0]["unknown_seconds"] / rows[0]["fit_seconds"],
        "flowers_predict_ms_batch1": rows[0]["predict_ms_batch1"],
    }
    report(
        table(shown) + "\ncolumns per method: AUROC, share of unknowns accepted when 95% of known test images "
        "are, accuracy on the accepted known images; fit-thr: known/unknown accepted at the head's own "
        f"threshold (accept {args.accept})\nchecks: {checks}",
        {"rows": rows, "checks": checks},
    )


if __name__ == "__main__":
    main()
