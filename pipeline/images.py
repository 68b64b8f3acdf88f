"""Find images under a class-per-folder root, hash their bytes, decode any common format to RGB."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# Folder names that mark a DATA_DIR/{train,val,test}/CLASS layout, and the split each records.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
RESIZE_METHODS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}
# Pillow's reduce-then-resample shortcut; 3.0 is "indistinguishable from fair resampling" (Pillow docs).
REDUCING_GAP = 3.0
# The decoding recipe is part of what makes the features: a change here must change this string.
DECODER = f"pillow-draft-exif-rgb-squash-gap{REDUCING_GAP:g}"
# Refuse images above this many pixels (Pillow's own warning threshold, about 89 megapixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Such images are refused by the explicit pixel count in decode_image; Pillow's warning would only be noise
# (and catch_warnings, which could turn it into an error, is not thread-safe under the decoding pool).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(Exception):
    """An image file that cannot be used; the message is the reason recorded in the cache."""


@dataclass(frozen=True)
class ImageFile:
    """One image file: where it is, its class index (-1 when unknown) and its split ('' when none)."""

    path: Path
    relpath: str
    label: int = -1
    split: str = ""


@dataclass
class Dataset:
    """The result of scanning a dataset folder."""

    root: Path
    class_names: list[str]
    files: list[ImageFile]
    ignored: list[str] = field(default_factory=list)

    @property
    def has_splits(self) -> bool:
        return any(f.split for f in self.files)


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension (any case) is an image format we read."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """All image files under folder (sorted, recursive) and the other files that were ignored."""
    images, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            (images if is_image_name(name) else ignored).append(Path(dirpath) / name)
    return images, ignored


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_dataset(root: str | os.PathLike) -> Dataset:
    """Scan DATA_DIR/CLASS/... or DATA_DIR/{train,val,test}/CLASS/...; raise UserError if unusable."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; expected DATA_DIR/CLASS/*.jpg (one sub-folder per class).")
    top = _subfolders(root)
    split_layout = bool(top) and all(p.name.lower() in SPLIT_FOLDERS for p in top)
    # (split, class folder) pairs
    groups = [(SPLIT_FOLDERS[s.name.lower()], c) for s in top for c in _subfolders(s)] if split_layout \
        else [("", c) for c in top]
    class_names = sorted({c.name for _, c in groups})
    if not class_names:
        raise UserError(f"{root} has no class folders; expected DATA_DIR/CLASS/*.jpg "
                        "or DATA_DIR/train/CLASS/*.jpg.")
    index = {name: i for i, name in enumerate(class_names)}
    files: list[ImageFile] = []
    # files outside class folders (beside them, or beside the split folders) are not images of a class
    ignored = [p for folder in ([root] + (top if split_layout else [])) for p in folder.iterdir() if p.is_file()]
    for split, folder in groups:
        images, other = _walk_images(folder)
        ignored += other
        if not images:
            raise UserError(f"class folder {folder} has no images ({len(other)} other files); "
                            "add images (.jpg .jpeg .png .bmp .gif .webp) or remove the folder.")
        files += [ImageFile(p, p.relative_to(root).as_posix(), index[folder.name], split) for p in images]
    if len(class_names) < 2:
        raise UserError(f"{root} has one class ({class_names[0]}); a classifier needs at least two "
                        "class folders.")
    return Dataset(root, class_names, files, [p.relative_to(root).as_posix() for p in ignored])


