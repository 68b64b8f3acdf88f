"""pipeline/runtime.py: Keras and TFLite runtimes give the same features; the converted file is cached;
conversion failures fall back (auto) or fail clearly (tflite)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import TINY_CONFIG, Conversion, World, quiet

from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.runtime import KerasRuntime, TFLiteRuntime, make_runtime, tflite_path

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[2] / "shared"
LITE0 = SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras"
FLOWERS = SHARED / "datasets" / "oxford_flowers12"

CONVERTING = "converting the backbone to TFLite once"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def by_hash(cache) -> dict[str, np.ndarray]:
    return {h: cache.features[i] for i, h in enumerate(cache.content_hash)}


def paired(keras_cache, tflite_cache) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows of the two caches matched by content hash (every image in both)."""
    a, b = by_hash(keras_cache), by_hash(tflite_cache)
    assert set(a) == set(b) and len(a) == len(keras_cache)
    keys = sorted(a)
    return np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])


@pytest.fixture(scope="module")
def tflite_extract(world: World, tiny_tflite: Conversion, tmp_path_factory: pytest.TempPathFactory):
    """The tiny dataset extracted again with runtime='tflite', the session's conversion placed beside the cache."""
    folder = tmp_path_factory.mktemp("tflite_cache")
    tiny_tflite.place(folder)
    messages: list[str] = []
    summary = extract(
        world.data, TINY_CONFIG, cache=folder / "tiny.h5", runtime="tflite", progress=False, log=quiet(messages)
    )
    return summary, messages, folder


# -- equivalence ------------------------------------------------------------------------------------


def test_tflite_features_match_keras_features(world: World, tflite_extract) -> None:
    summary, messages, folder = tflite_extract
    assert summary.runtime == "tflite" and summary.n_new == 24
    k, t = load(world.cache), load(summary.cache_path)
    # the cache key does not depend on the runtime
    assert k.attrs["fingerprint"] == t.attrs["fingerprint"] == world.config.fingerprint()
    assert k.identity == t.identity
    assert set(k.runtime) == {"keras"} and t.runtime == ["tflite"] * 24
    a, b = paired(k, t)
    assert a.shape == b.shape == (24, 1280)
    assert np.isfinite(b).all()
    cos = cosines(a, b)
    assert cos.min() >= 0.9999, cos
    # many pooled dimensions of the random-init backbone are constants; compare what varies too
    centre = a.mean(0)
    centred = cosines(a - centre, b - centre)
    assert centred.min() >= 0.999, centred


