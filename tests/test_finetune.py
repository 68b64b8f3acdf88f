"""pipeline/finetune.py: the model (init from a logreg head, augmentation inactive at inference), the
trainable flags of both phases, BatchNorm in inference mode, the split, and one end-to-end run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import CLASSES3, SMALL_APPLICATION, TINY_CONFIG, World, quiet, save_small_cnn

from pipeline.artifacts import PREDICTIONS_CSV, RUN_JSON, read_predictions
from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.finetune import backbone_base, build_model, finetune, finetune_parts, freeze_backbone, set_trainable
from pipeline.heads import load_head
from pipeline.splits import split_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed"),
]

RUN_FILES = [
    "model.keras",
    "model.keras.json",
    "history.csv",
    "learning_curves.png",
    "metrics.json",
    "confusion_matrix.png",
    "predictions.csv",
    "run.json",
]
FIT_HEAD_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "class_names",
    "n_test",
    "method",
    "clf",
    "best_params",
    "cv_score",
    "fit_seconds",
    "train_seconds",
    "n_train",
    "split",
    "split_notes",
    "seed",
}


@pytest.fixture(scope="module")
def data(world: World):
    """Decoded images of the dataset and the logreg head's probabilities on their cached features (the
    fitted pipeline's own: --init-head starts from its weights, before the head's calibration)."""
    rel, images = world.images()
    cache = load(world.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    head = load_head(world.heads["logreg"])
    return images, head, head.model.predict_proba(cache.features[[row[r] for r in rel]])


def is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_init_head_reproduces_logreg_before_training(world: World, data, augment: str) -> None:
    images, head, expected = data
    assert head.meta["options"]["l2_normalize"] is False
    model = build_model(world.config, 3, augment=augment, dropout=0.5, init_head=head)
    names = [layer.name for layer in model.layers]
    assert "augmentation" in names and "dropout" in names and "l2_normalize" not in names
    proba = model.predict(images, verbose=0)
    assert np.abs(proba - expected).max() <= 1e-4
    np.testing.assert_array_equal(proba.argmax(1), expected.argmax(1))
    # the same through a direct call in inference mode
    np.testing.assert_allclose(np.asarray(model(images, training=False)), proba, atol=1e-5)


def test_init_head_must_be_logreg(world: World) -> None:
    with pytest.raises(UserError, match="not a logistic-regression head"):
        build_model(world.config, 3, augment="none", init_head=load_head(world.heads["svm"]))


def test_freeze_backbone(world: World) -> None:
    model = build_model(world.config, 3, augment="light", dropout=0.2)
    freeze_backbone(model)
    base = backbone_base(model)
    assert base.trainable_weights == [] and len(base.non_trainable_weights) > 100
    assert not any(layer.trainable for layer in base.layers if layer.weights)
    classifier = model.get_layer("classifier")
    assert classifier.trainable and len(classifier.trainable_weights) == 2
    # the only trainable weights of the whole model are the classifier's
    assert {id(v) for v in model.trainable_weights} == {id(v) for v in classifier.trainable_weights}


@pytest.fixture(scope="module")
def flag_model(world: World):
    return build_model(world.config, 3, augment="none", dropout=0.2)


def trainable_layers(model) -> list[str]:
    return [layer.name for layer in backbone_base(model).layers if layer.trainable and layer.weights]


def test_set_trainable_last_n(flag_model) -> None:
    freeze_backbone(flag_model)
    n = set_trainable(flag_model, "5")
    base = backbone_base(flag_model)
    last = {layer.name for layer in base.layers[-5:]}
    names = trainable_layers(flag_model)
    assert names and set(names) <= last
    assert n == len(names) == sum(1 for layer in base.layers[-5:] if layer.weights and not is_batchnorm(layer))
    assert not any(layer.trainable for layer in base.layers if is_batchnorm(layer))
    assert not any(layer.trainable for layer in base.layers[:-5] if layer.weights)
    # the trainable weights the optimizer sees are those layers' weights, plus the classifier's
    expected = {id(v) for layer in base.layers if layer.name in names for v in layer.trainable_weights}
    expected |= {id(v) for v in flag_model.get_layer("classifier").trainable_weights}
    assert {id(v) for v in flag_model.trainable_weights} == expected


def test_set_trainable_all_and_from_layer(flag_model) -> None:
    base = backbone_base(flag_model)
    with_weights = [layer for layer in base.layers if layer.weights and not is_batchnorm(layer)]
    assert set_trainable(flag_model, "all") == len(with_weights) == len(trainable_layers(flag_model))
    assert not any(layer.trainable for layer in base.layers if is_batchnorm(layer))
    assert any(is_batchnorm(layer) for layer in base.layers)

    names = [layer.name for layer in base.layers]
    start = names.index("block_15_expand")
    n = set_trainable(flag_model, "5", from_layer="block_15_expand")  # from_layer wins over unfreeze
    expected = [layer.name for layer in base.layers[start:] if layer.weights and not is_batchnorm(layer)]
    assert trainable_layers(flag_model) == expected and n == len(expected) > 5
    assert not any(layer.trainable for layer in base.layers if is_batchnorm(layer))

    assert set_trainable(flag_model, "0") == 0 and trainable_layers(flag_model) == []
    assert set_trainable(flag_model, "100000") == len(with_weights)


def test_set_trainable_unknown_layer(flag_model) -> None:
    with pytest.raises(UserError, match="'block_99_nope' is not a layer of the backbone"):
        set_trainable(flag_model, "5", from_layer="block_99_nope")


def all_layers(model) -> list:
    """Every layer of a model, nested sub-models' layers included (depth first)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out += all_layers(layer)
    return out