def scan_paths(paths: list[str | os.PathLike]) -> tuple[list[ImageFile], list[str]]:
    """Image files named directly or found under folders (for predict), and the paths ignored."""
    files: list[ImageFile] = []
    ignored: list[str] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            images, other = _walk_images(path)
            files += [ImageFile(p.resolve(), str(p)) for p in images]
            ignored += [str(p) for p in other]
        elif path.is_file():
            files.append(ImageFile(path.resolve(), str(path)))
        else:
            raise UserError(f"{path} does not exist; give image files or folders of images.")
    return files, ignored


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes: the key of its row in the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Formats decoded at all: every other Pillow plugin stays off (EPS/PS would hand the bytes to Ghostscript).
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# Modes with more than 8 bits per sample: scaled to 8 bits band by band (never a full-size float copy).
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# The float32 working set of one band of rows while a deep image is scaled and box-reduced.
BAND_BYTES = 8 << 20
# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table).
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _reduce_factors(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """The integer box reduction Pillow's resize would apply first (reducing_gap) when shrinking to size."""
    if width <= size or height <= size or resize == "nearest":
        return 1, 1
    return max(1, int(width / size / REDUCING_GAP)), max(1, int(height / size / REDUCING_GAP))


def _deep_to_grey(img: Image.Image, size: int, resize: str) -> Image.Image:
    """A 16/32-bit or float grey image as 8-bit 'L', box-reduced on the way as Pillow's resize would.

    16-bit images are scaled by 1/257, 32-bit and float ones too when their maximum is above 255 (scaled,
    not clipped). The work goes band by band in float32, so it costs BAND_BYTES plus the reduced result.
    Reduced before the 8-bit rounding, such an image can differ from a full-size conversion by a level or two.
    """
    scale = 257.0 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 1.0
    fx, fy = _reduce_factors(img.width, img.height, size, resize)
    out_w, out_h = img.width // fx, img.height // fy  # the last fx-1 columns, fy-1 rows are left out
    rows = max(1, BAND_BYTES // (4 * img.width) // fy) * fy
    out = np.empty((out_h, out_w), np.uint8)
    for top in range(0, out_h * fy, rows):
        bottom = min(top + rows, out_h * fy)
        band = np.asarray(img.crop((0, top, out_w * fx, bottom))).astype(np.float32)
        if fx > 1 or fy > 1:
            band = band.reshape((bottom - top) // fy, fy, out_w, fx).mean(axis=(1, 3), dtype=np.float32)
        band /= scale
        np.clip(band, 0, 255, out=band)
        out[top // fy:bottom // fy] = band.astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb_or_grey(img: Image.Image, size: int, resize: str) -> Image.Image:
    """Any Pillow mode as 8-bit 'RGB', or 'L' for grey ones (resized as L, converted last: the same pixels,
    a third of the memory)."""
    if img.mode in DEEP_MODES:
        return _deep_to_grey(img, size, resize)
    if img.mode == "1":
        return img.convert("L")
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _byte_count(source: str | os.PathLike | IO[bytes]) -> int:
    """The size of a file, or of what is left to read in a seekable binary stream (left where it was)."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    start = source.tell()
    end = source.seek(0, io.SEEK_END)
    source.seek(start)
    return end - start


def decode_image(path: str | os.PathLike | bytes | IO[bytes], size: int, resize: str = "bilinear",
                 draft: bool = True, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file (a path, or its bytes or a binary stream, e.g. an upload) to a (size, size, 3)
    uint8 RGB array, or raise ImageError with the reason (whatever went wrong inside the decoder).

    Only ALLOWED_FORMATS are read. Memory beyond the file's bytes: the decoded image at its draft scale
    (Pillow holds 8-bit RGB as 4 bytes a pixel, grey and 1-bit as 1, 16-bit as 2, 32-bit and float as 4)
    plus at most BAND_BYTES and the reduced copy for deep modes, plus one RGB copy for colour modes that
    are not RGB already (palette, CMYK, alpha); grey and 1-bit images are resized as 8-bit grey.
    max_pixels: refuse images with more pixels than this at the scale they decode (JPEGs after draft).
    draft=False decodes JPEGs at full scale (slower, for measuring what draft mode saves).
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = io.BytesIO(path)
    if _byte_count(path) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as img:
            _check_pixels(img, MAX_PIXELS, "decompression-bomb limit")
            if draft and img.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers the target size
                img.draft("RGB", (size, size))
            if max_pixels is not None:
                _check_pixels(img, max_pixels, "limit of this server (--max-megapixels)")
            transpose = ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation, 1))
            img = _to_rgb_or_grey(img, size, resize)
            if transpose is not None:  # after the conversion: a permutation of 8-bit pixels, on the smaller copy
                img = img.transpose(transpose)
            if img.size != (size, size):
                downscale = img.width > size and img.height > size
                img = img.resize((size, size), RESIZE_METHODS[resize],
                                 reducing_gap=REDUCING_GAP if downscale else None)
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image in a format read here (" + ", ".join(ALLOWED_FORMATS)
                         + "), or a corrupt one") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (a plugin's bug on hostile bytes is this file's problem, not a crash)
        raise ImageError(f"could not decode ({type(exc).__name__}: {exc})") from None


def _check_pixels(img: Image.Image, limit: int, what: str) -> None:
    """ImageError when the image (at the scale it will be decoded) has more than limit pixels."""
    if img.width * img.height > limit:
        raise ImageError(f"refused: {img.width}x{img.height} pixels exceeds the {limit}-pixel {what}")
