"""Shared fixtures: tiny datasets generated on the fly, broken files, a fast backbone configuration."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The real models and datasets (read-only); integration tests skip when this folder is absent.
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_REASON = f"{SHARED} is absent: it holds the real models and datasets the integration tests use"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The Ray clusters the tests start (and their processes, which inherit this) report no usage. Besides phoning home,
# Ray Data's usage collection queries Prometheus from a background thread after each run and logs the refused
# connection with its traceback; on Python 3.11 formatting a traceback calls ast.parse, whose state is shared by all
# threads, and a concurrent ast.parse in the test thread failed with "AST constructor recursion depth mismatch".
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.backbones import BackboneConfig  # noqa: E402
from pipeline.runtime import make_runtime as _REAL_MAKE_RUNTIME  # noqa: E402 (imports no TensorFlow)

# Class name -> base colour; each image adds its own noise so that no two files share bytes.
CLASS_COLOURS = {"apple": (200, 40, 40), "grass": (40, 180, 60), "sky": (50, 80, 210)}
IMAGE_WH = (40, 30)  # width, height
TINY = dict(backbone="MobileNetV2", weights="none", image_size=32, alpha=0.35)
# The same configuration as command-line options.
TINY_ARGS = ["--backbone", "MobileNetV2", "--weights", "none", "--image-size", "32", "--alpha", "0.35"]
# Tests run the Keras runtime unless they test TFLite: `auto` means TFLite on a CPU, and converting
# even the tiny backbone takes about 3 s (tests that want it use the session's, see tiny_tflite in model_fixtures.py).
RUNTIME = "keras"
# Session fixtures registered once for every module: world, cnn_world, finetune_run, tiny_tflite (TensorFlow-backed)
# and report_world (a synthetic cache, heads, an audit and a study folder).
# Third-party plugins load here by module name, those installed only (pyproject.toml's addopts turns off loading
# through entry points): pytest rewrites the assertions of every module of an entry-point plugin's distribution,
# and with PYTHONDONTWRITEBYTECODE it cannot cache that, so schemathesis and hypothesis cost about 6 s a session.
OPTIONAL_PLUGINS = ("pytest_timeout", "_hypothesis_pytestplugin", "schemathesis.pytest.plugin")
pytest_plugins = [
    "model_fixtures",
    "report_fixtures",
    *(name for name in OPTIONAL_PLUGINS if find_spec(name.split(".")[0]) is not None),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests need ../shared; skip them, saying why, when it is not there."""
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=SHARED_REASON)
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def requires_shared(*parts: str) -> Path:
    """A path under ../shared, or skip the test (with the reason) when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent ({SHARED_REASON})")
    return path


# -- image generators -----------------------------------------------------------------------------


def pixels(colour: tuple[int, int, int], seed: int, wh: tuple[int, int] = IMAGE_WH) -> np.ndarray:
    """An (h, w, 3) uint8 image: a base colour, a stripe pattern depending on seed, a little noise."""
    w, h = wh
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[:] = colour
    period = 3 + seed % 5
    img[:, (np.arange(w) // period) % 2 == 1] *= 0.6  # vertical stripes
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    """Write an array as an image file (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path, **kwargs)
    return path


def make_dataset(
    root: Path,
    per_class: int = 4,
    classes: dict | None = None,
    seed: int = 0,
    wh: tuple[int, int] = IMAGE_WH,
    split: str | None = None,
) -> Path:
    """root/CLASS/img_K.{png,jpg} (alternating), or root/SPLIT/CLASS/... when split is given."""
    classes = classes or CLASS_COLOURS
    base = root / split if split else root
    for c, (name, colour) in enumerate(classes.items()):
        for k in range(per_class):
            ext = "png" if k % 2 == 0 else "jpg"
            s = seed + 1000 * c + k
            save_image(base / name / f"img_{k:03d}.{ext}", pixels(colour, s, wh), quality=95)
    return root


def add_images(root: Path, cls: str, count: int, start: int, seed: int = 77) -> list[Path]:
    """Add count new (byte-distinct) PNG images to one class folder."""
    colour = CLASS_COLOURS.get(cls, (128, 128, 128))
    return [
        save_image(root / cls / f"new_{start + k:04d}.png", pixels(colour, seed + 10_000 + start + k))
        for k in range(count)
    ]


