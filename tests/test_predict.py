"""pipeline.predict on a tiny real cache: cached images need no backbone, new ones use the head's recorded
configuration, bad files are reported per file, and the CSV has one line per image."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CLASS_COLOURS, TINY, make_dataset, pixels, save_image
from heads_fixtures import CLASS_NAMES3, blobs, write_cache
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from pipeline import heads
from pipeline.backbones import BackboneConfig
from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.heads import fit_head, load_head
from pipeline.images import decode_image
from pipeline.predict import predict

CLASSES = sorted(CLASS_COLOURS)  # apple, grass, sky
HEADER3 = ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "unknown", "unknown_score", "error"]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    """3 classes x 6 images, extracted once with a tiny random-weight MobileNetV2, and a logreg head on it."""
    import pipeline.extract as extract_module
    from pipeline.extract import extract
    from pipeline.runtime import make_runtime

    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "data", per_class=6)
    config = BackboneConfig(**TINY)
    # Keras (not a TFLite conversion), built once, shared by extract and the predict tests
    runtime = make_runtime(config.resolved(), "keras")
    with pytest.MonkeyPatch.context() as mp, threadpool_limits(1):
        mp.setattr(extract_module, "make_runtime", lambda *args, **kwargs: runtime)
        for clf, values in {"logreg": [0.1, 1.0, 10.0]}.items():
            mp.setitem(heads.GRIDS, clf, (heads.GRIDS[clf][0], values))
        summary = extract(data, config, cache=root / "tiny.h5", progress=False, log=quiet)
        assert summary.n_rows == 18 and not summary.skipped
        result = fit_head(root / "tiny.h5", "logreg", cv=3, n_jobs=1, out=root / "head", log=quiet)
    return SimpleNamespace(
        root=root, data=data, cache=root / "tiny.h5", head=root / "head", runtime=runtime, config=config, result=result
    )


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a backbone (or a runtime) fails the test."""
    import pipeline.backbones
    import pipeline.predict
    import pipeline.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(pipeline.runtime, "make_runtime", refuse)
    monkeypatch.setattr(pipeline.runtime, "build_backbone", refuse)
    monkeypatch.setattr(pipeline.backbones, "build_backbone", refuse)
    monkeypatch.setattr(pipeline.predict, "make_runtime", refuse, raising=False)


@pytest.fixture
def shared_backbone(real, monkeypatch: pytest.MonkeyPatch) -> list:
    """make_runtime hands out the fixture's runtime; returns the configs it was asked for."""
    import pipeline.predict
    import pipeline.runtime

    asked: list = []

    def make(config, *args, **kwargs):
        asked.append(config)
        return real.runtime

    monkeypatch.setattr(pipeline.runtime, "make_runtime", make)
    monkeypatch.setattr(pipeline.predict, "make_runtime", make, raising=False)
    return asked


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def expected_proba(real, path: Path) -> np.ndarray:
    """What the head should say about an image: decode, run the backbone, predict_proba."""
    image = decode_image(path, real.runtime.image_size, real.config.resize)
    return load_head(real.head).predict_proba(real.runtime(image[None]))[0]


# -- (a) everything from the cache -----------------------------------------------------------------


def test_dataset_images_come_from_the_cache(real, no_backbone, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    lines: list[str] = []
    predictions = predict([real.data], real.head, top_k=2, out=out, log=lines.append)
    assert len(predictions) == 18 and all(not p.error for p in predictions)
    cache = load(real.cache)
    head = load_head(real.head)
    by_path = dict(zip(cache.paths, head.predict_proba(cache.features)))
    for p in predictions:
        assert len(p.classes) == len(p.probabilities) == 2 and len(set(p.classes)) == 2
        assert set(p.classes) <= set(CLASSES)
        assert p.probabilities == sorted(p.probabilities, reverse=True)
        assert all(0 <= q <= 1 for q in p.probabilities)
        rel = Path(p.path).relative_to(real.data).as_posix()
        proba = by_path[rel]
        order = np.argsort(-proba, kind="stable")[:2]
        assert p.classes == [CLASSES[i] for i in order]
        assert p.probabilities == pytest.approx(proba[order].tolist(), abs=1e-6)
    rows = read_csv(out)
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "unknown", "unknown_score", "error"]
    assert len(rows) == 19 and all(r[-1] == "" for r in rows[1:])
    assert {r[0] for r in rows[1:]} == {p.path for p in predictions}
    assert not any("computing features" in line for line in lines)


