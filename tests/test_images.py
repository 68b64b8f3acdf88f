"""pipeline.images: scanning a dataset folder, hashing files, decoding every format to RGB."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLASS_COLOURS,
    ROOT,
    add_broken,
    add_ignored,
    add_modes,
    exif_rotated_jpeg,
    make_dataset,
    noise_jpeg,
    pixels,
    requires_shared,
    save_image,
)
from PIL import Image

from pipeline import images
from pipeline.errors import UserError
from pipeline.images import ImageError, decode_image, file_sha256, scan_dataset

SIZE = 32


# -- scanning -------------------------------------------------------------------------------------


def test_scan_class_folders(dataset: Path) -> None:
    ds = scan_dataset(dataset)
    assert ds.root == dataset.resolve()
    assert ds.class_names == sorted(CLASS_COLOURS)
    assert len(ds.files) == 12
    assert not ds.has_splits and {f.split for f in ds.files} == {""}
    assert ds.ignored == []
    for f in ds.files:
        cls, name = f.relpath.split("/")
        assert ds.class_names[f.label] == cls
        assert f.path == dataset.resolve() / cls / name and f.path.is_file()
    # deterministic order
    assert [f.relpath for f in ds.files] == [f.relpath for f in scan_dataset(dataset).files]


def test_scan_split_layout_records_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root, per_class=2, split="train")
    make_dataset(root, per_class=1, split="Validation", seed=500)  # any case; validation -> val
    make_dataset(root, per_class=1, classes={"apple": (1, 2, 3), "sky": (3, 2, 1)}, split="test", seed=900)
    ds = scan_dataset(root)
    assert ds.class_names == ["apple", "grass", "sky"]
    assert ds.has_splits
    by_split: dict[str, list] = {}
    for f in ds.files:
        by_split.setdefault(f.split, []).append(f)
        assert ds.class_names[f.label] == f.relpath.split("/")[1]  # SPLIT/CLASS/file
    assert {k: len(v) for k, v in by_split.items()} == {"train": 6, "val": 3, "test": 2}
    assert all(f.relpath.startswith("Validation/") for f in by_split["val"])
    # one class folder name in two splits is one class
    assert {f.label for f in ds.files if f.relpath.split("/")[1] == "apple"} == {0}


def test_scan_nested_folders_belong_to_their_class(dataset: Path) -> None:
    save_image(dataset / "sky" / "2019" / "june" / "deep.png", pixels((0, 0, 255), 42))
    ds = scan_dataset(dataset)
    deep = [f for f in ds.files if f.relpath == "sky/2019/june/deep.png"]
    assert len(deep) == 1 and ds.class_names[deep[0].label] == "sky"
    assert "2019" not in ds.class_names and len(ds.class_names) == 3


def test_scan_ignores_hidden_and_non_image_files_and_counts_them(dataset: Path) -> None:
    expected = add_ignored(dataset)
    (dataset / "README.md").write_text("about this dataset\n")  # a file at the top level
    save_image(dataset / "grass" / ".thumbs" / "t.png", pixels((0, 0, 0), 1))  # hidden folder: not scanned
    ds = scan_dataset(dataset)
    assert len(ds.files) == 12
    assert sorted(ds.ignored) == sorted(expected + ["README.md"])
    assert not any(".thumbs" in f.relpath or ".hidden" in f.relpath for f in ds.files)


def test_scan_extensions_any_case(tmp_path: Path) -> None:
    root = tmp_path / "data"
    names = ["a.JPG", "b.Jpeg", "c.PNG", "d.bmp", "e.GIF", "f.WebP", "g.jpeg"]
    for k, name in enumerate(names):
        save_image(root / "one" / name, pixels((10, 200, 10), k))
        save_image(root / "two" / name, pixels((200, 10, 10), 100 + k))
    (root / "one" / "h.tiff").write_bytes(b"II*\x00")  # a format we do not read
    ds = scan_dataset(root)
    assert sorted(f.relpath for f in ds.files) == sorted([f"one/{n}" for n in names] + [f"two/{n}" for n in names])
    assert ds.ignored == ["one/h.tiff"]


def test_is_image_name() -> None:
    assert images.is_image_name("x.JPEG") and images.is_image_name("y.webp")
    assert not images.is_image_name(".x.jpg") and not images.is_image_name("x.txt")
    assert not images.is_image_name("jpg")


def test_scan_empty_class_folder_is_an_error(dataset: Path) -> None:
    (dataset / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class.*no images"):
        scan_dataset(dataset)


def test_scan_class_with_only_non_images_is_an_error(dataset: Path) -> None:
    (dataset / "docs").mkdir()
    (dataset / "docs" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"docs has no images \(1 other files\)"):
        scan_dataset(dataset)


def test_scan_one_class_is_an_error(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", classes={"only": (1, 2, 3)})
    with pytest.raises(UserError, match="one class.*at least two"):
        scan_dataset(root)


def test_scan_no_class_folders_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    save_image(root / "a.png", pixels((1, 1, 1), 0))
    with pytest.raises(UserError, match="no class folders"):
        scan_dataset(root)


def test_scan_empty_split_layout_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no class folders"):
        scan_dataset(tmp_path / "data")


@pytest.mark.parametrize("exists_as_file", [False, True])
def test_scan_missing_folder_is_an_error(tmp_path: Path, exists_as_file: bool) -> None:
    target = tmp_path / "data"
    if exists_as_file:
        target.write_bytes(b"x")
    with pytest.raises(UserError, match="data is not a folder"):
        scan_dataset(target)


# -- hashing --------------------------------------------------------------------------------------


def test_file_sha256(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes((1 << 20) * 2 + 12345)  # spans several read blocks
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(tmp_path / "empty.bin")) == hashlib.sha256(b"").hexdigest()
    (tmp_path / "other.bin").write_bytes(data[:-1] + b"\x00")
    assert file_sha256(tmp_path / "other.bin") != file_sha256(tmp_path / "big.bin")


# -- decoding -------------------------------------------------------------------------------------

MODES = ["rgba", "la", "p_gif", "p_png_transparency", "cmyk", "i16", "l", "bilevel", "webp", "exif6"]


@pytest.fixture
def mode_files(tmp_path: Path) -> dict[str, Path]:
    return add_modes(tmp_path / "modes")


@pytest.mark.parametrize("kind", MODES)
def test_decode_every_mode_to_rgb(mode_files: dict[str, Path], kind: str) -> None:
    out = decode_image(mode_files[kind], SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert out.max() > 0  # not a blank image


@pytest.mark.parametrize("kind", ["rgba", "p_gif", "cmyk", "webp"])
def test_decode_keeps_colour(mode_files: dict[str, Path], kind: str) -> None:
    """Reddish source images stay reddish whatever the container's mode (alpha dropped, CMYK converted)."""
    mean = decode_image(mode_files[kind], SIZE).reshape(-1, 3).mean(axis=0)
    assert mean[0] > 100 and mean[0] > 2.5 * mean[1] and mean[0] > 2.5 * mean[2], mean


