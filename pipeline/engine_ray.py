"""The Ray engine (`extract --engine ray`): the streaming engine's mapper and writer on a Ray Data pipeline.

CPU tasks read each file's bytes, check them against the content hash the driver computed, and
decode those very bytes with the project's decoder. Workers never assume the driver's file system:
objects (s3://...) they fetch from the store themselves; local files are read by tasks pinned to the
driver's node, which hand the bytes on, unless the run started its own one-machine cluster. Then a
pool of actors runs the runtime (each actor builds it once: TFLite on CPUs, from the model bytes the
driver sends; Keras on a GPU); the driver writes every batch through the same sink as the local
engine as it arrives, so the journal grows chunk by chunk and a killed run resumes from it. Ray Data
retries a failed task and restarts a killed actor by default; a retried batch never duplicates a row
(rows are keyed by content hash and the cache is committed from the scan) nor loses one (the driver
writes only batches that came out, and counts them).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UserError, install_hint
from .runtime import TFLiteRuntime, tflite_from_bytes
from .storage import is_url
from .stream import (
    HASH,
    PATH,
    RUNTIME,
    FeatureMapper,
    FeatureSink,
    RunResult,
    RuntimeFactory,
    StorageOptions,
    Task,
    decode_columns,
    progress_bar,
    read_columns,
    task_columns,
)

logger = logging.getLogger(__name__)

RAY_INSTALL = install_hint("ray")
BLOCKS_PER_BATCH = 4  # batches per Ray Data block: fewer, larger tasks keep the per-task overhead small
DECODE_WORKER_MEMORY = 256 << 20  # bytes; a decode worker measured 130 MiB with 128 images of 224 px
READ_TASKS = 2  # tasks at once reading local files on the driver's node for the other nodes


def require_ray(ray_address: str | None = None) -> Any:
    """The ray module, or a UserError saying how to install it (or why ray_address cannot work)."""
    try:
        import ray
        import ray.data  # noqa: F401 (the Data library is the `ray[data]` extra)
    except ImportError:
        raise UserError(f"--engine ray needs Ray Data, which is not installed: {RAY_INSTALL}.") from None
    if ray_address and ray_address.startswith("ray://"):
        # Ray Data's executor needs a real driver (ray-project/ray#48682); Ray Client has no core worker
        raise UserError(
            f"--ray-address {ray_address}: Ray Data does not run through Ray Client (ray://). Run "
            "extract on a node of the cluster with --ray-address auto (or HEAD_IP:6379), for "
            "instance with `ray job submit -- cnncodes extract ... --engine ray --ray-address auto`."
        )
    return ray


def connect(ray_address: str | None) -> bool:
    """Join the cluster at ray_address, or start a local one on every core; True when this call started Ray."""
    ray = require_ray()
    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use its cluster
        return False
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    try:
        if ray_address:
            # the driver's pipeline package goes to the workers, so every node runs the same code
            ray.init(address=ray_address, runtime_env={"py_modules": [str(Path(__file__).parent)]}, **quiet)
        else:
            # "local": a new cluster even when `ray start` left one running here (that one needs --ray-address);
            # two CPUs at least, one for the actor and one for decoding, even on a one-core machine
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, **quiet)
    except ConnectionError as exc:
        raise UserError(
            f"--ray-address {ray_address}: no Ray cluster answered ({exc}). Start one with "
            "`ray start --head`, or omit --ray-address for a local one."
        ) from None
    return True


def describe(make_runtime: RuntimeFactory) -> tuple[str, int]:
    """Build the runtime once and return its name and image size."""
    runtime = make_runtime()
    return runtime.name, runtime.image_size


def probe(make_runtime: RuntimeFactory, gpus_per_actor: float) -> tuple[str, int, RuntimeFactory]:
    """(runtime name, image size) as the actors will see them, and the factory the actors build theirs with.

    CPU actors get the model the driver built (converted to TFLite once, beside the cache) as bytes: a
    node need not see the driver's files. With GPUs the probe runs in a one-shot task on a GPU worker,
    which exits after it: the driver never holds GPU memory and builds the runtime the actors build
    (Keras there, from the backbone's name or file as that node sees it).
    """
    if gpus_per_actor:
        ray = require_ray()
        remote = ray.remote(num_gpus=gpus_per_actor, max_calls=1)(describe)
        return (*ray.get(remote.remote(make_runtime)), make_runtime)
    runtime = make_runtime()
    if isinstance(runtime, TFLiteRuntime):
        return (
            runtime.name,
            runtime.image_size,
            functools.partial(tflite_from_bytes, runtime.path.read_bytes(), runtime.threads),
        )
    return runtime.name, runtime.image_size, make_runtime


def inference_actors(actors: int | None, gpus_per_actor: float) -> int:
    """The inference pool's size: actors, or one per node with CPUs (with GPUs, as many as the GPUs hold).

    Each actor reserves a CPU and the decoding tasks need at least one more: a pool that leaves
    none would wait forever, so it is refused.
    """
    ray = require_ray()
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), resources.get("GPU", 0)
    if gpus_per_actor and gpus < gpus_per_actor:
        raise UserError(
            f"--gpus-per-actor {gpus_per_actor:g}, but the Ray cluster has {gpus:g} GPU(s); "
            "use --gpus-per-actor 0 for CPU actors."
        )
    if actors is None:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1)
        actors = max(1, min(int(gpus // gpus_per_actor) if gpus_per_actor else nodes, cpus - 1))
    if actors + 1 > cpus:
        raise UserError(
            f"--actors {actors}: each inference actor reserves a CPU and decoding needs one more, "
            f"but the Ray cluster has {cpus} CPUs; use --actors {max(1, cpus - 1)} or fewer."
        )
    return actors


def on_this_node(ray: Any, map_batches: Callable[..., Any]) -> dict[str, Any]:
    """map_batches' arguments that keep a stage's tasks on the driver's node: the node-id label selector where
    Ray has it (as Ray Data's own reads of local files do), else the older node-affinity strategy."""
    node = ray.get_runtime_context().get_node_id()
    if "label_selector" in inspect.signature(map_batches).parameters:
        return {"label_selector": {"ray.io/node-id": node}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def pipeline(
    tasks: Sequence[Task],
    make_runtime: RuntimeFactory,
    size: int,
    resize: str,
    batch_size: int,
    actors: int,
    gpus_per_actor: float,
    workers: int | None,
    storage_options: StorageOptions = None,
    read_on_driver_node: bool = False,
) -> Any:
    """The Ray Data dataset: task rows [-> read tasks on the driver's node] -> decode tasks -> inference actors
    (lazy until iterated)."""
    ray = require_ray()
    block = batch_size * BLOCKS_PER_BATCH
    rows = task_columns(tasks)
    items = [{HASH: h, PATH: p} for h, p in zip(rows[HASH], rows[PATH])]
    n_blocks = math.ceil(len(items) / block)
    dataset = ray.data.from_items(items, override_num_blocks=n_blocks)
    if read_on_driver_node:
        # no CPU asked: reading waits on the disk, and the driver's node may have no CPU to give (num_cpus=0)
        dataset = dataset.map_batches(
            read_columns,
            batch_size=None,
            fn_kwargs={"storage_options": storage_options},
            compute=ray.data.TaskPoolStrategy(size=min(READ_TASKS, n_blocks)),
            num_cpus=0,
            **on_this_node(ray, dataset.map_batches),
        )
    # A decode worker's footprint (Python, Pillow, its block's bytes and images); asking for it also keeps
    # the stage out of the actors (Ray fuses a task stage into the next actor stage when resources are equal).
    memory = DECODE_WORKER_MEMORY + 2 * block * size * size * 3
    return dataset.map_batches(
        decode_columns,
        batch_size=None,
        compute=ray.data.TaskPoolStrategy(size=workers),
        fn_kwargs={"size": size, "resize": resize, "verify_hash": True, "storage_options": storage_options},
        num_cpus=1,
        memory=memory,
    ).map_batches(
        FeatureMapper,
        batch_size=batch_size,
        fn_constructor_args=(make_runtime, resize),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus_per_actor or None,
        # TensorFlow takes a whole GPU's memory by default; actors sharing one must not
        runtime_env={"env_vars": {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}} if gpus_per_actor else None,
    )


def run_ray(
    tasks: Sequence[Task],
    make_runtime: RuntimeFactory,
    sink: FeatureSink,
    *,
    resize: str = "bilinear",
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    ray_address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    storage_options: StorageOptions = None,
) -> RunResult:
    """Extract every task on a Ray cluster (a local one unless ray_address), writing through sink in this process.

    workers caps the decoding tasks running at once (default: as many as the cluster's CPUs allow);
    actors is the size of the inference pool (default: one per node, or as many as the GPUs hold).
    storage_options (resolved, see pipeline.storage.storage_options) go to the workers that read objects.
    A cluster the caller connected to is left as it was found (Ray Data's context, its log level).
    """
    ray = require_ray(ray_address)
    started = time.perf_counter()
    started_ray = connect(ray_address)
    if started_ray:
        what = f"joined the Ray cluster at {ray_address}" if ray_address else "started a local Ray cluster"
        log(f"{what} in {time.perf_counter() - started:.1f} s")
    context, ray_log = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = context.enable_progress_bars, ray_log.level
    try:
        context.enable_progress_bars = False  # ours counts images, not blocks
        ray_log.setLevel(logging.ERROR)  # its notices and tuning advice
        n_actors = inference_actors(actors, gpus_per_actor)
        name, size, actor_runtime = probe(make_runtime, gpus_per_actor)
        per_actor = f" with {gpus_per_actor:g} GPU each" if gpus_per_actor else ""
        where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray cluster"
        log(
            f"extracting {len(tasks)} new images with {name} on {where}: {n_actors} inference "
            f"actor{'s' if n_actors > 1 else ''}{per_actor} and decoding tasks on "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs"
        )
        # a cluster this run started on this machine shares its disk; any other may have nodes that do not
        ship = not started_ray or bool(ray_address)
        local_input = not any(is_url(t.file.path) for t in tasks)
        dataset = pipeline(
            tasks,
            actor_runtime,
            size,
            resize,
            batch_size,
            n_actors,
            gpus_per_actor,
            workers,
            storage_options,
            read_on_driver_node=ship and local_input,
        )
        result, done = _write_all(dataset, sink, len(tasks), progress)
    finally:
        context.enable_progress_bars = saved[0]
        ray_log.setLevel(saved[1])
        if started_ray:
            ray.shutdown()
    lost = len({t.content_hash for t in tasks} - done)
    if lost and not result.interrupted:  # Ray's retries should make this impossible; never commit silently
        log(f"warning: {lost} images did not come back from the Ray pipeline; run extract again for them")
    return result


def _write_all(dataset: Any, sink: FeatureSink, total: int, progress: bool) -> tuple[RunResult, set[str]]:
    """Iterate the pipeline in the driver and write each batch as it arrives; Ctrl-C keeps what is written.

    Returns the result and the content hashes written (a retried batch may bring some twice).
    """
    result, done = RunResult(), set()
    bar = progress_bar(total, progress)
    started = last_write = time.perf_counter()
    try:
        for columns in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if result.first_batch_at is None:
                result.first_batch_at = time.time()
                result.runtime = str(columns[RUNTIME][0])
            fresh = set(np.asarray(columns[HASH]).astype(str)) - done
            sink.write_columns(columns)
            done |= fresh
            result.n_done += len(fresh)
            bar.update(len(fresh))
            last_write = time.perf_counter()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        # to the last row written, as the local engine counts (Ray Data's shutdown of its actors comes after)
        result.seconds = last_write - started
    return result, done