def assert_training_flag_changes_nothing(model, batch: np.ndarray) -> None:
    """model(x, training=True) == model(x, training=False), and no BatchNorm moving statistic moved."""
    import keras

    bns = [layer for layer in all_layers(backbone_base(model)) if isinstance(layer, keras.layers.BatchNormalization)]
    before = [np.asarray(bn.moving_mean).copy() for bn in bns]
    features = model.get_layer("cnncodes_backbone")
    f_infer = np.asarray(features(batch, training=False))
    f_train = np.asarray(features(batch, training=True))
    np.testing.assert_allclose(f_train, f_infer, rtol=1e-5, atol=1e-7 * np.abs(f_infer).max())
    np.testing.assert_allclose(
        np.asarray(model(batch, training=True)), np.asarray(model(batch, training=False)), atol=1e-6
    )
    for bn, mean in zip(bns, before):
        np.testing.assert_array_equal(np.asarray(bn.moving_mean), mean, err_msg=bn.name)


def test_batchnorm_in_inference_mode_in_both_phases(world: World, data) -> None:
    """Without augmentation and dropout, training=True changes nothing in phase 1 (frozen backbone) and
    phase 2 (every backbone layer but BatchNorm trainable): BatchNorm keeps its moving statistics.
    (The init head's weights are ~1e12, so any change in the ~1e-10 features would show.)"""
    images, head, _ = data
    model = build_model(world.config, 3, augment="none", dropout=0.0, init_head=head)
    freeze_backbone(model)
    assert_training_flag_changes_nothing(model, images[:8])
    assert set_trainable(model, "all") > 0
    assert_training_flag_changes_nothing(model, images[:8])


