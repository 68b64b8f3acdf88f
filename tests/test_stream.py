"""pipeline.stream (reader, mapper, writer, runner) and extract_layers: several layers from one forward pass."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import add_broken, add_images

from pipeline.backbones import BackboneConfig, build_backbone
from pipeline.cache import CacheWriter, Row, layout, load
from pipeline.engines import run
from pipeline.errors import UserError
from pipeline.extract import default_cache_path, extract, extract_layers, summary_lines
from pipeline.images import scan_dataset
from pipeline.runtime import KerasRuntime, TFLiteRuntime, convert_to_tflite, make_runtime, tflite_path
from pipeline.stream import (
    ERROR,
    HASH,
    RUNTIME,
    FeatureMapper,
    FeatureSink,
    features_column,
    hash_files,
    read_tasks,
    stream_features,
    task_columns,
)

LAYERS = ["block_3_expand_relu", None]  # an early layer and the default (top) one of the tiny MobileNetV2


def quiet(_: str) -> None:
    pass


class FakeRuntime:
    """Two outputs computed with NumPy (no TensorFlow): per-channel means, and the overall mean and max."""

    name, image_size, dims = "fake", 8, [3, 2]
    dim = 3

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls.append(len(batch))
        x = batch.astype(np.float32)
        return [x.mean(axis=(1, 2)), np.stack([x.mean(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))], 1)]


def by_hash(cache) -> dict[str, np.ndarray]:
    return dict(zip(cache.content_hash, cache.features))


# -- reader, mapper, writer, runner (no TensorFlow) ------------------------------------------------


def writers_for(folder: Path, n: int) -> list[CacheWriter]:
    return [CacheWriter(folder / f"layer{k}.h5", {"layer": str(k)}, f"fp{k}") for k in range(n)]


def test_reader_mapper_sink_round_trip(dataset: Path, tmp_path: Path) -> None:
    broken = add_broken(dataset)
    scan = scan_dataset(dataset)
    files = list(zip(scan.files, hash_files([f.path for f in scan.files], 2)))
    writers = writers_for(tmp_path, 2)
    tasks = read_tasks(files, writers)
    assert len(tasks) == len(files) - 1  # the two byte-identical empty files are one task
    assert [t.file.relpath for t in tasks] == [f.relpath for f, _ in files if f.relpath != "grass/also_zero.jpg"]

    runtime = FakeRuntime()
    mapper = FeatureMapper(lambda: runtime, "bilinear", workers=2)
    out = mapper(task_columns(tasks))
    assert set(out) == {HASH, ERROR, RUNTIME, features_column(0), features_column(1)}
    assert runtime.calls == [len(tasks) - 3]  # one runtime call for the batch; three files do not decode
    failed = {t.file.relpath for t, e in zip(tasks, out[ERROR]) if e}
    assert failed == set(broken) - {"grass/also_zero.jpg"}
    # the same numbers as the local engine's stream of the same files
    good = [t for t, e in zip(tasks, out[ERROR]) if not e]
    batch = next(stream_features([t.file for t in good], FakeRuntime(), "bilinear", batch_size=64))
    ok = out[ERROR] == ""
    np.testing.assert_array_equal(out[features_column(0)][ok], batch.outputs[0])
    np.testing.assert_array_equal(out[features_column(1)][ok], batch.outputs[1])
    assert out[features_column(1)].shape == (len(tasks), 2) and not out[features_column(1)][~ok].any()

    assert FeatureSink(writers).write_columns(out) == len(tasks)
    rows = [Row(f.relpath, f.label, f.split, h) for f, h in files]
    index = {t.file.relpath: i for i, t in enumerate(good)}
    for k, writer in enumerate(writers):
        assert writer.commit(rows, scan.class_names, {}) == (12, 4)
        cache = load(writer.path)
        assert sorted(p for p, _ in cache.skipped) == sorted(broken)
        np.testing.assert_array_equal(cache.features, batch.outputs[k][[index[p] for p in cache.paths]])
    assert not read_tasks(files, writers_for(tmp_path, 2))  # reopened: nothing left to do


def test_sink_writes_only_what_each_cache_lacks(tmp_path: Path) -> None:
    writers = writers_for(tmp_path, 2)
    writers[0].add("a" * 64, np.zeros(3, np.float32), "fake")
    writers[0].flush()
    sink = FeatureSink(writers)
    sink.write(["a" * 64, "b" * 64], [np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)], "fake")
    sink.skip("c" * 64, "broken")
    assert [len(w._pending) for w in writers] == [1, 2]  # the first cache already had "a"
    assert all(w._pending_skipped == {"c" * 64: "broken"} for w in writers)
    with pytest.raises(ValueError, match="1 runtime outputs for 2 caches"):
        sink.write(["d" * 64], [np.ones((1, 3))], "fake")


def test_local_runner_counts_and_stops_on_ctrl_c(dataset: Path, tmp_path: Path) -> None:
    scan = scan_dataset(dataset)
    files = list(zip(scan.files, hash_files([f.path for f in scan.files])))
    writers = writers_for(tmp_path, 2)
    tasks = read_tasks(files, writers)
    runtime = FakeRuntime()
    result = run(tasks, lambda: runtime, FeatureSink(writers), batch_size=5, progress=False, log=quiet)
    assert runtime.calls == [5, 5, 2] and result.n_done == 12 and result.runtime == "fake"
    assert not result.interrupted and result.first_batch_at is not None and result.seconds > 0

    class Interrupting(FeatureSink):
        def write(self, *args) -> None:
            raise KeyboardInterrupt

    stopped = run(
        tasks, FakeRuntime, Interrupting(writers_for(tmp_path / "b", 2)), batch_size=5, progress=False, log=quiet
    )
    assert stopped.interrupted and stopped.n_done == 0
    assert run([], FakeRuntime, FeatureSink([]), progress=False).runtime == ""  # nothing to do: nothing built
    with pytest.raises(UserError, match="^engine is 'spark'"):
        run(tasks, FakeRuntime, FeatureSink(writers), engine="spark")


# -- several layers from one forward pass ----------------------------------------------------------


def test_two_layers_one_model_call_per_batch(dataset: Path, tiny_config, tmp_path: Path, counting) -> None:
    folder = tmp_path / "c"
    summaries = extract_layers(
        dataset, tiny_config, LAYERS, cache_dir=folder, batch_size=4, runtime="keras", progress=False, log=quiet
    )
    assert (counting["calls"], counting["images"], len(counting["built"])) == (3, 12, 1)  # 12 images, batches of 4
    dims = set()
    for summary, layer in zip(summaries, LAYERS):
        config = replace(tiny_config, layer=layer).resolved()
        assert summary.cache_path == default_cache_path(dataset, config, folder)  # what `extract --layer` uses
        assert (summary.n_new, summary.n_rows, summary.layer, summary.runtime) == (12, 12, layer or "", "keras")
        cache = load(summary.cache_path)
        assert cache.attrs["fingerprint"] == config.fingerprint() and cache.identity == config.identity()
        dims.add(cache.features.shape[1])
        assert summary.first_batch_s is not None and 0 < summary.first_batch_s < 3600
        lines = "\n".join(summary_lines(summary))
        assert f"first batch after {summary.first_batch_s:.2f} s from process start" in lines
    assert len(dims) == 2 and 1280 in dims

    for layer in LAYERS:  # extract --layer L finds its cache complete
        again = extract(
            dataset, replace(tiny_config, layer=layer), cache_dir=folder, runtime="keras", progress=False, log=quiet
        )
        assert (again.n_new, again.n_reused) == (0, 12)
    assert counting["calls"] == 3

    # the features are the single-layer model's
    single = extract(
        dataset,
        replace(tiny_config, layer=LAYERS[0]),
        cache=tmp_path / "single.h5",
        runtime="keras",
        progress=False,
        log=quiet,
    )
    want, got = by_hash(load(single.cache_path)), by_hash(load(summaries[0].cache_path))
    scale = float(np.abs(np.stack(list(want.values()))).max())
    for digest, vector in got.items():
        np.testing.assert_allclose(vector, want[digest], rtol=1e-4, atol=1e-5 * scale)


def test_only_images_missing_from_a_cache_go_through_the_model(
    dataset: Path, tiny_config, tmp_path: Path, counting
) -> None:
    folder = tmp_path / "c"
    options = dict(cache_dir=folder, runtime="keras", progress=False, log=quiet)
    extract_layers(dataset, tiny_config, LAYERS, **options)
    add_images(dataset, "apple", 2, start=0)
    extract(dataset, replace(tiny_config, layer=LAYERS[0]), **options)  # the first layer's cache is complete
    images = counting["images"]
    first, second = extract_layers(dataset, tiny_config, LAYERS, **options)
    assert counting["images"] - images == 2
    assert (first.n_new, first.n_reused, second.n_new, second.n_reused) == (0, 14, 2, 12)
    assert len(load(first.cache_path)) == len(load(second.cache_path)) == 14
    assert layout(second.cache_path).shards == 2  # 12 rows, then the 2 new ones: nothing else was rewritten
    extract(dataset, replace(tiny_config, layer=LAYERS[1]), compact=True, **options)
    assert (layout(second.cache_path).shards, layout(second.cache_path).runs) == (1, 1)
    assert counting["images"] - images == 2


def test_layer_list_mistakes(dataset: Path, tiny_config, tmp_path: Path, counting) -> None:
    with pytest.raises(UserError, match="each once"):
        extract_layers(dataset, tiny_config, ["block_3_expand_relu"] * 2, cache_dir=tmp_path, runtime="keras")
    with pytest.raises(UserError, match="one per layer"):
        extract_layers(dataset, tiny_config, LAYERS, caches=[tmp_path / "a.h5"], runtime="keras")
    with pytest.raises(UserError, match="same cache file"):
        extract_layers(dataset, tiny_config, LAYERS, caches=[tmp_path / "a.h5"] * 2, runtime="keras")
    with pytest.raises(UserError, match="^engine is 'spark'"):
        extract_layers(dataset, tiny_config, LAYERS, engine="spark")
    with pytest.raises(UserError, match="apply to the ray engine only"):
        extract_layers(dataset, tiny_config, LAYERS, actors=2)  # auto, and no cluster named
    with pytest.raises(UserError, match="apply to the ray engine only"):
        extract_layers(dataset, tiny_config, LAYERS, engine="local", ray_address="auto")
    assert not counting["built"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_tflite_multi_output_matches_keras_per_layer(tmp_path: Path) -> None:
    """Two layers of different widths, converted once; TFLite keeps their order and their values, in the
    frozen conversion make_runtime caches and in a SavedModel conversion with a signature (export's, and the
    cached conversions of earlier releases), whose tensor order TFLite does not promise."""
    from model_fixtures import save_small_cnn

    config = BackboneConfig(str(save_small_cnn(tmp_path / "small.keras"))).resolved()
    layers = ["conv_a", "conv_b"]  # 8 and 24 channels
    keras_runtime = KerasRuntime(build_backbone(config, layers))
    lite = make_runtime(config, "tflite", tflite_dir=tmp_path, log=quiet, layers=layers)
    path = tflite_path(config, tmp_path, layers)
    assert path.is_file() and path.name.startswith("small-32-2layers-")
    assert len({path, tflite_path(config, tmp_path, layers[::-1]), tflite_path(config, tmp_path)}) == 3
    assert lite.dims == keras_runtime.dims == [8, 24]
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    signed = TFLiteRuntime(convert_to_tflite(keras_runtime.model, tmp_path / "signed.tflite", signature=True))
    assert signed.dims == [8, 24]
    for a, b, c in zip(lite(images), keras_runtime(images), signed(images)):
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= 0.9999
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
