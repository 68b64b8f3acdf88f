"""audit: label issues, near-duplicates and their kinds, outliers, the learning curve, bad input, no TensorFlow."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, requires_shared
from heads_fixtures import SYNTH_CONFIG, blobs, fake_hash, write_cache
from typer.testing import CliRunner

import cli
from pipeline.audit import (
    ASSUMED_EXPONENT,
    OUTLIER_CUTOFF,
    audit,
    doubling_gain,
    fit_power_law,
    kth_neighbour_distance,
    learning_curve_answer,
    outlier_scores,
    pair_kinds,
    power_law,
)
from pipeline.errors import UserError
from pipeline.neighbours import DEFAULT_THRESHOLD, comparable_rows, near_duplicate_pairs, pairs_above

NAMES = ["ant", "bee", "cat"]


# -- near-duplicates on synthetic features ---------------------------------------------------------


def features_with_copies(n: int = 300, dim: int = 64, seed: int = 0):
    """Non-negative features (like ReLU codes) with 10 planted near-copies (small noise) appended."""
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.normal(0.5, 1.0, (n, dim)), 0).astype(np.float32)
    originals = rng.choice(n, 10, replace=False)
    copies = X[originals] + rng.normal(0, 0.05, (10, dim)).astype(np.float32)
    planted = {(int(o), n + k) for k, o in enumerate(originals)}
    return np.vstack([X, np.abs(copies)]), planted


def test_near_duplicate_pairs_finds_exactly_the_planted_copies():
    X, planted = features_with_copies()
    i, j, cosine = near_duplicate_pairs(X, DEFAULT_THRESHOLD)
    assert set(zip(i.tolist(), j.tolist())) == planted
    assert (i < j).all() and (np.diff(cosine) <= 0).all() and (cosine <= 1).all()
    assert cosine.min() >= DEFAULT_THRESHOLD


def test_blocks_do_not_change_the_pairs():
    X, _ = features_with_copies()
    whole = near_duplicate_pairs(X, 0.3)
    blocked = near_duplicate_pairs(X, 0.3, block=7)
    for a, b in zip(whole, blocked):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert len(whole[0]) > 10  # a lower threshold admits some chance pairs too


def test_hnsw_index_finds_the_same_pairs():
    pytest.importorskip("faiss")
    X, planted = features_with_copies()
    i, j, _, method = pairs_above(comparable_rows(X), DEFAULT_THRESHOLD, exact_limit=50)
    assert method == "hnsw (faiss)"
    assert set(zip(i.tolist(), j.tolist())) == planted


def test_identical_rows_score_one():
    X, _ = features_with_copies()
    X[5] = X[7]
    i, j, cosine = near_duplicate_pairs(X, 0.999)
    assert (5, 7) in set(zip(i.tolist(), j.tolist()))


def test_pair_kinds():
    labels = np.array([0, 0, 1, 1])
    in_test = np.array([True, False, False, False])
    kinds = pair_kinds(np.array([0, 1, 0, 2]), np.array([1, 2, 3, 3]), labels, in_test)
    # 0-1: test/train (leakage, first); 1-2: both train, labels differ; 0-3: test/train and labels differ
    assert kinds.tolist() == ["cross_split", "conflicting_labels", "cross_split", "same_side"]


# -- outliers ----------------------------------------------------------------------------------------


def test_outlier_is_the_image_far_from_its_class():
    X, y = blobs(n_classes=3, per_class=40, dim=32, seed=2)
    X[5] = X[y == 2][:3].mean(0)  # an image of class 0 that looks like class 2
    scores = outlier_scores(kth_neighbour_distance(comparable_rows(X), y), y)
    assert int(np.nanargmax(scores)) == 5 and scores[5] > OUTLIER_CUTOFF
    assert (np.delete(scores, 5) < OUTLIER_CUTOFF).mean() > 0.9


def test_outlier_scores_in_tiny_classes():
    distance = kth_neighbour_distance(comparable_rows(np.eye(4, 8) + 1), np.array([0, 0, 1, 2]))
    assert np.isnan(distance[2:]).all() and not np.isnan(distance[:2]).any()
    assert np.isnan(outlier_scores(distance, np.array([0, 0, 1, 2]))).all()  # under 3 per class: no score


# -- learning curve ------------------------------------------------------------------------------------


def test_power_law_fit_recovers_the_curve():
    n = np.array([5, 10, 20, 40, 80])
    fit = fit_power_law(n, power_law(n, 0.5, 0.6, 0.95))
    assert fit == pytest.approx({"a": 0.5, "b": 0.6, "c": 0.95}, abs=1e-3)
    gain = doubling_gain(fit, 80)
    assert gain == pytest.approx(100 * 0.5 * 80**-0.6 * (1 - 2**-0.6), rel=1e-3)
    _, text = learning_curve_answer(n.tolist(), power_law(n, 0.5, 0.6, 0.95).tolist(), fit)
    assert text.startswith(f"doubling the images per class (from 80 to 160) would add about {gain:.1f} points")


def test_power_law_falls_back_with_few_points():
    n = np.array([5, 10, 20])
    fit = fit_power_law(n, power_law(n, 0.3, ASSUMED_EXPONENT, 0.9))
    assert fit["b"] == ASSUMED_EXPONENT and fit == pytest.approx({"a": 0.3, "b": 0.5, "c": 0.9}, abs=1e-3)
    assert fit_power_law([8], [0.9]) is None
    gain, text = learning_curve_answer([8], [0.9], None)
    assert gain is None and text.startswith("too few images per class")
    noisy = fit_power_law([5, 10, 20, 40, 64], [0.9, 0.88, 0.95, 0.93, 0.97])  # not monotone: still a curve
    assert noisy is not None and 0 <= noisy["c"] <= 1 and noisy["a"] >= 0


# -- the audit on a synthetic cache -------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 well-separated classes with folder splits, 3 flipped labels, near-copies of each kind, one byte copy."""
    rng = np.random.default_rng(0)
    X, y = blobs(n_classes=3, per_class=40, dim=64, seed=1)
    split = ["test" if k % 5 == 0 else "train" for k in range(len(y))]
    paths = [f"{split[k]}/{NAMES[y[k]]}/img_{k:03d}.png" for k in range(len(y))]
    hashes = [fake_hash(k) for k in range(len(y))]
    y = y.copy()
    flipped = [11, 52, 93]  # training images given the next class's label
    for r in flipped:
        y[r] = (y[r] + 1) % 3
    kinds = {}
    for source, kind, label in [
        (0, "cross_split", 0),
        (40, "cross_split", 1),
        (3, "same_side", 0),
        (84, "conflicting_labels", 0),
    ]:  # 84: a class-2 image, its copy labelled 0
        X = np.vstack([X, X[source] + rng.normal(0, 0.05, X.shape[1]).astype(np.float32)])
        y = np.append(y, label)
        split.append("train")
        paths.append(f"train/{NAMES[label]}/copy_{source:03d}.png")
        hashes.append(fake_hash(("copy", source)))
        kinds[(paths[source], paths[-1])] = kind
    X, y = np.vstack([X, X[7:8]]), np.append(y, y[7])  # byte-identical to row 7
    split.append("train")
    paths.append(f"train/{NAMES[y[7]]}/same_bytes.png")
    hashes.append(hashes[7])
    cache = write_cache(tmp_path_factory.mktemp("audit") / "planted.h5", X, y, NAMES, split, hashes, paths)
    out = cache.parent / "audit"
    result = audit(cache, out=out, cv=3, n_jobs=1, log=lambda m: None)
    return {"cache": cache, "out": out, "result": result, "flipped": [paths[r] for r in flipped], "kinds": kinds}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def test_audit_folder_and_json(planted):
    out, report = planted["out"], planted["result"].report
    assert {p.name for p in out.iterdir()} == {
        "audit.json",
        "label_issues.csv",
        "near_duplicates.csv",
        "outliers.csv",
        "learning_curve.png",
        "class_balance.png",
    }
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk["near_duplicates"] == report["near_duplicates"]
    for key in (
        "cache",
        "cache_fingerprint",
        "dataset_root",
        "n_images",
        "class_names",
        "class_balance",
        "duplicates",
        "label_issues",
        "near_duplicates",
        "outliers",
        "learning_curve",
        "summary",
        "seconds",
    ):
        assert key in on_disk, key
    assert on_disk["n_images"] == 125 and on_disk["class_names"] == NAMES
    assert on_disk["duplicates"] == {"byte_identical_groups": 1, "files_in_groups": 2}
    assert on_disk["split"].startswith("folders")
    curve = on_disk["learning_curve"]
    assert curve["per_class"][:3] == [5, 10, 20] and len(curve["cv_accuracy"]) == len(curve["per_class"])
    assert set(curve["fit"]) == {"a", "b", "c"} and curve["answer"].startswith("doubling the images per class")
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_issues_find_the_flipped_labels(planted):
    columns, rows = read_csv(planted["out"] / "label_issues.csv")
    assert columns == ["path", "given", "suggested", "score"]
    top = [r["path"] for r in rows[:4]]
    assert set(planted["flipped"]) <= set(top)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and all(0 <= s < 0.5 for s in scores)  # most suspicious first
    flipped = next(r for r in rows if r["path"] == planted["flipped"][0])  # img_011: an ant labelled bee
    assert (flipped["given"], flipped["suggested"]) == ("bee", "ant")
    label = planted["result"].report["label_issues"]
    assert label["count"] == len(rows) and 3 <= label["estimated_mislabelled"] <= len(rows)


