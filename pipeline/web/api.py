"""The FastAPI app of `serve`: a page and a JSON API that classify uploaded images with a classifier loaded once.

Requests that arrive together run as one model call: a micro-batcher collects the decoded images of concurrent
requests for a few milliseconds (up to a maximum batch), runs the model in one worker thread, and hands each
request its own rows. Uploads are decoded from their bytes in memory, at most ServeLimits.max_decodes at a time,
through the same decoder as extract and predict; no path a request names is ever opened.

Every answer is JSON `{"error": ...}` for bad input (4xx), and three ASGI middlewares guard every request before
any route runs: SecurityHeaders (nosniff on every answer), HostOriginGuard (the Host must be one the server
answers to: no DNS rebinding; a browser's Origin must be the server's own: no other web page may use it) and
BodyGuard (the body is counted while it streams and refused at the limit, and must arrive within a deadline).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime
import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Protocol, Sequence

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from ..images import ImageError, decode_image
from .render import THUMBNAIL_PX, placeholder_uri, render

MAX_FILES = 32  # images in one request
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000  # a larger top_k asks for every class, as a smaller one above the class count does
BODY_TIMEOUT_S = 60.0  # the whole request body must arrive within this, however slowly it trickles
# Sent with every answer: no MIME sniffing, no framing by other pages, no embedding by other origins.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the server, and who may send it (the `serve` options of the same names)."""

    max_upload_mb: float = 20  # one image file
    max_request_mb: float = 100  # one whole request body
    max_megapixels: float = 24  # one image, at the scale it decodes (JPEGs after libjpeg's draft scaling)
    max_decodes: int = 2  # images decoded at once, across all requests
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host header names answered ("*": any)
    docs: bool = False  # FastAPI's /docs page (Swagger UI from a CDN); /openapi.json is always served
    body_timeout_s: float = BODY_TIMEOUT_S  # the whole body must arrive within this

    @property
    def upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def request_bytes(self) -> int:
        return int(self.max_request_mb * 1e6)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)


class PixelClassifier(Protocol):
    """What the server needs of a model: pipeline.predict.Classifier has it."""

    classes: list[str]
    image_size: int
    resize: str
    backbone: str
    unknown_threshold: float | None  # None: no unknown detector

    def predict_scored(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities with the unknown score as one more column (NaN without a detector)."""


class MicroBatcher:
    """Runs the images of requests that arrive together as one model call, in one worker thread.

    After the first waiting request it collects others for up to wait_s (or until max_batch images),
    and while the model runs, new requests queue up for the next call.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, wait_s: float = 0.005) -> None:
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
            self._queue.put_nowait((images[start : start + self.max_batch], futures[-1]))
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

    async def _run(
        self, jobs: list[tuple[np.ndarray, asyncio.Future]], loop: asyncio.AbstractEventLoop, worker: ThreadPoolExecutor
    ) -> None:
        batch = np.concatenate([images for images, _ in jobs])
        try:
            proba = await loop.run_in_executor(worker, self.predict, batch)
        except Exception as exc:  # noqa: BLE001 (every request of the batch gets the error; the loop goes on)
            for _, future in jobs:
                if not future.done():
                    future.set_exception(exc)
            return
        self.calls += 1
        self.images += len(batch)
        start = 0
        for images, future in jobs:
            if not future.done():  # done: the client went away and its request was cancelled
                future.set_result(proba[start : start + len(images)])
            start += len(images)


