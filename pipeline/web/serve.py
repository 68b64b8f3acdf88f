"""A page and a JSON API that classify uploaded images with a head or a model file loaded once.

Requests that arrive together run as one model call: a micro-batcher collects the decoded images
of concurrent requests for a few milliseconds (up to a maximum batch), runs the model in one worker
thread, and hands each request its own rows. Uploads are decoded from their bytes in memory; no
path a request names is ever opened, and bad input gets a 4xx JSON `{"error": ...}` naming the file.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# they name UploadFile, which is imported inside create_app (FastAPI is an optional extra)
import asyncio
import os
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import UserError
from ..images import ImageError, decode_image
from ..params import Interval, check_params
from ..predict import load_classifier
from .render import THUMBNAIL_PX, placeholder_uri, render

MAX_FILES = 32  # images in one request
DEFAULT_TOP_K = 5
SERVE_CONSTRAINTS = {
    "host": [str],
    "port": [Interval(1, 65535, integer=True)],
    "max_upload_mb": [Interval(0.001, 4096)],
    "max_batch": [Interval(1, 1024, integer=True)],
    "batch_wait_ms": [Interval(0, 1000)],
    "top_k": [Interval(1, 1000, integer=True)],
}
WEB_INSTALL = "pip install -e '.[web]'"


class PixelClassifier(Protocol):
    """What the server needs of a model: pipeline.predict.Classifier has it."""

    classes: list[str]
    image_size: int
    resize: str
    backbone: str
    unknown_threshold: float | None  # None: no unknown detector

    def predict_scored(self, images: np.ndarray) -> np.ndarray: ...


class MicroBatcher:
    """Runs the images of requests that arrive together as one model call, in one worker thread.

    After the first waiting request it collects others for up to wait_s (or until max_batch images),
    and while the model runs, new requests queue up for the next call.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 wait_s: float = 0.005) -> None:
        self.predict, self.max_batch, self.wait_s = predict, max_batch, wait_s
        self.calls = 0  # model calls so far
        self.images = 0  # images through the model so far
        self._queue: asyncio.Queue | None = None
        self._held: tuple[np.ndarray, asyncio.Future] | None = None  # a job that did not fit the last batch

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """The probabilities of one request's images, computed together with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("the micro-batcher is not running (start the app's lifespan)")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(images), self.max_batch):
            futures.append(loop.create_future())
            self._queue.put_nowait((images[start:start + self.max_batch], futures[-1]))
        return np.concatenate(await asyncio.gather(*futures))

    async def run(self) -> None:
        """Serve the queue until cancelled."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        # one thread: model calls never overlap (a TFLite interpreter is not thread-safe)
        with ThreadPoolExecutor(1, thread_name_prefix="model") as worker:
            try:
                while True:
                    jobs = [await self._next(None)]
                    count, deadline = len(jobs[0][0]), loop.time() + self.wait_s
                    while count < self.max_batch:
                        job = await self._next(deadline - loop.time())
                        if job is None:
                            break
                        if count + len(job[0]) > self.max_batch:
                            self._held = job
                            break
                        jobs.append(job)
                        count += len(job[0])
                    await self._run(jobs, loop, worker)
            finally:
                self._queue = None

    async def _next(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future] | None:
        """The held job, else the next queued one (waiting at most timeout seconds; None: forever)."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
        except (asyncio.QueueEmpty, asyncio.TimeoutError):
            return None

    async def _run(self, jobs: list[tuple[np.ndarray, asyncio.Future]], loop: asyncio.AbstractEventLoop,
                   worker: ThreadPoolExecutor) -> None:
        batch = np.concatenate([images for images, _ in jobs])
        try:
            proba = await loop.run_in_executor(worker, self.predict, batch)
        except Exception as exc:  # every request of the batch gets the error; the loop goes on
            for _, future in jobs:
                if not future.done():
                    future.set_exception(exc)
            return
        self.calls += 1
        self.images += len(batch)
        start = 0
        for images, future in jobs:
            if not future.done():  # done: the client went away and its request was cancelled
                future.set_result(proba[start:start + len(images)])
            start += len(images)


class UploadError(Exception):
    """An upload that cannot be classified: the HTTP status and a message naming the file."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _require_web() -> None:
    """UserError naming the extra to install when FastAPI, uvicorn or python-multipart is missing."""
    missing = [name for name, modules in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                          ("python-multipart", ["python_multipart", "multipart"]))
               if not any(find_spec(m) for m in modules)]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}, which is not installed: {WEB_INSTALL}.")


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB"


def _top(proba: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-proba, kind="stable")[:k]
    return [{"class": classes[i], "probability": float(proba[i])} for i in order]


def _answer(filename: str | None, row: np.ndarray, classes: Sequence[str], k: int,
            threshold: float | None) -> dict[str, Any]:
    """One file's JSON: its top-k, and whether it is unknown (null for both without a detector)."""
    score = float(row[-1])
    known = threshold is not None and not np.isnan(score)
    return {"filename": filename, "top": _top(row[:-1], classes, k),
            "unknown": bool(score > threshold) if known else None, "unknown_score": score if known else None}


