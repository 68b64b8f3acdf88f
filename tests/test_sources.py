"""Heads on several feature sources (pipeline/sources.py) and the honest split by default (near-duplicates grouped)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from heads_fixtures import blobs, fake_hash, write_cache
from model_fixtures import World, quiet

from pipeline.artifacts import read_predictions
from pipeline.heads import fit_head, load_head
from pipeline.sources import SOURCES_KEY, head_sources

NAMES = ["ant", "bee", "cat"]


def cache_with_near_copies(
    path: Path, n: int = 150, dim: int = 96, copies: int = 10, seed: int = 0
) -> tuple[Path, list]:
    """Three classes of ReLU-like features with `copies` planted near-copies (same class, small noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = rng.normal(0, 1.0, (3, dim))
    X = np.maximum(centres[y] + rng.normal(0.5, 1.0, (n, dim)), 0)
    originals = rng.choice(n, copies, replace=False)
    X = np.vstack([X, np.abs(X[originals] + rng.normal(0, 0.05, (copies, dim)))]).astype(np.float32)
    y = np.concatenate([y, y[originals]])
    write_cache(path, X, y, NAMES)
    return path, [(int(o), n + k) for k, o in enumerate(originals)]


# -- honest split by default ----------------------------------------------------------------------


def test_near_duplicates_are_grouped_by_default_and_counted(tmp_path: Path) -> None:
    cache, planted = cache_with_near_copies(tmp_path / "c.h5")
    result = fit_head(cache, out=tmp_path / "head", n_jobs=1, log=quiet())
    m = result.metrics
    assert m["near_duplicate_threshold"] == 0.55
    assert m["near_duplicate_groups"] == len(planted)
    assert any(f"{len(planted)} groups kept on one side" in note for note in m["split_notes"])
    in_test = np.zeros(len(result.split.group), bool)
    in_test[result.split.test] = True
    assert all(in_test[a] == in_test[b] for a, b in planted)  # no planted pair straddles the split
    assert all(result.split.group[a] == result.split.group[b] for a, b in planted)  # nor a CV fold


def test_group_near_duplicates_zero_turns_it_off(tmp_path: Path) -> None:
    cache, planted = cache_with_near_copies(tmp_path / "c.h5")
    m = fit_head(cache, out=tmp_path / "head", n_jobs=1, group_near_duplicates=0, log=quiet()).metrics
    assert m["near_duplicate_threshold"] == 0 and m["near_duplicate_groups"] == 0
    assert any("not grouped" in note for note in m["split_notes"])


def test_cli_prints_the_near_duplicate_groups(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import cli

    cache, planted = cache_with_near_copies(tmp_path / "c.h5")
    result = CliRunner().invoke(cli.app, ["fit-head", str(cache), "--out", str(tmp_path / "head"), "--n-jobs", "1"])
    assert result.exit_code == 0, result.output
    assert f"near-duplicates (whitened cosine >= 0.55): {len(planted)} groups kept on one side" in result.output


# -- several caches -------------------------------------------------------------------------------


def test_fit_head_on_two_caches_joins_rows_by_content_hash(tmp_path: Path) -> None:
    X, y = blobs(3, 20, dim=8, seed=1)
    hashes = [fake_hash(("img", i)) for i in range(len(y))]
    a = write_cache(tmp_path / "a.h5", X, y, NAMES, hashes=hashes)
    X2, _ = blobs(3, 20, dim=12, seed=2)
    keep = np.arange(len(y)) % 10 != 0  # b lacks 6 images
    b = write_cache(tmp_path / "b.h5", X2[keep], y[keep], NAMES, hashes=[h for h, k in zip(hashes, keep) if k])
    messages: list[str] = []
    result = fit_head([a, b], out=tmp_path / "head", n_jobs=1, log=quiet(messages))
    assert any("54 images in all of them, 6 dropped" in m for m in messages)
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert [s["feature_dim"] for s in meta[SOURCES_KEY]] == [8, 12] and meta["feature_dim"] == 20
    assert [Path(s["cache_path"]).name for s in meta[SOURCES_KEY]] == ["a.h5", "b.h5"]
    assert len(result.split.train) + len(result.split.test) == 54
    assert [Path(s.cache_path).name for s in head_sources(meta)] == ["a.h5", "b.h5"]
    single = json.loads((fit_head(a, out=tmp_path / "one", n_jobs=1, log=quiet()).folder / "head.json").read_text())
    assert SOURCES_KEY not in single and len(head_sources(single)) == 1  # one-cache heads keep their keys


def test_caches_of_other_classes_are_refused(tmp_path: Path) -> None:
    from pipeline.errors import UserError

    X, y = blobs(3, 10, dim=8)
    a = write_cache(tmp_path / "a.h5", X, y, NAMES)
    b = write_cache(tmp_path / "b.h5", X, y, ["x", "y", "z"])
    with pytest.raises(UserError, match="classes"):
        fit_head([a, b], out=tmp_path / "head", n_jobs=1, log=quiet())


# -- two backbones, end to end (tiny models) ------------------------------------------------------


@pytest.fixture(scope="module")
def two_backbones(world: World, cnn_world: World, tmp_path_factory) -> Path:
    """A logreg head on the tiny MobileNetV2 and the small CNN (both 32 px) side by side."""
    out = tmp_path_factory.mktemp("two") / "head"
    return fit_head([world.cache, cnn_world.cache], out=out, n_jobs=1, log=quiet()).folder


def test_two_source_head_predicts_what_fit_head_measured(
    two_backbones: Path,
    world: World,
    tmp_path: Path,
) -> None:
    from pipeline.predict import predict

    test = read_predictions(two_backbones / "predictions.csv")
    files = [Path(world.data) / p for p in test.paths]
    expected = [test.class_names[k] for k in test.y_pred]
    cached = predict(files, two_backbones, runtime="keras", log=quiet())
    assert [p.classes[0] for p in cached] == expected
    # the caches gone: both backbones run (one pass each) and give the same classes
    moved = Path(shutil.copytree(two_backbones, tmp_path / "head"))
    meta = json.loads((moved / "head.json").read_text())
    for s in meta[SOURCES_KEY]:
        s["cache_path"] = str(tmp_path / "gone.h5")
    (moved / "head.json").write_text(json.dumps(meta))
    messages: list[str] = []
    computed = predict(files, moved, runtime="keras", log=quiet(messages))
    assert any(f"computing features of {len(files)}" in m for m in messages)
    assert [p.classes[0] for p in computed] == expected
    np.testing.assert_allclose([p.probabilities[0] for p in computed], [p.probabilities[0] for p in cached], atol=1e-4)


@pytest.mark.slow
def test_export_of_a_two_backbone_head_agrees_with_predict(two_backbones: Path, tmp_path: Path) -> None:
    from pipeline.export import export_head

    path, check = export_head(two_backbones, tmp_path / "two.keras", verify=64)
    assert check["images"] == check["n_test"] > 0
    assert check["top1_agreement"] == 1.0 and check["max_abs_prob_diff"] < 1e-4
    assert len(load_head(two_backbones).meta[SOURCES_KEY]) == 2


@pytest.mark.slow
def test_export_resizes_for_a_backbone_of_another_input_size(
    world: World,
    cnn_world: World,
    tmp_path: Path,
) -> None:
    """A 48 px backbone beside the 32 px one: the model takes 48 px pixels and resizes inside for the other."""
    import keras

    from pipeline.backbones import BackboneConfig
    from pipeline.export import export_head
    from pipeline.extract import extract

    keras.utils.set_random_seed(3)
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv")(x)
    keras.Model(inputs, x).save(tmp_path / "cnn48.keras")
    config = BackboneConfig(str(tmp_path / "cnn48.keras")).resolved()
    cache = tmp_path / "cnn48.h5"
    extract(world.data, config, cache=cache, runtime="keras", progress=False, log=quiet())
    head = fit_head([cache, world.cache], out=tmp_path / "head", n_jobs=1, log=quiet()).folder
    path, check = export_head(head, tmp_path / "mixed.keras", verify=64)
    model = keras.saving.load_model(path, compile=False)
    assert model.input_shape[1:] == (48, 48, 3)
    assert check["top1_agreement"] >= 0.9  # the 32 px branch sees a resized 48 px image, not a fresh decode


def test_report_flags_an_older_heads_near_duplicate_leaks(tmp_path: Path) -> None:
    from pipeline.artifacts import Predictions
    from pipeline.web.report import Method, near_duplicate_leaks

    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "audit.json").write_text(json.dumps({"near_duplicates": {"threshold": 0.55, "file": "pairs.csv"}}))
    (audit / "pairs.csv").write_text("path_a,path_b,cosine\nt1.png,a.png,0.9\nt2.png,t1.png,0.8\nb.png,c.png,0.7\n")
    tested = Predictions(
        ["t1.png", "t2.png"], ["h1", "h2"], ["", ""], np.zeros(2, int), np.ones((2, 2)) / 2, ["x", "y"]
    )
    old = Method("old", tmp_path, "head", {"accuracy": 1.0}, {}, tested)
    assert near_duplicate_leaks(old, audit).startswith("1 test images have a near-duplicate in training")
    grouped = Method("new", tmp_path, "head", {"accuracy": 1.0, "near_duplicate_threshold": 0.55}, {}, tested)
    assert near_duplicate_leaks(grouped, audit) == "" and near_duplicate_leaks(old, None) == ""
