"""pipeline/export.py: backbone + folded linear head as one .keras / .tflite file that reproduces the
scikit-learn head on raw pixels; predict --model; export refusals.

The exports of both formats are of a small CNN whose features have ordinary norms (cnn_world, L2-normalised
heads): the fold does not depend on the backbone, and converting it takes 1 s where the tiny MobileNetV2 takes
about 9 s (a real Keras Applications backbone is converted in test_runtime.py). Heads of the random-init
MobileNetV2 (world) compared to 1e-4 are fitted with l2_normalize=False: its features have norms ~1e-10, below
which scikit-learn's Normalizer leaves vectors unscaled while Keras' UnitNormalization still scales them.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import CLASSES2, CLASSES3, World
from typer.testing import CliRunner

from pipeline.artifacts import PREDICTIONS_CSV, read_predictions
from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.export import export_head, verify_export
from pipeline.heads import load_head
from pipeline.predict import predict
from pipeline.runtime import load_model_file, sidecar_path
from pipeline.stream import as_outputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]


def expected_proba(w: World, head_dir: Path, data: Path, cache_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(decoded images, the head's probabilities on their cached features), in the same order."""
    rel, images = w.images(data)
    cache = load(cache_path)
    row = {p: i for i, p in enumerate(cache.paths)}
    return images, load_head(head_dir).predict_proba(cache.features[[row[r] for r in rel]])


def assert_matches_head(model_path: Path, images: np.ndarray, expected: np.ndarray, classes, tol=1e-4) -> None:
    runtime, meta = load_model_file(model_path)
    assert meta["classes"] == list(classes)
    assert meta["image_size"] == 32 == runtime.image_size and meta["resize"] == "bilinear"
    proba = as_outputs(runtime(images))[0]
    assert proba.shape == expected.shape
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert np.abs(proba - expected).max() <= tol, np.abs(proba - expected).max()
    np.testing.assert_array_equal(proba.argmax(1), expected.argmax(1))