def test_converted_file_is_named_by_fingerprint_and_reused(
    world: World, tiny_tflite: Conversion, tflite_extract, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary, messages, folder = tflite_extract
    converted = tflite_path(world.config, folder)
    assert converted.name == tiny_tflite.path.name == f"MobileNetV2-32-{world.config.fingerprint()}.tflite"
    assert converted.is_file()
    assert sum(CONVERTING in m for m in tiny_tflite.messages) == 1  # make_runtime converted once, saying so
    assert not any(CONVERTING in m for m in messages)  # extract found the conversion beside its cache
    mtime = converted.stat().st_mtime_ns

    import pipeline.runtime as runtime_module

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cached file exists")

    monkeypatch.setattr(runtime_module, "convert_to_tflite", no_conversion)
    monkeypatch.setattr(runtime_module, "has_gpu", lambda: False)
    for kind in ("tflite", "auto"):
        again: list[str] = []
        rt = make_runtime(world.config, kind, tflite_dir=folder, log=quiet(again))
        assert isinstance(rt, TFLiteRuntime) and rt.name == "tflite"
        assert (rt.image_size, rt.dim) == (32, 1280)
        assert not any(CONVERTING in m for m in again), again
    assert converted.stat().st_mtime_ns == mtime


def test_tflite_runtime_changing_batch_sizes(world: World, tflite_extract) -> None:
    _, _, folder = tflite_extract
    rt = TFLiteRuntime(tflite_path(world.config, folder), threads=1)
    rel, images = world.images()
    cache = load(world.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    expected = cache.features[[row[r] for r in rel]]
    start = 0
    for n in (3, 5, 3, 1, 5):
        out = rt(images[start : start + n])
        assert out.shape == (n, 1280) and out.dtype == np.float32
        assert cosines(out, expected[start : start + n]).min() >= 0.9999
        start += n
    # the same images in another batch composition give the same rows
    whole = rt(images[:8])
    np.testing.assert_allclose(whole[3:8], rt(images[3:8]), rtol=1e-5, atol=0)


def test_damaged_cached_file_is_converted_again(
    world: World, tflite_extract, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, folder = tflite_extract
    good = tflite_path(world.config, folder)
    damaged = tflite_path(world.config, tmp_path)
    damaged.write_bytes(b"not a flatbuffer at all" * 10)
    import pipeline.runtime as runtime_module

    calls = []

    def fake_convert(model, path, **options):
        calls.append(Path(path))
        shutil.copy(good, path)  # stands in for a (slow) real conversion
        return Path(path)

    monkeypatch.setattr(runtime_module, "convert_to_tflite", fake_convert)
    rt = make_runtime(world.config, "tflite", tflite_dir=tmp_path, log=quiet())
    assert isinstance(rt, TFLiteRuntime) and calls == [damaged]
    assert damaged.read_bytes() == good.read_bytes()


# -- failures -------------------------------------------------------------------------------------


def _failing_convert(*args, **kwargs):
    raise RuntimeError("op not supported: FancyOp\nsecond line of converter noise")


def test_tflite_conversion_failure_is_user_error(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "convert_to_tflite", _failing_convert)
    with pytest.raises(UserError) as info:
        make_runtime(world.config, "tflite", tflite_dir=tmp_path, log=quiet())
    message = str(info.value)
    assert "could not be converted to TFLite" in message and "RuntimeError" in message
    assert "op not supported: FancyOp" in message and "second line" not in message
    assert "--runtime keras" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_auto_falls_back_to_keras_with_a_notice(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "convert_to_tflite", _failing_convert)
    monkeypatch.setattr(runtime_module, "has_gpu", lambda: False)
    messages: list[str] = []
    rt = make_runtime(world.config, "auto", tflite_dir=tmp_path, log=quiet(messages))
    assert isinstance(rt, KerasRuntime) and rt.name == "keras"
    assert any("TFLite conversion failed (RuntimeError)" in m and "Keras runtime" in m for m in messages), messages
    # and the fallback runtime works: the same features as the Keras cache
    rel, images = world.images()
    cache = load(world.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    np.testing.assert_allclose(rt(images[:4]), cache.features[[row[r] for r in rel[:4]]], rtol=1e-4, atol=1e-15)


@pytest.mark.parametrize("kind", ["onnx", "TFLite", ""])
def test_unknown_runtime_name(kind: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="must be one of auto, keras, tflite"):
        make_runtime(TINY_CONFIG.resolved(), kind, tflite_dir=tmp_path, log=quiet())


def test_extract_refuses_unknown_runtime(world: World, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="runtime"):
        extract(world.data, TINY_CONFIG, cache=tmp_path / "c.h5", runtime="onnx", progress=False, log=quiet())
    assert not (tmp_path / "c.h5").exists()


# -- real data ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_efficientnet_lite0_tflite_matches_keras_on_flowers(tmp_path: Path, lite0_tflite: Conversion) -> None:
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} is absent (the real models and datasets live in {SHARED})")
    from pipeline.backbones import BackboneConfig

    assert sum(CONVERTING in m for m in lite0_tflite.messages) == 1  # make_runtime converted the real model
    lite0_tflite.place(tmp_path / "tflite")

    data = tmp_path / "flowers"
    classes = sorted(p for p in FLOWERS.iterdir() if p.is_dir())
    assert len(classes) >= 10
    per_class = -(-40 // len(classes))  # about 40 images in all, a few per class
    for folder in classes:
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copy(image, data / folder.name / image.name)  # copies: never write into shared
    config = BackboneConfig(str(LITE0), layer="avg_pool")
    k = extract(data, config, cache=tmp_path / "keras" / "c.h5", runtime="keras", progress=False, log=quiet())
    t = extract(data, config, cache=tmp_path / "tflite" / "c.h5", runtime="tflite", progress=False, log=quiet())
    assert (k.runtime, t.runtime) == ("keras", "tflite")
    ck, ct = load(k.cache_path), load(t.cache_path)
    assert ck.attrs["fingerprint"] == ct.attrs["fingerprint"] and len(ck) == len(ct) >= 36
    a, b = paired(ck, ct)
    assert a.shape[1] == 1280 and np.linalg.norm(a, axis=1).min() > 1  # real features, not tiny ones
    cos = cosines(a, b)
    assert cos.min() >= 0.9999, cos


class _Features:
    """What a traced function returns: something with .numpy()."""

    def numpy(self) -> np.ndarray:
        return np.zeros((1, 4), np.float32)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_keras_call_is_raised_when_the_call_returns(presses: int) -> None:
    """TensorFlow turns a KeyboardInterrupt raised in its C++ callbacks into a TypeError (extract's Ctrl-C
    then ended in a traceback, exit 1): the runtime holds the first Ctrl-C until the call returns."""
    import os
    import signal
    import time

    finished = []

    def call_that_mangles_interrupts(batch: np.ndarray) -> _Features:
        try:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs by now
        except KeyboardInterrupt:
            raise TypeError("Binding inputs to tf.function failed") from None
        finished.append(True)
        return _Features()

    runtime = object.__new__(KerasRuntime)
    runtime._run = call_that_mangles_interrupts
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # never the TypeError, whatever the number of presses
            runtime(np.zeros((1, 8, 8, 3), np.uint8))
        assert finished == ([True] if presses == 1 else [])  # one press: the call ran to its end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