def save_nested_bn_backbone(path: Path) -> Path:
    """A .keras backbone whose middle block is a nested Sequential holding a BatchNormalization."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, name="stem")(x)
    x = keras.Sequential(
        [
            keras.layers.Conv2D(8, 3, padding="same", name="block_conv"),
            keras.layers.BatchNormalization(name="block_bn"),
            keras.layers.ReLU(name="block_relu"),
        ],
        name="block",
    )(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    keras.Model(inputs, x, name="nested").save(path)
    return path


def test_set_trainable_freezes_nested_batchnorm(tmp_path: Path) -> None:
    import keras

    from pipeline.backbones import BackboneConfig

    config = BackboneConfig(str(save_nested_bn_backbone(tmp_path / "nested.keras"))).resolved()
    model = build_model(config, 3, augment="none", dropout=0.0)
    set_trainable(model, "all")
    bns = [layer for layer in all_layers(backbone_base(model)) if isinstance(layer, keras.layers.BatchNormalization)]
    assert {bn.name for bn in bns} == {"block_bn", "top_bn"}
    assert not any(bn.trainable for bn in bns), [(bn.name, bn.trainable) for bn in bns]
    batch = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    assert_training_flag_changes_nothing(model, batch)


# -- the split ------------------------------------------------------------------------------------


def test_finetune_parts(world: World) -> None:
    cache = load(world.cache)
    for seed in (0, 1, 2):
        parts = finetune_parts(cache, 0.2, 0.15, seed)
        split = split_rows(cache, 0.2, seed)
        np.testing.assert_array_equal(parts.test, split.test)
        np.testing.assert_array_equal(np.sort(np.concatenate([parts.train, parts.val])), np.sort(split.train))
        assert not set(parts.train) & set(parts.val) and not set(parts.val) & set(parts.test)
        assert len(parts.val) >= 3  # at least one validation image per class
        assert set(cache.labels[parts.val]) == {0, 1, 2} and set(cache.labels[parts.train]) == {0, 1, 2}
        again = finetune_parts(cache, 0.2, 0.15, seed)
        for a, b in ((parts.train, again.train), (parts.val, again.val), (parts.test, again.test)):
            np.testing.assert_array_equal(a, b)
        assert "validation carved from training (val_size 0.15)" in parts.source
    seeds = {tuple(finetune_parts(cache, 0.2, 0.15, s).val) for s in range(5)}
    assert len(seeds) > 1  # the seed matters


# -- end to end -----------------------------------------------------------------------------------


def test_finetune_end_to_end(cnn_world: World, finetune_run) -> None:
    world = cnn_world  # the run's backbone and cache
    result, messages = finetune_run
    folder = result.folder
    for name in RUN_FILES:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    assert not result.interrupted
    with open(folder / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [row["phase"] for row in history] == ["1", "2"]
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert all(np.isfinite(float(row["loss"])) and row["val_loss"] for row in history)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert FIT_HEAD_KEYS <= set(metrics), FIT_HEAD_KEYS - set(metrics)
    assert metrics["class_names"] == list(CLASSES3) and metrics["clf"] == "finetune"
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3)
    # the test part is fit-head's: same size as the head's test part
    head_metrics = json.loads((world.heads["logreg"] / "metrics.json").read_text())
    assert metrics["n_test"] == head_metrics["n_test"] == int(np.asarray(metrics["confusion_matrix"]).sum())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["epochs_run"] == 2
    assert metrics["trainable_layers"] > 0
    sidecar = json.loads((folder / "model.keras.json").read_text())
    assert sidecar["classes"] == list(CLASSES3) and sidecar["image_size"] == 32
    assert any("fine-tuning:" in m and "trainable" in m for m in messages)
    # per-image test predictions, on fit-head's test images, agreeing with metrics.json
    predictions = read_predictions(folder / PREDICTIONS_CSV)
    head_predictions = read_predictions(world.heads["logreg"] / PREDICTIONS_CSV)
    assert sorted(predictions.content_hash) == sorted(head_predictions.content_hash)
    assert predictions.correct.mean() == pytest.approx(metrics["accuracy"])
    run = json.loads((folder / RUN_JSON).read_text())
    assert run["fingerprint"] == metrics["fingerprint"] == sidecar["fingerprint"]
    assert run["cache_fingerprint"] == load(world.cache).attrs["fingerprint"]
    assert metrics["accuracy_ci"][0] <= metrics["accuracy"] <= metrics["accuracy_ci"][1]


def test_predict_with_finetuned_model(cnn_world: World, finetune_run) -> None:
    world = cnn_world
    from pipeline.predict import predict

    result, _ = finetune_run
    predictions = predict([world.data / "bars"], model=result.folder / "model.keras", top_k=3, log=lambda m: None)
    assert len(predictions) == 8 and not any(p.error for p in predictions)
    for p in predictions:
        assert sorted(p.classes) == sorted(CLASSES3)
        assert abs(sum(p.probabilities) - 1.0) < 1e-4
        assert isinstance(p.unknown, bool) and np.isfinite(p.unknown_score)  # the model's second output
    off = predict([world.data / "bars"], model=result.folder / "model.keras", no_unknown=True, log=lambda m: None)
    assert all(p.unknown is None and p.unknown_score is None for p in off)


def run_parts(run: Path):
    """The run's train / validation / test rows, recomputed as finetune splits (fixture defaults: seed 0)."""
    from pipeline.heads import NEAR_DUPLICATES, near_duplicate_hash_pairs
    from pipeline.splits import rows_of_hash_pairs

    rows = load(json.loads((run / RUN_JSON).read_text())["cache_path"])
    pairs = near_duplicate_hash_pairs(rows.features, rows.content_hash, NEAR_DUPLICATES)
    return rows, finetune_parts(rows, 0.2, 0.15, 0, rows_of_hash_pairs(rows.content_hash, pairs))


