"""`cnncodes serve`: load a head or model file once and serve the page and the JSON API (pipeline.web.api)
with uvicorn, under the limits of pipeline.web.connections."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError, install_hint
from ..params import Interval, ParamError, check_params, define, literal

logger = logging.getLogger(__name__)

define(
    host=[str],
    port=[Interval(1, 65535, integer=True)],
    max_upload_mb=[Interval(0.001, 4096)],
    max_request_mb=[Interval(0.001, 65536)],
    max_megapixels=[Interval(0.01, 1000)],
    max_decodes=[Interval(1, 256, integer=True)],
    max_connections=[Interval(8, 100_000, integer=True)],
    max_batch=[Interval(1, 1024, integer=True)],
    batch_wait_ms=[Interval(0, 1000)],
)
WEB_INSTALL = install_hint("web")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _require_web() -> None:
    """UserError naming the extra to install when FastAPI, uvicorn or python-multipart is missing."""
    missing = [
        name
        for name, modules in (
            ("fastapi", ["fastapi"]),
            ("uvicorn", ["uvicorn"]),
            ("python-multipart", ["python_multipart", "multipart"]),
        )
        if not any(find_spec(m) for m in modules)
    ]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}, which is not installed: {WEB_INSTALL}.")


def _check_port_free(host: str, port: int) -> None:
    """UserError now, before a model loads, when host:port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host."
            ) from None


def allowed_host_names(host: str, extra: Sequence[str]) -> tuple[str, ...]:
    """The Host header names the server answers to: the bound host (and the loopback names when it is a
    loopback or wildcard address), plus --allowed-hosts."""
    from .api import LOOPBACK_NAMES

    names = [host] if host not in WILDCARD_HOSTS else []
    if host in LOOPBACK_NAMES or host in WILDCARD_HOSTS:
        names += LOOPBACK_NAMES
    for name in extra:
        if not name or "/" in name or " " in name:
            raise ParamError(
                "{} " + literal(repr(name)) + " is not a host name; give names like example.org or "
                "192.168.1.20 (or * for any).",
                "allowed_hosts",
            )
        names.append(name.strip("[]"))
    return tuple(dict.fromkeys(n.lower() for n in names))


def serve(
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 20,
    max_request_mb: float = 100,
    max_megapixels: float = 24,
    max_decodes: int = 2,
    max_connections: int = 256,
    allowed_hosts: Sequence[str] = (),
    docs: bool = False,
    max_batch: int = 32,
    batch_wait_ms: float = 5,
    top_k: int = 5,
    runtime: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = logger.info,
) -> None:
    """Load a head or model file once and serve the page and the API with uvicorn until Ctrl-C."""
    check_params(
        dict(
            host=host,
            port=port,
            max_upload_mb=max_upload_mb,
            max_request_mb=max_request_mb,
            max_megapixels=max_megapixels,
            max_decodes=max_decodes,
            max_connections=max_connections,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            top_k=top_k,
        )
    )
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    names = allowed_host_names(host, allowed_hosts)
    _require_web()
    _check_port_free(host, port)
    from ..predict import load_classifier
    from .api import ServeLimits, create_app
    from .connections import connection_cap, run_server

    connection_cap(max_connections)  # too few file descriptors: say so before the model loads
    limits = ServeLimits(max_upload_mb, max_request_mb, max_megapixels, max_decodes, names, docs)
    # the only file serve may write is a TFLite conversion of the backbone, when none is cached: into a
    # temporary folder removed at exit
    with tempfile.TemporaryDirectory(prefix="cnncodes-serve-") as scratch:
        classifier = load_classifier(head, model, runtime, threads, scratch_dir=scratch, log=log)
        size = classifier.image_size
        classifier.predict_scored(np.zeros((1, size, size, 3), np.uint8))  # warm up before the first request
        app = create_app(
            classifier,
            limits,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            top_k=top_k,
            source=Path(head or model).name,
        )
        log(
            f"serving {len(classifier.classes)} classes ({classifier.backbone}) on http://{host}:{port}/ "
            f"(answering to {', '.join(names)}){' (API docs at /docs)' if docs else ''}; Ctrl-C stops"
        )
        run_server(app, host, port, max_connections, log=log)
