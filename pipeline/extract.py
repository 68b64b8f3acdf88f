"""The streaming loop: scan, skip what the cache holds, decode in parallel with inference, append, commit."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import __version__
from .backbones import BackboneConfig, library_version
from .cache import CacheWriter, Row
from .images import ImageError, ImageFile, decode_image, file_sha256, scan_dataset
from .params import Interval, Options, check_params
from .runtime import RUNTIMES, Runtime, make_runtime

DEFAULT_CACHE_DIR = Path("cache")
LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "h5py", "numpy", "pillow", "scikit-learn")

RUN_CONSTRAINTS = {
    "batch_size": [Interval(1, 4096, integer=True)],
    "chunk_size": [Interval(1, 1 << 20, integer=True)],
    "workers": [Interval(1, 256, integer=True), None],
    "threads": [Interval(1, 256, integer=True), None],
    "runtime": [Options(RUNTIMES)],
}


@dataclass
class Batch:
    """One inference batch: the files that decoded with their features, and those that failed."""

    files: list[ImageFile]
    features: np.ndarray
    failed: list[tuple[ImageFile, str]] = field(default_factory=list)


@dataclass
class ExtractSummary:
    """What an extract run did, for the CLI to print and for benchmarks to read."""

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

    @property
    def images_per_s(self) -> float:
        return self.n_new / self.extract_seconds if self.extract_seconds > 0 else 0.0


def default_workers() -> int:
    """Decoding threads: one per core (Pillow releases the GIL while decoding)."""
    return os.cpu_count() or 2


def hash_files(paths: Sequence[Path], workers: int | None = None) -> list[str | Exception]:
    """sha256 of each file, in parallel; an unreadable file gives its exception instead."""
    def one(path: Path) -> str | Exception:
        try:
            return file_sha256(path)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        return list(pool.map(one, paths))


def _decode(file: ImageFile, size: int, resize: str) -> np.ndarray | str:
    try:
        return decode_image(file.path, size, resize)
    except ImageError as exc:
        return str(exc)
    except Exception as exc:  # one bad file never aborts a run, whatever the decoder raises
        return f"could not decode ({type(exc).__name__}: {exc})"


def stream_features(files: Iterable[ImageFile], runtime: Runtime, resize: str = "bilinear",
                    batch_size: int = 32, workers: int | None = None) -> Iterator[Batch]:
    """Decode files on a thread pool (a few batches ahead) while the runtime infers the current batch."""
    size = runtime.image_size
    pending: deque[tuple[ImageFile, Future]] = deque()
    source = iter(files)
    buffer = np.empty((batch_size, size, size, 3), np.uint8)
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        def submit(items: Iterable[ImageFile]) -> None:
            pending.extend((f, pool.submit(_decode, f, size, resize)) for f in items)

        submit(islice(source, 3 * batch_size))
        try:
            batch = Batch([], np.empty((0, runtime.dim), np.float32))
            while pending:
                file, future = pending.popleft()
                submit(islice(source, 1))
                image = future.result()
                if isinstance(image, str):
                    batch.failed.append((file, image))
                else:
                    buffer[len(batch.files)] = image
                    batch.files.append(file)
                if len(batch.files) == batch_size or not pending:
                    batch.features = runtime(buffer[:len(batch.files)]) if batch.files else batch.features
                    yield batch
                    batch = Batch([], np.empty((0, runtime.dim), np.float32))
        finally:
            for _, future in pending:
                future.cancel()


def default_cache_path(dataset_root: Path, config: BackboneConfig, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """cache/<dataset>-<backbone>[-<layer>]-<size>-<fingerprint>.h5: one file per configuration."""
    return Path(cache_dir) / f"{dataset_root.name}-{config.short_name}-{config.fingerprint()[:8]}.h5"


def _cache_attrs(config: BackboneConfig, dataset_root: Path, n_ignored: int) -> dict[str, Any]:
    versions = {"cnncodes": __version__, **{name: library_version(name) for name in LIBRARIES}}
    return {"dataset_root": str(dataset_root), "n_ignored": n_ignored,
            "backbone_path": config.backbone if config.weights == "file" else "",
            "weights_path": config.weights if os.path.isfile(config.weights) else "",
            "config_json": json.dumps(config.__dict__), "versions_json": json.dumps(versions),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def extract(data_dir: str | os.PathLike, config: BackboneConfig = BackboneConfig(), *,
            cache: str | os.PathLike | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
            batch_size: int = 32, chunk_size: int = 256, workers: int | None = None,
            runtime: str = "auto", threads: int | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> ExtractSummary:
    """Bring the cache of data_dir for this backbone configuration up to date; return what was done."""
    started = time.perf_counter()
    check_params(dict(batch_size=batch_size, chunk_size=chunk_size, workers=workers, threads=threads,
                      runtime=runtime), RUN_CONSTRAINTS)
    config = config.resolved()
    dataset = scan_dataset(data_dir)
    path = Path(cache) if cache else default_cache_path(dataset.root, config, Path(cache_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    hashes = hash_files([f.path for f in dataset.files], workers)
    unreadable = [(f.relpath, f"unreadable: {h}") for f, h in zip(dataset.files, hashes) if isinstance(h, Exception)]
    files = [(f, h) for f, h in zip(dataset.files, hashes) if isinstance(h, str)]
    writer = CacheWriter(path, config.identity(), config.fingerprint(), chunk_size)
    todo: dict[str, ImageFile] = {}
    for f, h in files:
        if not writer.has(h):
            todo.setdefault(h, f)  # byte-identical files are decoded once
    n_known = sum(1 for _, h in files if h not in todo)
    interrupted, runtime_name, extract_seconds = False, "", 0.0
    if todo:
        engine = make_runtime(config, runtime, tflite_dir=path.parent, threads=threads, log=log)
        runtime_name = engine.name
        hash_of = {id(f): h for h, f in todo.items()}
        log(f"extracting {len(todo)} new images with {engine.name} ({n_known} files already in the cache)")
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            for batch in stream_features(todo.values(), engine, config.resize, batch_size, workers):
                for file, reason in batch.failed:
                    writer.add_skipped(hash_of[id(file)], reason)
                for file, vector in zip(batch.files, batch.features):
                    writer.add(hash_of[id(file)], vector, engine.name)
                bar.update(len(batch.files) + len(batch.failed))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            extract_seconds = time.perf_counter() - t0
    rows = [Row(f.relpath, f.label, f.split, h) for f, h in files]
    n_rows, _ = writer.commit(rows, dataset.class_names, _cache_attrs(config, dataset.root, len(dataset.ignored)),
                              unreadable)
    skipped = unreadable + [(f.relpath, writer.skip_reason(h)) for f, h in files if writer.skip_reason(h)]
    n_new = sum(1 for _, h in files if h in todo and writer.has_features(h))
    # journalled rows of files that are still there (a file deleted since the crash is not resumed)
    n_resumed = sum(1 for _, h in files if h in writer.resumed_hashes)
    return ExtractSummary(path, len(dataset.files), n_rows, n_new, n_known - n_resumed,
                          n_resumed, skipped, len(dataset.ignored), time.perf_counter() - started,
                          extract_seconds, runtime_name, interrupted)


def summary_lines(summary: ExtractSummary, max_listed: int = 20) -> list[str]:
    """The end-of-run report: counts, speed, and every skipped file with its reason."""
    lines = [f"cache: {summary.cache_path} ({summary.n_rows} images)",
             f"  new {summary.n_new}, already cached {summary.n_reused}, resumed from an interrupted run "
             f"{summary.n_resumed}, skipped {len(summary.skipped)}, non-image files ignored {summary.n_ignored}"]
    if summary.n_new:
        lines.append(f"  {summary.images_per_s:.1f} images/s with {summary.runtime} "
                     f"({summary.extract_seconds:.1f} s extracting, {summary.seconds:.1f} s in all)")
    if summary.skipped:
        lines.append(f"  skipped files ({len(summary.skipped)}; also listed in the cache under skipped/):")
        lines += [f"    {path}: {reason}" for path, reason in summary.skipped[:max_listed]]
        if len(summary.skipped) > max_listed:
            lines.append(f"    ... and {len(summary.skipped) - max_listed} more")
    if summary.interrupted:
        lines.append("interrupted: the cache holds everything finished so far; run the same command to resume.")
    return lines
