"""Find images under a class-per-folder root, hash their bytes, decode any common format to RGB."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import UserError
from .storage import is_url, list_tree, local_path, open_binary

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
    """One image file: where it is (a local Path, or an object's URL), its class index (-1 when unknown) and its
    split ('' when none)."""

    path: Path | str
    relpath: str
    label: int = -1
    split: str = ""


@dataclass
class Dataset:
    """The result of scanning a dataset folder (root: a local Path, or the URL of an object-store prefix)."""

    root: Path | str
    class_names: list[str]
    files: list[ImageFile]
    ignored: list[str] = field(default_factory=list)

    @property
    def has_splits(self) -> bool:
        return any(f.split for f in self.files)


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension (any case) is an image format we read."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_order(relpath: str) -> tuple:
    """Sort key of os.walk's top-down order: a folder's files (by name) before its sub-folders (by name)."""
    *folders, name = relpath.split("/")
    return (*((1, f) for f in folders), (0, name))


@dataclass
class _Tree:
    """A listing of a folder: relative posix paths of its files and folders, in walk order, hidden folders left out."""

    files: list[str]
    dirs: set[str]

    def children(self, folder: str) -> list[str]:
        """The sub-folders of folder ('' for the root), sorted."""
        depth = folder.count("/") + 1 if folder else 0
        return sorted(d for d in self.dirs if d.count("/") == depth and (not folder or d.startswith(folder + "/")))


def _is_visible(relpath: str) -> bool:
    return not any(part.startswith(".") for part in relpath.split("/")[:-1])


def _list_local(root: Path) -> _Tree:
    files, dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs.update(prefix + d for d in dirnames)
        files += [prefix + name for name in sorted(filenames)]
    return _Tree(files, dirs)


def _list(root: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> tuple[Path | str, _Tree]:
    """(root as the scan records it, its listing): one recursive listing, local or in an object store."""
    if is_url(root):
        url, files, dirs = list_tree(os.fspath(root), storage_options)
        visible = sorted((f for f in files if _is_visible(f)), key=_walk_order)
        return url, _Tree(visible, {d for d in dirs if _is_visible(d + "/x")})
    path = local_path(root).resolve()
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; expected DATA_DIR/CLASS/*.jpg (one sub-folder per class).")
    return path, _list_local(path)


def _join(root: Path | str, relpath: str) -> Path | str:
    return root / relpath if isinstance(root, Path) else f"{root}/{relpath}"


def scan_dataset(root: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """Scan DATA_DIR/CLASS/... or DATA_DIR/{train,val,test}/CLASS/... (a folder or an object-store URL);
    raise UserError if unusable."""
    root, tree = _list(root, storage_options)
    if not tree.files and not tree.dirs:
        raise UserError(
            f"{root} is empty or is not a folder; expected DATA_DIR/CLASS/*.jpg (one sub-folder per class)."
        )
    top = tree.children("")
    split_layout = bool(top) and all(name.lower() in SPLIT_FOLDERS for name in top)
    # (split, class folder) pairs
    groups = (
        [(SPLIT_FOLDERS[s.lower()], c) for s in top for c in tree.children(s)]
        if split_layout
        else [("", c) for c in top]
    )
    class_names = sorted({c.rsplit("/", 1)[-1] for _, c in groups})
    if not class_names:
        raise UserError(f"{root} has no class folders; expected DATA_DIR/CLASS/*.jpg or DATA_DIR/train/CLASS/*.jpg.")
    index = {name: i for i, name in enumerate(class_names)}
    under: dict[str, list[str]] = {}  # class folder -> the files under it, in walk order
    depth = 2 if split_layout else 1
    # files outside class folders (beside them, or beside the split folders) are not images of a class
    ignored = []
    for rel in tree.files:
        parts = rel.split("/")
        if len(parts) > depth:
            under.setdefault("/".join(parts[:depth]), []).append(rel)
        else:
            ignored.append(rel)
    files: list[ImageFile] = []
    for split, folder in groups:
        inside = under.get(folder, [])
        images = [rel for rel in inside if is_image_name(rel.rsplit("/", 1)[-1])]
        ignored += [rel for rel in inside if not is_image_name(rel.rsplit("/", 1)[-1])]
        if not images:
            raise UserError(
                f"class folder {_join(root, folder)} has no images ({len(inside) - len(images)} other "
                "files); add images (.jpg .jpeg .png .bmp .gif .webp) or remove the folder."
            )
        label = index[folder.rsplit("/", 1)[-1]]
        files += [ImageFile(_join(root, rel), rel, label, split) for rel in images]
    if len(class_names) < 2:
        raise UserError(f"{root} has one class ({class_names[0]}); a classifier needs at least two class folders.")
    return Dataset(root, class_names, files, ignored)


def scan_paths(
    paths: list[str | os.PathLike], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[ImageFile], list[str]]:
    """Image files named directly or found under folders, local or object-store URLs (for predict), and the
    paths ignored."""
    files: list[ImageFile] = []
    ignored: list[str] = []
    for given in paths:
        if is_url(given):
            url, listed, _ = list_tree(os.fspath(given), storage_options)
            if not listed:  # an object, not a prefix (list_tree refused a missing one)
                files.append(ImageFile(url, url))
                continue
            for rel in sorted((f for f in listed if _is_visible(f)), key=_walk_order):
                if is_image_name(rel.rsplit("/", 1)[-1]):
                    files.append(ImageFile(f"{url}/{rel}", f"{os.fspath(given).rstrip('/')}/{rel}"))
                else:
                    ignored.append(f"{os.fspath(given).rstrip('/')}/{rel}")
            continue
        path = local_path(given)
        if path.is_dir():
            tree = _list_local(path)
            for rel in tree.files:
                shown = str(path / rel)
                if is_image_name(rel.rsplit("/", 1)[-1]):
                    files.append(ImageFile((path / rel).resolve(), shown))
                else:
                    ignored.append(shown)
        elif path.is_file():
            files.append(ImageFile(path.resolve(), str(path)))
        else:
            raise UserError(f"{path} does not exist; give image files or folders of images.")
    return files, ignored


def file_sha256(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> str:
    """Hex sha256 of the file's (or the object's) bytes: the key of its row in the cache."""
    digest = hashlib.sha256()
    with open_binary(path, storage_options) as handle:
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
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
        out[top // fy : bottom // fy] = band.astype(np.uint8)
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


def decode_image(
    path: str | os.PathLike | bytes | IO[bytes],
    size: int,
    resize: str = "bilinear",
    draft: bool = True,
    max_pixels: int | None = None,
) -> np.ndarray:
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
                img = img.resize((size, size), RESIZE_METHODS[resize], reducing_gap=REDUCING_GAP if downscale else None)
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not an image in a format read here (" + ", ".join(ALLOWED_FORMATS) + "), or a corrupt one"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (a plugin's bug on hostile bytes is this file's problem, not a crash)
        raise ImageError(f"could not decode ({type(exc).__name__}: {exc})") from None


def _check_pixels(img: Image.Image, limit: int, what: str) -> None:
    """ImageError when the image (at the scale it will be decoded) has more than limit pixels."""
    if img.width * img.height > limit:
        raise ImageError(f"refused: {img.width}x{img.height} pixels exceeds the {limit}-pixel {what}")
