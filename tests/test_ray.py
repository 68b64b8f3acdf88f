"""The Ray engine on a local Ray cluster (2 CPUs, started once for this module).

Its cache equals the local engine's row for row, and stays so when an inference actor is killed in
the middle of a run, or when the driver is killed (kill -9) and the run is done again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, add_broken
from model_fixtures import TINY_CONFIG, Conversion, assert_same_cache, make_pattern_dataset, quiet

from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.extract import extract

NO_RAY = "Ray is not installed (pip install 'cnncodes[ray]'): the Ray engine cannot be tested"
# TFLite, the CPU actors' runtime: the session's conversion placed beside the caches; no actor imports TensorFlow
RUNTIME = "tflite"
CHUNK = BATCH = 4
DELAY = 0.4  # seconds per inference batch in the runs that get killed: time to kill them half way
REGISTRY = "cnncodes-test-actors"
# Ray Data's own configuration code warns about its deprecated options whatever we set
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the whole module (starting one takes several seconds)."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    pytest.importorskip("ray.data", reason=NO_RAY)
    # one GPU declared (there is none): Ray schedules GPU actors on it, and their runtime runs on the CPU
    ray.init(
        address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    # the slow runtimes below travel to the actors by value: the workers cannot import this test file
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images in 3 classes, a byte-identical copy in another class, and broken files."""
    root = make_pattern_dataset(tmp_path_factory.mktemp("ray") / "data")
    shutil.copy(root / "bars" / "img_00.png", root / "checks" / "copy_of_bars.png")
    add_broken(root, "bars", "checks")
    return root