def test_renamed_copies_of_cached_images_need_no_backbone(real, no_backbone, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for cls in CLASSES:
        source = sorted((real.data / cls).iterdir())[0]
        shutil.copy(source, folder / f"copy_of_{cls}{source.suffix}")
    predictions = predict([folder], real.head, top_k=3, log=quiet)
    assert len(predictions) == 3 and all(not p.error for p in predictions)
    for p in predictions:
        assert len(p.classes) == 3 and sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert p.probabilities == sorted(p.probabilities, reverse=True)


def test_top_k_is_capped_at_the_number_of_classes(real, no_backbone, tmp_path: Path) -> None:
    one = sorted((real.data / "sky").iterdir())[0]
    predictions = predict([one], real.head, top_k=10, out=tmp_path / "p.csv", log=quiet)
    assert len(predictions) == 1 and len(predictions[0].classes) == 3
    assert read_csv(tmp_path / "p.csv")[0] == HEADER3


@pytest.mark.parametrize("kwargs, fragment", [({"top_k": 0}, "^top_k is 0"), ({"batch_size": 0}, "^batch_size is 0")])
def test_bad_predict_options(real, kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        predict([real.data], real.head, log=quiet, **kwargs)


def test_nothing_to_predict(real, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        predict([tmp_path / "nowhere"], real.head, log=quiet)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files found"):
        predict([tmp_path / "empty"], real.head, log=quiet)
    with pytest.raises(UserError, match="head.json is missing"):
        predict([real.data], tmp_path / "no-head", log=quiet)


# -- (b) new images, broken files -------------------------------------------------------------------


def test_new_and_broken_images(real, shared_backbone: list, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    new = [
        save_image(folder / "red.png", pixels(CLASS_COLOURS["apple"], 4242)),
        save_image(folder / "blue.jpg", pixels(CLASS_COLOURS["sky"], 4343), quality=95),
    ]
    (folder / "broken.jpg").write_text("not a JPEG at all")
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    cached = sorted((real.data / "grass").iterdir())[0]
    out = tmp_path / "out" / "preds.csv"
    lines: list[str] = []
    predictions = predict([folder, cached], real.head, top_k=3, out=out, log=lines.append)

    assert len(predictions) == 5  # four image files in the folder and one cached file; notes.txt ignored
    by_name = {Path(p.path).name: p for p in predictions}
    assert set(by_name) == {"red.png", "blue.jpg", "broken.jpg", "zero.png", cached.name}
    for path in new:
        p = by_name[path.name]
        assert not p.error and len(p.classes) == 3
        proba = expected_proba(real, path)
        assert p.classes[0] == CLASSES[int(np.argmax(proba))]
        assert sorted(p.probabilities, reverse=True) == pytest.approx(sorted(proba.tolist(), reverse=True), abs=1e-5)
    assert "not an image" in by_name["broken.jpg"].error and by_name["broken.jpg"].classes == []
    assert "empty" in by_name["zero.png"].error and by_name["zero.png"].probabilities == []
    assert not by_name[cached.name].error

    assert len(shared_backbone) == 1  # one backbone for all the new files
    assert shared_backbone[0] == real.config.resolved()
    assert any("1 images found in the cache; computing features of 4" in line for line in lines), lines
    assert any("1 non-image files ignored" in line for line in lines), lines

    rows = read_csv(out)
    assert rows[0] == HEADER3
    assert len(rows) == 1 + 5 and all(len(r) == len(HEADER3) for r in rows)
    by_row = {Path(r[0]).name: r for r in rows[1:]}
    assert by_row["broken.jpg"][1:9] == [""] * 8 and "not an image" in by_row["broken.jpg"][9]
    assert by_row["red.png"][9] == "" and by_row["red.png"][1] in CLASSES
    assert by_row["red.png"][7] in ("true", "false") and float(by_row["red.png"][8]) == float(by_row["red.png"][8])
    assert float(by_row["red.png"][2]) >= float(by_row["red.png"][4]) >= float(by_row["red.png"][6])


def test_csv_columns_do_not_depend_on_the_files(real, shared_backbone: list, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_text("not a PNG")
    predictions = predict([tmp_path / "bad"], real.head, top_k=2, out=tmp_path / "p.csv", log=quiet)
    assert len(predictions) == 1 and "not an image" in predictions[0].error
    rows = read_csv(tmp_path / "p.csv")
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "unknown", "unknown_score", "error"], rows[0]
    assert len(rows[1]) == len(rows[0])


def test_backbone_rebuilt_from_the_head_gives_the_cached_features(real, tmp_path: Path) -> None:
    """With its cache gone, predict builds the backbone recorded in head.json: same probabilities."""
    head = Path(shutil.copytree(real.head, tmp_path / "head"))
    meta = json.loads((head / "head.json").read_text())
    (head / "head.json").write_text(json.dumps({**meta, "cache_path": str(tmp_path / "gone.h5")}))
    folder = real.data / "apple"
    lines: list[str] = []
    rebuilt = predict([folder], head, top_k=3, runtime="keras", log=lines.append)
    assert any("0 images found in the cache; computing features of 6" in line for line in lines), lines
    cached = {p.path: p for p in predict([folder], real.head, top_k=3, log=quiet)}
    assert len(rebuilt) == 6 and all(not p.error for p in rebuilt)
    for p in rebuilt:
        assert p.classes == cached[p.path].classes
        assert p.probabilities == pytest.approx(cached[p.path].probabilities, abs=1e-4)


# -- (c) a head that contradicts itself -------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["backbone_config"].update(image_size=64), "image_size: 32 -> 64"),
        (lambda m: m["identity"].update(resize="bicubic"), "resize: 'bicubic' -> 'bilinear'"),
        (lambda m: m["identity"].update(alpha=1.0), "alpha: 1.0 -> 0.35"),
    ],
    ids=["config-image_size", "identity-resize", "identity-alpha"],
)
def test_head_config_that_differs_from_its_identity(real, no_backbone, tmp_path: Path, edit, fragment: str) -> None:
    head = Path(shutil.copytree(real.head, tmp_path / "head"))
    meta = json.loads((head / "head.json").read_text())
    edit(meta)
    (head / "head.json").write_text(json.dumps(meta))
    new = save_image(tmp_path / "new" / "x.png", pixels(CLASS_COLOURS["grass"], 777))
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        predict([new], head, log=quiet)
    assert "trained on other features" in str(info.value)


def test_synthetic_head_with_a_foreign_backbone_config(tmp_path: Path, no_backbone) -> None:
    """No TensorFlow needed: the mismatch is caught before any backbone would be built."""
    X, y = blobs(per_class=10)
    cache = write_cache(tmp_path / "synth.h5", X, y, CLASS_NAMES3)
    with threadpool_limits(1):
        fit_head(cache, "knn", cv=2, n_jobs=1, out=tmp_path / "head", log=quiet)
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    meta["backbone_config"]["layer"] = "block_5_add"
    (tmp_path / "head" / "head.json").write_text(json.dumps(meta))
    new = save_image(tmp_path / "x.png", pixels((1, 2, 3), 5))
    with pytest.raises(UserError, match="layer: '' -> 'block_5_add'"):
        predict([new], tmp_path / "head", log=quiet)


# -- the command line -----------------------------------------------------------------------------


def test_cli_predict(real, no_backbone, tmp_path: Path) -> None:
    import cli

    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(
        cli.app, ["predict", str(real.data), "--head", str(real.head), "--top-k", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "18 images classified, 0 skipped" in result.stdout
    assert f"predictions written to {out}" in result.stdout
    rows = read_csv(out)
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "unknown", "unknown_score", "error"]
    assert len(rows) == 19 and {r[5] for r in rows[1:]} <= {"true", "false"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--head", "NO_HEAD"], "head.json is missing"),
        (["--head", "HEAD", "--top-k", "0"], "--top-k is 0"),
        ([], "give exactly one of --head"),
        (["--head", "HEAD", "--accept", "1.5"], "--accept is 1.5; it must be a number in [0.01, 1]"),
        (["--head", "HEAD", "--unknown-threshold", "abc"], "--unknown-threshold is 'abc'; it must be a number"),
        (["--head", "HEAD", "--accept", "0.9", "--unknown-threshold", "2"], "at most one of --accept"),
    ],
)
def test_cli_predict_user_errors(real, tmp_path: Path, args: list[str], fragment: str) -> None:
    import cli

    args = [str(tmp_path / "no-head") if a == "NO_HEAD" else str(real.head) if a == "HEAD" else a for a in args]
    result = CliRunner().invoke(cli.app, ["predict", str(real.data), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


# -- unknowns --------------------------------------------------------------------------------------
def test_unknown_decision_follows_the_options(real, no_backbone) -> None:
    """The head's own threshold, --unknown-threshold, --accept and --no-unknown; the top-k stays listed."""
    head = load_head(real.head)
    assert head.detector is not None and head.temperature is not None
    own = predict([real.data], real.head, top_k=3, log=quiet)
    scores = np.array([p.unknown_score for p in own])
    assert all(len(p.classes) == 3 for p in own)
    assert [p.unknown for p in own] == list(scores > head.detector.threshold)
    everything = predict([real.data], real.head, unknown_threshold=float(scores.min()) - 1, log=quiet)
    assert all(p.unknown for p in everything) and all(p.classes for p in everything)
    half = predict([real.data], real.head, accept=0.5, log=quiet)
    assert 0 < sum(p.unknown for p in half) < len(half)
    off = predict([real.data], real.head, no_unknown=True, log=quiet)
    assert all(p.unknown is None and p.unknown_score is None for p in off)
    np.testing.assert_allclose([p.probabilities for p in off], [p.probabilities for p in own])


def test_old_head_without_detector_still_predicts(real, no_backbone, tmp_path: Path) -> None:
    """A head saved before calibration and the detector existed: raw probabilities, unknown left empty."""
    from pipeline.artifacts import HEAD_JSON, UNKNOWN_NPZ

    old = tmp_path / "old-head"
    shutil.copytree(real.head, old)
    meta = json.loads((old / HEAD_JSON).read_text())
    del meta["calibration"], meta["unknown"]
    (old / HEAD_JSON).write_text(json.dumps(meta))
    (old / UNKNOWN_NPZ).unlink()
    notes: list[str] = []
    predictions = predict([real.data], old, top_k=3, out=tmp_path / "old.csv", log=notes.append)
    assert len(predictions) == 18 and all(p.unknown is None and p.unknown_score is None for p in predictions)
    assert any("no unknown detector" in n for n in notes)
    head = load_head(old)
    cache = load(real.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    for p in predictions:
        raw = head.model.predict_proba(cache.features[[row[Path(p.path).relative_to(real.data).as_posix()]]])[0]
        assert p.probabilities[0] == pytest.approx(raw.max())  # uncalibrated, as the old head wrote them
    rows = read_csv(tmp_path / "old.csv")
    assert rows[0] == HEADER3 and all(r[7] == r[8] == "" for r in rows[1:])