def exif_rotated_jpeg(path: Path) -> Path:
    """A 40x30 JPEG, left half red and right half blue, tagged EXIF orientation 6.

    Displayed (rotated 90 degrees clockwise) it is 30 wide and 40 high, red on top, blue below.
    """
    a = np.zeros((30, 40, 3), np.uint8)
    a[:, :20] = (220, 20, 20)
    a[:, 20:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    return path


def add_modes(folder: Path) -> dict[str, Path]:
    """One image in each awkward pixel mode; every one must decode to RGB."""
    colour = (200, 40, 40)
    rgb = pixels(colour, 5)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])
    grey16 = np.linspace(0, 65535, IMAGE_WH[0] * IMAGE_WH[1]).reshape(IMAGE_WH[1], IMAGE_WH[0]).astype(np.uint16)
    out = {
        "rgba": save_image(folder / "mode_rgba.png", rgba),
        "la": save_image(folder / "mode_la.png", rgb, "LA"),
        "p_gif": save_image(folder / "mode_p.gif", rgb, "P"),
        "p_png_transparency": save_image(folder / "mode_p_t.png", rgb, "P", transparency=0),
        "cmyk": save_image(folder / "mode_cmyk.jpg", rgb, "CMYK", quality=95),
        "i16": save_image(folder / "mode_i16.png", grey16),
        "l": save_image(folder / "mode_l.png", rgb, "L"),
        "bilevel": save_image(folder / "mode_1.bmp", rgb, "1"),
        "webp": save_image(folder / "mode_rgb.webp", rgb),
        "exif6": exif_rotated_jpeg(folder / "mode_exif6.jpg"),
    }
    assert Image.open(out["i16"]).mode == "I;16"
    assert Image.open(out["cmyk"]).mode == "CMYK"
    assert Image.open(out["p_gif"]).mode == "P"
    return out


def noise_jpeg(path: Path, seed: int = 3, wh: tuple[int, int] = (200, 150)) -> Path:
    """A noisy JPEG large enough that cutting it in half lands inside the compressed data."""
    rng = np.random.default_rng(seed)
    return save_image(path, rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8), quality=90)


def add_broken(root: Path, cls: str = "apple", other_cls: str = "grass") -> dict[str, str]:
    """Broken image files under root; returns relpath -> a word the skip reason must contain."""
    folder = root / cls
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    # a second empty file elsewhere: byte-identical to the first (same content hash)
    (root / other_cls).mkdir(parents=True, exist_ok=True)
    (root / other_cls / "also_zero.jpg").write_bytes(b"")
    whole = noise_jpeg(folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "text.png").write_text("this is not a PNG, just text with an image extension\n")
    return {
        f"{cls}/zero.jpg": "empty",
        f"{other_cls}/also_zero.jpg": "empty",
        f"{cls}/truncated.jpg": "truncated",
        f"{cls}/text.png": "not an image",
    }


def add_ignored(root: Path, cls: str = "sky") -> list[str]:
    """Files the scan must ignore (and count): a non-image file and a hidden image file."""
    (root / cls / "notes.txt").write_text("labelling notes\n")
    save_image(root / cls / ".hidden.png", pixels((1, 2, 3), 99))
    return [f"{cls}/notes.txt", f"{cls}/.hidden.png"]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """3 classes x 4 small images (PNG and JPEG), nothing broken."""
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def s3():
    """A local S3 server (moto) with a test bucket, for the whole session: see tests/object_store.py."""
    from object_store import start_s3

    yield from start_s3()


@pytest.fixture(scope="session")
def tiny_config() -> BackboneConfig:
    """A backbone that builds in about a second: MobileNetV2 alpha 0.35, random weights, 32x32."""
    return BackboneConfig(**TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_config: BackboneConfig):
    """The tiny backbone, built once per session."""
    from pipeline.backbones import build_backbone

    return build_backbone(tiny_config.resolved())


@pytest.fixture(scope="session")
def runtime_pool() -> dict:
    """Real runtimes built once per (config, kind, layers) for the whole session."""
    return {}


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch, runtime_pool: dict) -> dict:
    """extract's make_runtime builds each real runtime once per session and counts model calls and images.

    Returns the counts: {"calls": model calls, "images": images inferred, "built": the keys asked for}.
    """
    import pipeline.extract as extract_module

    seen = {"calls": 0, "images": 0, "built": []}

    class Counting:
        def __init__(self, inner) -> None:
            self.inner, self.name, self.image_size = inner, inner.name, inner.image_size
            self.dim, self.dims = inner.dim, inner.dims

        def __call__(self, batch):
            seen["calls"] += 1
            seen["images"] += len(batch)
            return self.inner(batch)

    def make(config, kind="auto", **kwargs):
        key = (config, kind, tuple(kwargs.get("layers") or ()))
        if key not in runtime_pool:
            runtime_pool[key] = _REAL_MAKE_RUNTIME(config, kind, **kwargs)
        seen["built"].append(key)
        return Counting(runtime_pool[key])

    monkeypatch.setattr(extract_module, "make_runtime", make)
    return seen


@pytest.fixture
def shared_runtime(counting: dict) -> Callable[[], int]:
    """Make extract() reuse one built runtime per configuration and kind (saves a model build per run).

    Returns a function giving how many images went through the runtime so far.
    """
    return lambda: counting["images"]