@pytest.fixture(scope="module")
def exported(cnn_world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The small CNN's logreg and svm heads, each exported to .keras and .tflite (2 conversions)."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for clf in ("logreg", "svm"):
        for fmt in ("keras", "tflite"):
            path, check = export_head(cnn_world.heads[clf], folder / f"{clf}.{fmt}", format=fmt, verify=0)
            assert path == folder / f"{clf}.{fmt}" and check == {}
            out[clf, fmt] = path
    return out


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
@pytest.mark.parametrize("clf", ["logreg", "svm"])
def test_export_reproduces_head(cnn_world: World, exported, clf: str, fmt: str) -> None:
    w = cnn_world
    path = exported[clf, fmt]
    images, expected = expected_proba(w, w.heads[clf], w.data, w.cache)
    # a useful check only if the head is not uniform: its probabilities must separate the classes
    assert (expected.max(1) - np.sort(expected, 1)[:, -2]).min() > 0.02  # calibrated: flatter, not uniform
    assert_matches_head(path, images, expected, CLASSES3)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["format"] == fmt and meta["quantize"] == "none" and meta["kind"] == "exported head"
    assert Path(meta["head"]) == w.heads[clf].resolve()
    assert meta["backbone_config"]["backbone"] == w.config.backbone


@pytest.mark.parametrize("clf", ["logreg", "svm"])
def test_binary_export_reproduces_head(cnn_world: World, clf: str, tmp_path: Path) -> None:
    w = cnn_world
    path, _ = export_head(w.heads2[clf], tmp_path / f"{clf}2.keras", verify=0)
    assert load_model_file(path)[0].model.output_shape == [(None, 2), (None, 1)]  # probabilities, unknown score
    images, expected = expected_proba(w, w.heads2[clf], w.data2, w.cache2)
    assert (np.abs(expected[:, 0] - expected[:, 1])).min() > 0.05
    assert_matches_head(path, images, expected, CLASSES2)


@pytest.mark.parametrize("clf", ["logreg", "svm"])
def test_l2_normalised_export_reproduces_head(cnn_world: World, clf: str, tmp_path: Path) -> None:
    """At ordinary feature norms the UnitNormalization layer reproduces scikit-learn's Normalizer."""
    w = cnn_world
    assert load_head(w.heads[clf]).meta["options"]["l2_normalize"] is True
    path, _ = export_head(w.heads[clf], tmp_path / f"{clf}.keras", verify=0)
    assert "l2_normalize" in [layer.name for layer in load_model_file(path)[0].model.layers]
    images, expected = expected_proba(w, w.heads[clf], w.data, w.cache)
    assert_matches_head(path, images, expected, CLASSES3)


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
def test_export_returns_calibrated_probabilities_and_the_unknown_score(
    cnn_world: World, fmt: str, tmp_path: Path
) -> None:
    """The second output is the head's own unknown score; the sidecar gives the threshold; predict --model and
    export's check agree with the head's decisions."""
    w = cnn_world
    head = load_head(w.heads["logreg"])
    assert head.temperature is not None and head.detector is not None
    path, check = export_head(w.heads["logreg"], tmp_path / f"m.{fmt}", format=fmt, verify=100)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["outputs"] == ["probabilities", "unknown_score"]
    assert meta["unknown"]["threshold"] == pytest.approx(head.detector.threshold)
    assert meta["calibration"]["temperature"] == pytest.approx(head.temperature)
    rel, images = w.images(w.data)
    cache = load(w.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    features = cache.features[[row[r] for r in rel]]
    proba, scores = as_outputs(load_model_file(path)[0](images))
    expected = head.unknown_scores(features, head.predict_proba(features))
    np.testing.assert_allclose(proba, head.predict_proba(features), atol=1e-4)
    assert np.abs(scores.reshape(-1) - expected).max() < 0.05 * max(1.0, np.abs(expected).max())
    assert check["unknown_agreement"] == 1.0 and check["max_abs_score_diff"] < 0.05
    # a threshold just below the median score: about half unknown, as the head decides it
    cut = float(np.median(expected)) - 1e-3
    rows = predict([w.data], model=path, unknown_threshold=cut, log=lambda m: None)
    by_path = {Path(p.path).relative_to(w.data).as_posix(): p for p in rows}
    decided = np.array([by_path[r].unknown for r in rel])
    assert np.mean(decided == (expected > cut)) >= 0.95 and 0 < decided.sum() < len(decided)


def test_float16_tflite_export_and_verify(cnn_world: World, tmp_path: Path) -> None:
    w = cnn_world
    path, _ = export_head(w.heads["logreg"], tmp_path / "f16.tflite", format="tflite", quantize="float16")
    meta = json.loads(sidecar_path(path).read_text())
    assert (meta["format"], meta["quantize"]) == ("tflite", "float16")
    runtime, _ = load_model_file(path)
    head = load_head(w.heads["logreg"])
    test = read_predictions(w.heads["logreg"] / PREDICTIONS_CSV)
    check = verify_export(runtime, head, test, 64)
    assert set(check) == {
        "images",
        "max_abs_prob_diff",
        "top1_agreement",
        "export_accuracy",
        "head_accuracy",
        "n_test",
        "unknown_agreement",
        "max_abs_score_diff",
        "unknown_export",
        "unknown_head",
    }
    assert check["images"] == check["n_test"] == len(test) > 0
    assert 0.9 <= check["top1_agreement"] <= 1.0
    assert check["head_accuracy"] == pytest.approx(float(test.correct.mean()))
    assert abs(check["export_accuracy"] - check["head_accuracy"]) <= 1 - check["top1_agreement"] + 1e-9
    assert 0.0 <= check["max_abs_prob_diff"] < 0.05


def test_verify_export_reports_exact_agreement(cnn_world: World, exported) -> None:
    """The module's .keras export of the logreg head against the head's own test predictions, then against the
    same predictions made flatter: the check measures exactly that difference."""
    head_dir = cnn_world.heads["logreg"]
    runtime, _ = load_model_file(exported["logreg", "keras"])
    test, head = read_predictions(head_dir / PREDICTIONS_CSV), load_head(head_dir)
    check = verify_export(runtime, head, test, max_images=3)
    assert check["images"] == 3
    assert check["top1_agreement"] == 1.0 and check["max_abs_prob_diff"] <= 1e-4
    # against other probabilities (each row halfway to uniform: the same top class) the difference shows
    flatter = replace(test, proba=0.5 * test.proba + 0.5 / test.proba.shape[1])
    other = verify_export(runtime, head, flatter, max_images=len(test))
    assert other["images"] == len(test) and other["top1_agreement"] == 1.0
    assert other["max_abs_prob_diff"] == pytest.approx(np.abs(test.proba - flatter.proba).max(), abs=1e-4)
    assert other["max_abs_prob_diff"] > 0.1


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("clf", ["knn", "rbf-svm"])
def test_non_linear_heads_do_not_export(world: World, clf: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        export_head(world.heads[clf], tmp_path / "m.keras")
    message = str(info.value)
    assert f"is a {clf} head" in message and "logreg, svm" in message and "--clf logreg" in message
    assert not (tmp_path / "m.keras").exists() and not sidecar_path(tmp_path / "m.keras").exists()


def test_quantize_needs_tflite(world: World, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^quantize applies to format tflite only"):
        export_head(world.heads["logreg"], tmp_path / "m.keras", format="keras", quantize="float16")
    with pytest.raises(UserError, match="onnx"):
        export_head(world.heads["logreg"], tmp_path / "m.onnx", format="onnx")
    with pytest.raises(UserError, match="int4"):
        export_head(world.heads["logreg"], tmp_path / "m.tflite", format="tflite", quantize="int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.tflite", "model.bin"])
def test_keras_export_with_wrong_extension_is_user_error(world: World, tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="does not end in .keras"):
        export_head(world.heads["logreg"], tmp_path / name, format="keras")


@pytest.mark.parametrize("name, fmt", [("m.h5", "keras"), ("m.keras", "tflite")])
def test_export_suffix_must_match_format(
    world: World, exported, tmp_path: Path, name: str, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.export as export_module

    def fake_convert(model, path, quantize="none", input_dtype="uint8"):  # a real conversion takes seconds
        shutil.copy(exported["logreg", "tflite"], path)
        return Path(path)

    monkeypatch.setattr(export_module, "convert_to_tflite", fake_convert)
    with pytest.raises(UserError):
        export_head(world.heads["logreg"], tmp_path / name, format=fmt)


def test_cli_export_knn_head_is_a_user_error(world: World, tmp_path: Path) -> None:
    import cli

    result = CliRunner().invoke(cli.app, ["export", str(world.heads["knn"]), "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and "logreg, svm" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_cli_export_keras_with_verification(cnn_world: World, tmp_path: Path) -> None:
    import cli

    out = tmp_path / "cli.keras"
    result = CliRunner().invoke(
        cli.app, ["export", str(cnn_world.heads["logreg"]), "--out", str(out), "--verify", "12"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.is_file() and sidecar_path(out).is_file()
    n_test = len(read_predictions(cnn_world.heads["logreg"] / PREDICTIONS_CSV))
    assert f"check on {min(12, n_test)} of the head's {n_test} test images" in result.stdout
    assert "top-1 agreement 1.0000" in result.stdout and "test accuracy on those images: exported" in result.stdout


def test_export_works_without_the_cache_and_refuses_bad_verify(cnn_world: World, tmp_path: Path) -> None:
    """export (with its check) needs the head folder and the images, not the feature cache."""
    import cli

    moved = tmp_path / "moved.h5"
    shutil.copytree(cnn_world.heads["logreg"], tmp_path / "head")
    head = json.loads((tmp_path / "head" / "head.json").read_text())
    (tmp_path / "head" / "head.json").write_text(json.dumps({**head, "cache_path": str(moved)}))
    path, check = export_head(tmp_path / "head", tmp_path / "m.keras", verify=100)
    assert path.is_file() and check["top1_agreement"] == 1.0
    result = CliRunner().invoke(
        cli.app, ["export", str(tmp_path / "head"), "--out", str(tmp_path / "n.keras"), "--verify", "-1"]
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: --verify is -1")
    assert "Traceback" not in result.output and not (tmp_path / "n.keras").exists()


# -- predict --model ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
def test_predict_with_model_file(cnn_world: World, exported, fmt: str, tmp_path: Path) -> None:
    world = cnn_world  # the exported heads are the small CNN's
    out = tmp_path / "pred.csv"
    predictions = predict([world.data], model=exported["logreg", fmt], top_k=2, out=out, log=lambda m: None)
    assert len(predictions) == 24 and not any(p.error for p in predictions)
    cache = load(world.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    head = load_head(world.heads["logreg"])
    for p in predictions:
        assert len(p.classes) == 2 and set(p.classes) <= set(CLASSES3) and p.classes[0] != p.classes[1]
        assert p.probabilities[0] >= p.probabilities[1]
        rel = Path(p.path).relative_to(world.data).as_posix()
        proba = head.predict_proba(cache.features[[row[rel]]])[0]
        assert p.classes[0] == CLASSES3[int(proba.argmax())]
        assert abs(p.probabilities[0] - proba.max()) <= 1e-4
    with open(out, newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "unknown", "unknown_score", "error"]
    assert len(lines) == 25


def test_missing_sidecar_is_user_error(world: World, exported, tmp_path: Path) -> None:
    for fmt in ("keras", "tflite"):
        lonely = tmp_path / f"lonely.{fmt}"
        shutil.copy(exported["logreg", fmt], lonely)
        with pytest.raises(UserError, match=rf"lonely\.{fmt}\.json is missing"):
            load_model_file(lonely)
        with pytest.raises(UserError, match="missing"):
            predict([world.data], model=lonely, log=lambda m: None)
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(tmp_path / "nothing.keras")
    sidecar_path(lonely).write_text("{not json")
    with pytest.raises(UserError, match=r"lonely\.tflite\.json is not valid JSON"):
        load_model_file(lonely)