class UploadError(Exception):
    """An upload that cannot be classified: the HTTP status and a message naming the file."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Service:
    """What the routes need, kept on app.state.service: the classifier, its batcher, the limits."""

    classifier: PixelClassifier
    batcher: MicroBatcher
    limits: ServeLimits
    default_k: int
    source: str
    decode_slots: asyncio.Semaphore


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every refusal: `{"error": message}` with the security headers."""
    return JSONResponse({"error": message}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


# -- middleware: plain ASGI classes, each checking one thing before any route runs ----------------------
class SecurityHeaders:
    """Adds SECURITY_HEADERS to every answer (where a route did not set them)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)


def host_name(host: str) -> str:
    """The name part of a Host header: 'example.org:8000' -> 'example.org', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


class HostOriginGuard:
    """400 unless the Host header names an allowed host (DNS rebinding); 403 when a browser says the request
    comes from a page of another origin (a cross-site form or fetch). Clients that send no Origin pass."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = {name.lower() for name in allowed_hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if "*" not in self.allowed and host_name(host) not in self.allowed:
            refusal = error_response(
                400,
                f"Host {host!r} is not a name this server answers to; open it as "
                f"http://{min(self.allowed)}:PORT/ or start it with "
                "--allowed-hosts NAME",
            )
            return await refusal(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower():
            refusal = error_response(
                403,
                f"requests from pages of other origins ({origin}) are refused; use "
                "this server's own page, or a client that sends no Origin header",
            )
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class BodyGuard:
    """Refuses a request body over max_bytes (413) before reading it when Content-Length says so, else as soon as
    the streamed count passes the limit; and one not received within timeout_s (408).

    Any answer sent before the whole body arrived (these, or an error of the app) closes the connection: the
    server would otherwise read and discard the rest of the body to reuse the connection.
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = (
            f"the request body is over {_mb(self.max_bytes)} (--max-request-mb; at most {MAX_FILES} files per request)"
        )
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, too_big, {"Connection": "close"})(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        body_left = declared not in ("", "0") or "transfer-encoding" in headers

        async def counted() -> dict:
            nonlocal received, body_left
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_big)
            body_left = body_left and message.get("more_body", False)
            return message

        async def closing_early(message: dict) -> None:
            if message["type"] == "http.response.start" and body_left:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, counted, closing_early)


# -- the routes -------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every refusal: what was wrong, naming the file or option."""

    error: str


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "the Host header is not a name this server answers to (--allowed-hosts), or the body is "
        "not multipart form data",
        403: "the request comes from a web page of another origin",
        408: "the request body did not arrive in time",
        413: "a file or the whole body is over its size limit",
        422: "a file is not a readable image, or the request breaks this schema (no files, more than "
        f"{MAX_FILES}, top_k out of range)",
    }
    return {status: {"model": ErrorBody, "description": reasons[status]} for status in statuses}


router = APIRouter(responses=_documented(400, 403))


def service(request: Request) -> Service:
    """The app's Service (a FastAPI dependency)."""
    return request.app.state.service


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(svc: Annotated[Service, Depends(service)]) -> HTMLResponse:
    """The upload page (self-contained: no script, style or font from elsewhere)."""
    classifier = svc.classifier
    return HTMLResponse(
        render(
            "serve.html",
            title="cnncodes classifier",
            classes=classifier.classes,
            backbone=classifier.backbone,
            top_k=svc.default_k,
            max_upload_mb=svc.limits.max_upload_mb,
            max_files=MAX_FILES,
            source=svc.source,
            placeholder=placeholder_uri(),
            thumb_px=THUMBNAIL_PX,
            detector=classifier.unknown_threshold is not None,
        )
    )


@router.get("/health")
async def health(svc: Annotated[Service, Depends(service)]) -> dict[str, Any]:
    """The model's classes and backbone, whether it has an unknown detector, and how many model calls and images
    it has run."""
    classifier, limits = svc.classifier, svc.limits
    return {
        "status": "ok",
        "classes": classifier.classes,
        "backbone": classifier.backbone,
        "unknown_detector": classifier.unknown_threshold is not None,
        "unknown_threshold": classifier.unknown_threshold,
        "image_size": classifier.image_size,
        "source": svc.source,
        "model_calls": svc.batcher.calls,
        "images": svc.batcher.images,
        "max_batch": svc.batcher.max_batch,
        "max_upload_mb": limits.max_upload_mb,
        "max_request_mb": limits.max_request_mb,
        "max_megapixels": limits.max_megapixels,
    }


async def _decode(upload: UploadFile, svc: Service) -> np.ndarray | UploadError:
    """One upload's pixels, or the 4xx error naming it."""
    name = upload.filename or "(unnamed file)"
    limit = svc.limits.upload_bytes
    if upload.size is not None and upload.size > limit:
        return UploadError(413, f"{name}: {_mb(upload.size)} is over the {_mb(limit)} upload limit (--max-upload-mb)")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        return UploadError(413, f"{name}: over the {_mb(limit)} upload limit (--max-upload-mb)")
    classifier = svc.classifier
    try:
        async with svc.decode_slots:  # bounds the memory that decoding takes, whatever the number of requests
            return await asyncio.to_thread(
                decode_image, data, classifier.image_size, classifier.resize, max_pixels=svc.limits.max_pixels
            )
    except ImageError as exc:
        return UploadError(422, f"{name}: {exc}")


def _top(proba: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-proba, kind="stable")[:k]
    return [{"class": classes[i], "probability": float(proba[i])} for i in order]


