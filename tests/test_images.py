"""pipeline.images: scanning a dataset folder, hashing files, decoding every format to RGB."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.images as images
from conftest import (CLASS_COLOURS, add_broken, add_ignored, add_modes, exif_rotated_jpeg, make_dataset,
                      noise_jpeg, pixels, save_image)
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
    top, bottom = out[: SIZE // 2 - 2].reshape(-1, 3).mean(0), out[SIZE // 2 + 2:].reshape(-1, 3).mean(0)
    assert top[0] > 150 and top[2] < 80, top
    assert bottom[2] > 150 and bottom[0] < 80, bottom
    left, right = out[:, : SIZE // 2].reshape(-1, 3).mean(0), out[:, SIZE // 2:].reshape(-1, 3).mean(0)
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


@pytest.mark.parametrize("kind, reason", [
    ("zero", "empty file"), ("truncated", "truncated"), ("text", "not an image"), ("notes", "not an image"),
    ("corrupt_png", "corrupt"),
])
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
