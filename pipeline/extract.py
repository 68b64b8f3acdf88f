"""The extract command: scan, skip what the caches hold, run the streaming engine, commit, summarise."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .artifacts import output_dir
from .backbones import BackboneConfig, library_version
from .cache import CacheWriter, Row
from .engines import choose, cluster_address, run
from .errors import UserError
from .images import scan_dataset
from .params import ParamError, check_params
from .runtime import make_runtime
from .storage import storage_options as resolve_storage_options
from .stream import FeatureSink, RunResult, hash_files, read_tasks
from .views import VIEWS_ATTR, ViewRecipe, ViewsRuntime, refuse_other_recipe, views_path

logger = logging.getLogger(__name__)

LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "h5py", "numpy", "pillow", "scikit-learn")


@dataclass
class ExtractSummary:
    """What an extract run did to one cache, for the CLI to print and for benchmarks to read."""

    cache_path: Path
    n_files: int
    n_rows: int
    n_new: int
    n_reused: int
    n_resumed: int
    skipped: list[tuple[str, str]]
    n_ignored: int
    seconds: float
    extract_seconds: float
    runtime: str = ""
    interrupted: bool = False
    first_batch_s: float | None = None  # from process start to the first batch out of the runtime
    engine: str = "local"
    layer: str = ""

    @property
    def images_per_s(self) -> float:
        return self.n_new / self.extract_seconds if self.extract_seconds > 0 else 0.0


def process_start_time() -> float | None:
    """When this process started, on time.time()'s clock (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # field 22 (starttime, clock ticks after boot) is the 20th after the parenthesised command name
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            seconds_since_boot = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - seconds_since_boot + started_ticks / os.sysconf("SC_CLK_TCK")