def test_finetune_run_is_calibrated_with_a_detector_on_its_validation_part(finetune_run) -> None:
    """Temperature and detector fitted on the validation part: recorded in run.json, metrics.json and the
    sidecar; the threshold accepts `accept` of the validation images; the saved model's second output gives
    their scores (as the detector computed them) and predictions.csv holds calibrated probabilities."""
    from pipeline.artifacts import UNKNOWN_NPZ
    from pipeline.openset import load_detector
    from pipeline.predict import predict
    from pipeline.tables import unknown_lines

    result, _ = finetune_run
    folder = result.folder
    metrics = json.loads((folder / "metrics.json").read_text())
    run = json.loads((folder / RUN_JSON).read_text())
    sidecar = json.loads((folder / "model.keras.json").read_text())
    temperature = metrics["temperature"]
    assert temperature > 0 and run["calibration"]["temperature"] == sidecar["calibration"]["temperature"] == temperature
    assert "validation part" in run["calibration"]["fitted_on"]
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_uncalibrated"] <= 1
    assert sum(metrics["reliability"]["count"]) == metrics["n_test"]
    unknown = metrics["unknown"]
    assert unknown["accept"] == 0.95 and unknown["n_unknown"] + unknown["n_accepted"] == metrics["n_test"]
    assert unknown["test_unknown_rate"] == pytest.approx(unknown["n_unknown"] / metrics["n_test"])
    assert sidecar["outputs"] == ["probabilities", "unknown_score"]
    assert sidecar["unknown"]["threshold"] == run["unknown"]["threshold"] == unknown["threshold"]
    assert run["unknown"]["n_val"] == metrics["n_val"] and run["unknown"]["n_train"] == metrics["n_train"]
    # the threshold accepts `accept` of the validation images: the fewest that reach it
    detector = load_detector(run["unknown"], folder / UNKNOWN_NPZ)
    known = detector.oof_scores
    assert len(known) == metrics["n_val"] and len(detector.train_unit) == metrics["n_train"]
    assert (known <= detector.threshold).sum() == int(np.ceil(0.95 * len(known) - 1e-9))
    # the model file computes the same scores on the validation images (float16 training features: ~1e-3)
    rows, parts = run_parts(folder)
    root = Path(run["dataset_root"])
    scored = predict([root / rows.paths[i] for i in parts.val], model=folder / "model.keras", log=lambda m: None)
    np.testing.assert_allclose(sorted(p.unknown_score for p in scored), np.sort(known), atol=0.02)
    # predictions.csv: the calibrated probabilities of the test images, as the model file gives them
    written = read_predictions(folder / PREDICTIONS_CSV)
    again = predict([root / p for p in written.paths], model=folder / "model.keras", top_k=3, log=lambda m: None)
    assert len(again) == len(written.paths) and not any(p.error for p in again)
    for p, row in zip(again, written.proba):  # predict keeps the order given
        assert max(p.probabilities) == pytest.approx(row.max(), abs=1e-4)
    assert abs(sum(bool(p.unknown) for p in again) - unknown["n_unknown"]) <= 1  # a test image on the threshold
    assert any("validation part" in line for line in unknown_lines(metrics))  # what finetune prints


