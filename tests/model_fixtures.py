"""Shared TensorFlow-backed fixtures for the runtime, export, fine-tune and compare tests.

One tiny dataset (3 classes x 8 images with distinct patterns), one Keras-runtime cache of the
random-weights MobileNetV2 (alpha 0.35, 32x32), and heads fitted on it, built once per session so
that the TensorFlow work is shared between test files; the same dataset through a two-layer CNN file
(`cnn_world`: ordinary feature norms; its export converts in under 1 s where the tiny MobileNetV2's takes
8 s, and its training step traces in seconds), its fine-tuning run (`finetune_run`), and the tiny backbone
converted to TFLite once (`tiny_tflite`). conftest.py registers this module as a plugin (`pytest_plugins`),
so every test module can ask for them without importing them.

Random-init features are tiny (norms ~1e-10): heads meant to be compared exactly with a Keras or
TFLite model are fitted with l2_normalize=False (see the notes in the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.backbones import BackboneConfig  # noqa: E402

TINY_CONFIG = BackboneConfig("MobileNetV2", "none", image_size=32, alpha=0.35)
# MobileNet v1 at alpha 0.25, random weights: a Keras Applications family with a third of MobileNetV2's layers, for
# tests where any such family proves the point and the backbone is built or traced several times
SMALL_APPLICATION = BackboneConfig("MobileNet", "none", image_size=32, alpha=0.25)
LITE0 = ROOT.parent / "shared" / "keras-models" / "efficientnet_lite0_imagenet.keras"
CLASSES3 = ("bars", "checks", "speckle")
CLASSES2 = ("bars", "checks")
PER_CLASS = 8
WH = 40  # square images, 40x40 px


def pattern(cls: str, k: int, seed: int = 0) -> np.ndarray:
    """A 40x40 RGB uint8 image whose pattern depends on the class and whose details depend on k."""
    rng = np.random.default_rng(seed * 10_000 + 97 * CLASSES3.index(cls) + k)
    yy, xx = np.mgrid[0:WH, 0:WH].astype(np.float64)
    if cls == "bars":  # horizontal gradient with vertical bars, reddish
        base = xx / WH * 200 + 40 * ((xx // (2 + k % 4)) % 2)
        img = np.stack([base, 0.3 * base, 0.2 * (255 - base)], -1)
    elif cls == "checks":  # checkerboard, greenish, with a vertical gradient
        period = 3 + k % 5
        board = (((xx // period) + (yy // period)) % 2) * 180
        img = np.stack([0.2 * board, board * 0.5 + yy / WH * 120, 60 + 0 * board], -1)
    else:  # coloured speckle noise, bluish and bright
        img = rng.uniform(0, 255, (WH, WH, 3)) * np.array([0.4, 0.6, 1.0])
    img = img + rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pattern_dataset(root: Path, classes=CLASSES3, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """root/CLASS/img_K.png: per_class images per class (all byte-distinct)."""
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(pattern(cls, k, seed)).save(root / cls / f"img_{k:02d}.png")
    return root


def quiet(messages: list[str] | None = None):
    """A log function that collects messages (or drops them)."""
    return (lambda m: messages.append(str(m))) if messages is not None else (lambda m: None)


def assert_same_cache(got_path: Path, reference_path: Path) -> None:
    """Same rows (paths, labels, splits, content hashes), same skipped files, features with cosine >= 0.9999."""
    from pipeline.cache import load

    got, ref = load(got_path), load(reference_path)
    assert got.paths == ref.paths
    assert got.content_hash == ref.content_hash
    assert got.split == ref.split
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert sorted(got.skipped) == sorted(ref.skipped)
    a, b = got.features.astype(np.float64), ref.features.astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.9999, cosine.min()


@dataclass
class World:
    """Everything built once: datasets, caches (Keras runtime) and fitted heads."""

    root: Path
    config: BackboneConfig  # resolved
    data: Path
    cache: Path
    heads: dict[str, Path] = field(default_factory=dict)  # logreg, svm (l2 off), knn, rbf-svm, logreg_l2
    data2: Path | None = None
    cache2: Path | None = None
    heads2: dict[str, Path] = field(default_factory=dict)  # logreg, svm on the 2-class dataset

    def images(self, data: Path | None = None) -> tuple[list[str], np.ndarray]:
        """(relative paths, decoded uint8 images) of every file of a dataset, as extract decodes them."""
        from pipeline.images import decode_image

        data = data or self.data
        rel = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
        size = self.config.image_size
        return rel, np.stack([decode_image(data / r, size, self.config.resize) for r in rel])


def _fit(cache: Path, clf: str, out: Path, l2: bool) -> Path:
    from pipeline.heads import fit_head

    return fit_head(cache, clf, out=out, l2_normalize=l2, n_jobs=1, log=quiet()).folder


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The tiny datasets, their Keras-runtime caches and the heads (about 10 s, once per session)."""
    from pipeline.extract import extract

    root = tmp_path_factory.mktemp("model_world")
    config = TINY_CONFIG.resolved()
    w = World(root, config, make_pattern_dataset(root / "data"), root / "caches" / "tiny.h5")
    extract(w.data, config, cache=w.cache, runtime="keras", progress=False, log=quiet())
    for clf, l2 in (("logreg", False), ("svm", False), ("knn", True), ("rbf-svm", True)):
        w.heads[clf] = _fit(w.cache, clf, root / "heads" / clf, l2)
    return w