def default_cache_path(
    dataset_root: Path | str,
    config: BackboneConfig,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """CACHE_DIR/<dataset>-<backbone>[-<layer>]-<size>-<fingerprint>.h5: one file per configuration (<dataset>: the
    last name of the folder or of the object-store URL; CACHE_DIR: the output home's cache/ folder by default)."""
    name = str(dataset_root).rstrip("/").rsplit("/", 1)[-1]
    folder = Path(cache_dir) if cache_dir is not None else output_dir("cache")
    return folder / f"{name}-{config.short_name}-{config.fingerprint()[:8]}.h5"


def _cache_attrs(config: BackboneConfig, dataset_root: Path | str, n_ignored: int) -> dict[str, Any]:
    versions = {"cnncodes": __version__, **{name: library_version(name) for name in LIBRARIES}}
    return {
        "dataset_root": str(dataset_root),
        "n_ignored": n_ignored,
        "backbone_path": config.backbone if config.weights == "file" else "",
        "weights_path": config.weights if os.path.isfile(config.weights) else "",
        "config_json": json.dumps(config.__dict__),
        "versions_json": json.dumps(versions),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def extract_layers(
    data_dir: str | os.PathLike,
    config: BackboneConfig,
    layers: Sequence[str | None],
    *,
    caches: Sequence[str | os.PathLike | None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    workers: int | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    engine: str = "auto",
    compact: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    ray_address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    storage_options: str | dict[str, Any] | None = None,
    views: ViewRecipe | None = None,
) -> list[ExtractSummary]:
    """Bring one cache per layer up to date with one forward pass per batch; one summary per layer.

    Each layer's cache is the file `extract --layer L` uses (same name and fingerprint); an image
    goes through the backbone when at least one of the caches lacks it. data_dir is a folder or an
    object-store URL (s3://bucket/prefix; storage_options: fsspec's, as JSON text or a dict, else
    $CNNCODES_STORAGE_OPTIONS). engine "auto" picks local or ray (pipeline.engines.choose); ray_address,
    actors and gpus_per_actor configure the ray engine (see pipeline.engine_ray.run_ray). views: also bring each
    cache's augmented views (pipeline/views.py) up to date, in a second pass (local) over the images lacking them.
    """
    started = time.perf_counter()
    ray_options = dict(ray_address=ray_address, actors=actors, gpus_per_actor=gpus_per_actor)
    check_params(
        dict(
            batch_size=batch_size,
            chunk_size=chunk_size,
            workers=workers,
            threads=threads,
            runtime=runtime,
            engine=engine,
            **ray_options,
        )
    )
    address, _ = cluster_address(ray_address)
    if views is not None and engine == "ray":
        raise ParamError("{} works with the local engine only (its views pass runs here).", "views")
    if engine == "ray" or (engine == "auto" and address):
        from .engine_ray import require_ray

        require_ray(address)  # said before the scan and the hashing, which take minutes on big data
    elif ray_address is not None or actors is not None or gpus_per_actor:
        raise ParamError(
            "{}, {} and {} apply to the ray engine only: use {} ray, or {} auto with a cluster named "
            "({} or RAY_ADDRESS).",
            "ray_address",
            "actors",
            "gpus_per_actor",
            "engine",
            "engine",
            "ray_address",
        )
    options = resolve_storage_options(storage_options)
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise UserError(f"layers {layers} must name at least one layer, each once.")
    if caches is not None and len(caches) != len(layers):
        raise UserError(f"{len(caches)} cache paths for {len(layers)} layers: give one per layer, or none.")
    configs = [replace(config, layer=layer).resolved() for layer in layers]
    dataset = scan_dataset(data_dir, options)
    paths = [
        Path(c) if c else default_cache_path(dataset.root, cfg, cache_dir)
        for c, cfg in zip(caches or [None] * len(layers), configs)
    ]
    if len({p.resolve() for p in paths}) != len(paths):
        raise UserError(
            f"two layers would write the same cache file ({', '.join(map(str, paths))}); "
            "give each layer its own cache path."
        )
    hashes = hash_files([f.path for f in dataset.files], workers, options)
    unreadable = [(f.relpath, f"unreadable: {h}") for f, h in zip(dataset.files, hashes) if isinstance(h, Exception)]
    files = [(f, h) for f, h in zip(dataset.files, hashes) if isinstance(h, str)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    writers = [CacheWriter(p, cfg.identity(), cfg.fingerprint(), chunk_size) for p, cfg in zip(paths, configs)]
    lacked = [{h for _, h in files if not w.has(h)} for w in writers]  # per cache, before this run
    for writer in writers:
        if writer.lost_hashes:
            log(f"note: {writer.path} lost shard files of {len(writer.lost_hashes)} rows; extracting them again")
    tasks = read_tasks(files, writers)
    chosen, why = choose(engine, len(tasks), ray_address)
    if engine == "auto" and tasks:
        log(f"engine: {chosen} ({why})")
    result, sink = RunResult(), FeatureSink(writers)
    if tasks:
        # one model for every layer; a single layer builds exactly the model `extract --layer` builds
        factory = functools.partial(
            make_runtime,
            configs[0],
            runtime,
            tflite_dir=paths[0].parent,
            threads=threads,
            log=log,
            layers=layers if len(layers) > 1 else None,
        )
        known = sum(1 for _, h in files if all(w.has(h) for w in writers))
        log(f"{known} of {len(files)} files already in the cache{'s' * (len(writers) > 1)}")
        result = run(
            tasks,
            factory,
            sink,
            engine=chosen,
            resize=configs[0].resize,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            log=log,
            storage_options=options,
            engine_options={**ray_options, "ray_address": address} if chosen == "ray" else None,
        )
    if views is not None and not result.interrupted:
        result.interrupted = _extract_views(
            files,
            configs,
            paths,
            layers,
            views,
            chunk_size,
            runtime,
            threads,
            batch_size,
            workers,
            progress,
            log,
            dataset,
            options,
        )
    process_start = process_start_time()
    first_batch_s = (
        result.first_batch_at - process_start
        if result.first_batch_at is not None and process_start is not None
        else None
    )
    if sink.retry:
        log(
            f"warning: {len(sink.retry)} images could not be read this time ({next(iter(sink.retry.values()))}); "
            "they are listed as skipped and tried again by the next run"
        )
        unreadable += [(f.relpath, sink.retry[h]) for f, h in files if h in sink.retry]
    rows = [Row(f.relpath, f.label, f.split, h) for f, h in files]
    summaries = []
    for writer, cfg, path, missing in zip(writers, configs, paths, lacked):
        n_rows, _ = writer.commit(
            rows,
            dataset.class_names,
            _cache_attrs(cfg, dataset.root, len(dataset.ignored)),
            unreadable,
            compact=compact,
        )
        skipped = unreadable + [(f.relpath, writer.skip_reason(h)) for f, h in files if writer.skip_reason(h)]
        n_new = sum(1 for _, h in files if h in missing and writer.has_features(h))
        # journalled rows of files that are still there (a file deleted since the crash is not resumed)
        n_resumed = sum(1 for _, h in files if h in writer.resumed_hashes)
        n_known = sum(1 for _, h in files if h not in missing)
        summaries.append(
            ExtractSummary(
                path,
                len(dataset.files),
                n_rows,
                n_new,
                n_known - n_resumed,
                n_resumed,
                skipped,
                len(dataset.ignored),
                time.perf_counter() - started,
                result.seconds,
                result.runtime,
                result.interrupted,
                first_batch_s,
                chosen,
                cfg.layer or "",
            )
        )
    return summaries


def _extract_views(
    files: Sequence[tuple[Any, str]],
    configs: Sequence[BackboneConfig],
    paths: Sequence[Path],
    layers: Sequence[str | None],
    recipe: ViewRecipe,
    chunk_size: int,
    runtime: str,
    threads: int | None,
    batch_size: int,
    workers: int | None,
    progress: bool,
    log: Callable[[str], None],
    dataset: Any,
    storage_options: dict[str, Any],
) -> bool:
    """The views pass: each image lacking views decoded once, its K views through the backbone, written to the
    companion caches (streamed in chunks like the clean features). Returns whether it was interrupted."""
    for path in paths:
        refuse_other_recipe(path, recipe)
    writers = [
        CacheWriter(
            views_path(p),
            {**cfg.identity(), VIEWS_ATTR: recipe.to_json()},
            recipe.fingerprint(cfg.fingerprint()),
            chunk_size,
        )
        for p, cfg in zip(paths, configs)
    ]
    tasks = read_tasks(files, writers)
    if tasks:
        log(f"{len(files) - len(tasks)} of {len(files)} files already have their {recipe.k} views")
        factory = functools.partial(
            make_runtime,
            configs[0],
            runtime,
            tflite_dir=paths[0].parent,
            threads=threads,
            log=log,
            layers=layers if len(layers) > 1 else None,
        )
        result = run(
            tasks,
            lambda: ViewsRuntime(factory(), recipe, configs[0].resize),
            FeatureSink(writers),
            resize=configs[0].resize,
            batch_size=max(1, batch_size // recipe.k),
            workers=workers,
            progress=progress,
            log=log,
            storage_options=storage_options,
        )
    rows = [Row(f.relpath, f.label, f.split, h) for f, h in files]
    for writer, cfg in zip(writers, configs):
        writer.commit(
            rows,
            dataset.class_names,
            {**_cache_attrs(cfg, dataset.root, len(dataset.ignored)), VIEWS_ATTR: recipe.to_json()},
        )
    return bool(tasks) and result.interrupted


def extract(
    data_dir: str | os.PathLike,
    config: BackboneConfig = BackboneConfig(),
    *,
    cache: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    workers: int | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    engine: str = "auto",
    compact: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    ray_address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    storage_options: str | dict[str, Any] | None = None,
    views: ViewRecipe | None = None,
) -> ExtractSummary:
    """Bring the cache of data_dir (a folder or an object-store URL) for this backbone configuration up to date;
    return what was done."""
    return extract_layers(
        data_dir,
        config,
        [config.layer],
        caches=[cache],
        cache_dir=cache_dir,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        runtime=runtime,
        threads=threads,
        engine=engine,
        compact=compact,
        progress=progress,
        log=log,
        ray_address=ray_address,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        storage_options=storage_options,
        views=views,
    )[0]


def summary_lines(summary: ExtractSummary, max_listed: int = 20) -> list[str]:
    """The end-of-run report: counts, speed, and every skipped file with its reason."""
    lines = [
        f"cache: {summary.cache_path} ({summary.n_rows} images)",
        f"  new {summary.n_new}, already cached {summary.n_reused}, resumed from an interrupted run "
        f"{summary.n_resumed}, skipped {len(summary.skipped)}, non-image files ignored {summary.n_ignored}",
    ]
    if summary.n_new:
        lines.append(
            f"  {summary.images_per_s:.1f} images/s with {summary.runtime} "
            f"({summary.extract_seconds:.1f} s extracting, {summary.seconds:.1f} s in all)"
        )
    if summary.first_batch_s is not None:
        lines.append(f"  first batch after {summary.first_batch_s:.2f} s from process start")
    if summary.skipped:
        lines.append(f"  skipped files ({len(summary.skipped)}; also listed in the cache under skipped/):")
        lines += [f"    {path}: {reason}" for path, reason in summary.skipped[:max_listed]]
        if len(summary.skipped) > max_listed:
            lines.append(f"    ... and {len(summary.skipped) - max_listed} more")
    if summary.interrupted:
        lines.append("interrupted: the cache holds everything finished so far; run the same command to resume.")
    return lines
