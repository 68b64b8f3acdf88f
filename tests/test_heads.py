"""pipeline.heads: honest splits, grouped CV, errors users can fix, what a head folder holds (no TensorFlow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from heads_fixtures import CLASS_NAMES3, ROOT, SYNTH_CONFIG, blobs, fake_hash, noise, write_cache  # noqa: F401
from threadpoolctl import threadpool_limits

from pipeline import heads
from pipeline.artifacts import (
    CV_PREDICTIONS_CSV,
    HEAD_MODEL,
    METRICS_JSON,
    PREDICTIONS_CSV,
    UNKNOWN_NPZ,
    read_predictions,
)
from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.heads import CLASSIFIERS, fit_head, load_head
from pipeline.metrics import load_metrics
from pipeline.splits import cv_splits, split_rows

TIMING_KEYS = ("fit_seconds", "train_seconds", "unknown_seconds")


def quiet(_: str) -> None:
    pass


SMALL_GRIDS = {"logreg": [0.1, 1.0, 10.0], "svm": [0.01, 1.0], "rbf-svm": [1.0, 10.0], "knn": [1, 3, 5]}


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Tiny matrices: BLAS / OpenMP thread start-up costs more than it saves on a busy 2-core machine."""
    with threadpool_limits(1):
        yield


def use_small_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    for clf, values in SMALL_GRIDS.items():
        monkeypatch.setitem(heads.GRIDS, clf, (heads.GRIDS[clf][0], values))


@pytest.fixture
def small_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter C / k grids: the tests that use this are about splits, files and errors, not tuning."""
    use_small_grids(monkeypatch)


@pytest.fixture
def blob_cache(tmp_path: Path) -> Path:
    """3 classes x 30 rows x 16 dims, well separated, no duplicates, no folder splits."""
    X, y = blobs()
    return write_cache(tmp_path / "blobs.h5", X, y, CLASS_NAMES3)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One head per classifier on the blob cache (the real grids, 3 folds), shared by the read-only tests."""
    root = tmp_path_factory.mktemp("fitted")
    X, y = blobs()
    cache = write_cache(root / "blobs.h5", X, y, CLASS_NAMES3)
    with threadpool_limits(1):
        return {"cache": cache, **{clf: fit(cache, root / clf, clf) for clf in CLASSIFIERS}}


def fit(cache: Path, out: Path, clf: str = "logreg", **kwargs):
    kwargs = {"cv": 3, "n_jobs": 1, "log": quiet, **kwargs}
    return fit_head(cache, clf, out=out, **kwargs)


def scores(folder: Path) -> dict:
    """metrics.json without the timings (which differ between identical runs)."""
    return {k: v for k, v in load_metrics(folder).items() if k not in TIMING_KEYS}


# -- learning ------------------------------------------------------------------------------------

TIES_BUG = (
    "heads.fit_head scores CV by accuracy, which ties at 1.0 over most of the C grid on separable "
    "data; GridSearchCV keeps the first (smallest) C = 1e-4, so the logreg head is over-regularised and "
    "its probabilities are near-uniform (mean top probability 0.34 for blobs ~17 sd apart)"
)


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_separable_blobs_are_learned_by_every_head(fitted: dict, clf: str) -> None:
    metrics = fitted[clf].metrics
    assert metrics["n_test"] == 18
    assert metrics["accuracy"] >= 0.95, (clf, metrics["accuracy"], metrics["best_params"])
    assert metrics["cv_score"] >= 0.95 and metrics["macro_f1"] >= 0.95


@pytest.mark.parametrize("clf", ["logreg", "svm", "rbf-svm", "knn"])
def test_heads_are_confident_on_separable_blobs(fitted: dict, clf: str) -> None:
    """Blobs about 17 standard deviations apart: the chosen C (or k) must not flatten the probabilities to 1/3."""
    X = load(fitted["cache"]).features[fitted[clf].split.test]
    top = load_head(fitted[clf].folder).predict_proba(X).max(axis=1)
    assert top.mean() > 0.8, (clf, top.mean(), fitted[clf].metrics["best_params"])