@pytest.fixture(scope="session")
def finetune_run(cnn_world: World, tmp_path_factory: pytest.TempPathFactory):
    """One end-to-end fine-tuning run (1 head epoch + 1 fine-tuning epoch) of the small CNN on the tiny dataset
    (tracing the tiny MobileNetV2's training step took most of 30 s; test_finetune.py trains it where the point
    is MobileNetV2's own layers)."""
    from pipeline.cache import copy_cache
    from pipeline.finetune import finetune

    root = tmp_path_factory.mktemp("finetune_run")
    cache = root / "cnn.h5"
    copy_cache(cnn_world.cache, cache)  # finetune re-commits its cache: keep the shared one untouched
    messages: list[str] = []
    result = finetune(
        cnn_world.data,
        cnn_world.config,
        epochs=1,
        head_epochs=1,
        batch_size=8,
        cache=cache,
        out=root / "run",
        log=quiet(messages),
    )
    return result, messages


@dataclass
class Conversion:
    """The tiny backbone converted to TFLite once: the file and what make_runtime logged while converting."""

    path: Path
    messages: list[str]

    def place(self, folder: Path) -> Path:
        """Copy the converted file into folder, where extract finds it as its own earlier conversion."""
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.path, folder / self.path.name))


@pytest.fixture(scope="session")
def tiny_tflite(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The tiny backbone converted to TFLite by make_runtime, once per session (about 3 s a conversion): the
    modules that run TFLite place it beside their caches instead of converting the same configuration again."""
    from pipeline.runtime import make_runtime, tflite_path

    folder = tmp_path_factory.mktemp("tiny_tflite")
    messages: list[str] = []
    make_runtime(TINY_CONFIG.resolved(), "tflite", tflite_dir=folder, log=quiet(messages))
    return Conversion(tflite_path(TINY_CONFIG.resolved(), folder), messages)


@pytest.fixture(scope="session")
def lite0_tflite(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """EfficientNet-Lite0 (avg_pool) from ../shared converted to TFLite by make_runtime, once per session (about
    4 s): the integration tests on real images place it beside their caches and run TFLite (3-4x Keras' speed)."""
    from pipeline.runtime import make_runtime, tflite_path

    if not LITE0.is_file():
        pytest.skip(f"{LITE0} is absent (the real models and datasets live in {LITE0.parents[1]})")
    config = BackboneConfig(str(LITE0), layer="avg_pool").resolved()
    folder = tmp_path_factory.mktemp("lite0_tflite")
    messages: list[str] = []
    make_runtime(config, "tflite", tflite_dir=folder, log=quiet(messages))
    return Conversion(tflite_path(config, folder), messages)


@dataclass
class KerasHomeRun:
    """`extract` of real images through MobileNet 0.25 with ImageNet weights found through KERAS_HOME."""

    cache: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def mobilenet_keras_home(tmp_path_factory: pytest.TempPathFactory) -> KerasHomeRun:
    """MobileNet 0.25's ImageNet weights from ../shared through KERAS_HOME, which Keras reads when it is imported,
    so `cli.py extract --runtime tflite` runs in its own process: 8 flowers of each of 3 classes, once per session.
    The integration test checks the features it cached, the lean test the conversion it left beside the cache."""
    from conftest import requires_shared

    models = requires_shared("keras-models", "models", "mobilenet_2_5_224_tf_no_top.h5").parent
    flowers = requires_shared("datasets", "oxford_flowers12")
    root = tmp_path_factory.mktemp("keras_home_run")
    (root / "keras_home").mkdir()
    (root / "keras_home" / "models").symlink_to(models)
    data = root / "flowers-small"
    for cls in ("daisy", "sunflower", "iris"):
        (data / cls).mkdir(parents=True)
        for path in sorted((flowers / cls).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(path, data / cls / path.name)
    cache = root / "caches" / "mobilenet.h5"
    backbone = ["--backbone", "MobileNet", "--alpha", "0.25", "--weights", "imagenet", "--image-size", "224"]
    env = {
        **os.environ,
        "KERAS_HOME": str(root / "keras_home"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        [sys.executable, "cli.py", "extract", str(data), *backbone, "--cache", str(cache), "--runtime", "tflite"]
        + ["--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return KerasHomeRun(cache, done)


def save_small_cnn(path: Path, seed: int = 7) -> Path:
    """A tiny seeded CNN saved as a .keras file: its pooled features have ordinary magnitudes (norms ~1),
    unlike the random-init MobileNetV2's (~1e-10); usable with L2 normalisation and float16 weights."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_a")(x)
    x = keras.layers.Conv2D(24, 3, strides=2, activation="relu", name="conv_b")(x)
    keras.Model(inputs, x, name="small_cnn").save(path)
    return path


@pytest.fixture(scope="session")
def cnn_world(world: World, tmp_path_factory: pytest.TempPathFactory) -> World:
    """The 3-class dataset through a small CNN model file (ordinary feature norms); L2-normalised heads.
    Also a 2-class dataset with its heads (data2, cache2, heads2), for the binary exports."""
    from pipeline.extract import extract

    root = tmp_path_factory.mktemp("cnn_world")
    config = BackboneConfig(str(save_small_cnn(root / "small_cnn.keras"))).resolved()
    w = World(root, config, world.data, root / "caches" / "cnn.h5")
    extract(w.data, config, cache=w.cache, runtime="keras", progress=False, log=quiet())
    for clf in ("logreg", "svm"):
        w.heads[clf] = _fit(w.cache, clf, root / "heads" / clf, True)
    w.data2 = make_pattern_dataset(root / "data2", CLASSES2, seed=1)
    w.cache2 = root / "caches" / "binary.h5"
    extract(w.data2, config, cache=w.cache2, runtime="keras", progress=False, log=quiet())
    for clf in ("logreg", "svm"):
        w.heads2[clf] = _fit(w.cache2, clf, root / "heads2" / clf, True)
    return w
