"""The streaming engine: what to extract, decoding with inference, writing, under a chosen engine.

Built like clip-retrieval's inference: a READER turns the scanned files into tasks (one per content
some cache lacks, `read_tasks`), a MAPPER decodes a batch with the project's decoder and runs the
runtime on it (`stream_features`, and `FeatureMapper` for engines that ship batches to workers), a
WRITER fans each image's outputs out to one CacheWriter per layer (`FeatureSink`), and a RUNNER
composes them (pipeline.engines.run). The distribution strategy is separate: `run_local` decodes on
a thread pool a few batches ahead of one in-process runtime; other engines (pipeline.engines names
them) map batches elsewhere with the same mapper and write through the same sink in the driver.
Files are local paths or object-store URLs (pipeline.storage); storage_options reach the latter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .cache import CacheWriter
from .images import ImageError, ImageFile, decode_image, file_sha256
from .params import Interval, define
from .runtime import Runtime
from .storage import IO_THREADS, is_url, read_bytes, read_many

logger = logging.getLogger(__name__)

define(chunk_size=[Interval(1, 1 << 20, integer=True)])
# Column names of a batch of tasks as it goes through the mapper (a dict of arrays, one row per task:
# Ray Data's "numpy" batch format). IMAGE holds decoded uint8 pixels between the decode and infer halves;
# BYTES a file's bytes, read where the file is (ERROR says why not) for a decoder on another machine.
HASH, PATH, ERROR, RUNTIME, IMAGE, BYTES = "content_hash", "path", "error", "runtime", "image", "bytes"
StorageOptions = Mapping[str, Any] | None
RuntimeFactory = Callable[[], Runtime]


def features_column(k: int) -> str:
    """The column of a mapped batch holding the k-th runtime output (the k-th layer)."""
    return f"features_{k}"


def default_workers(remote: bool = False) -> int:
    """Decoding threads: one per core (Pillow releases the GIL while decoding), more for objects (a thread
    mostly waits for its object to arrive)."""
    return max(os.cpu_count() or 2, IO_THREADS if remote else 1)


def hash_files(
    paths: Sequence[Path | str], workers: int | None = None, storage_options: StorageOptions = None
) -> list[str | Exception]:
    """sha256 of each file or object, in parallel; an unreadable one gives its exception instead."""
    if any(is_url(p) for p in paths):  # objects come whole, many at once: hash the bytes that came
        return [
            hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else data
            for data in read_many(paths, storage_options)
        ]

    def one(path: Path | str) -> str | Exception:
        try:
            return file_sha256(path)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        return list(pool.map(one, paths))


def decode_file(
    source: str | os.PathLike | bytes, size: int, resize: str, storage_options: StorageOptions = None
) -> np.ndarray | str:
    """One file (a path, an object's URL or the bytes) through the project's decoder: uint8 (size, size, 3), or
    the reason it failed (never raises)."""
    if isinstance(source, (str, os.PathLike)) and is_url(source):
        try:
            source = read_bytes(source, storage_options)
        except Exception as exc:  # any failure of the store (a network, a credential): read again next run
            return f"unreadable: {type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else f"unreadable: {exc}"
    try:
        return decode_image(source, size, resize)
    except ImageError as exc:
        return str(exc)
    except Exception as exc:  # one bad file never aborts a run, whatever the decoder raises
        return f"could not decode ({type(exc).__name__}: {exc})"


def output_dims(runtime: Runtime) -> list[int]:
    """The width of each output: a multi-output runtime's `dims`, else its one `dim`."""
    return list(getattr(runtime, "dims", None) or [runtime.dim])


def as_outputs(result: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """A runtime's result as a list of arrays (a multi-output runtime already returns one)."""
    return list(result) if isinstance(result, (list, tuple)) else [result]


@dataclass
class Batch:
    """One inference batch: the files that decoded with one features array per output, and those that failed."""

    files: list[ImageFile]
    outputs: list[np.ndarray]  # (len(files), dim_k) float32 for each runtime output
    failed: list[tuple[ImageFile, str]] = field(default_factory=list)

    @property
    def features(self) -> np.ndarray:
        """The features of a single-output runtime."""
        return self.outputs[0]


def stream_features(
    files: Iterable[ImageFile],
    runtime: Runtime,
    resize: str = "bilinear",
    batch_size: int = 32,
    workers: int | None = None,
    storage_options: StorageOptions = None,
) -> Iterator[Batch]:
    """Decode files on a thread pool (a few batches ahead) while the runtime infers the current batch."""
    size = runtime.image_size
    empty = [np.empty((0, d), np.float32) for d in output_dims(runtime)]
    pending: deque[tuple[ImageFile, Future]] = deque()
    source = iter(files)
    first = next(source, None)
    source = chain([first] if first is not None else [], source)
    buffer = np.empty((batch_size, size, size, 3), np.uint8)
    with ThreadPoolExecutor(workers or default_workers(first is not None and is_url(first.path))) as pool:

        def submit(items: Iterable[ImageFile]) -> None:
            pending.extend((f, pool.submit(decode_file, f.path, size, resize, storage_options)) for f in items)

        submit(islice(source, 3 * batch_size))
        try:
            batch = Batch([], empty)
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
                    if batch.files:
                        batch.outputs = as_outputs(runtime(buffer[: len(batch.files)]))
                    yield batch
                    batch = Batch([], empty)
        finally:
            for _, future in pending:
                future.cancel()


# -- READER ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One content to extract: its hash and the first file that has these bytes."""

    content_hash: str
    file: ImageFile


def read_tasks(files: Sequence[tuple[ImageFile, str]], writers: Sequence[CacheWriter]) -> list[Task]:
    """One task per content hash that at least one cache lacks, in scan order (byte-identical files once)."""
    todo: dict[str, ImageFile] = {}
    for file, digest in files:
        if digest not in todo and not all(w.has(digest) for w in writers):
            todo[digest] = file
    return [Task(h, f) for h, f in todo.items()]


def task_columns(tasks: Sequence[Task]) -> dict[str, np.ndarray]:
    """The mapper's input columns for these tasks: content hashes and absolute paths."""
    return {HASH: np.array([t.content_hash for t in tasks]), PATH: np.array([str(t.file.path) for t in tasks])}


# -- MAPPER ----------------------------------------------------------------------------------------
def checked_decode(data: bytes | OSError, content_hash: str, size: int, resize: str) -> np.ndarray | str:
    """Decode data if it still hashes to content_hash; else, or if it could not be read, the reason."""
    if isinstance(data, OSError):
        return f"unreadable: {data}"
    if hashlib.sha256(data).hexdigest() != content_hash:
        return "changed while extracting (its bytes no longer match the scan); run extract again"
    return decode_file(data, size, resize)


def read_and_decode(
    path: str, content_hash: str, size: int, resize: str, storage_options: StorageOptions = None
) -> np.ndarray | str:
    """Decode the bytes of path (a file or an object) if they still hash to content_hash; else the reason.

    For a worker that reads a file later than the scan hashed it (a Ray task, maybe on another node):
    the bytes are read once, checked, and those very bytes decoded.
    """
    return checked_decode(next(read_many([path], storage_options)), content_hash, size, resize)


def read_columns(columns: dict[str, np.ndarray], storage_options: StorageOptions = None) -> dict[str, np.ndarray]:
    """{HASH, PATH} in; {HASH, PATH, BYTES, ERROR (why BYTES is empty)} out: the files read where they are, for
    decoders on machines that cannot read them."""
    data = list(read_many([str(p) for p in columns[PATH]], storage_options))
    return {
        HASH: np.asarray(columns[HASH]).astype(str),
        PATH: np.asarray(columns[PATH]).astype(str),
        BYTES: np.array([d if isinstance(d, bytes) else b"" for d in data], dtype=object),
        ERROR: np.array([str(d) if isinstance(d, OSError) else "" for d in data], dtype=str),
    }


def decode_columns(
    columns: dict[str, np.ndarray],
    size: int,
    resize: str,
    workers: int | None = 1,
    verify_hash: bool = False,
    storage_options: StorageOptions = None,
) -> dict[str, np.ndarray]:
    """The mapper's decode half: {HASH, PATH[, BYTES, ERROR]} in; {HASH, ERROR ('' when fine), IMAGE (zeros
    where ERROR)} out.

    verify_hash: decode a file only if its bytes still hash to HASH (see read_and_decode); the bytes are
    those of BYTES when the batch has them (see read_columns), else read here (objects many at once).
    """
    paths, hashes = [str(p) for p in columns[PATH]], np.asarray(columns[HASH]).astype(str)
    data: list[bytes | OSError] | None = None
    if BYTES in columns:
        data = [OSError(e) if e else bytes(b) for b, e in zip(columns[BYTES], np.asarray(columns[ERROR]).astype(str))]
    elif verify_hash:
        data = list(read_many(paths, storage_options, threads=workers or default_workers()))

    def one(k: int) -> np.ndarray | str:
        if data is not None:
            return checked_decode(data[k], hashes[k], size, resize)
        return decode_file(paths[k], size, resize, storage_options)

    if workers == 1:  # a Ray task's one CPU: decode here, without a pool thread to hand each file to
        decoded = [one(k) for k in range(len(paths))]
    else:
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            decoded = list(pool.map(one, range(len(paths))))
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    for k, image in enumerate(decoded):
        if not isinstance(image, str):
            images[k] = image
    return {HASH: hashes, ERROR: np.array([d if isinstance(d, str) else "" for d in decoded], dtype=str), IMAGE: images}


class FeatureMapper:
    """Decode a batch of tasks and run the runtime once on it: a callable class for Ray Data's map_batches.

    The runtime is built on first use, once per instance (once per Ray actor). A batch that already
    carries IMAGE (decoded by an earlier stage, see decode_columns) goes straight to the runtime.
    """

    def __init__(self, make_runtime: RuntimeFactory, resize: str = "bilinear", workers: int | None = 1) -> None:
        self._make_runtime, self.resize, self.workers = make_runtime, resize, workers
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """The runtime, built the first time it is needed."""
        if self._runtime is None:
            self._runtime = self._make_runtime()
        return self._runtime

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{HASH, PATH} or {HASH, ERROR, IMAGE} in; {HASH, ERROR, RUNTIME, features_k (zeros where ERROR)} out."""
        if IMAGE not in columns:
            columns = decode_columns(columns, self.runtime.image_size, self.resize, self.workers)
        errors = np.asarray(columns[ERROR]).astype(str)
        ok = errors == ""
        outputs = [np.zeros((len(errors), d), np.float32) for d in output_dims(self.runtime)]
        if ok.any():
            for out, values in zip(outputs, as_outputs(self.runtime(np.asarray(columns[IMAGE])[ok]))):
                out[ok] = values
        return {
            HASH: np.asarray(columns[HASH]).astype(str),
            ERROR: errors,
            RUNTIME: np.full(len(errors), self.runtime.name),
            **{features_column(k): out for k, out in enumerate(outputs)},
        }


# -- WRITER ----------------------------------------------------------------------------------------
# Reasons that say a file could not be read as scanned just now (a network, a credential, a file being
# replaced): they are not recorded against the content, so that the next run tries it again.
RETRY_REASONS = ("unreadable:", "changed while extracting")


class FeatureSink:
    """Fans mapped rows out to one CacheWriter per layer; each writer gets only the rows it lacks.

    retry: content hash -> reason, for the contents that could not be read this time (see RETRY_REASONS).
    """

    def __init__(self, writers: Sequence[CacheWriter]) -> None:
        self.writers = list(writers)
        self.retry: dict[str, str] = {}

    def write(self, hashes: Sequence[str], outputs: Sequence[np.ndarray], runtime: str) -> None:
        """One features row per hash for each writer (outputs[k] goes to writers[k])."""
        if len(outputs) != len(self.writers):
            raise ValueError(f"{len(outputs)} runtime outputs for {len(self.writers)} caches")
        for writer, values in zip(self.writers, outputs):
            for digest, vector in zip(hashes, values):
                if not writer.has(digest):
                    writer.add(digest, vector, runtime)

    def skip(self, content_hash: str, reason: str) -> None:
        """A content that could not be decoded, for every writer that lacks it (kept aside if it may read later)."""
        if reason.startswith(RETRY_REASONS):
            self.retry[content_hash] = reason
            return
        for writer in self.writers:
            if not writer.has(content_hash):
                writer.add_skipped(content_hash, reason)

    def write_columns(self, columns: dict[str, np.ndarray]) -> int:
        """A mapped batch (see FeatureMapper); returns how many tasks it completed."""
        hashes, errors = [str(h) for h in columns[HASH]], [str(e) for e in columns[ERROR]]
        for digest, reason in zip(hashes, errors):
            if reason:
                self.skip(digest, reason)
        ok = np.array([not e for e in errors], bool)
        if ok.any():
            runtime = str(np.asarray(columns[RUNTIME])[ok][0])
            self.write(
                [h for h, good in zip(hashes, ok) if good],
                [np.asarray(columns[features_column(k)])[ok] for k in range(len(self.writers))],
                runtime,
            )
        return len(hashes)


# -- RUNNER ----------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run did: its runtime, its wall time, when the first batch came out, whether Ctrl-C stopped it."""

    runtime: str = ""  # the runtime's name ('keras' or 'tflite'); '' when nothing ran
    seconds: float = 0.0  # from the runtime being ready to the last row written
    first_batch_at: float | None = None  # time.time() when the first batch came out of the runtime
    interrupted: bool = False  # Ctrl-C: the sink holds what was finished
    n_done: int = 0  # tasks written (features or a skip reason)


def progress_bar(total: int, enabled: bool) -> Any:
    """The images/s and ETA bar of a run."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True)


def run_local(
    tasks: Sequence[Task],
    make_runtime: RuntimeFactory,
    sink: FeatureSink,
    *,
    resize: str = "bilinear",
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    storage_options: StorageOptions = None,
) -> RunResult:
    """One runtime in this process, decoding on a thread pool a few batches ahead of it."""
    runtime = make_runtime()
    log(f"extracting {len(tasks)} new images with {runtime.name}")
    result = RunResult(runtime.name)
    hash_of = {id(t.file): t.content_hash for t in tasks}
    bar = progress_bar(len(tasks), progress)
    started = time.perf_counter()
    try:
        for batch in stream_features((t.file for t in tasks), runtime, resize, batch_size, workers, storage_options):
            if batch.files and result.first_batch_at is None:
                result.first_batch_at = time.time()
            for file, reason in batch.failed:
                sink.skip(hash_of[id(file)], reason)
            if batch.files:
                sink.write([hash_of[id(f)] for f in batch.files], batch.outputs, runtime.name)
            result.n_done += len(batch.files) + len(batch.failed)
            bar.update(len(batch.files) + len(batch.failed))
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        result.seconds = time.perf_counter() - started
    return result