def test_finetune_cli_rejects_a_bad_accept(world: World, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(
        cli.app,
        [
            "finetune",
            str(world.data),
            "--accept",
            "1.5",
            "--out",
            str(tmp_path / "run"),
            "--cache",
            str(tmp_path / "c.h5"),
        ],
    )
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "accept" in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(augment="heavy"), "augment"),
        (dict(unfreeze="abc"), "^unfreeze is 'abc'"),
        (dict(unfreeze="-3"), "^unfreeze is '-3'"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(epochs=-1), "epochs"),
        (dict(batch_size=0), "^batch_size is 0"),
        (dict(test_size=5), "^test_size is 5"),
        (dict(accept=1.5), "^accept is 1.5"),
        (dict(accept="abc"), "^accept is 'abc'"),
    ],
)
def test_invalid_options(world: World, tmp_path: Path, options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        finetune(world.data, TINY_CONFIG, cache=tmp_path / "c.h5", out=tmp_path / "run", log=quiet(), **options)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.h5").exists()


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_stops_after_the_batch_and_keeps_the_best_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT during phase 2: exit code 130, every output written from the best epoch so far.

    The signal is real (os.kill of this process after phase 2's second epoch, while training runs), sent
    in-process through `cnncodes finetune`: a child process spent 10 of this test's 14 s importing
    TensorFlow. The backbone is a two-layer CNN file: what is tested is the interrupt."""
    import signal

    import keras
    from PIL import Image
    from typer.testing import CliRunner

    import cli
    import pipeline.finetune as finetune_module

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    real_callbacks, sent = finetune_module._callbacks, []

    class CtrlC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs=None) -> None:
            if epoch == 1 and not sent:  # phase 2's second epoch (phase 1 has none: --head-epochs 0)
                sent.append(epoch)
                os.kill(os.getpid(), signal.SIGINT)

    def with_ctrl_c(model, phase, *args):
        return [*real_callbacks(model, phase, *args), *([CtrlC()] if phase == 2 else [])]

    monkeypatch.setattr(finetune_module, "_callbacks", with_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN under a shell's background job
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli.app,
        [
            "finetune",
            str(tmp_path / "data"),
            "--backbone",
            str(save_small_cnn(tmp_path / "small_cnn.keras")),
            "--epochs",
            "500",
            "--head-epochs",
            "0",
            "--patience",
            "500",
            "--batch-size",
            "4",
            "--cache",
            str(tmp_path / "c.h5"),
            "--out",
            str(out),
        ],
    )
    assert sent and result.exit_code == 130, (result.output[-2000:], result.exception)
    assert "interrupted: the best weights so far were evaluated and saved." in result.output
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler was put back
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and 2 <= metrics["epochs_run"] < 500
    for name in ("model.keras", "model.keras.json", "history.csv", "learning_curves.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name


# -- randomness is scoped -------------------------------------------------------------------------


def test_seed_decides_the_new_layers_and_the_random_backbone_is_fixed(world: World) -> None:
    """A weights=None backbone is always the seed-0 one (it is the cache's configuration), it does not
    reseed the caller, and the finetune seed alone decides the rest of the model."""
    from pipeline.backbones import build_backbone, temp_seed

    config = SMALL_APPLICATION.resolved()  # built 5 times here

    def model_weights(seed: int) -> list[np.ndarray]:
        with temp_seed(seed):
            return build_model(config, 3, "none", 0.2).get_layer("classifier").get_weights()

    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    backbone = build_backbone(config).get_weights()
    assert np.array_equal(np.random.random(3), expected)  # building did not reseed the caller
    assert all(np.array_equal(a, b) for a, b in zip(backbone, build_backbone(config).get_weights()))
    one, same, other = model_weights(1), model_weights(1), model_weights(2)
    assert np.array_equal(one[0], same[0]) and not np.array_equal(one[0], other[0])
