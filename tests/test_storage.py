"""Images in object storage: s3:// through fsspec against a local S3-compatible server (moto).

Extracting from the bucket gives the cache that extracting the same folder from disk gives (rows,
hashes, skipped files, features), with the URL kept as the dataset root; predict reads objects too;
mistakes (an unknown protocol, a missing bucket, wrong credentials, a missing extra, bad options) are
one `error:` line and exit code 2, with nothing written. The Ray engine on object storage is tested on
a two-node cluster in test_cluster.py.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, add_broken
from model_fixtures import TINY_CONFIG, Conversion, assert_same_cache, make_pattern_dataset, quiet
from object_store import BUCKET, S3
from test_cli import assert_user_error, invoke

from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.images import scan_dataset
from pipeline.storage import STORAGE_OPTIONS_ENV, storage_options

RUNTIME = "tflite"  # the CPU's runtime: the session's conversion, placed beside the caches


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 8 images, a byte-identical copy in another class, broken files and a non-image file."""
    root = make_pattern_dataset(tmp_path_factory.mktemp("store") / "data")
    shutil.copy(root / "bars" / "img_00.png", root / "checks" / "copy_of_bars.png")
    add_broken(root, "bars", "checks")
    (root / "speckle" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def url(s3: S3, data: Path) -> str:
    return s3.upload(data, "flowers/data")


@pytest.fixture(scope="module")
def caches(tiny_tflite: Conversion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's caches, with the session's converted backbone beside them."""
    folder = tmp_path_factory.mktemp("caches")
    tiny_tflite.place(folder)
    return folder


def test_scan_of_a_bucket_is_the_scan_of_the_folder(s3: S3, data: Path, url: str, tmp_path: Path) -> None:
    on_disk, in_store = scan_dataset(data), scan_dataset(url + "/")  # a trailing slash changes nothing
    assert in_store.root == url
    assert in_store.class_names == on_disk.class_names
    assert [(f.relpath, f.label, f.split) for f in in_store.files] == [
        (f.relpath, f.label, f.split) for f in on_disk.files
    ]
    assert [f.path for f in in_store.files] == [f"{url}/{f.relpath}" for f in on_disk.files]
    assert sorted(in_store.ignored) == sorted(on_disk.ignored)
    # the train/val/test layout too
    split = tmp_path / "split"
    for name, part in (("train", "bars"), ("train", "checks"), ("val", "bars"), ("val", "checks")):
        shutil.copytree(data / part, split / name / part)
    on_disk, in_store = scan_dataset(split), scan_dataset(s3.upload(split, "split"))
    assert in_store.has_splits
    assert [(f.relpath, f.label, f.split) for f in in_store.files] == [
        (f.relpath, f.label, f.split) for f in on_disk.files
    ]


def test_extract_from_the_bucket_equals_extract_from_disk(data: Path, url: str, caches: Path) -> None:
    options = {"runtime": RUNTIME, "progress": False, "log": quiet()}
    reference = extract(data, TINY_CONFIG, cache=caches / "disk.h5", **options)
    summary = extract(url, TINY_CONFIG, cache_dir=caches, **options)
    assert summary.cache_path.name.startswith("data-")  # named after the prefix's last part, as a folder is
    assert summary.engine == "local" and summary.n_new == reference.n_new and summary.n_ignored == 1
    assert_same_cache(summary.cache_path, reference.cache_path)
    assert load(summary.cache_path).attrs["dataset_root"] == url  # the URL, not a local copy
    again = extract(url, TINY_CONFIG, cache_dir=caches, **options)
    assert again.n_new == 0 and again.n_reused == again.n_files  # hashed from the objects, found in the cache


def test_predict_reads_objects(data: Path, url: str, caches: Path, tmp_path: Path) -> None:
    from pipeline.heads import fit_head
    from pipeline.predict import predict

    cache = extract(url, TINY_CONFIG, cache_dir=caches, runtime=RUNTIME, progress=False, log=quiet()).cache_path
    head = fit_head(cache, "logreg", out=tmp_path / "head", n_jobs=1, log=quiet()).folder
    in_store = predict([f"{url}/speckle"], head, runtime=RUNTIME, log=quiet())
    on_disk = predict([data / "speckle"], head, runtime=RUNTIME, log=quiet())
    assert [p.path for p in in_store] == [f"{url}/speckle/{Path(p.path).name}" for p in on_disk]
    assert [p.classes for p in in_store] == [p.classes for p in on_disk]


def test_storage_options_come_from_json_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert storage_options('{"anon": false}') == {"anon": False}
    (tmp_path / "opts.json").write_text('{"endpoint_url": "http://127.0.0.1:9"}')
    assert storage_options(f"@{tmp_path / 'opts.json'}") == {"endpoint_url": "http://127.0.0.1:9"}
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, '{"key": "k"}')
    assert storage_options() == {"key": "k"}
    with pytest.raises(UserError, match="not valid JSON") as error:
        storage_options('{"secret": "hunter2"')
    assert "hunter2" not in str(error.value)  # never echoed: it may be a credential
    with pytest.raises(UserError, match="must be a JSON object"):
        storage_options("[1, 2]")


def test_mistakes_are_one_line_and_write_nothing(
    s3: S3, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is also a mapping)
    out = tmp_path / "c"

    def extract_cli(source: str, *more: str):
        return invoke("extract", source, *TINY_ARGS, "--runtime", RUNTIME, "--cache-dir", out, "--no-progress", *more)

    assert_user_error(extract_cli("nosuch://bucket/data"), "unknown storage protocol nosuch://")
    assert_user_error(extract_cli(f"s3://{BUCKET}-missing/data"), "does not exist")
    assert_user_error(extract_cli(f"s3://{BUCKET}/no/such/prefix"), "is empty or is not a folder")
    assert_user_error(extract_cli(url, "--storage-options", '{"endpoint_url": 1'), "--storage-options is not valid")
    with s3.checking_credentials():
        assert_user_error(extract_cli(url), "access denied", "check the credentials")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails, as when the extra is missing
    monkeypatch.delitem(registry._registry, "s3", raising=False)  # forget the class loaded before
    assert_user_error(extract_cli(url), "needs s3fs", "pip install 'cnncodes[s3]'")
    assert not out.exists()


def test_an_object_that_cannot_be_read_now_is_tried_again(
    data: Path, url: str, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import stream

    real_read, flaky = stream.read_bytes, f"{url}/checks/img_03.png"

    def read_bytes(path, options=None):
        if path == flaky:  # a network error, or a worker without the credentials
            raise OSError("connection reset by peer")
        return real_read(path, options)

    options = {"runtime": RUNTIME, "progress": False, "log": quiet(), "cache": caches / "flaky.h5"}
    monkeypatch.setattr(stream, "read_bytes", read_bytes)
    first = extract(url, TINY_CONFIG, **options)
    assert ("checks/img_03.png", "unreadable: connection reset by peer") in first.skipped
    assert "checks/img_03.png" not in load(first.cache_path).paths
    monkeypatch.undo()
    second = extract(url, TINY_CONFIG, **options)  # not remembered as a bad image: read again, and kept
    assert second.n_new == 1 and "checks/img_03.png" in load(second.cache_path).paths
    assert_same_cache(
        second.cache_path,
        extract(data, TINY_CONFIG, cache=caches / "disk2.h5", runtime=RUNTIME, progress=False, log=quiet()).cache_path,
    )
