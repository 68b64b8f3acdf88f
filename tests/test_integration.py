"""Real ImageNet backbones on a real dataset, from ../shared (read-only; skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, requires_shared

from pipeline.backbones import BackboneConfig, layer_names
from pipeline.cache import load
from pipeline.extract import extract

pytestmark = pytest.mark.integration

FLOWERS = SHARED / "datasets" / "oxford_flowers12"
LITE0 = SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras"


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on even rows of each class, score the odd rows (cosine similarity)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    rank = np.zeros(len(labels), int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    train, test = rank % 2 == 0, rank % 2 == 1
    centroids = np.stack([x[train & (labels == c)].mean(0) for c in np.unique(labels)])
    return float((np.argmax(x[test] @ centroids.T, axis=1) == labels[test]).mean())


def test_flowers_with_efficientnet_lite0(tmp_path: Path, lite0_tflite) -> None:
    data, model = requires_shared(FLOWERS.relative_to(SHARED)), requires_shared(LITE0.relative_to(SHARED))
    cache = tmp_path / "flowers.h5"
    config = BackboneConfig(str(model), layer="avg_pool")
    # TFLite, the runtime extract picks on a CPU, with the session's conversion (test_runtime.py checks it
    # against Keras): 960 images in about 8 s where Keras takes about 25 s
    lite0_tflite.place(tmp_path)
    summary = extract(data, config, cache=cache, batch_size=32, runtime="tflite", progress=False, log=lambda m: None)
    # iris/image_0422.jpg and iris/image_0469.jpg are byte-identical (SOURCE.txt): one extraction, two rows
    # n_new counts files new to the cache: the duplicate pair (SOURCE.txt) shares one extraction (959 hashes below)
    assert (summary.n_files, summary.n_rows, summary.n_new, summary.skipped) == (960, 960, 960, [])
    assert summary.n_ignored == 1  # SOURCE.txt at the top

    c = load(cache)
    assert c.features.shape == (960, 1280) and np.isfinite(c.features).all()
    assert len(c.class_names) == 12 and c.class_names[0] == "bluebell"
    assert np.bincount(c.labels, minlength=12).tolist() == [80] * 12
    assert all(c.class_names[l] == p.split("/")[0] for p, l in zip(c.paths, c.labels))
    i, j = c.paths.index("iris/image_0422.jpg"), c.paths.index("iris/image_0469.jpg")
    assert c.content_hash[i] == c.content_hash[j] and len(set(c.content_hash)) == 959
    np.testing.assert_array_equal(c.features[i], c.features[j])
    assert c.attrs["image_size"] == 224 and c.attrs["layer"] == "avg_pool" and c.attrs["weights"] == "file"
    assert c.attrs["backbone"].startswith("sha256:") and c.attrs["backbone_path"] == str(model.resolve())
    # real ImageNet features separate these flowers well; chance is 1/12
    assert nearest_centroid_accuracy(c.features, c.labels) > 0.7

    again = extract(data, config, cache=cache, runtime="tflite", progress=False, log=lambda m: None)
    assert again.n_new == 0 and again.n_reused == 960 and again.n_rows == 960
    np.testing.assert_array_equal(load(cache).features, c.features)


def test_lite0_layers_include_the_pooled_layer() -> None:
    model = requires_shared(LITE0.relative_to(SHARED))
    names = dict(layer_names(BackboneConfig(str(model)).resolved()))
    assert names["avg_pool"] == "(1280,)" and "top_activation" in names and "predictions" in names


def test_mobilenet_alpha_025_imagenet_through_keras_home(mobilenet_keras_home) -> None:
    """Keras reads KERAS_HOME when it is imported, so the session's fixture extracts in its own process."""
    run = mobilenet_keras_home
    assert run.done.returncode == 0, run.done.stderr[-3000:]
    assert f"cache: {run.cache} (24 images)" in run.done.stdout
    c = load(run.cache)
    assert c.features.shape == (24, 256) and np.abs(c.features).max() > 0.1  # real weights, not a random init
    assert c.attrs["weights"].startswith("imagenet (keras ") and c.attrs["alpha"] == 0.25
    assert c.class_names == ["daisy", "iris", "sunflower"]
