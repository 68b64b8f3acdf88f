"""What every page shares: the Jinja2 environment (templates in this package), images and figures as data URIs.

Pages are single files: thumbnails, plots, styles and scripts are all inline, so a page opens from
disk with no network. Jinja2 autoescapes every value put into HTML; data for a page's script goes
through the `tojson` filter, which escapes `<`, `>`, `&` and `'` so that no value can close the
<script> element.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Iterable

from PIL import Image

from ..images import decode_image

THUMBNAIL_PX = 96
THUMBNAIL_QUALITY = 70
# Shown where an image cannot be read (moved, deleted or corrupt): a grey square with a question mark.
PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96" viewBox="0 0 96 96">'
    '<rect width="96" height="96" fill="#ddd"/><text x="48" y="60" font-size="40" '
    'text-anchor="middle" fill="#888" font-family="sans-serif">?</text></svg>'
)


@lru_cache(maxsize=1)
def environment() -> Any:
    """The Jinja2 environment loading this package's templates, with HTML autoescaping on."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=PackageLoader("pipeline.web", "templates"),
        autoescape=select_autoescape(("html",)),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """A template of pipeline/web/templates rendered with context."""
    return environment().get_template(template).render(**context)


def data_uri(data: bytes, mime: str) -> str:
    """data:<mime>;base64,... for bytes."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def placeholder_uri() -> str:
    """The data URI shown in place of an image that cannot be read."""
    return data_uri(PLACEHOLDER_SVG.encode(), "image/svg+xml")


def thumbnail_uri(path: str | os.PathLike, px: int = THUMBNAIL_PX, quality: int = THUMBNAIL_QUALITY) -> str:
    """A px-square JPEG data URI of an image file, decoded as the backbone sees it (squashed to a square).

    Raises pipeline.images.ImageError (or OSError) when the file cannot be used.
    """
    pixels = decode_image(path, px, "area")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, optimize=True)
    return data_uri(buffer.getvalue(), "image/jpeg")


def thumbnail_or_problem(path: str, px: int) -> tuple[str, str]:
    """(thumbnail data URI, '') of an image file, or ('', the reason it cannot be shown)."""
    try:
        return thumbnail_uri(path, px), ""
    except Exception as exc:  # a moved or broken image gets the placeholder, never a crash
        return "", f"{path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"


class Thumbnails:
    """Thumbnails of image files (by path), encoded on a thread pool from the moment they are asked for.

    A caller that knows which images a page will show starts them early, while other work runs: train does
    so while the head fits, since decoding the images again costs about as much as the fit. Leaving the
    context cancels what has not started.
    """

    def __init__(self, px: int = THUMBNAIL_PX, workers: int | None = None) -> None:
        self.px = px
        self._pool = ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="cnncodes-thumbnails")
        self._pending: dict[str, Future] = {}

    def start(self, paths: Iterable[str]) -> None:
        """Queue the thumbnails of paths that are not queued yet, in this order."""
        for path in paths:
            if path not in self._pending:
                self._pending[path] = self._pool.submit(thumbnail_or_problem, path, self.px)

    def get(self, path: str) -> tuple[str, str]:
        """thumbnail_or_problem(path), waiting for it (queued now if it was not)."""
        self.start([path])
        return self._pending[path].result()

    def __len__(self) -> int:
        """How many thumbnails were asked for."""
        return len(self._pending)

    def __enter__(self) -> Thumbnails:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def file_uri(path: str | os.PathLike, mime: str = "image/png") -> str:
    """A data URI of a file as it is (a PNG written by another stage)."""
    with open(path, "rb") as handle:
        return data_uri(handle.read(), mime)


def figure_uri(fig: Any, format: str = "svg", dpi: int = 100) -> str:
    """A matplotlib Figure rendered in memory as an SVG or PNG data URI."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format=format, dpi=dpi)
    return data_uri(buffer.getvalue(), "image/svg+xml" if format == "svg" else "image/png")
