"""The Ray engine on a two-node Ray cluster started on this machine, images in a local S3 server (moto).

The head node (2 CPUs, where this test process is the driver) and one worker node (1 CPU) share no
resources; workers read objects from the store themselves, local files reach them as bytes read on the
driver's node, and only the driver writes the cache. The cache equals the local engine's; a worker node
killed in the middle of a run leaves a cache that is clean, and that a re-run completes by extracting only
what is missing. The Ray context and log level of this caller-owned cluster are left as they were.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

import pytest
from model_fixtures import TINY_CONFIG, Conversion, assert_same_cache, make_pattern_dataset, quiet
from object_store import S3

from pipeline.cache import load
from pipeline.extract import extract

NO_RAY = "Ray is not installed (pip install 'cnncodes[ray]'): the Ray engine cannot be tested"
RUNTIME = "tflite"  # the CPU actors' runtime: the session's conversion, placed beside the caches
BATCH = 4
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + one worker node (1 CPU); this process is the driver. Yields (ray, cluster, worker node)."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    pytest.importorskip("ray.data", reason=NO_RAY)
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 100 << 20, "include_dashboard": False},
    )
    worker = nodes.add_node(num_cpus=1, object_store_memory=100 << 20)
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    nodes.wait_for_nodes()
    import test_ray  # the slow runtime below travels to the actors by value: workers cannot import test files

    ray.cloudpickle.register_pickle_by_value(test_ray)
    yield ray, nodes, worker
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pattern_dataset(tmp_path_factory.mktemp("cluster") / "data", per_class=12)


@pytest.fixture(scope="module")
def caches(tiny_tflite: Conversion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("caches")
    tiny_tflite.place(folder)
    return folder


@pytest.fixture(scope="module")
def reference(data: Path, caches: Path) -> Path:
    """The local engine's cache."""
    return extract(
        data, TINY_CONFIG, cache=caches / "local.h5", runtime=RUNTIME, engine="local", progress=False, log=quiet()
    ).cache_path


@pytest.fixture(scope="module")
def url(s3: S3, data: Path) -> str:
    return s3.upload(data, "cluster/data")


def ray_extract(source, cache: Path, s3: S3, messages: list[str] | None = None, **options):
    # the endpoint travels as a storage option; the workers' environment would do as well
    return extract(
        source,
        TINY_CONFIG,
        cache=cache,
        runtime=RUNTIME,
        engine="ray",
        batch_size=BATCH,
        chunk_size=BATCH,
        actors=1,
        progress=False,
        log=quiet(messages),
        storage_options={"endpoint_url": s3.endpoint},
        **options,
    )


def test_two_nodes_from_the_object_store_equal_the_local_engine(
    cluster, s3: S3, url: str, reference: Path, caches: Path
) -> None:
    ray, _, _ = cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    context, log = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    before = context.enable_progress_bars, log.level
    summary = ray_extract(url, caches / "store.h5", s3)
    assert summary.engine == "ray" and summary.n_new == load(reference).features.shape[0]
    assert_same_cache(summary.cache_path, reference)
    assert load(summary.cache_path).attrs["dataset_root"] == url
    assert (context.enable_progress_bars, log.level) == before  # the caller's cluster as it was


def test_two_nodes_from_local_files_equal_the_local_engine(
    cluster, s3: S3, data: Path, reference: Path, caches: Path
) -> None:
    summary = ray_extract(data, caches / "disk.h5", s3)
    assert summary.engine == "ray"
    assert_same_cache(summary.cache_path, reference)


def test_auto_engine_takes_the_named_cluster(
    cluster, s3: S3, data: Path, reference: Path, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import engines

    _, nodes, _ = cluster
    messages: list[str] = []
    monkeypatch.setenv("RAY_ADDRESS", nodes.address)
    small = extract(
        data, TINY_CONFIG, cache=caches / "auto-small.h5", runtime=RUNTIME, progress=False, log=quiet(messages)
    )
    assert small.engine == "local"
    assert any(f"under the {engines.RAY_MIN_IMAGES}" in m for m in messages), messages
    monkeypatch.setattr(engines, "RAY_MIN_IMAGES", 10)
    big = extract(
        data, TINY_CONFIG, cache=caches / "auto-big.h5", runtime=RUNTIME, actors=1, progress=False, log=quiet(messages)
    )
    assert big.engine == "ray" and any(m.startswith(f"engine: ray (RAY_ADDRESS={nodes.address}") for m in messages)
    assert_same_cache(big.cache_path, reference)


def test_killed_worker_node_leaves_a_clean_cache_that_a_rerun_completes(
    cluster, s3: S3, url: str, reference: Path, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import test_ray

    from pipeline import engine_ray
    from pipeline import extract as extract_module

    _, nodes, worker = cluster
    monkeypatch.setattr(extract_module, "make_runtime", functools.partial(test_ray.slow_make_runtime, register=False))
    monkeypatch.setattr(engine_ray, "BLOCKS_PER_BATCH", 1)  # rows come back steadily
    cache, outcome = caches / "killed.h5", {}

    def run() -> None:
        try:
            outcome["summary"] = ray_extract(url, cache, s3)
        except BaseException as exc:  # noqa: BLE001 (whatever Ray raised: the test looks at the cache after it)
            outcome["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    test_ray.wait_until(
        lambda: test_ray.journal_chunks(cache) >= 1 or not driver.is_alive(), what="the first journal chunk"
    )
    assert driver.is_alive(), f"the run ended before the kill: {outcome}"
    chunks, killed_at = test_ray.journal_chunks(cache), time.monotonic()
    nodes.remove_node(worker, allow_graceful=False)  # its raylet, object store and workers die at once
    driver.join(timeout=400)
    assert not driver.is_alive(), "the run hung after the worker node died"
    print(
        f"worker node killed with {chunks} chunks written; the run ended {time.monotonic() - killed_at:.1f} s "
        f"later: {'finished' if 'summary' in outcome else repr(outcome.get('error'))[:200]}"
    )
    monkeypatch.undo()
    rerun = ray_extract(url, cache, s3)
    total = load(reference).features.shape[0]
    if "summary" in outcome:  # Ray retried the lost tasks on the head: nothing is missing
        assert outcome["summary"].n_new == total and rerun.n_new == 0
    else:  # the run failed: what it wrote is kept, the re-run extracts only the rest
        assert rerun.n_resumed >= BATCH and rerun.n_new + rerun.n_resumed == total
    assert_same_cache(cache, reference)