def test_near_duplicates_csv_has_each_planted_pair_with_its_kind(planted):
    columns, rows = read_csv(planted["out"] / "near_duplicates.csv")
    assert columns == ["path_a", "path_b", "cosine", "split_a", "split_b", "label_a", "label_b", "kind"]
    found = {(r["path_a"], r["path_b"]): r for r in rows}
    assert set(found) == set(planted["kinds"])  # no chance pairs, and the byte-identical pair is not repeated
    for pair, kind in planted["kinds"].items():
        assert found[pair]["kind"] == kind
    leak = found[next(p for p, k in planted["kinds"].items() if k == "cross_split")]
    assert (leak["split_a"], leak["split_b"]) == ("test", "train")
    cosines = [float(r["cosine"]) for r in rows]
    assert cosines == sorted(cosines, reverse=True)
    assert planted["result"].report["near_duplicates"]["by_kind"] == {
        "cross_split": 2,
        "conflicting_labels": 1,
        "same_side": 1,
    }


def test_outliers_csv(planted):
    columns, rows = read_csv(planted["out"] / "outliers.csv")
    assert columns == ["path", "label", "split", "score"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s > OUTLIER_CUTOFF for s in scores)
    # a flipped image sits among another class's images: far from every image of its given class
    assert set(planted["flipped"]) <= {r["path"] for r in rows}


