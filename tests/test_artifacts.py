"""pipeline.artifacts: atomic files and folders, predictions.csv, self-contained heads (no TensorFlow)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from heads_fixtures import CLASS_NAMES3, blobs, write_cache

from pipeline.artifacts import (
    HEAD_JSON,
    HEAD_MODEL,
    LEGACY_HEAD_MODEL,
    METRICS_JSON,
    PREDICTIONS_CSV,
    Predictions,
    atomic_write,
    chain_fingerprint,
    paired_outcomes,
    read_json,
    read_predictions,
    staged_folder,
    write_predictions,
)
from pipeline.errors import UserError
from pipeline.heads import fit_head, load_head

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_staged_folder_swaps_whole_and_cleans_up_on_error(tmp_path: Path) -> None:
    folder = tmp_path / "head"
    with staged_folder(folder) as stage:
        (stage / "a").write_text("1")
        (stage / "b").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(folder) as stage:
            (stage / "a").write_text("2")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "1", "b": "1"}
    with staged_folder(folder) as stage:
        (stage / "c").write_text("3")
    assert [p.name for p in folder.iterdir()] == ["c"]  # the new folder replaces the old one whole
    assert [p.name for p in tmp_path.iterdir()] == ["head"]


def test_predictions_round_trip_with_awkward_names(tmp_path: Path) -> None:
    names = ["a,b", 'say "x"', "ünï"]
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    written = Predictions(["dir/one two.jpg", "x,y.png"], ["h1", "h2"], ["", "test"], np.array([0, 1]), proba, names)
    write_predictions(tmp_path / "p.csv", written)
    back = read_predictions(tmp_path / "p.csv")
    assert back.paths == written.paths and back.class_names == names and back.split == ["", "test"]
    assert np.allclose(back.proba, proba) and back.correct.tolist() == [True, False]
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.startswith("path,content_hash,split,true,predicted,")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a predictions file"):
        read_predictions(tmp_path / "bad.csv")


def test_read_json_names_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(UserError, match=r"x\.json is not valid JSON"):
        read_json(tmp_path / "x.json")


def test_fingerprints_chain() -> None:
    a = chain_fingerprint("cache1", clf="logreg", seed=0)
    assert a == chain_fingerprint("cache1", seed=0, clf="logreg")
    assert a != chain_fingerprint("cache2", clf="logreg", seed=0) != chain_fingerprint("cache1", clf="logreg", seed=1)


@pytest.fixture
def head(tmp_path: Path) -> Path:
    X, y = blobs()
    cache = write_cache(tmp_path / "cache" / "blobs.h5", X, y, CLASS_NAMES3)
    return fit_head(cache, "logreg", cv=3, n_jobs=1, out=tmp_path / "head", log=lambda m: None).folder


def test_head_needs_nothing_from_a_moved_cache(head: Path, tmp_path: Path) -> None:
    """Everything a head needs is in its folder: moving its cache away changes nothing it reports."""
    meta = json.loads((head / HEAD_JSON).read_text())
    shutil.move(tmp_path / "cache", tmp_path / "elsewhere")
    loaded = load_head(head)
    X, _ = blobs()
    assert loaded.predict_proba(X[:5]).shape == (5, 3)
    assert read_predictions(head / PREDICTIONS_CSV).correct.mean() == meta["metrics"]["accuracy"]


def test_skops_head_refuses_foreign_types(head: Path) -> None:
    """A head.skops that asks for a type no head holds is refused before anything is loaded."""
    import skops.io
    from sklearn.ensemble import RandomForestClassifier

    skops.io.dump(RandomForestClassifier(n_estimators=2).fit([[0], [1]], [0, 1]), head / HEAD_MODEL)
    with pytest.raises(UserError, match="is not the model"):  # head.json's hash refuses it first
        load_head(head)
    meta = json.loads((head / HEAD_JSON).read_text())
    (head / HEAD_JSON).write_text(json.dumps({k: v for k, v in meta.items() if k != "model_sha256"}))
    with pytest.raises(UserError, match="refused"):  # a head saved before hashes: refused by its types
        load_head(head)


class _RunsACommand:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_heads_load_only_when_trusted(head: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    meta = json.loads((head / HEAD_JSON).read_text())
    (head / HEAD_JSON).write_text(json.dumps({**meta, "format_version": 1}))
    (head / HEAD_MODEL).unlink()
    (head / LEGACY_HEAD_MODEL).write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(UserError, match="--trust-pickle"):
        load_head(head, trust_pickle=False)
    assert not marker.exists()
    # a malicious file disguised as a skops head is refused too, and nothing runs: by its hash, and when
    # head.json records none (a head saved before hashes), by skops
    (head / HEAD_JSON).write_text(json.dumps(meta))
    (head / HEAD_MODEL).write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(UserError, match="is not the model"):
        load_head(head)
    (head / HEAD_JSON).write_text(json.dumps({k: v for k, v in meta.items() if k != "model_sha256"}))
    with pytest.raises(UserError, match="not a readable skops head"):
        load_head(head)
    assert not marker.exists()


def test_trusted_pickle_head_still_loads(head: Path) -> None:
    import joblib
    import skops.io

    from pipeline.heads import TRUSTED_TYPES

    model = skops.io.load(head / HEAD_MODEL, trusted=sorted(TRUSTED_TYPES))
    joblib.dump(model, head / LEGACY_HEAD_MODEL)
    (head / HEAD_MODEL).unlink()
    meta = json.loads((head / HEAD_JSON).read_text())
    del meta["model_sha256"]  # format-1 heads were saved before hashes
    (head / HEAD_JSON).write_text(json.dumps({**meta, "format_version": 1}))
    assert load_head(head, trust_pickle=True).predict_proba(blobs()[0][:2]).shape == (2, 3)


# A child fits a head, then refits it into the same folder and is killed at a chosen moment of the save.
KILL_DRIVER = """
import sys, time, os, pathlib
sys.path.insert(0, {root!r})
import pipeline.artifacts as artifacts
from pipeline.heads import fit_head
fit_head({cache!r}, "logreg", cv=3, n_jobs=1, seed=1, out={head!r}, log=lambda m: None)
marker = pathlib.Path({marker!r})
if {fallback!r}:
    artifacts._exchange = lambda a, b: False
    real_rename = os.rename
    def slow_rename(src, dst):
        real_rename(src, dst)
        if str(src).endswith("head"):  # the old folder is now aside, the new one not yet in place
            marker.touch(); time.sleep(60)
    os.rename = slow_rename