def _answer(
    filename: str | None, row: np.ndarray, classes: Sequence[str], k: int, threshold: float | None
) -> dict[str, Any]:
    """One file's JSON: its top-k, and whether it is unknown (null for both without a detector)."""
    score = float(row[-1])
    known = threshold is not None and not np.isnan(score)
    return {
        "filename": filename,
        "top": _top(row[:-1], classes, k),
        "unknown": bool(score > threshold) if known else None,
        "unknown_score": score if known else None,
    }


TOP_K_HELP = "classes per image, most probable first (at most the class count; default: the server's --top-k)"


@router.post("/predict", responses=_documented(408, 413, 422))
async def predict(
    svc: Annotated[Service, Depends(service)],
    files: Annotated[
        list[UploadFile],
        File(
            min_length=1,
            max_length=MAX_FILES,
            description=f"one to {MAX_FILES} images (JPEG, PNG, GIF, BMP, WebP or TIFF)",
        ),
    ],
    # absent (None): the server's --top-k; annotated int so that the schema says integer (null is not a value
    # a client may send: Optional[int] would publish it as one)
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description=TOP_K_HELP)] = None,  # noqa: RUF013
) -> dict[str, Any]:
    """The top-k classes of each uploaded image, with calibrated probabilities, and whether it is unknown
    (not one of the classes: "unknown" true; null when the model has no detector) with its score."""
    decoded = await asyncio.gather(*(_decode(f, svc) for f in files))
    failed = [d for d in decoded if isinstance(d, UploadError)]
    if failed:
        prefix = f"{len(failed)} of {len(files)} files could not be used: " if len(files) > 1 else ""
        raise UploadError(max(f.status for f in failed), prefix + "; ".join(map(str, failed)))
    classes = svc.classifier.classes
    k = min(top_k or svc.default_k, len(classes))
    rows = await svc.batcher(np.stack(decoded))
    threshold = svc.classifier.unknown_threshold
    return {"predictions": [_answer(f.filename, row, classes, k, threshold) for f, row in zip(files, rows)]}


# -- errors: every one is `{"error": ...}` ----------------------------------------------------------------
async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
    """A file that could not be used."""
    return error_response(exc.status, str(exc))


async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's 404, 405 (with its Allow header), and BodyGuard's 408 and 413."""
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as one message (a 422: the request breaks the published schema)."""
    problems = []
    for problem in exc.errors():
        where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
        if where == "files" and problem.get("type") == "missing":
            problems.append("no files: send one or more images in the multipart form field 'files'")
        elif where == "files" and problem.get("type") == "too_long":
            problems.append(f"{len(problem.get('input') or ())} files in one request; send at most {MAX_FILES}")
        else:
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    return error_response(422, "; ".join(problems))


async def unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A bug: a 500 that says so, and the server stays up."""
    return error_response(500, f"internal error ({type(exc).__name__}); the server is still up")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Run the micro-batcher for as long as the app runs."""
    task = asyncio.create_task(app.state.service.batcher.run())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def create_app(
    classifier: PixelClassifier,
    limits: ServeLimits = ServeLimits(),
    *,
    max_batch: int = 32,
    batch_wait_ms: float = 5,
    top_k: int = DEFAULT_TOP_K,
    source: str = "",
) -> FastAPI:
    """The FastAPI app: GET / (the page), POST /predict, GET /health, /openapi.json (and /docs with limits.docs)."""
    n_classes = len(classifier.classes)
    app = FastAPI(
        title="cnncodes classifier",
        lifespan=lifespan,
        docs_url="/docs" if limits.docs else None,
        redoc_url=None,
        description=f"Classifies images into {n_classes} classes with {classifier.backbone}.",
    )
    app.state.service = Service(
        classifier,
        MicroBatcher(classifier.predict_scored, max_batch, batch_wait_ms / 1000),
        limits,
        min(top_k, n_classes),
        source,
        asyncio.Semaphore(limits.max_decodes),
    )
    app.include_router(router)
    app.add_exception_handler(UploadError, upload_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)
    # the last added runs first: headers on every answer, then the body's limits (so that any early refusal,
    # the Host and Origin ones too, closes the connection rather than reading the rest), then who may ask
    app.add_middleware(HostOriginGuard, allowed_hosts=limits.allowed_hosts)
    app.add_middleware(BodyGuard, max_bytes=limits.request_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(SecurityHeaders)
    return app