def test_summary_names_the_findings(planted):
    summary = "\n".join(planted["result"].summary)
    assert "125 images, 3 classes" in summary and "1 group of byte-identical files" in summary
    assert "2 cross_split" in summary and "doubling the images per class" in summary


def test_head_split_is_the_heads_test_part(planted, tmp_path):
    from pipeline.heads import fit_head

    head = fit_head(planted["cache"], "logreg", cv=3, n_jobs=1, out=tmp_path / "head", log=lambda m: None).folder
    result = audit(planted["cache"], head, tmp_path / "with-head", cv=3, n_jobs=1, log=lambda m: None)
    assert result.report["split"] == f"the test images of head {head}"
    assert result.report["near_duplicates"]["by_kind"] == planted["result"].report["near_duplicates"]["by_kind"]
    assert any(line.startswith(f"head {head}: test accuracy") for line in result.summary)
    other = write_cache(
        tmp_path / "other.h5",
        *blobs(seed=5),
        NAMES,
        config=SYNTH_CONFIG.__class__(**{**SYNTH_CONFIG.__dict__, "image_size": 48}),
    )
    with pytest.raises(UserError, match="fitted on another cache"):
        audit(other, head, tmp_path / "x", cv=3, n_jobs=1, log=lambda m: None)


# -- bad input -------------------------------------------------------------------------------------


