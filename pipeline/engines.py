"""The extraction engines by name, each runner imported only when its engine runs, and `auto`'s choice.

An engine's runner takes (tasks, make_runtime, sink) and the keywords of pipeline.stream.run_local, plus
its own options; it returns a RunResult. pipeline.stream knows no engine; pipeline.extract asks here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, Sequence

from .params import Interval, Options, check_params, define
from .stream import RunResult

# name -> "module:function" of its runner (imported lazily: Ray is an optional, heavy dependency)
RUNNERS = {"local": "pipeline.stream:run_local", "ray": "pipeline.engine_ray:run_ray"}
ENGINES = ("auto", *RUNNERS)
define(
    engine=[Options(ENGINES)],
    ray_address=[str, None],
    actors=[Interval(1, 4096, integer=True), None],
    gpus_per_actor=[Interval(0, 64)],
)
# `auto` runs on a named Ray cluster from this many new images: below it, joining the cluster and starting its
# actors (3-6 s) costs more than a second node saves at about 90 images/s per node (see docs/scale-out.md)
RAY_MIN_IMAGES = 2000


def cluster_address(ray_address: str | None) -> tuple[str | None, str]:
    """The Ray cluster named by --ray-address, else by $RAY_ADDRESS, and which of them named it."""
    if ray_address:
        return ray_address, f"--ray-address {ray_address}"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    return None, ""


def choose(engine: str, n_new: int, ray_address: str | None) -> tuple[str, str]:
    """(engine to run, why): `auto` takes Ray when a cluster is named and there are enough new images."""
    if engine != "auto":
        return engine, "as asked"
    address, named_by = cluster_address(ray_address)
    if address is None:
        return "local", "no Ray cluster named (--ray-address or RAY_ADDRESS)"
    if n_new < RAY_MIN_IMAGES:
        return "local", (
            f"{n_new} new images, under the {RAY_MIN_IMAGES} where the cluster at {named_by} pays for its start-up"
        )
    return "ray", f"{named_by} names a cluster and there are {n_new} new images"


def runner(engine: str) -> Callable[..., Any]:
    """The run function of an engine (its module imported now)."""
    check_params(dict(engine=engine))
    if engine not in RUNNERS:
        raise ValueError(f"engine {engine!r} must be chosen (engines.choose) before it runs")
    module, function = RUNNERS[engine].split(":")
    return getattr(importlib.import_module(module), function)


def run(
    tasks: Sequence[Any],
    make_runtime: Callable[[], Any],
    sink: Any,
    *,
    engine: str = "local",
    engine_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """Extract every task into the sink with the named engine; options as pipeline.stream.run_local takes them,
    engine_options the engine's own (run_ray's ray_address, actors, gpus_per_actor)."""
    if not tasks:
        return RunResult()
    return runner(engine)(tasks, make_runtime, sink, **options, **(engine_options or {}))