@pytest.mark.parametrize("kind", ["l", "la", "i16"])
def test_decode_grey_gives_equal_channels(mode_files: dict[str, Path], kind: str) -> None:
    out = decode_image(mode_files[kind], SIZE).astype(int)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_decode_16_bit_is_scaled_not_clipped(mode_files: dict[str, Path]) -> None:
    """A 0..65535 ramp maps onto 0..255; clipping at 255 would make most of it white."""
    out = decode_image(mode_files["i16"], SIZE)[..., 0].astype(float)
    assert 100 < out.mean() < 155
    assert out.min() < 15 and out.max() > 240
    assert (out == 255).mean() < 0.1


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    path = exif_rotated_jpeg(tmp_path / "rot.jpg")
    with Image.open(path) as img:
        assert img.size == (40, 30)  # stored landscape...
    seen: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        seen.append(self.size)
        return real_resize(self, size, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", spy)
        out = decode_image(path, SIZE).astype(int)
    assert seen == [(30, 40)]  # ...decoded portrait, before the square resize
    # rotated 90 degrees clockwise: the left (red) half is now on top, the right (blue) half below
    top, bottom = out[: SIZE // 2 - 2].reshape(-1, 3).mean(0), out[SIZE // 2 + 2 :].reshape(-1, 3).mean(0)
    assert top[0] > 150 and top[2] < 80, top
    assert bottom[2] > 150 and bottom[0] < 80, bottom
    left, right = out[:, : SIZE // 2].reshape(-1, 3).mean(0), out[:, SIZE // 2 :].reshape(-1, 3).mean(0)
    assert abs(left[0] - right[0]) < 30  # no left/right split any more


@pytest.mark.parametrize("wh", [(5, 3), (300, 100), (32, 32), (640, 480)])
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_decode_resizes_any_shape(tmp_path: Path, wh: tuple[int, int], ext: str) -> None:
    path = save_image(tmp_path / f"x.{ext}", pixels((30, 160, 90), 1, wh), quality=95)
    out = decode_image(path, SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    mean = out.reshape(-1, 3).mean(0)
    assert mean[1] > mean[0] and mean[1] > mean[2]  # still green (draft mode and resize keep colour)


@pytest.mark.parametrize("resize", sorted(images.RESIZE_METHODS))
def test_decode_resize_methods(tmp_path: Path, resize: str) -> None:
    path = save_image(tmp_path / "x.png", pixels((120, 60, 30), 2, (100, 70)))
    out = decode_image(path, 48, resize)
    assert out.shape == (48, 48, 3)


def test_decode_is_deterministic(tmp_path: Path) -> None:
    path = noise_jpeg(tmp_path / "n.jpg", wh=(400, 300))
    assert np.array_equal(decode_image(path, SIZE), decode_image(path, SIZE))


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zero", "empty file"),
        ("truncated", "truncated"),
        ("text", "not an image"),
        ("notes", "not an image"),
        ("corrupt_png", "corrupt"),
    ],
)
def test_decode_broken_files_raise_image_error(tmp_path: Path, kind: str, reason: str) -> None:
    expected = add_broken(tmp_path / "data")
    paths = {"zero": "apple/zero.jpg", "truncated": "apple/truncated.jpg", "text": "apple/text.png"}
    if kind == "notes":
        path = tmp_path / "notes.txt"
        path.write_text("not an image at all\n")
    elif kind == "corrupt_png":
        path = save_image(tmp_path / "c.png", np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
        data = bytearray(path.read_bytes())
        data[200:400] = bytes(b ^ 0xFF for b in data[200:400])  # inside the compressed pixel data
        path.write_bytes(bytes(data))
    else:
        path = tmp_path / "data" / paths[kind]
        assert expected[paths[kind]] in reason  # the fixture's own table agrees
    with pytest.raises(ImageError, match=reason) as info:
        decode_image(path, SIZE)
    assert str(info.value)  # the message is the reason recorded in the cache


def test_decode_refuses_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / "big.png", pixels((1, 2, 3), 0, (100, 80)))
    assert decode_image(path, SIZE).shape == (SIZE, SIZE, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 80 - 1)
    with pytest.raises(ImageError, match=r"refused: 100x80 pixels exceeds the 7999-pixel"):
        decode_image(path, SIZE)


@pytest.mark.parametrize("limit", [1000])  # Pillow's own DecompressionBombError (2x its limit)
def test_decode_refuses_pillow_bomb_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    path = save_image(tmp_path / "big.png", pixels((1, 2, 3), 0, (100, 80)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError, match="refused"):
        decode_image(path, SIZE)


# -- hostile input: bounded memory, no external programs, only ImageError ------------------------------

HUGE = 9400  # 88 megapixels: under MAX_PIXELS, so the decoder must cope rather than refuse
# Peak RSS from /proc (VmHWM: this process's own high-water mark). getrusage's ru_maxrss would not do: Linux
# carries it over exec from the forking parent, so under a big pytest process it starts high.
MEASURE = """
import sys
sys.path.insert(0, sys.argv[1])
from pipeline.images import decode_image
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
data = open(sys.argv[2], "rb").read()
before = status_kb("VmRSS")
out = decode_image(data, 224)
print((status_kb("VmHWM") - before) / 1024, out.shape, int(out.mean()))
"""


@pytest.fixture(scope="module")
def huge_pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 9400x9400 16-bit and a 1-bit PNG: kilobytes on disk, 88 megapixels decoded."""
    folder = tmp_path_factory.mktemp("huge")
    grey = Image.new("I;16", (HUGE, HUGE), 20_000)
    grey.paste(60_000, (0, 0, HUGE // 2, HUGE))  # the left half bright
    grey.save(folder / "deep.png")
    del grey
    bits = Image.new("1", (HUGE, HUGE), 0)
    bits.paste(1, (0, 0, HUGE // 2, HUGE))
    bits.save(folder / "bits.png")
    return {"16-bit": folder / "deep.png", "1-bit": folder / "bits.png"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["16-bit", "1-bit"])
def test_huge_deep_and_bilevel_pngs_decode_in_bounded_memory(huge_pngs: dict[str, Path], kind: str) -> None:
    """Peak RSS growth of decoding one 88-megapixel file, measured in a fresh process (the finding: 2.5 GB)."""
    path = huge_pngs[kind]
    assert path.stat().st_size < 1_000_000
    with Image.open(path) as img:
        assert img.size == (HUGE, HUGE) and img.mode == {"16-bit": "I;16", "1-bit": "1"}[kind]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(ROOT), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    growth_mb, shape = done.stdout.split(maxsplit=1)
    assert shape.startswith("(224, 224, 3)")
    assert float(growth_mb) < 300, f"{kind}: peak RSS grew by {growth_mb} MB"


def test_deep_image_reduced_in_bands_matches_a_full_size_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Box-reducing a 16-bit image before the 8-bit rounding (in bands) changes a pixel by a level or two."""
    ramp = np.random.default_rng(4).integers(0, 65536, (700, 900)).astype(np.uint16)
    path = save_image(tmp_path / "deep.png", ramp)
    monkeypatch.setattr(images, "BAND_BYTES", 4 * 900 * 7)  # bands of a few rows: their seams must not show
    out = decode_image(path, SIZE).astype(int)
    grey = Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB")
    expected = np.asarray(grey.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=images.REDUCING_GAP))
    assert np.abs(out - expected).max() <= 2


GHOSTSCRIPT = '#!/bin/sh\ntouch "$(dirname "$0")/gs-was-run"\nexit 1\n'
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n"


def test_postscript_named_jpg_is_refused_without_running_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in `gs` first on PATH leaves a marker when run: Pillow's EPS plugin would run it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(GHOSTSCRIPT)
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "holiday.jpg"
    path.write_bytes(EPS)
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError, match="not an image in a format read here"):
            decode_image(source, SIZE)
    assert not (bin_dir / "gs-was-run").exists()
    with pytest.raises(Exception), Image.open(path) as img:  # noqa: B017 (every plugin open: the stand-in gs runs)
        img.load()
    assert (bin_dir / "gs-was-run").exists()  # so the stand-in would have told


@pytest.mark.parametrize("name", ["DDS_NotImplementedError.bin", "SPIDER_AttributeError.bin", "TIFF_TypeError.bin"])
def test_decoder_crashers_are_image_errors(name: str) -> None:
    path = requires_shared("testdata", "decoder-crashers", name)
    with pytest.raises(ImageError):
        decode_image(path, SIZE)
    with pytest.raises(ImageError):
        decode_image(path.read_bytes(), SIZE)


def fuzz_seeds() -> list[bytes]:
    """One small valid image in each allowed format (and a few modes): what the mutator starts from."""
    rgb = pixels((180, 60, 40), 9, (12, 10))
    seeds = []
    for fmt, mode, kwargs in [
        ("JPEG", "RGB", {"quality": 80}),
        ("PNG", "RGB", {}),
        ("PNG", "I;16", {}),
        ("PNG", "P", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("BMP", "1", {}),
        ("WEBP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("TIFF", "I;16", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("TIFF", "F", {}),
    ]:
        img = Image.fromarray(rgb)
        if mode == "I;16":
            img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 250)
        elif mode == "F":
            img = Image.fromarray(rgb[..., 0].astype(np.float32) * 3.5)
        elif mode != "RGB":
            img = img.convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **kwargs)
        seeds.append(buffer.getvalue())
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A seeded byte mutation: flip, overwrite with extreme values, cut, duplicate or drop a run of bytes."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        at = int(rng.integers(0, len(data)))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data[at : at + 4] = bytes(rng.choice([0, 0xFF, 0x7F, 0x80], 4).astype(np.uint8))
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            run = data[at : at + int(rng.integers(1, 32))]
            data[at:at] = run
        else:
            del data[at : at + int(rng.integers(1, 16))]
        if not data:
            break
    return bytes(data)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # Pillow warns about many of these inputs (bad TIFF tags, bombs)
def test_mutation_fuzz_raises_only_image_error() -> None:
    """20,000 mutated images of every allowed format (seeded): each decodes or raises ImageError, in < 60 s."""
    rng = np.random.default_rng(2024)
    seeds = fuzz_seeds()
    start, outcomes = time.perf_counter(), {"decoded": 0, "refused": 0}
    for k in range(20_000):
        data = mutate(seeds[k % len(seeds)], rng)
        try:
            decode_image(data, 8)
            outcomes["decoded"] += 1
        except ImageError:
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 (the failure this test exists for)
            pytest.fail(
                f"input {k} (seed format {k % len(seeds)}) raised {type(exc).__name__}: {exc}; bytes {data[:64]!r}"
            )
    seconds = time.perf_counter() - start
    assert seconds < 60, f"20,000 inputs took {seconds:.0f} s"
    assert min(outcomes.values()) > 1000, outcomes  # the mutations reach the decoders and past them


# The decoding recipe (DECODER, part of every cache fingerprint) pinned on a real image: if this changes,
# DECODER must change too, or caches would silently mix pixels of two recipes.
# (JPEG at its size; a big JPEG, drafted and reduced; a 28 px RGBA PNG, upscaled; a grey JPEG.)
GOLDEN = {
    "oxford_flowers12": ("bluebell/image_0241.jpg", "20449eeb17a7b80570a208263c5142d318aae88bf2096803fe9d593049f7a9ab"),
    "usd_bills_kaggle": (
        "10_dollar/-10-dolares-2013-estados-unidos-hamilton-sc-10-dollars.jpg",
        "4ca34715492aaec643e0757d81a17057bc5bc1a322617a9c9ddf27cffc558340",
    ),
    "rps_moroney_28px": ("paper/paper01-000.png", "c428b2daff0dec9b09c334fdadd4c53f18fff961e477df9aeeb3ad4cef1fbfb9"),
    "brain_mri_tumor": ("no/1 no.jpeg", "96ca110c72c6938054ae4c26da1d2abaf71e3afbc71f0077eb2895d8b7f49aa3"),
}


@pytest.mark.integration
@pytest.mark.parametrize("dataset", sorted(GOLDEN))
def test_decoded_pixels_of_a_real_image_are_pinned(dataset: str) -> None:
    relpath, expected = GOLDEN[dataset]
    path = requires_shared("datasets", dataset, relpath)
    digest = hashlib.sha256(decode_image(path, 224, "bilinear").tobytes()).hexdigest()
    assert digest == expected, f"decoded pixels changed: change images.DECODER ({images.DECODER}) and this pin"
