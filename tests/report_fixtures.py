"""The report tests' shared world: generated images, a synthetic cache (no TensorFlow), two heads, an audit
folder and a study folder, built once per session (registered as a plugin in conftest.py)."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import pixels, save_image
from heads_fixtures import blobs, write_cache

from pipeline.artifacts import AUDIT_JSON, STUDY_JSON, write_json

CLASSES = ["ant", "bee", "cat"]
COLOURS = [(200, 60, 40), (220, 200, 40), (60, 60, 200)]
PER_CLASS = 14


@dataclass
class ReportWorld:
    """Generated images, their synthetic cache, two heads, an audit folder and a study folder."""

    root: Path
    data: Path
    cache: Path
    heads: dict[str, Path] = field(default_factory=dict)
    audit: Path | None = None
    study: Path | None = None


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_audit(folder: Path, world: ReportWorld, paths: list[str]) -> Path:
    """An audit folder in the format of briefs/formats.md."""
    folder.mkdir(parents=True)
    _write_csv(
        folder / "label_issues.csv",
        ["path", "given", "suggested", "score"],
        [[paths[0], "ant", "bee", 0.02], [paths[1], "ant", "cat", 0.1]],
    )
    _write_csv(
        folder / "near_duplicates.csv",
        ["path_a", "path_b", "cosine", "split_a", "split_b", "label_a", "label_b", "kind"],
        [[paths[2], paths[20], 0.991, "train", "test", "ant", "bee", "conflicting_labels"]],
    )
    _write_csv(folder / "outliers.csv", ["path", "label", "split", "score"], [[paths[30], "cat", "train", 0.93]])
    save_image(folder / "learning_curve.png", pixels((90, 90, 90), 1, (60, 40)))
    write_json(
        folder / AUDIT_JSON,
        {
            "cache": str(world.cache),
            "cache_fingerprint": "x",
            "dataset_root": str(world.data),
            "n_images": len(paths),
            "class_names": CLASSES,
            "class_balance": {c: PER_CLASS for c in CLASSES},
            "duplicates": {"byte_identical_groups": 0, "files_in_groups": 0},
            "label_issues": {"count": 2, "method": "cleanlab find_label_issues", "file": "label_issues.csv"},
            "near_duplicates": {
                "threshold": 0.98,
                "count": 1,
                "by_kind": {"conflicting_labels": 1},
                "search": "exact",
                "file": "near_duplicates.csv",
            },
            "outliers": {"count": 1, "file": "outliers.csv", "method": "kNN distance"},
            "learning_curve": {
                "per_class": [5, 10],
                "cv_accuracy": [0.8, 0.9],
                "cv_std": [0.05, 0.03],
                "fit": {"a": 1, "b": 0.5, "c": 0.95},
                "doubling_gain_points": 2.0,
                "answer": "more data: about +2 points per doubling",
                "file": "learning_curve.png",
            },
            "summary": ["2 suspected label issues", "1 near-duplicate pair across splits"],
            "seconds": 1.0,
        },
    )
    return folder


def make_study(folder: Path, world: ReportWorld, paths: list[str]) -> Path:
    """A study folder in the format of briefs/formats.md, its winner a copy of the logreg head."""
    folder.mkdir(parents=True)
    shutil.copytree(world.heads["logreg"], folder / "winner")
    save_image(folder / "checkout-MobileNetV2.png", pixels((10, 120, 10), 2, (80, 50)))
    row = {
        "backbone": "MobileNetV2",
        "layer": "top",
        "head": "logreg",
        "cv_accuracy": 0.9,
        "test_accuracy": 0.88,
        "test_ci": [0.8, 0.93],
        "n_test": 30,
        "extract_images_per_s": 80.0,
        "fit_seconds": 1.2,
        "infer_ms_per_image": 12.0,
        "model_mb": 9.0,
        "cache": str(world.cache),
    }
    write_json(
        folder / STUDY_JSON,
        {
            "dataset_root": str(world.data),
            "n_images": len(paths),
            "images_per_class": {c: PER_CLASS for c in CLASSES},
            "seed": 0,
            "rows": [row, {**row, "head": "svm", "cv_accuracy": 0.85}],
            "winner": {**row, "head_dir": "winner"},
            "advice": {"quadrant": "small data, similar to ImageNet", "text": ["train a linear head on the top layer"]},
            "checkout": {
                "MobileNetV2": {
                    "likeness": {"ant": {"mean_top1": 0.4, "mean_entropy": 2.1}},
                    "samples": [{"path": paths[0], "class": "ant", "top5": [["ant", 0.5], ["bee", 0.2]]}],
                    "grid_png": "checkout-MobileNetV2.png",
                }
            },
            "skipped": [{"config": "ResNet50/top/knn", "reason": "over the time budget"}],
            "finetune": None,
            "interrupted": False,
            "seconds": 12.0,
        },
    )
    return folder


@pytest.fixture(scope="session")
def report_world(tmp_path_factory: pytest.TempPathFactory) -> ReportWorld:
    """3 classes x 14 generated images, overlapping features (so some test images are wrong), two heads."""
    from pipeline.heads import fit_head

    root = tmp_path_factory.mktemp("report_world")
    world = ReportWorld(root, root / "data", root / "cache.h5")
    X, y = blobs(3, PER_CLASS, dim=8, sep=0.7, seed=3)
    paths = [f"{CLASSES[c]}/img_{k:04d}.png" for k, c in enumerate(y)]
    for k, (path, c) in enumerate(zip(paths, y)):
        save_image(world.data / path, pixels(COLOURS[c], k))
    write_cache(world.cache, X, y, CLASSES, paths=paths)  # dataset_root: root / "data"
    for clf in ("logreg", "knn"):
        world.heads[clf] = fit_head(
            world.cache, clf, cv=3, n_jobs=1, out=root / "heads" / clf, log=lambda m: None
        ).folder
    world.audit = make_audit(root / "audit", world, paths)
    world.study = make_study(root / "study", world, paths)
    return world
