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
from functools import lru_cache
from typing import Any

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
