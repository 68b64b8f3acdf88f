"""pipeline.backbones: option checks and fingerprints (no TensorFlow), then building real (tiny) models."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY

from pipeline.backbones import APPLICATIONS, BackboneConfig, build_backbone, layer_names, saved_input_size
from pipeline.errors import UserError
from pipeline.images import DECODER

# -- resolved(): checked without TensorFlow --------------------------------------------------------


@pytest.mark.parametrize(
    "name, suggestion", [("MobileNetv2", "MobileNetV2"), ("resnet50", "ResNet50"), ("EfficientNetB9", "EfficientNetB")]
)
def test_unknown_backbone_suggests_close_names(name: str, suggestion: str) -> None:
    with pytest.raises(UserError, match=f"unknown backbone '{name}'. Did you mean .*{suggestion}") as info:
        BackboneConfig(name).resolved()
    assert "cnncodes backbones" in str(info.value)


def test_unknown_backbone_without_close_match() -> None:
    with pytest.raises(UserError, match="unknown backbone 'qwertyuiop'") as info:
        BackboneConfig("qwertyuiop").resolved()
    assert "Did you mean" not in str(info.value)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"weights file .*nope\.weights\.h5 does not exist.*use weights imagenet"):
        BackboneConfig("MobileNetV2", weights=str(tmp_path / "nope.weights.h5")).resolved()


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"backbone file .*missing\.keras does not exist"):
        BackboneConfig(str(tmp_path / "missing.keras")).resolved()


def test_alpha_on_a_model_without_alpha() -> None:
    with pytest.raises(UserError, match="^alpha applies to MobileNet.*not to ResNet50"):
        BackboneConfig("ResNet50", alpha=0.5).resolved()


@pytest.mark.parametrize(
    "field, value",
    [
        ("pooling", "mean"),
        ("image_size", 16),
        ("image_size", 33.5),
        ("resize", "fancy"),
        ("alpha", 5.0),
        ("layer", 3),
    ],
)
def test_bad_option_values_name_the_argument(field: str, value) -> None:
    with pytest.raises(UserError, match=f"^{field} is {value!r}; it must be"):
        replace(BackboneConfig("MobileNetV2"), **{field: value}).resolved()


def test_resolved_fills_defaults_and_is_idempotent(tmp_path: Path) -> None:
    config = BackboneConfig("EfficientNetB1", weights="ImageNet").resolved()
    assert config.image_size == APPLICATIONS["EfficientNetB1"].size == 240
    assert config.weights == "imagenet"
    assert config.resolved() == config
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"not really weights")
    config = BackboneConfig("MobileNetV2", weights=str(weights), image_size=96).resolved()
    assert config.weights == str(weights.resolve()) and config.image_size == 96
    assert config.resolved() == config


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    base = BackboneConfig(**TINY).resolved()
    assert base.fingerprint() == BackboneConfig(**TINY).resolved().fingerprint()
    assert len(base.fingerprint()) == 16 and int(base.fingerprint(), 16) >= 0
    assert base.identity() == {
        "backbone": "MobileNetV2",
        "weights": "none (random, seed 0)",
        "layer": "",
        "pooling": "avg",
        "image_size": 32,
        "resize": "bilinear",
        "alpha": 0.35,
        "decoder": DECODER,
    }
    changes = [
        dict(layer="block_3_expand_relu"),
        dict(image_size=48),
        dict(pooling="max"),
        dict(alpha=0.5),
        dict(resize="bicubic"),
        dict(weights="imagenet"),
        dict(backbone="MobileNet"),
    ]
    prints = {base.fingerprint()}
    for change in changes:
        prints.add(replace(BackboneConfig(**TINY), **change).resolved().fingerprint())
    assert len(prints) == len(changes) + 1  # every change gives a new fingerprint


def test_imagenet_weights_keep_their_keras_release_where_keras_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lean install (no Keras) resolves a head's recorded configuration to the same identity, so the
    head's cached conversion and features are still its own; with Keras installed, the installed release counts."""
    import pipeline.backbones as backbones

    recorded = BackboneConfig("MobileNetV2").resolved()
    assert recorded.keras_version == backbones.library_version("keras") != ""
    monkeypatch.setattr(backbones, "library_version", lambda name: "")
    lean = BackboneConfig(**recorded.__dict__).resolved()
    assert lean.identity() == recorded.identity() and lean.fingerprint() == recorded.fingerprint()
    monkeypatch.setattr(backbones, "library_version", lambda name: "9.9.9")
    newer = BackboneConfig(**recorded.__dict__).resolved()
    assert newer.identity()["weights"] == "imagenet (keras 9.9.9)" and newer.fingerprint() != recorded.fingerprint()
    assert BackboneConfig("MobileNetV2", weights="none").resolved().keras_version is None