else:
    real_exchange = artifacts._exchange
    def slow_exchange(a, b):
        marker.touch(); time.sleep(60)
    artifacts._exchange = slow_exchange
fit_head({cache!r}, "svm", cv=3, n_jobs=1, seed=2, out={head!r}, log=lambda m: None)
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_kill_during_save_leaves_old_head_whole(tmp_path: Path, fallback: bool) -> None:
    X, y = blobs()
    cache = write_cache(tmp_path / "cache" / "blobs.h5", X, y, CLASS_NAMES3)
    head, marker = tmp_path / "head", tmp_path / "marker"
    code = KILL_DRIVER.format(root=str(ROOT), cache=str(cache), head=str(head), marker=str(marker), fallback=fallback)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, "the child ended before reaching the save"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    loaded = load_head(head)  # recovers a half-done swap
    meta = json.loads((head / HEAD_JSON).read_text())
    metrics = json.loads((head / METRICS_JSON).read_text())
    assert meta["options"]["clf"] == "logreg" and meta["options"]["seed"] == 1  # the old head, all of it
    assert metrics["fingerprint"] == meta["fingerprint"] and metrics["clf"] == "logreg"
    assert type(loaded.model.steps[-1][1]).__name__ == "LogisticRegression"
    assert len(read_predictions(head / PREDICTIONS_CSV)) == metrics["n_test"]
    # and the next save goes through, leaving no staging folders behind
    fit_head(cache, "svm", cv=3, n_jobs=1, seed=2, out=head, log=lambda m: None)
    assert json.loads((head / HEAD_JSON).read_text())["options"]["clf"] == "svm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "head", "marker"]


def _predictions(rows: list[tuple[str, str, bool]]) -> Predictions:
    """Two-class predictions: (path, content hash, right?) for each image, the true class always 0."""
    proba = np.array([[0.9, 0.1] if right else [0.1, 0.9] for _, _, right in rows])
    return Predictions(
        [p for p, _, _ in rows],
        [h for _, h, _ in rows],
        ["test"] * len(rows),
        np.zeros(len(rows), np.int64),
        proba,
        ["a", "b"],
    )


def test_paired_outcomes_keep_byte_identical_test_images_apart():
    # two copies of one image (same hash, other paths): a is right on one and wrong on the other
    a = _predictions([("x/1.jpg", "h1", True), ("x/1-copy.jpg", "h1", False), ("x/2.jpg", "h2", True)])
    b = _predictions([("x/2.jpg", "h2", False), ("x/1-copy.jpg", "h1", True), ("x/1.jpg", "h1", True)])
    ca, cb = paired_outcomes(a, b)
    assert len(ca) == 3  # keyed by hash alone the two copies would collapse into one
    assert sorted(zip(ca.tolist(), cb.tolist())) == [(False, True), (True, False), (True, True)]


def test_paired_outcomes_pair_the_same_images_under_other_paths():
    a = _predictions([("a/1.jpg", "h1", True), ("a/1b.jpg", "h1", True), ("a/2.jpg", "h2", False)])
    b = _predictions([("b/1.jpg", "h1", False), ("b/9.jpg", "h9", True)])
    ca, cb = paired_outcomes(a, b)
    assert ca.tolist() == [True] and cb.tolist() == [False]