@pytest.fixture(scope="module")
def caches(tiny_tflite: Conversion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every cache of the module, with the session's converted backbone beside them."""
    folder = tmp_path_factory.mktemp("caches")
    tiny_tflite.place(folder)
    return folder


@pytest.fixture(scope="module")
def reference(data: Path, caches: Path) -> Path:
    """The local engine's cache of the dataset."""
    cache = caches / "local.h5"
    extract(data, TINY_CONFIG, cache=cache, runtime=RUNTIME, progress=False, log=quiet())
    return cache


def ray_extract(data: Path, cache: Path, **options):
    return extract(
        data,
        TINY_CONFIG,
        cache=cache,
        runtime=RUNTIME,
        engine="ray",
        chunk_size=CHUNK,
        batch_size=BATCH,
        progress=False,
        log=quiet(),
        **options,
    )


def journal_chunks(cache: Path) -> int:
    return len(list(cache.with_name(cache.name + ".partial").glob("chunk-*.npz")))


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- slow, self-registering runtimes for the runs that get killed ----------------------------------------
class SlowRuntime:
    """A runtime that sleeps before each batch, so that a run lasts long enough to be killed half way."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.image_size, self.dim = inner.name, inner.image_size, inner.dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return self.inner(batch)


def slow_make_runtime(*args, register: bool = True, **kwargs) -> SlowRuntime:
    """pipeline.runtime.make_runtime, slowed; an actor that builds it registers itself (for the test to kill)."""
    import ray

    from pipeline.runtime import make_runtime

    context = ray.get_runtime_context()
    if register and context.get_actor_id():  # in an inference actor, not in the driver's probe
        ray.get(ray.get_actor(REGISTRY).add.remote(context.current_actor))
    return SlowRuntime(make_runtime(*args, **kwargs), DELAY)


class Registry:
    """Handles of the inference actors, in the order they built their runtime (a restarted one again)."""

    def __init__(self) -> None:
        self.handles: list = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def all(self) -> list:
        return self.handles


# -- tests ---------------------------------------------------------------------------------------------
def test_missing_ray_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'cnncodes\[ray\]'"):
        extract(tmp_path / "not even scanned", TINY_CONFIG, engine="ray")


def test_ray_client_address_is_refused_before_any_work(tmp_path: Path) -> None:
    pytest.importorskip("ray.data", reason=NO_RAY)
    # Ray Data's executor cannot run in a Ray Client (ray://) driver: say so before scanning
    with pytest.raises(UserError, match="Ray Client"):
        extract(tmp_path / "not even scanned", TINY_CONFIG, engine="ray", ray_address="ray://head:10001")


def test_changed_file_is_not_decoded(tmp_path: Path) -> None:
    from pipeline.images import file_sha256
    from pipeline.stream import read_and_decode

    image = shutil.copy(next(make_pattern_dataset(tmp_path / "d", per_class=1).rglob("*.png")), tmp_path / "a.png")
    digest = file_sha256(image)
    assert read_and_decode(str(image), digest, 32, "bilinear").shape == (32, 32, 3)
    Path(image).write_bytes(Path(image).read_bytes() + b"\0")
    assert "changed while extracting" in read_and_decode(str(image), digest, 32, "bilinear")
    assert read_and_decode(str(tmp_path / "gone.png"), digest, 32, "bilinear").startswith("unreadable")


@pytest.mark.slow
def test_ray_cache_equals_local(cluster, data: Path, reference: Path, caches: Path) -> None:
    cache = caches / "ray.h5"
    summary = ray_extract(data, cache)
    assert summary.engine == "ray" and summary.runtime == RUNTIME
    assert summary.n_new == summary.n_rows == len(load(reference))
    assert_same_cache(cache, reference)
    again = ray_extract(data, cache)  # incremental: nothing left to do
    assert again.n_new == 0 and again.runtime == ""  # nothing ran


@pytest.mark.slow
def test_gpu_actors(cluster, data: Path, reference: Path, caches: Path) -> None:
    from pipeline.engine_ray import inference_actors

    messages: list[str] = []
    summary = extract(
        data,
        TINY_CONFIG,
        cache=caches / "gpu.h5",
        runtime=RUNTIME,
        engine="ray",
        gpus_per_actor=1,
        progress=False,
        log=quiet(messages),
    )
    assert any("1 inference actor with 1 GPU each" in m for m in messages), messages
    assert summary.runtime == RUNTIME
    assert_same_cache(summary.cache_path, reference)
    with pytest.raises(UserError, match="--gpus-per-actor 2, but the Ray cluster has 1 GPU"):
        inference_actors(None, 2.0)


def test_actor_pool_must_leave_a_cpu_for_decoding(cluster) -> None:
    from pipeline.engine_ray import inference_actors

    assert inference_actors(None, 0.0) == 1  # one node
    assert inference_actors(None, 0.5) == 1  # two actors would share the GPU, but there are 2 CPUs
    with pytest.raises(UserError, match="--actors 2: .* use --actors 1 or fewer"):
        inference_actors(2, 0.0)


@pytest.mark.slow
def test_killed_actor_is_restarted_and_no_row_is_lost_or_doubled(
    cluster, data: Path, reference: Path, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.engine_ray as engine_ray
    import pipeline.extract as extract_module

    registry = cluster.remote(Registry).options(name=REGISTRY).remote()
    monkeypatch.setattr(extract_module, "make_runtime", slow_make_runtime)
    monkeypatch.setattr(engine_ray, "BLOCKS_PER_BATCH", 1)  # one batch per Ray task: rows come back steadily
    cache, outcome = caches / "actor_killed.h5", {}

    def run() -> None:
        try:
            outcome["summary"] = ray_extract(data, cache)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: journal_chunks(cache) >= 1 or not worker.is_alive(), what="the first journal chunk")
    assert worker.is_alive(), f"the run ended before the kill: {outcome}"
    started, chunks = time.monotonic(), journal_chunks(cache)
    cluster.kill(cluster.get(registry.all.remote())[0], no_restart=False)
    worker.join(timeout=180)
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")
    print(
        f"actor killed with {chunks} chunks written; the run finished {time.monotonic() - started:.1f} s after the kill"
    )
    assert len(cluster.get(registry.all.remote())) == 2  # the killed actor came back and built its runtime again
    assert_same_cache(cache, reference)
    cluster.kill(registry)


DRIVER = """
import functools, sys
sys.path[:0] = [{tests!r}, {root!r}]
import ray
import pipeline.engine_ray as engine_ray
import pipeline.extract as extract_module
import test_ray
ray.cloudpickle.register_pickle_by_value(test_ray)  # the workers cannot import the test file
engine_ray.BLOCKS_PER_BATCH = 1
extract_module.make_runtime = functools.partial(test_ray.slow_make_runtime, register=False)
extract_module.extract({data!r}, test_ray.TINY_CONFIG, cache={cache!r}, runtime={runtime!r}, engine="ray",
                       ray_address={address!r}, chunk_size={chunk}, batch_size={chunk}, progress=False)
"""


@pytest.mark.slow
def test_killed_driver_resumes_from_its_chunks(cluster, data: Path, reference: Path, caches: Path) -> None:
    cache = caches / "driver_killed.h5"
    script = DRIVER.format(
        tests=str(ROOT / "tests"),
        root=str(ROOT),
        data=str(data),
        cache=str(cache),
        runtime=RUNTIME,
        address=cluster.get_runtime_context().gcs_address,
        chunk=CHUNK,
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    driver = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(lambda: journal_chunks(cache) >= 1 or driver.poll() is not None, what="the first journal chunk")
        assert driver.poll() is None, f"the driver ended before the kill:\n{driver.communicate()[0][-3000:]}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    chunks = journal_chunks(cache)
    assert chunks >= 1 and not cache.exists()  # killed before its commit
    started = time.monotonic()
    summary = ray_extract(data, cache)
    print(f"driver killed with {chunks} chunks written; the re-run took {time.monotonic() - started:.1f} s")
    assert summary.n_resumed >= CHUNK  # the chunks written before the kill are not computed again
    assert summary.n_new > 0  # and the kill came before the end
    assert summary.n_new + summary.n_resumed == summary.n_rows
    assert_same_cache(cache, reference)