def create_app(classifier: PixelClassifier, *, max_upload_mb: float = 20, max_batch: int = 32,
               batch_wait_ms: float = 5, top_k: int = DEFAULT_TOP_K, source: str = "") -> Any:
    """The FastAPI app: GET / (the page), POST /predict, GET /health, and the OpenAPI docs at /docs."""
    _require_web()
    from fastapi import FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException

    limit = int(max_upload_mb * 1e6)
    body_limit = MAX_FILES * limit + 64 * 1024  # every file at the limit, plus the multipart framing
    n_classes = len(classifier.classes)
    default_k = min(top_k, n_classes)
    batcher = MicroBatcher(classifier.predict_scored, max_batch, batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_: Any):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="cnncodes classifier", lifespan=lifespan,
                  description=f"Classifies images into {n_classes} classes with {classifier.backbone}.")
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
            if where == "files" and problem.get("type") == "missing":
                problems.append("no files: send one or more images in the multipart form field 'files'")
            else:
                problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        return error(422, "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__}); the server is still up")

    class BodyLimit:
        """Refuse a request body over body_limit bytes: before reading it (Content-Length) or while it streams."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            message = (f"the request body is over {_mb(body_limit)} (at most {MAX_FILES} files of "
                       f"{_mb(limit)} each, --max-upload-mb)")
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > body_limit:
                return await error(413, message)(scope, receive, send)
            received = 0

            async def counted() -> dict:
                nonlocal received
                part = await receive()
                received += len(part.get("body", b""))
                if received > body_limit:
                    raise HTTPException(413, message)
                return part

            await self.inner(scope, counted, send)

    app.add_middleware(BodyLimit)

    async def decode(upload: UploadFile) -> np.ndarray | UploadError:
        name = upload.filename or "(unnamed file)"
        if upload.size is not None and upload.size > limit:
            return UploadError(413, f"{name}: {_mb(upload.size)} is over the {_mb(limit)} upload limit "
                                    "(--max-upload-mb)")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            return UploadError(413, f"{name}: over the {_mb(limit)} upload limit (--max-upload-mb)")
        try:
            return await asyncio.to_thread(decode_image, data, classifier.image_size, classifier.resize)
        except ImageError as exc:
            return UploadError(422, f"{name}: {exc}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render("serve.html", title="cnncodes classifier", classes=classifier.classes,
                                   backbone=classifier.backbone, top_k=default_k, max_upload_mb=max_upload_mb,
                                   max_files=MAX_FILES, source=source, placeholder=placeholder_uri(),
                                   thumb_px=THUMBNAIL_PX, detector=classifier.unknown_threshold is not None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The model's classes and backbone, whether it has an unknown detector, and how many model calls and
        images it has run."""
        return {"status": "ok", "classes": classifier.classes, "backbone": classifier.backbone,
                "unknown_detector": classifier.unknown_threshold is not None,
                "unknown_threshold": classifier.unknown_threshold,
                "image_size": classifier.image_size, "source": source, "model_calls": batcher.calls,
                "images": batcher.images, "max_batch": max_batch, "max_upload_mb": max_upload_mb}

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(..., description=f"one or more images (at most {MAX_FILES})"),
                      top_k: int = Query(default_k, ge=1, le=n_classes,
                                         description="classes per image, most probable first")) -> dict[str, Any]:
        """The top-k classes of each uploaded image, with calibrated probabilities, and whether it is unknown
        (not one of the classes: "unknown" true; null when the model has no detector) with its score."""
        if len(files) > MAX_FILES:
            raise UploadError(413, f"{len(files)} files in one request; send at most {MAX_FILES}")
        decoded = await asyncio.gather(*(decode(f) for f in files))
        failed = [d for d in decoded if isinstance(d, UploadError)]
        if failed:
            prefix = f"{len(failed)} of {len(files)} files could not be used: " if len(files) > 1 else ""
            raise UploadError(max(f.status for f in failed), prefix + "; ".join(map(str, failed)))
        rows = await batcher(np.stack(decoded))
        return {"predictions": [_answer(f.filename, row, classifier.classes, top_k, classifier.unknown_threshold)
                                for f, row in zip(files, rows)]}

    return app


def _check_port_free(host: str, port: int) -> None:
    """UserError now, before a model loads, when host:port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.") \
                from None


def serve(head: str | os.PathLike | None = None, model: str | os.PathLike | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20, max_batch: int = 32,
          batch_wait_ms: float = 5, top_k: int = DEFAULT_TOP_K, runtime: str = "auto", threads: int | None = None,
          log: Callable[[str], None] = print) -> None:
    """Load a head or model file once and serve the page and the API with uvicorn until Ctrl-C."""
    check_params(dict(host=host, port=port, max_upload_mb=max_upload_mb, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, top_k=top_k), SERVE_CONSTRAINTS)
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    _require_web()
    _check_port_free(host, port)
    import uvicorn

    # the only file serve may write is a TFLite conversion of the backbone, when none is cached: into a
    # temporary folder removed at exit
    with tempfile.TemporaryDirectory(prefix="cnncodes-serve-") as scratch:
        classifier = load_classifier(head, model, runtime, threads, scratch_dir=scratch, log=log)
        size = classifier.image_size
        classifier.predict_scored(np.zeros((1, size, size, 3), np.uint8))  # warm up before the first request
        app = create_app(classifier, max_upload_mb=max_upload_mb, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                         top_k=top_k, source=Path(head or model).name)
        log(f"serving {len(classifier.classes)} classes ({classifier.backbone}) on http://{host}:{port}/ "
            f"(API docs at /docs); Ctrl-C stops")
        uvicorn.run(app, host=host, port=port, log_level="warning")