def assert_cli_error(args: list, *fragments: str) -> None:
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_one_class_cache(tmp_path):
    X, _ = blobs(n_classes=1, per_class=12)
    cache = write_cache(tmp_path / "one.h5", X, [0] * 12, ["only"])
    assert_cli_error(["audit", cache, "--out", tmp_path / "a"], "holds one class (only)", "at least two classes")
    assert not (tmp_path / "a").exists()


def test_cache_too_small_for_folds(tmp_path):
    X, y = blobs(n_classes=2, per_class=[6, 2])
    cache = write_cache(
        tmp_path / "small.h5", X, y, ["big", "tiny"], hashes=[fake_hash(k) for k in range(6)] + [fake_hash("same")] * 2
    )
    assert_cli_error(
        ["audit", cache, "--out", tmp_path / "a"], "class tiny", "1 distinct image", "at least 2 per class"
    )


@pytest.mark.parametrize(
    "args, fragment", [(["--threshold", "1.5"], "--threshold is 1.5"), (["--cv", "1"], "--cv is 1")]
)
def test_bad_options(planted, tmp_path, args, fragment):
    assert_cli_error(["audit", planted["cache"], "--out", tmp_path / "a", *args], fragment)


def test_missing_head_folder(planted, tmp_path):
    assert_cli_error(
        ["audit", planted["cache"], "--head", tmp_path / "nohead", "--out", tmp_path / "a"], "head.json is missing"
    )


# -- no TensorFlow -----------------------------------------------------------------------------------


def test_audit_command_never_imports_tensorflow(planted, tmp_path):
    code = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from typer.testing import CliRunner\nimport cli\n"
        f"r = CliRunner().invoke(cli.app, ['audit', {str(planted['cache'])!r}, '--out', {str(tmp_path / 'a')!r}, "
        "'--cv', '3', '--n-jobs', '1'])\n"
        "assert r.exit_code == 0, (r.output, r.exception)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not bad, bad[:5]\nprint(r.stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "label issues:" in out.stdout and "audited in" in out.stdout
    assert (tmp_path / "a" / "audit.json").is_file()


# -- planted faults in real images (Lite0) -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_planted_faults_in_flowers(tmp_path, lite0_tflite):
    """bench/audit.py on 4 flower classes: 5% of the images moved to a wrong class, 20 test images
    re-encoded into training. Most moved images must lead the label issues, nearly every copy be found."""
    requires_shared("datasets", "oxford_flowers12")
    lite0_tflite.place(tmp_path)  # beside the bench's caches: it runs TFLite without converting again
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "audit.py"),
            "--classes",
            "4",
            "--runtime",
            "tflite",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    print(out.stdout)
    figures = json.loads(out.stdout.strip().splitlines()[-1])["planted"]
    assert figures["moved"] == 16 and figures["planted_pairs"] == 20
    assert figures["recall_top_2x"] >= 0.8, figures
    assert figures["pair_recall"] >= 0.95, figures
    assert figures["planted_cross_split"] == figures["planted_found"]  # copies of test images in training: leakage


def test_whitening_of_few_wide_rows_equals_the_covariance_path() -> None:
    """With fewer images than dimensions comparable_rows takes the thin SVD; its cosines are the eigh path's."""
    X = np.random.default_rng(0).normal(size=(40, 90)) + np.linspace(0, 3, 90)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    centred = unit - unit.mean(axis=0)
    variance, directions = np.linalg.eigh(centred.T @ centred)
    spread = np.sqrt(np.clip(variance, 0, None))
    expected = centred @ (directions / (spread + 0.15 * spread.max()))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    wide, tall = comparable_rows(X), comparable_rows(np.vstack([X] * 3))  # 40 < 90 rows; 120 >= 90
    np.testing.assert_allclose(wide @ wide.T, expected @ expected.T, atol=1e-5)
    np.testing.assert_allclose(tall[:40] @ tall[:40].T, expected @ expected.T, atol=1e-5)