def test_fingerprint_follows_weights_file_content(tmp_path: Path) -> None:
    w1, w2, w3 = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5", tmp_path / "c.weights.h5"
    w1.write_bytes(b"weights one")
    w2.write_bytes(b"weights one")
    w3.write_bytes(b"weights two")
    f1, f2, f3 = (BackboneConfig("MobileNetV2", weights=str(w)).resolved().fingerprint() for w in (w1, w2, w3))
    assert f1 == f2 != f3
    assert BackboneConfig("MobileNetV2", weights=str(w1)).resolved().identity()["weights"].startswith("sha256:")


def test_options_checked_without_tensorflow() -> None:
    """resolved(), identity and fingerprint, and importing extract, never import TensorFlow or Keras."""
    code = (
        "import sys; from pipeline.backbones import BackboneConfig; import pipeline.extract, pipeline.cache\n"
        "c = BackboneConfig('ResNet50').resolved(); c.fingerprint()\n"
        "try:\n    BackboneConfig('Nope').resolved()\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["UserError", "[]"]


# -- model files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved .keras model: 48x48x3 -> conv_a (8) -> relu_a -> conv_b (16) -> gap -> head (3)."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((48, 48, 3), name="img")
    x = keras.layers.Conv2D(8, 3, name="conv_a")(inputs)
    x = keras.layers.ReLU(name="relu_a")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def test_saved_input_size(tiny_keras: Path, tmp_path: Path) -> None:
    assert saved_input_size(tiny_keras) == 48
    (tmp_path / "junk.keras").write_text("not a zip")
    assert saved_input_size(tmp_path / "junk.keras") is None


def test_model_file_resolves_with_its_input_size(tiny_keras: Path, tmp_path: Path) -> None:
    config = BackboneConfig(str(tiny_keras)).resolved()
    assert config.image_size == 48 and config.weights == "file" and config.backbone == str(tiny_keras.resolve())
    assert BackboneConfig(str(tiny_keras), image_size=48).resolved() == config
    with pytest.raises(UserError, match="takes 48x48 images; drop image_size 64"):
        BackboneConfig(str(tiny_keras), image_size=64).resolved()
    with pytest.raises(UserError, match="^alpha applies to MobileNet models only"):
        BackboneConfig(str(tiny_keras), alpha=0.5).resolved()
    # the identity is the file's content, not its name
    copy = tmp_path / "renamed.keras"
    copy.write_bytes(tiny_keras.read_bytes())
    assert BackboneConfig(str(copy)).resolved().fingerprint() == config.fingerprint()
    assert config.identity()["backbone"].startswith("sha256:")
    assert replace(config, layer="conv_a").fingerprint() != config.fingerprint()


@pytest.mark.filterwarnings("ignore:The structure of `inputs`")
def test_model_file_backbone_with_layer(tiny_keras: Path) -> None:
    import keras

    source = keras.saving.load_model(tiny_keras, compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype(np.float32)

    model = build_backbone(BackboneConfig(str(tiny_keras), layer="conv_a").resolved())
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 8)
    # raw pixels in (no preprocessing for a model file), spatial average of conv_a out
    want = keras.Model(source.inputs, source.get_layer("conv_a").output)(x).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(model(x).numpy(), want, rtol=1e-5, atol=1e-5)

    assert build_backbone(BackboneConfig(str(tiny_keras)).resolved()).output_shape == (None, 16)  # last 4-D: conv_b
    assert build_backbone(BackboneConfig(str(tiny_keras), layer="head").resolved()).output_shape == (None, 3)
    maxed = build_backbone(BackboneConfig(str(tiny_keras), layer="relu_a", pooling="max").resolved())
    want = keras.Model(source.inputs, source.get_layer("relu_a").output)(x).numpy().max(axis=(1, 2))
    np.testing.assert_allclose(maxed(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_model_file_unknown_layer(tiny_keras: Path) -> None:
    with pytest.raises(UserError, match=r"tiny\.keras has no layer 'conv_c'\. Did you mean conv_") as info:
        build_backbone(BackboneConfig(str(tiny_keras), layer="conv_c").resolved())
    message = str(info.value)
    assert "conv_a" in message and "conv_b" in message and "gap" in message and "head" in message


def test_layer_names_of_a_model_file(tiny_keras: Path) -> None:
    names = dict(layer_names(BackboneConfig(str(tiny_keras)).resolved()))
    # layers after the default (last 4-D) one are listed too: they are valid --layer choices
    assert list(names) == ["img", "conv_a", "relu_a", "conv_b", "gap", "head"]
    assert names["conv_a"] == "(46, 46, 8)" and names["gap"] == "(16,)" and names["head"] == "(3,)"


def test_model_file_with_flexible_input_needs_image_size(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((None, None, 3))
    path = tmp_path / "flex.keras"
    keras.Model(inputs, keras.layers.Conv2D(4, 3, name="c")(inputs)).save(path)
    assert saved_input_size(path) is None
    with pytest.raises(UserError, match="takes images of any size; give image_size"):
        build_backbone(BackboneConfig(str(path)).resolved())
    config = BackboneConfig(str(path), image_size=40).resolved()
    model = build_backbone(config)
    assert model.input_shape == (None, 40, 40, 3) and model.output_shape == (None, 4)


# -- Keras Applications (tiny, random weights) -------------------------------------------------------


def test_tiny_config_builds(tiny_model) -> None:
    assert tiny_model.input_shape == (None, 32, 32, 3)
    assert tiny_model.output_shape == (None, APPLICATIONS["MobileNetV2"].width)  # 1280 whatever alpha <= 1
    assert tiny_model.get_layer("preprocess") is not None  # preprocess_input lives inside the model
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    y = tiny_model(x).numpy()
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max() > 0
    assert not np.allclose(y[0], y[1], rtol=1e-3, atol=0)  # different images, different features


def test_earlier_layer_and_pooling(tiny_config: BackboneConfig) -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    avg = build_backbone(replace(tiny_config, layer="block_3_expand_relu").resolved())
    maxed = build_backbone(replace(tiny_config, layer="block_3_expand_relu", pooling="max").resolved())
    # 6 x 8 channels: expansion factor 6 of block_2's 24 * 0.35 -> 8 channels
    assert avg.output_shape == maxed.output_shape == (None, 48)
    a, m = avg(x).numpy(), maxed(x).numpy()
    assert (m >= a - 1e-6).all() and (m > a + 1e-6).any()  # same weights (seeded): max >= mean


def test_unknown_layer_lists_layers(tiny_config: BackboneConfig) -> None:
    with pytest.raises(UserError, match=r"MobileNetV2 has no layer 'out_rel'\. Did you mean out_relu") as info:
        build_backbone(replace(tiny_config, layer="out_rel").resolved())
    message = str(info.value)
    assert "Its last layers are:" in message and "Conv_1_bn" in message and "backbones --layers" in message


def test_random_weights_are_reproducible(tiny_config: BackboneConfig, tiny_model) -> None:
    x = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    again = build_backbone(tiny_config.resolved())
    np.testing.assert_array_equal(again(x).numpy(), tiny_model(x).numpy())


def test_offline_imagenet_weights_give_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.applications, "MobileNetV3Small", offline)
    monkeypatch.setenv("KERAS_HOME", "/somewhere/keras")
    with pytest.raises(
        UserError,
        match=r"could not load ImageNet weights for MobileNetV3Small.*Offline\? "
        r"Put the Keras weight file under /somewhere/keras/models",
    ):
        build_backbone(BackboneConfig("MobileNetV3Small", image_size=32).resolved())