@pytest.mark.parametrize("clf", ["svm", "rbf-svm"])
@pytest.mark.parametrize("matrix_bytes", [heads.KERNEL_MATRIX_BYTES, 0], ids=["kernel-matrix", "libsvm-kernel"])
def test_svm_sweep_on_a_precomputed_kernel_predicts_as_libsvm_does(
    clf: str, matrix_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's kernel matrix stands in for libsvm's own kernel: same predictions at every C (and
    a training part too large for the matrix falls back to libsvm's kernel)."""
    monkeypatch.setattr(heads, "KERNEL_MATRIX_BYTES", matrix_bytes)
    X, y = noise(n_classes=3, per_class=20, dim=12, seed=1)  # overlapping classes: C matters
    train, val = np.arange(0, 60, 2), np.arange(1, 60, 2)
    grid = heads.GRIDS[clf][1]
    swept = heads._fold_sweep(clf, X, y, train, val, grid, 3, True, None, 0)
    for value, (predicted, decision) in zip(grid, swept):
        model = heads.make_pipeline(clf).set_params(**{heads.GRIDS[clf][0]: value}).fit(X[train], y[train])
        np.testing.assert_array_equal(predicted, model.predict(X[val]), err_msg=f"{clf} at C={value}")
        # the decision values (for the out-of-fold probabilities) are libsvm's too
        np.testing.assert_allclose(decision, model.decision_function(X[val]), atol=1e-6)
    assert len({tuple(p) for p, _ in swept}) > 1  # the grid changes the predictions: a real check


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_noise_labels_score_near_chance(tmp_path: Path, clf: str, small_grids) -> None:
    X, y = noise()
    cache = write_cache(tmp_path / "noise.h5", X, y, CLASS_NAMES3)
    result = fit(cache, tmp_path / "h", clf)
    assert result.metrics["accuracy"] < 0.7
    assert result.metrics["cv_score"] < 0.7
    assert (tmp_path / "h" / METRICS_JSON).is_file() and (tmp_path / "h" / HEAD_MODEL).is_file()


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_loaded_head_probabilities_sum_to_one(fitted: dict, clf: str) -> None:
    head = load_head(fitted[clf].folder)
    proba = head.predict_proba(load(fitted["cache"]).features)
    assert proba.shape == (90, 3)
    assert np.all(proba >= 0) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert head.classes == CLASS_NAMES3


def test_same_seed_same_split_and_scores(tmp_path: Path, small_grids) -> None:
    X, y = blobs(sep=0.3)  # overlapping blobs: scores below 1 that could move
    cache = write_cache(tmp_path / "c.h5", X, y, CLASS_NAMES3)
    a = fit(cache, tmp_path / "a", "svm", seed=3)
    b = fit(cache, tmp_path / "b", "svm", seed=3)
    assert np.array_equal(a.split.train, b.split.train) and np.array_equal(a.split.test, b.split.test)
    assert scores(tmp_path / "a") == scores(tmp_path / "b")
    assert scores(tmp_path / "a")["seed"] == 3
    pa = load_head(tmp_path / "a").predict_proba(X)
    assert np.array_equal(pa, load_head(tmp_path / "b").predict_proba(X))


def test_other_seed_other_split(blob_cache: Path) -> None:
    cache = load(blob_cache)
    by_seed = {seed: split_rows(cache, 0.2, seed) for seed in range(4)}
    assert np.array_equal(split_rows(cache, 0.2, 3).test, by_seed[3].test)
    assert len({tuple(s.test.tolist()) for s in by_seed.values()}) == 4


def test_class_weight_balanced_scores_cv_by_balanced_accuracy(fitted: dict, tmp_path: Path, small_grids) -> None:
    X, y = blobs(per_class=[40, 12, 8], sep=3.0)
    cache = write_cache(tmp_path / "imb.h5", X, y, CLASS_NAMES3)
    balanced = fit(cache, tmp_path / "bal", class_weight="balanced")
    assert balanced.metrics["cv_scoring"] == "balanced_accuracy"
    head = load_head(tmp_path / "bal")
    assert head.meta["options"]["class_weight"] == "balanced"
    assert head.model.named_steps["clf"].class_weight == "balanced"
    plain = fitted["logreg"]
    assert plain.metrics["cv_scoring"] == "accuracy"
    assert load_head(plain.folder).model.named_steps["clf"].class_weight is None


def test_knn_grid_never_exceeds_the_smallest_training_fold(tmp_path: Path) -> None:
    X, y = blobs(per_class=6)
    cache = write_cache(tmp_path / "small.h5", X, y, CLASS_NAMES3)
    result = fit(cache, tmp_path / "knn", "knn", cv=3)
    split = result.split
    group = np.arange(len(y))  # no duplicates: one group per row
    folds = cv_splits(y[split.train], group[split.train], 3, 0, CLASS_NAMES3, quiet)
    smallest = min(len(tr) for tr, _ in folds)
    assert max(result.metrics["cv_grid"]) <= smallest < 31
    assert result.metrics["best_params"]["n_neighbors"] <= smallest


# -- splits --------------------------------------------------------------------------------------


def test_random_split_keeps_duplicates_on_one_side(tmp_path: Path) -> None:
    X, y = blobs()
    hashes = [fake_hash(("group", i // 3)) for i in range(90)]  # 30 groups of 3 identical files
    cache = load(write_cache(tmp_path / "dups.h5", X, y, CLASS_NAMES3, hashes=hashes))
    tests = set()
    for seed in range(8):
        split = split_rows(cache, 0.2, seed)
        assert sorted(split.train.tolist() + split.test.tolist()) == list(range(90))
        in_test = np.zeros(90, bool)
        in_test[split.test] = True
        for g in range(30):
            assert len(set(in_test[3 * g : 3 * g + 3])) == 1, (seed, g)
        # 10 groups per class, round(0.2 * 10) = 2 groups of 3 files in the test part per class
        assert np.bincount(y[split.test], minlength=3).tolist() == [6, 6, 6]
        assert split.duplicate_groups == 30 and split.leaked_groups == 0
        assert any("30 groups of byte-identical files" in n and "one side" in n for n in split.notes)
        tests.add(tuple(split.test.tolist()))
    assert len(tests) > 1  # the seed matters


def test_fit_head_keeps_duplicates_on_one_side(tmp_path: Path, small_grids) -> None:
    X, y = blobs()
    hashes = [fake_hash(("pair", i // 2)) for i in range(90)]
    cache = write_cache(tmp_path / "pairs.h5", X, y, CLASS_NAMES3, hashes=hashes)
    result = fit(cache, tmp_path / "h", seed=5)
    test = set(result.split.test.tolist())
    assert all((2 * g in test) == (2 * g + 1 in test) for g in range(45))
    metrics = load_metrics(tmp_path / "h")
    assert metrics["duplicate_groups"] == 45 and metrics["leaked_groups"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_split_is_stratified(tmp_path: Path, seed: int) -> None:
    counts = [30, 17, 8]  # 0.2 * n = 6, 3.4, 1.6
    X, y = blobs(per_class=counts)
    cache = load(write_cache(tmp_path / "strat.h5", X, y, CLASS_NAMES3))
    split = split_rows(cache, 0.2, seed)
    assert np.bincount(y[split.test], minlength=3).tolist() == [round(0.2 * n) for n in counts] == [6, 3, 2]
    assert split.duplicate_groups == 0 and split.notes == []
    assert "stratified" in split.source and f"seed {seed}" in split.source


def folder_split_cache(tmp_path: Path, name: str = "folders.h5", test_name: str = "test"):
    """3 classes x 20 rows; per class rows 0-14 train, 15-19 test. Two duplicate groups span train and
    test (leaks), one duplicate group stays inside train."""
    X, y = blobs(per_class=20)
    split = [("train" if i % 20 < 15 else test_name) for i in range(60)]
    hashes = [fake_hash(("f", i)) for i in range(60)]
    hashes[15] = hashes[0]  # apple: train 0 == test 15
    hashes[35] = hashes[20]  # bee: train 20 == test 35
    hashes[41] = hashes[40]  # cat: two train files, identical
    return write_cache(tmp_path / name, X, y, CLASS_NAMES3, split=split, hashes=hashes), y, split


def test_folder_split_is_used_as_given_and_leakage_reported(tmp_path: Path, small_grids) -> None:
    cache, y, split = folder_split_cache(tmp_path)
    result = fit(cache, tmp_path / "h0", seed=0)
    assert result.split.test.tolist() == [i for i in range(60) if split[i] == "test"]
    assert result.split.train.tolist() == [i for i in range(60) if split[i] == "train"]
    moved = split_rows(load(cache), 0.5, 7)  # neither the seed nor test_size moves a given split
    assert np.array_equal(moved.test, result.split.test) and np.array_equal(moved.train, result.split.train)
    metrics = load_metrics(tmp_path / "h0")
    assert metrics["split"] == "folders (test is the test part)"
    assert metrics["leaked_groups"] == 2 and metrics["duplicate_groups"] == 3
    leak = [n for n in metrics["split_notes"] if "LEAKAGE" in n]
    assert len(leak) == 1 and "2 groups" in leak[0]
    assert metrics["n_test"] == 15 and metrics["n_train"] == 45


def test_no_leakage_note_when_duplicates_stay_inside_one_split(tmp_path: Path) -> None:
    X, y = blobs(per_class=10)
    split = [("train" if i % 10 < 7 else "test") for i in range(30)]
    hashes = [fake_hash(("n", i)) for i in range(30)]
    hashes[1] = hashes[0]  # both train
    hashes[9] = hashes[8]  # both test
    result = split_rows(load(write_cache(tmp_path / "c.h5", X, y, CLASS_NAMES3, split=split, hashes=hashes)))
    assert result.leaked_groups == 0 and result.duplicate_groups == 2
    assert not any("LEAKAGE" in n for n in result.notes)


def test_val_folder_is_the_test_part_without_a_test_folder(tmp_path: Path) -> None:
    cache, y, split = folder_split_cache(tmp_path, test_name="val")
    result = split_rows(load(cache))
    assert result.source == "folders (val is the test part)"
    assert result.test.tolist() == [i for i in range(60) if split[i] == "val"]
    assert result.leaked_groups == 2


def test_val_rows_train_when_a_test_folder_exists(tmp_path: Path) -> None:
    X, y = blobs(per_class=10)
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    split = split * 3
    result = split_rows(load(write_cache(tmp_path / "c.h5", X, y, CLASS_NAMES3, split=split)))
    assert result.test.tolist() == [i for i in range(30) if split[i] == "test"]
    assert result.train.tolist() == [i for i in range(30) if split[i] in ("train", "val")]


def test_identical_files_with_different_labels_are_noted(tmp_path: Path) -> None:
    X, y = blobs(per_class=10)
    hashes = [fake_hash(("l", i)) for i in range(30)]
    hashes[12] = hashes[3]  # an apple file copied into bee
    result = split_rows(load(write_cache(tmp_path / "c.h5", X, y, CLASS_NAMES3, hashes=hashes)))
    notes = [n for n in result.notes if "carry different labels" in n]
    assert len(notes) == 1 and "ant/img_0003.png" in notes[0] and "bee/img_0012.png" in notes[0]


# -- mistakes users make ---------------------------------------------------------------------------


def test_one_class_in_the_training_part(tmp_path: Path) -> None:
    X, y = blobs(n_classes=2, per_class=10)
    split = ["train"] * 10 + ["test"] * 10  # every bee is a test image
    cache = write_cache(tmp_path / "c.h5", X, y, ["ant", "bee"], split=split)
    with pytest.raises(UserError, match="one class only"):
        fit(cache, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_single_class_cache(tmp_path: Path) -> None:
    X, y = blobs(n_classes=1, per_class=12)
    cache = write_cache(tmp_path / "c.h5", X, y, ["ant"])
    with pytest.raises(UserError, match="one class only"):
        fit(cache, tmp_path / "h")


def tiny_class_cache(tmp_path: Path, n_small: int) -> Path:
    X, y = blobs(per_class=[20, 20, n_small])
    return write_cache(tmp_path / f"small{n_small}.h5", X, y, CLASS_NAMES3)


def test_class_with_one_training_image_is_named(tmp_path: Path) -> None:
    # cat has 2 images: one goes to the test part, one is left to train on
    with pytest.raises(UserError, match="class cat has 1 distinct training image"):
        fit(tiny_class_cache(tmp_path, 2), tmp_path / "h")


def test_small_class_means_fewer_folds(tmp_path: Path, small_grids) -> None:
    # cat has 4 images: round(0.2 * 4) = 1 for the test part, 3 to train on: 3 folds instead of 5
    lines: list[str] = []
    result = fit(tiny_class_cache(tmp_path, 4), tmp_path / "h", cv=5, log=lines.append)
    assert any("cat has 3 distinct training images, so CV uses 3 folds instead of 5" in line for line in lines), lines
    assert result.metrics["cv_folds"] == 3
    assert load_head(tmp_path / "h").meta["options"]["cv"] == 5


def test_empty_cache(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "empty.h5", np.zeros((0, 16), np.float32), [], CLASS_NAMES3)
    assert len(load(cache)) == 0
    with pytest.raises(UserError, match="holds no features"):
        fit(cache, tmp_path / "h")


def test_missing_and_foreign_cache_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        fit(tmp_path / "nowhere.h5", tmp_path / "h")
    (tmp_path / "junk.h5").write_text("not HDF5")
    with pytest.raises(UserError, match="not a readable HDF5 cache"):
        fit(tmp_path / "junk.h5", tmp_path / "h")


@pytest.mark.parametrize(
    "option, value",
    [
        ("clf", "tree"),
        ("cv", 1),
        ("cv", 2.5),
        ("test_size", 1.5),
        ("test_size", 0.0),
        ("class_weight", "foo"),
        ("seed", -1),
        ("n_jobs", -2),
        ("n_jobs", 0),
    ],
)
def test_invalid_options_name_the_argument(blob_cache: Path, tmp_path: Path, option: str, value) -> None:
    clf = value if option == "clf" else "logreg"
    kwargs = {} if option == "clf" else {option: value}
    with pytest.raises(UserError) as info:
        fit_head(blob_cache, clf, out=tmp_path / "h", log=quiet, **{"n_jobs": 1, **kwargs})
    assert str(info.value).startswith(f"{option} is {value!r}"), str(info.value)
    assert not (tmp_path / "h").exists()


def test_class_only_in_the_test_folder(tmp_path: Path, small_grids) -> None:
    X, y = blobs(per_class=20)
    split = [("train" if i < 40 and i % 20 < 15 else "test") for i in range(60)]  # cat: test images only
    cache = write_cache(tmp_path / "c.h5", X, y, CLASS_NAMES3, split=split)
    with pytest.raises(UserError, match="class cat has no training images"):
        fit(cache, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_class_without_any_row(tmp_path: Path, small_grids) -> None:
    """Every image of one class folder was unreadable: the cache lists the class but holds no row of it."""
    X, y = blobs(per_class=20)
    cache = write_cache(tmp_path / "c.h5", X[:40], y[:40], CLASS_NAMES3)
    with pytest.raises(UserError, match="class cat has no training images"):
        fit(cache, tmp_path / "h")


@pytest.mark.filterwarnings("ignore:Number of classes in training fold")
@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_class_made_of_copies_is_a_user_error(tmp_path: Path, clf: str, small_grids) -> None:
    """cat: 30 files but only 2 distinct contents (15 copies each); one goes to test, one trains."""
    X, y = blobs()
    hashes = [fake_hash(("u", i)) for i in range(60)] + [fake_hash(("copy", i % 2)) for i in range(30)]
    cache = write_cache(tmp_path / "copies.h5", X, y, CLASS_NAMES3, hashes=hashes)
    with pytest.raises(UserError, match="class cat has 1 distinct training image"):
        fit(cache, tmp_path / "h", clf, cv=5)


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_copies_limit_the_folds(tmp_path: Path, clf: str, small_grids) -> None:
    """cat: 30 files, 4 distinct contents: 1 content tests, 3 train, so CV uses 3 folds, not 5."""
    X, y = blobs()
    hashes = [fake_hash(("u", i)) for i in range(60)] + [fake_hash(("copy", i % 4)) for i in range(30)]
    cache = write_cache(tmp_path / "copies.h5", X, y, CLASS_NAMES3, hashes=hashes)
    result = fit(cache, tmp_path / "h", clf, cv=5)
    assert result.metrics["cv_folds"] == 3
    assert load_head(tmp_path / "h").predict_proba(X[:3]).shape == (3, 3)


# -- a head folder ------------------------------------------------------------------------------------

METRIC_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "best_params",
    "cv_score",
    "fit_seconds",
    "split_notes",
    "duplicate_groups",
    "leaked_groups",
    "n_test",
    "n_train",
    "split",
    "cv_folds",
    "cv_scoring",
    "class_names",
    "clf",
    "method",
    "seed",
}


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_head_folder_contents(fitted: dict, clf: str) -> None:
    result, blob_cache = fitted[clf], fitted["cache"]
    folder = result.folder
    assert folder.name == clf
    assert {p.name for p in folder.iterdir()} == {
        HEAD_MODEL,
        "head.json",
        METRICS_JSON,
        PREDICTIONS_CSV,
        CV_PREDICTIONS_CSV,
        UNKNOWN_NPZ,
    }

    metrics = json.loads((folder / METRICS_JSON).read_text())
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    matrix = np.asarray(metrics["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == metrics["n_test"] == len(result.split.test) == 18
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])
    assert set(metrics["per_class"]) == set(CLASS_NAMES3)
    assert [metrics["per_class"][c]["support"] for c in CLASS_NAMES3] == matrix.sum(axis=1).tolist()
    assert metrics["n_train"] + metrics["n_test"] == 90
    assert metrics["clf"] == clf and metrics["fit_seconds"] > 0
    assert set(metrics["best_params"]) == {heads.GRIDS[clf][0].split("__")[-1]}
    assert list(metrics["best_params"].values())[0] in heads.GRIDS[clf][1]
    assert metrics["cv_grid"] == [float(v) for v in heads.GRIDS[clf][1]]
    assert 0 <= metrics["cv_score"] <= 1 and metrics["cv_folds"] == 3

    meta = json.loads((folder / "head.json").read_text())
    cache = load(blob_cache)
    assert meta["classes"] == CLASS_NAMES3
    assert meta["identity"] == cache.identity == SYNTH_CONFIG.resolved().identity()
    assert meta["cache_fingerprint"] == SYNTH_CONFIG.resolved().fingerprint()
    # the head's own fingerprint is chained from the cache's and the options
    assert len(meta["fingerprint"]) == 16 and meta["fingerprint"] != meta["cache_fingerprint"]
    assert meta["fingerprint"] == metrics["fingerprint"]
    assert meta["options"]["clf"] == clf and meta["dataset_root"] == cache.attrs["dataset_root"]
    assert meta["feature_dim"] == 16
    assert Path(meta["cache_path"]) == blob_cache.resolve()
    assert {"scikit-learn", "numpy", "cnncodes"} <= set(meta["versions"])
    assert meta["backbone_config"] == SYNTH_CONFIG.resolved().__dict__
    assert meta["metrics"]["accuracy"] == metrics["accuracy"]

    # predictions.csv holds every test image once; metrics.json is recomputed from it exactly
    predictions = read_predictions(folder / PREDICTIONS_CSV)
    assert sorted(predictions.paths) == sorted(cache.paths[i] for i in result.split.test)
    assert predictions.class_names == CLASS_NAMES3 and predictions.proba.shape == (18, 3)
    assert np.allclose(predictions.proba.sum(1), 1, atol=1e-4)
    assert predictions.correct.mean() == pytest.approx(metrics["accuracy"])
    recomputed = np.zeros((3, 3), int)
    np.add.at(recomputed, (predictions.y_true, predictions.y_pred), 1)
    assert recomputed.tolist() == metrics["confusion_matrix"]
    lo, hi = metrics["accuracy_ci"]
    assert lo <= metrics["accuracy"] <= hi and 0 <= lo < hi <= 1
    if clf in ("logreg", "knn"):  # out-of-fold probabilities of every training row
        oof = read_predictions(folder / CV_PREDICTIONS_CSV)
        assert sorted(oof.paths) == sorted(cache.paths[i] for i in result.split.train)
        assert oof.correct.mean() == pytest.approx(metrics["cv_score"], abs=0.05)


def test_default_head_folder(blob_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_grids) -> None:
    monkeypatch.chdir(tmp_path)
    result = fit_head(blob_cache, "knn", cv=2, n_jobs=1, log=quiet)
    assert result.folder == Path("heads") / "blobs-knn"
    assert (tmp_path / "heads" / "blobs-knn" / "head.json").is_file()


@pytest.fixture
def head_dir(fitted: dict, tmp_path: Path) -> Path:
    """A private copy of the fitted logreg head (tests may break it)."""
    import shutil

    return Path(shutil.copytree(fitted["logreg"].folder, tmp_path / "head"))


def test_missing_head_files(head_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="head.json is missing"):
        load_head(tmp_path / "nowhere")
    (head_dir / HEAD_MODEL).unlink()
    with pytest.raises(UserError, match="head.skops is missing"):
        load_head(head_dir)


def test_broken_head_json(head_dir: Path) -> None:
    meta = json.loads((head_dir / "head.json").read_text())
    (head_dir / "head.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError, match="head format 99"):
        load_head(head_dir)
    (head_dir / "head.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_head(head_dir)


def test_check_features(head_dir: Path) -> None:
    head = load_head(head_dir)
    identity = SYNTH_CONFIG.resolved().identity()
    head.check_features(identity, 16, "this cache")  # the same features: no error

    other = dict(identity, image_size=64)
    with pytest.raises(UserError, match="image_size: 32 -> 64") as info:
        head.check_features(other, 16, "cache other.h5")
    assert "other.h5" in str(info.value) and "feature width" not in str(info.value)

    layer = dict(identity, layer="block_13_expand")
    with pytest.raises(UserError, match="layer: '' -> 'block_13_expand'"):
        head.check_features(layer, 16, "x")

    backbone = dict(identity, backbone="ResNet50")
    with pytest.raises(UserError, match="backbone: 'MobileNetV2' -> 'ResNet50'"):
        head.check_features(backbone, 16, "x")

    with pytest.raises(UserError, match="feature width: 16 -> 8") as info:
        head.check_features(identity, 8, "x")
    assert "image_size" not in str(info.value)


def test_predict_proba_checks_the_width(head_dir: Path) -> None:
    head = load_head(head_dir)
    assert head.predict_proba(np.zeros((2, 16), np.float32)).shape == (2, 3)
    with pytest.raises(UserError, match="expects 16 features per image"):
        head.predict_proba(np.zeros((2, 15), np.float32))
    with pytest.raises(UserError, match="expects 16 features"):
        head.predict_proba(np.zeros(16, np.float32))


# -- no TensorFlow -------------------------------------------------------------------------------------

NO_TF = (
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
    "assert not bad, bad[:5]\n"
)


def test_fit_head_and_cli_never_import_tensorflow(blob_cache: Path, tmp_path: Path) -> None:
    """In a fresh interpreter: fit_head, load_head and `fit-head` through the CLI leave TensorFlow unimported."""
    head, cli_head = tmp_path / "h", tmp_path / "cli-head"
    code = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from pipeline.heads import fit_head, load_head\n"
        f"r = fit_head({str(blob_cache)!r}, 'svm', cv=2, n_jobs=1, out={str(head)!r}, log=lambda m: None)\n"
        f"load_head({str(head)!r}).predict_proba(r.split.test.reshape(-1, 1).repeat(16, 1) * 1.0)\n"
        + NO_TF
        + "print('accuracy', r.metrics['accuracy'])\n"
        "from typer.testing import CliRunner\nimport cli\n"
        f"r = CliRunner().invoke(cli.app, ['fit-head', {str(blob_cache)!r}, '--clf', 'logreg', '--cv', '2', "
        f"'--n-jobs', '1', '--out', {str(cli_head)!r}])\n"
        "assert r.exit_code == 0, (r.output, r.exception)\n" + NO_TF + "print(r.stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "accuracy 1.0" in out.stdout
    assert "test accuracy" in out.stdout and "(18 test images)" in out.stdout
    assert (head / HEAD_MODEL).is_file() and (cli_head / "head.json").is_file()


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


def test_cli_fit_head(blob_cache: Path, tmp_path: Path, runner, small_grids) -> None:
    import cli

    out = tmp_path / "h"
    result = runner.invoke(
        cli.app, ["fit-head", str(blob_cache), "--clf", "svm", "--cv", "3", "--n-jobs", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "test accuracy" in result.stdout
    assert "3-fold CV (accuracy) chose {'C':" in result.stdout
    assert "72 train / 18 test images" in result.stdout
    for name in CLASS_NAMES3:
        assert any(line.startswith(name) for line in result.stdout.splitlines())
    assert f"head saved to {out}/" in result.stdout
    assert load_metrics(out)["clf"] == "svm"


def test_cli_fit_head_balanced_and_notes(tmp_path: Path, runner, small_grids) -> None:
    import cli

    cache, _, _ = folder_split_cache(tmp_path)
    result = runner.invoke(
        cli.app,
        [
            "fit-head",
            str(cache),
            "--class-weight",
            "balanced",
            "--cv",
            "3",
            "--n-jobs",
            "1",
            "--out",
            str(tmp_path / "h"),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "(balanced_accuracy)" in result.stdout
    assert "LEAKAGE: 2 groups" in result.stdout
    assert load_metrics(tmp_path / "h")["cv_scoring"] == "balanced_accuracy"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["MISSING"], "does not exist"),
        (["CACHE", "--clf", "tree"], "--clf is 'tree'"),
        (["CACHE", "--cv", "1"], "--cv is 1"),
        (["CACHE", "--test-size", "1.5"], "--test-size is 1.5"),
        (["CACHE", "--class-weight", "foo"], "--class-weight is 'foo'"),
    ],
)
def test_cli_fit_head_user_errors(blob_cache: Path, tmp_path: Path, runner, args: list[str], fragment: str) -> None:
    import cli

    args = [str(blob_cache) if a == "CACHE" else str(tmp_path / "missing.h5") if a == "MISSING" else a for a in args]
    result = runner.invoke(cli.app, ["fit-head", *args, "--out", str(tmp_path / "h")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "h").exists()


def test_a_solver_that_did_not_converge_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.linear_model import LogisticRegression

    make = heads.make_pipeline

    def one_iteration(*args, **kwargs):
        pipeline = make(*args, **kwargs)
        if isinstance(pipeline.steps[-1][1], LogisticRegression):
            pipeline.steps[-1][1].set_params(max_iter=1)
        return pipeline

    X, y = blobs(per_class=20, sep=0.5)
    messages: list[str] = []
    monkeypatch.setattr(heads, "make_pipeline", one_iteration)
    heads.fit_arrays(X, y, np.arange(len(y)), CLASS_NAMES3, "logreg", cv=3, n_jobs=1, log=messages.append)
    warned = [m for m in messages if "stopped before converging" in m]
    assert len(warned) == 1 and "CV fit(s)" in warned[0] and "the final fit" in warned[0], messages
    messages.clear()
    monkeypatch.setattr(heads, "make_pipeline", make)
    heads.fit_arrays(X, y, np.arange(len(y)), CLASS_NAMES3, "logreg", cv=3, n_jobs=1, log=messages.append)
    assert not [m for m in messages if "converging" in m]


# -- head files that cannot lie: a schema, hashes binding head.json to head.skops ---------------------


def rewrite_meta(head_dir: Path, change) -> None:
    """Apply change(meta) -> new head.json value, and write it back."""
    meta = json.loads((head_dir / "head.json").read_text())
    (head_dir / "head.json").write_text(json.dumps(change(meta)))


def drop(meta: dict, *keys: str) -> dict:
    return {k: v for k, v in meta.items() if k not in keys}


def object_array_member(head_dir: Path) -> None:
    """Replace the first .npy member of head.skops with an object array (pickled inside the .npy)."""
    import io
    import zipfile

    path = head_dir / HEAD_MODEL
    with zipfile.ZipFile(path) as src:
        members = {name: src.read(name) for name in src.namelist()}
    target = next(name for name in members if name.endswith(".npy"))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    members[target] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)


# case -> (how to break the head folder, a fragment of the one-line error)
MALFORMED_HEADS = {
    "json_list": (lambda d: (d / "head.json").write_text("[1, 2]"), "holds a list, not an object"),
    "no_backbone_config": (lambda d: rewrite_meta(d, lambda m: drop(m, "backbone_config")), "no 'backbone_config'"),
    "classes_not_a_list": (
        lambda d: rewrite_meta(d, lambda m: {**m, "classes": "ant,bee"}),
        "'classes' is a string, expected a list",
    ),
    "duplicate_classes": (
        lambda d: rewrite_meta(d, lambda m: {**m, "classes": ["ant", "bee", "ant"]}),
        "class names listed twice: ant",
    ),
    "feature_dim_text": (
        lambda d: rewrite_meta(d, lambda m: {**m, "feature_dim": "16"}),
        "'feature_dim' is a string, expected an integer",
    ),
    "foreign_backbone_key": (
        lambda d: rewrite_meta(d, lambda m: {**m, "backbone_config": {"depth": 3}}),
        "'backbone_config' does not describe a backbone",
    ),
    "swapped_classes": (
        lambda d: rewrite_meta(d, lambda m: {**m, "classes": ["bee", "ant", "cat"]}),
        "were changed after the head was fitted",
    ),
    "other_model": (
        lambda d: (d / HEAD_MODEL).write_bytes((d.parent / "svm" / HEAD_MODEL).read_bytes()),
        "is not the model",
    ),
    "object_array": (
        lambda d: (rewrite_meta(d, lambda m: drop(m, "model_sha256")), object_array_member(d)),
        "is not a readable skops head",
    ),
}


@pytest.fixture
def head_pair(fitted: dict, tmp_path: Path) -> Path:
    """Private copies of the logreg and svm heads side by side (tests may break them)."""
    import shutil

    for clf in ("logreg", "svm"):
        shutil.copytree(fitted[clf].folder, tmp_path / clf)
    return tmp_path / "logreg"


def test_saved_head_records_the_hash_of_its_model_and_class_names(fitted: dict) -> None:
    import hashlib

    folder = fitted["logreg"].folder
    meta = json.loads((folder / "head.json").read_text())
    assert meta["model_sha256"] == hashlib.sha256((folder / HEAD_MODEL).read_bytes()).hexdigest()
    assert meta["classes_sha256"] == hashlib.sha256(b"ant\nbee\ncat").hexdigest()


@pytest.mark.parametrize("case", sorted(MALFORMED_HEADS))
def test_malformed_head_is_one_user_error(head_pair: Path, case: str) -> None:
    breaks, fragment = MALFORMED_HEADS[case]
    breaks(head_pair)
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_head(head_pair)


def test_heads_without_hashes_and_with_keys_of_later_versions_still_load(head_dir: Path) -> None:
    rewrite_meta(
        head_dir,
        lambda m: {**drop(m, "model_sha256", "classes_sha256"), "calibration": {"temperature": 1.5}, "unknown": None},
    )
    assert load_head(head_dir).classes == CLASS_NAMES3


def test_pickle_head_refusal_offers_only_flags_the_command_has(head_dir: Path) -> None:
    rewrite_meta(head_dir, lambda m: {**m, "format_version": 1})
    with pytest.raises(UserError, match="pickle") as without_flag:
        load_head(head_dir)  # serve, export, compare, finetune: no --trust-pickle
    assert "--trust-pickle" not in str(without_flag.value)
    with pytest.raises(UserError, match="pass --trust-pickle"):
        load_head(head_dir, trust_pickle=False)  # predict has the flag


@pytest.mark.parametrize("command", ["predict", "serve", "export"])
@pytest.mark.parametrize("case", ["json_list", "no_backbone_config", "swapped_classes", "other_model", "object_array"])
def test_cli_malformed_head_exits_2_with_one_line(
    head_pair: Path, tmp_path: Path, runner, command: str, case: str
) -> None:
    import socket

    from PIL import Image

    import cli

    if command == "serve":
        pytest.importorskip("fastapi", reason="the web extra is not installed")
    MALFORMED_HEADS[case][0](head_pair)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = {
        "predict": ["predict", str(image), "--head", str(head_pair)],
        "serve": ["serve", "--head", str(head_pair), "--port", str(port)],
        "export": ["export", str(head_pair), "--out", str(tmp_path / "m.keras")],
    }[command]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert MALFORMED_HEADS[case][1] in lines[0] and "Traceback" not in result.output


# -- calibration and the unknown detector -----------------------------------------------------------
@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_every_head_is_calibrated_and_gets_a_detector(fitted: dict, clf: str) -> None:
    from pipeline.artifacts import HEAD_JSON, METRICS_JSON, UNKNOWN_NPZ

    folder = fitted[clf].folder
    meta = json.loads((folder / HEAD_JSON).read_text())
    metrics = json.loads((folder / METRICS_JSON).read_text())
    assert meta["calibration"]["method"] == "temperature" and meta["calibration"]["temperature"] > 0
    assert meta["unknown"]["method"] == "combined" and meta["unknown"]["accept"] == 0.95
    assert (folder / UNKNOWN_NPZ).is_file() and meta["unknown"]["n_train"] == metrics["n_train"]
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_uncalibrated"] <= 1
    assert sum(metrics["reliability"]["count"]) == metrics["n_test"]
    assert 0 <= metrics["unknown"]["test_unknown_rate"] <= 1
    head = load_head(folder)
    X = load(fitted["cache"]).features
    raw = head.model.predict_proba(X[:5])
    assert np.allclose(head.predict_proba(X[:5]).argmax(1), raw.argmax(1))
    assert head.unknown_scores(X[:5], head.predict_proba(X[:5])).shape == (5,)


def test_accept_sets_the_detector_and_enters_the_fingerprint(blob_cache: Path, tmp_path: Path, small_grids) -> None:
    from pipeline.artifacts import HEAD_JSON, UNKNOWN_NPZ

    a = fit(blob_cache, tmp_path / "a", accept=0.95)
    b = fit(blob_cache, tmp_path / "b", accept=0.8)
    none = fit(blob_cache, tmp_path / "none", accept=None)
    meta = {k: json.loads((tmp_path / k / HEAD_JSON).read_text()) for k in ("a", "b", "none")}
    assert (
        meta["b"]["unknown"]["accept"] == 0.8 and meta["b"]["unknown"]["threshold"] < meta["a"]["unknown"]["threshold"]
    )
    assert len({a.metrics["fingerprint"], b.metrics["fingerprint"], none.metrics["fingerprint"]}) == 3
    assert (
        "unknown" not in meta["none"]
        and "calibration" in meta["none"]
        and not (tmp_path / "none" / UNKNOWN_NPZ).exists()
    )
    assert load_head(tmp_path / "none").detector is None
    with pytest.raises(UserError, match="^accept is 1.5"):
        fit(blob_cache, tmp_path / "c", accept=1.5)


def test_a_chain_of_near_duplicates_is_named_in_the_split_notes(tmp_path: Path) -> None:
    X, y = blobs()  # 90 rows, 3 classes
    cache = load(write_cache(tmp_path / "chain.h5", X, y, CLASS_NAMES3))
    chain = [(i, i + 1) for i in range(0, 9)]  # rows 0-9 linked one to the next: a group of 10 (11% of 90)
    notes = " ".join(split_rows(cache, 0.2, 0, chain).notes)
    assert "near-duplicate links chain 10 of 90 images into one group" in notes and "--group-near-duplicates" in notes
    pairs = [(2 * i, 2 * i + 1) for i in range(10)]  # ten pairs of copies: the usual case, no note
    assert "chain" not in " ".join(split_rows(cache, 0.2, 0, pairs).notes)
