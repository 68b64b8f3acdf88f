"""pipeline.extract + pipeline.cache: broken files, cache layout, incremental runs, journal, disk full, resume."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    CLASS_COLOURS,
    RUNTIME,
    add_broken,
    add_ignored,
    add_images,
    add_modes,
    make_dataset,
    pixels,
    save_image,
)
from model_fixtures import SMALL_APPLICATION

import pipeline.cache as cache_module
from pipeline.backbones import BackboneConfig
from pipeline.cache import CacheWriter, load
from pipeline.errors import UserError
from pipeline.extract import extract, summary_lines
from pipeline.images import file_sha256


def run(data: Path, config: BackboneConfig, cache: Path, **kwargs):
    """extract() quietly, with small batches so that even tiny datasets take several."""
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("runtime", RUNTIME)
    return extract(data, config, cache=cache, progress=False, log=lambda m: None, **kwargs)


def features_by_hash(c) -> dict[str, np.ndarray]:
    return {h: f for h, f in zip(c.content_hash, c.features)}


def assert_same_features(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float noise, relative to the features' own scale (random weights give tiny values)."""
    scale = float(np.abs(b).max())
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "features.h5"


# -- one run over a messy dataset ------------------------------------------------------------------


def test_broken_files_are_skipped_with_reasons(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    broken = add_broken(dataset)
    ignored = add_ignored(dataset)
    modes = add_modes(dataset / "grass")
    summary = run(dataset, tiny_config, cache_path)

    good = 12 + len(modes)
    assert summary.n_files == good + len(broken)
    assert summary.n_rows == good and summary.n_new == good
    assert summary.n_reused == 0  # nothing was in the cache before this run
    assert summary.n_ignored == len(ignored) and not summary.interrupted
    assert dict(summary.skipped).keys() == broken.keys() and len(summary.skipped) == len(broken)
    for path, reason in summary.skipped:
        assert broken[path] in reason, (path, reason)

    c = load(cache_path)
    assert len(c) == good and not set(c.paths) & broken.keys()
    assert {Path(p).name for p in c.paths} >= {p.name for p in modes.values()}
    # every bad file, the two byte-identical empty ones included, is listed in the cache with its reason
    assert sorted(p for p, _ in c.skipped) == sorted(broken)
    for path, reason in c.skipped:
        assert broken[path] in reason, (path, reason)
    lines = "\n".join(summary_lines(summary))
    assert all(path in lines for path in broken) and f"skipped {len(broken)}" in lines


def test_all_files_broken_still_writes_a_cache(tmp_path: Path, tiny_config, cache_path, shared_runtime) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.png").write_text(f"not a png {cls}")
    summary = run(root, tiny_config, cache_path)
    assert summary.n_rows == 0 and len(summary.skipped) == 2
    c = load(cache_path)
    assert len(c) == 0 and c.features.shape[0] == 0 and len(c.skipped) == 2


def test_cache_layout(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    summary = run(dataset, tiny_config, cache_path)
    assert summary.cache_path == cache_path
    with h5py.File(cache_path, "r") as f:
        assert {"features", "labels", "class_names", "paths", "content_hash", "split", "runtime", "skipped"} <= set(
            f.keys()
        )
        assert set(f["skipped"].keys()) == {"paths", "content_hash", "reasons"}
        assert f["features"].dtype == np.float32 and f["labels"].dtype == np.int32
    c = load(cache_path)
    resolved = tiny_config.resolved()
    n = 12
    assert c.features.shape == (n, 1280) and c.features.dtype == np.float32 and np.isfinite(c.features).all()
    assert c.labels.shape == (n,) and c.class_names == sorted(CLASS_COLOURS)
    assert len(c.paths) == len(c.content_hash) == len(c.split) == len(c.runtime) == n
    for path, label, digest in zip(c.paths, c.labels, c.content_hash):
        assert not Path(path).is_absolute() and "\\" not in path and str(dataset) not in path
        assert c.class_names[label] == path.split("/")[0]
        assert digest == file_sha256(dataset / path)
    assert set(c.split) == {""} and set(c.runtime) == {"keras"} and c.skipped == []
    a = c.attrs
    assert a["format_version"] == cache_module.FORMAT_VERSION == 2
    assert a["fingerprint"] == resolved.fingerprint()
    assert c.identity == resolved.identity()
    assert (a["backbone"], a["weights"], a["layer"], a["pooling"]) == (
        "MobileNetV2",
        "none (random, seed 0)",
        "",
        "avg",
    )
    assert (a["image_size"], a["resize"], a["alpha"]) == (32, "bilinear", 0.35)
    assert a["decoder"].startswith("pillow") and a["feature_dim"] == 1280
    versions = json.loads(a["versions_json"])
    assert {"cnncodes", "keras", "numpy", "h5py", "pillow"} <= versions.keys() and versions["numpy"] == np.__version__
    assert a["dataset_root"] == str(dataset.resolve()) and a["n_ignored"] == 0
    # rows of different images differ (relative to the features' scale)
    scale = np.abs(c.features).max()
    assert scale > 0 and np.abs(c.features[0] - c.features[1]).max() > 1e-3 * scale


def test_split_layout_recorded(tmp_path: Path, tiny_config, cache_path, shared_runtime) -> None:
    root = tmp_path / "data"
    make_dataset(root, per_class=2, split="train")
    make_dataset(root, per_class=1, split="val", seed=300)
    make_dataset(root, per_class=1, split="test", seed=600)
    run(root, tiny_config, cache_path)
    c = load(cache_path)
    assert len(c) == 12
    for path, split, label in zip(c.paths, c.split, c.labels):
        top, cls, _ = path.split("/")
        assert split == top and c.class_names[label] == cls
    assert sorted(c.split) == sorted(["train"] * 6 + ["val"] * 3 + ["test"] * 3)


def test_duplicate_files_share_one_extraction(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    shutil.copy(dataset / "apple" / "img_000.png", dataset / "grass" / "copy_of_apple.png")
    summary = run(dataset, tiny_config, cache_path)
    # 13 files are new to the cache, the backbone ran 12 times: the copy shares the original's features
    assert summary.n_rows == 13 and summary.n_new == 13 and shared_runtime() == 12
    c = load(cache_path)
    i, j = c.paths.index("apple/img_000.png"), c.paths.index("grass/copy_of_apple.png")
    assert c.content_hash[i] == c.content_hash[j]
    np.testing.assert_array_equal(c.features[i], c.features[j])
    assert c.class_names[c.labels[j]] == "grass"


# -- incremental runs ------------------------------------------------------------------------------


def test_rerun_extracts_nothing(dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch) -> None:
    add_broken(dataset)
    first = run(dataset, tiny_config, cache_path)
    before = load(cache_path)

    import pipeline.extract as extract_module

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is new: the model must not even be built")

    monkeypatch.setattr(extract_module, "make_runtime", no_model)
    second = run(dataset, tiny_config, cache_path)
    assert second.n_new == 0 and second.n_resumed == 0
    assert second.n_reused == second.n_files == first.n_files
    assert sorted(second.skipped) == sorted(first.skipped)  # broken files are remembered, not retried
    after = load(cache_path)
    assert after.paths == before.paths and after.content_hash == before.content_hash
    np.testing.assert_array_equal(after.features, before.features)
    assert sorted(after.skipped) == sorted(before.skipped)


def test_renamed_file_reuses_its_features(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    run(dataset, tiny_config, cache_path)
    before = load(cache_path)
    old = before.features[before.paths.index("sky/img_001.jpg")]
    (dataset / "sky" / "img_001.jpg").rename(dataset / "sky" / "renamed.jpg")
    (dataset / "apple" / "img_002.png").rename(dataset / "grass" / "moved_to_grass.png")
    n_before = shared_runtime()
    summary = run(dataset, tiny_config, cache_path)
    assert summary.n_new == 0 and summary.n_reused == 12 and shared_runtime() == n_before
    c = load(cache_path)
    assert "sky/renamed.jpg" in c.paths and "sky/img_001.jpg" not in c.paths
    np.testing.assert_array_equal(c.features[c.paths.index("sky/renamed.jpg")], old)
    moved = c.paths.index("grass/moved_to_grass.png")
    assert c.class_names[c.labels[moved]] == "grass"  # the label follows the folder, not the content


def test_deleted_file_leaves_the_cache(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    run(dataset, tiny_config, cache_path)
    gone = dataset / "grass" / "img_003.jpg"
    digest = file_sha256(gone)
    gone.unlink()
    summary = run(dataset, tiny_config, cache_path)
    assert summary.n_rows == 11 and summary.n_new == 0
    c = load(cache_path)
    assert "grass/img_003.jpg" not in c.paths and digest not in c.content_hash and len(c) == 11


def test_added_and_edited_files_only_are_extracted(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    run(dataset, tiny_config, cache_path)
    before = load(cache_path)
    add_images(dataset, "apple", 1, start=0)
    edited = dataset / "sky" / "img_000.png"
    save_image(edited, pixels((250, 250, 0), 4242))  # same path, new content
    n_before = shared_runtime()
    summary = run(dataset, tiny_config, cache_path)
    assert summary.n_new == 2 and summary.n_reused == 11 and summary.n_rows == 13
    assert shared_runtime() - n_before == 2  # only the two changed files went through the model
    c = load(cache_path)
    assert "apple/new_0000.png" in c.paths
    old_rows = features_by_hash(before)
    for path, digest, feats in zip(c.paths, c.content_hash, c.features):
        if path not in ("apple/new_0000.png", "sky/img_000.png"):
            np.testing.assert_array_equal(feats, old_rows[digest])
    assert c.content_hash[c.paths.index("sky/img_000.png")] == file_sha256(edited) not in old_rows


def test_removed_class_relabels(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    run(dataset, tiny_config, cache_path)
    shutil.rmtree(dataset / "apple")
    run(dataset, tiny_config, cache_path)
    c = load(cache_path)
    assert c.class_names == ["grass", "sky"] and len(c) == 8
    assert all(c.class_names[l] == p.split("/")[0] for p, l in zip(c.paths, c.labels))


def test_other_config_same_cache_is_refused(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    run(dataset, tiny_config, cache_path)
    before = cache_path.read_bytes()
    other = replace(tiny_config, image_size=48)
    with pytest.raises(UserError, match=r"written with another configuration \(image_size: 32 -> 48\)") as info:
        run(dataset, other, cache_path)
    assert "--cache" in str(info.value)
    assert cache_path.read_bytes() == before  # untouched
    with pytest.raises(UserError, match="layer: '' -> 'block_3_expand_relu'"):
        run(dataset, replace(tiny_config, layer="block_3_expand_relu"), cache_path)


def test_default_cache_names_differ_per_config(dataset: Path, tiny_config, tmp_path, shared_runtime) -> None:
    a = extract(dataset, tiny_config, cache_dir=tmp_path / "c", runtime=RUNTIME, progress=False, log=lambda m: None)
    b = extract(
        dataset,
        replace(tiny_config, pooling="max"),
        cache_dir=tmp_path / "c",
        runtime=RUNTIME,
        progress=False,
        log=lambda m: None,
    )
    assert a.cache_path != b.cache_path and a.cache_path.parent == b.cache_path.parent == tmp_path / "c"
    assert a.cache_path.name.startswith("data-MobileNetV2-32-") and a.cache_path.suffix == ".h5"
    assert load(a.cache_path).attrs["pooling"] == "avg" and load(b.cache_path).attrs["pooling"] == "max"
    assert a.n_new == b.n_new == 12  # the second configuration did not reuse the first one's rows


def test_features_deterministic_for_random_weights(dataset: Path, tmp_path) -> None:
    """Two runs, each building its own model from the seed, give the same features."""
    run(dataset, SMALL_APPLICATION, tmp_path / "one.h5", batch_size=5)
    run(dataset, SMALL_APPLICATION, tmp_path / "two.h5", batch_size=3)
    one, two = load(tmp_path / "one.h5"), load(tmp_path / "two.h5")
    assert one.paths == two.paths
    assert_same_features(one.features, two.features)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(chunk_size=0), dict(batch_size=2.5)])
def test_bad_run_options(dataset: Path, tiny_config, cache_path, bad) -> None:
    with pytest.raises(UserError, match=f"^{next(iter(bad))} is"):
        run(dataset, tiny_config, cache_path, **bad)
    assert not cache_path.exists()


# -- the journal -----------------------------------------------------------------------------------


def spy_on_commit(monkeypatch) -> list[list[str]]:
    """Record the journal files present when each commit starts."""
    seen: list[list[str]] = []
    real = CacheWriter.commit

    def commit(self, *args, **kwargs):
        seen.append(sorted(p.name for p in self.partial_dir.glob("chunk-*.npz")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "commit", commit)
    return seen


def test_chunks_are_journalled_then_removed(
    dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch
) -> None:
    seen = spy_on_commit(monkeypatch)
    summary = run(dataset, tiny_config, cache_path, chunk_size=3, batch_size=2)
    assert summary.n_rows == 12
    assert len(seen) == 1 and len(seen[0]) == 4  # 12 rows in chunks of 3, all written before the commit
    assert not cache_path.with_name(cache_path.name + ".partial").exists()
    assert not list(cache_path.parent.glob("*.tmp*"))
    assert len(load(cache_path)) == 12


def flaky_flush(monkeypatch, fail_after: int, exc: BaseException) -> list[int]:
    """Make CacheWriter.flush raise exc once fail_after chunks have been written in this run."""
    written: list[int] = []
    real = CacheWriter.flush

    def flush(self):
        if len(written) >= fail_after and self._pending:
            raise exc
        if self._pending:
            written.append(len(self._pending))
        return real(self)

    monkeypatch.setattr(CacheWriter, "flush", flush)
    return written


def test_crashed_run_resumes_from_the_journal(
    tmp_path: Path, tiny_config, cache_path, shared_runtime, monkeypatch
) -> None:
    data = make_dataset(tmp_path / "data", per_class=6)
    add_broken(data)
    with monkeypatch.context() as mp:
        written = flaky_flush(mp, 2, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(data, tiny_config, cache_path, chunk_size=4, batch_size=2)
    assert written == [4, 4]
    partial = cache_path.with_name(cache_path.name + ".partial")
    assert len(list(partial.glob("chunk-*.npz"))) == 2 and not cache_path.exists()

    n_before = shared_runtime()
    summary = run(data, tiny_config, cache_path, chunk_size=4, batch_size=2)
    assert summary.n_resumed == 8 and summary.n_new == 18 - 8 and summary.n_rows == 18
    assert shared_runtime() - n_before == 10  # the journalled rows were not extracted again
    assert len(summary.skipped) == 4 and not partial.exists()

    fresh = run(data, tiny_config, tmp_path / "fresh.h5")
    got, want = load(cache_path), load(tmp_path / "fresh.h5")
    assert got.paths == want.paths and got.content_hash == want.content_hash
    assert_same_features(got.features, want.features)
    assert sorted(got.skipped) == sorted(want.skipped) and fresh.n_new == 18


def test_resume_on_top_of_an_old_cache(dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch) -> None:
    run(dataset, tiny_config, cache_path)
    old = load(cache_path)
    add_images(dataset, "grass", 7, start=0)
    with monkeypatch.context() as mp:
        flaky_flush(mp, 1, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(dataset, tiny_config, cache_path, chunk_size=3, batch_size=2)
    still = load(cache_path)  # the last complete cache is untouched
    assert still.paths == old.paths
    np.testing.assert_array_equal(still.features, old.features)
    summary = run(dataset, tiny_config, cache_path, chunk_size=3)
    assert (summary.n_reused, summary.n_resumed, summary.n_new, summary.n_rows) == (12, 3, 4, 19)


def test_journal_of_another_config_is_ignored(
    dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch
) -> None:
    other = replace(tiny_config, pooling="max")
    with monkeypatch.context() as mp:
        flaky_flush(mp, 1, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(dataset, other, cache_path, chunk_size=4)
    summary = run(dataset, tiny_config, cache_path, chunk_size=4)
    assert summary.n_resumed == 0 and summary.n_new == 12
    assert load(cache_path).attrs["pooling"] == "avg"
    assert not cache_path.with_name(cache_path.name + ".partial").exists()


def test_keyboard_interrupt_keeps_finished_rows(
    tmp_path: Path, tiny_config, cache_path, shared_runtime, monkeypatch
) -> None:
    data = make_dataset(tmp_path / "data", per_class=6)
    import pipeline.extract as extract_module

    make = extract_module.make_runtime
    calls = {"n": 0}

    def interrupting(config, kind="auto", **kwargs):
        engine = make(config, kind, **kwargs)
        inner = engine.__call__

        class Runtime:
            name, image_size, dim = engine.name, engine.image_size, engine.dim

            def __call__(self, batch):
                calls["n"] += 1
                if calls["n"] == 4:
                    raise KeyboardInterrupt
                return inner(batch)

        return Runtime()

    monkeypatch.setattr(extract_module, "make_runtime", interrupting)
    summary = run(data, tiny_config, cache_path, batch_size=3, chunk_size=4)
    assert summary.interrupted and summary.n_new == summary.n_rows == 9  # three batches of 3 finished
    assert "interrupted" in summary_lines(summary)[-1]
    c = load(cache_path)
    assert len(c) == 9 and not cache_path.with_name(cache_path.name + ".partial").exists()
    monkeypatch.setattr(extract_module, "make_runtime", make)
    again = run(data, tiny_config, cache_path)
    assert again.n_new == 9 and again.n_reused == 9 and again.n_rows == 18 and not again.interrupted


# -- disk full -------------------------------------------------------------------------------------


def test_disk_full_keeps_the_old_cache_and_the_journal(
    dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch
) -> None:
    run(dataset, tiny_config, cache_path)
    old = load(cache_path)
    add_images(dataset, "sky", 3, start=0)
    real_usage = shutil.disk_usage
    with monkeypatch.context() as mp:
        mp.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
        with pytest.raises(UserError, match="the disk is full") as info:
            run(dataset, tiny_config, cache_path, chunk_size=2)
    message = str(info.value)
    assert f"previous cache {cache_path} is intact" in message and "run extract again" in message
    still = load(cache_path)
    assert still.paths == old.paths
    np.testing.assert_array_equal(still.features, old.features)
    partial = cache_path.with_name(cache_path.name + ".partial")
    assert len(list(partial.glob("chunk-*.npz"))) == 2  # 3 new rows: a full chunk of 2 and the rest
    assert not list(cache_path.parent.glob("*.tmp*"))

    summary = run(dataset, tiny_config, cache_path)
    assert (summary.n_new, summary.n_resumed, summary.n_reused, summary.n_rows) == (0, 3, 12, 15)
    assert not partial.exists()


def test_enospc_while_writing_the_cache(dataset: Path, tiny_config, cache_path, shared_runtime, monkeypatch) -> None:
    run(dataset, tiny_config, cache_path)
    before = cache_path.read_bytes()
    add_images(dataset, "apple", 2, start=0)
    real_file = h5py.File

    def full_disk(name, mode="r", *args, **kwargs):
        if mode == "w":
            handle = real_file(name, mode, *args, **kwargs)  # the temporary file exists, then the disk fills
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(name, mode, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(h5py, "File", full_disk)
        with pytest.raises(UserError, match="disk is full"):
            run(dataset, tiny_config, cache_path)
    assert cache_path.read_bytes() == before
    assert sorted(p.name for p in cache_path.parent.iterdir() if p.suffix != ".tflite") == [
        "features.h5",
        "features.h5.partial",
        "features.h5.shards",
    ]
    assert run(dataset, tiny_config, cache_path).n_resumed == 2


def test_cache_loads_reject_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not a readable HDF5 cache"):
        load(tmp_path / "text.h5")
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(UserError, match="cache format 0"):
        load(tmp_path / "old.h5")


def test_unreadable_file_is_skipped_and_recorded(dataset: Path, tiny_config, cache_path, shared_runtime) -> None:
    """A file that cannot even be read (here a dangling symlink) is skipped like a broken image."""
    (dataset / "sky" / "dangling.jpg").symlink_to(dataset / "sky" / "no-such-file.jpg")
    summary = run(dataset, tiny_config, cache_path)
    assert summary.n_rows == 12
    assert [p for p, _ in summary.skipped] == ["sky/dangling.jpg"]
    assert "unreadable" in summary.skipped[0][1]
    c = load(cache_path)
    assert [p for p, _ in c.skipped] == ["sky/dangling.jpg"] and "unreadable" in c.skipped[0][1]
    again = run(dataset, tiny_config, cache_path)
    assert again.n_new == 0 and [p for p, _ in again.skipped] == ["sky/dangling.jpg"]
    assert [p for p, _ in load(cache_path).skipped] == ["sky/dangling.jpg"]


def test_resume_after_files_were_deleted(tmp_path: Path, tiny_config, cache_path, shared_runtime, monkeypatch) -> None:
    """Journalled rows of files deleted since the crash are not counted as resumed."""
    data = make_dataset(tmp_path / "data", per_class=4)
    with monkeypatch.context() as mp:
        flaky_flush(mp, 1, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(data, tiny_config, cache_path, chunk_size=4, batch_size=2)
    partial = cache_path.with_name(cache_path.name + ".partial")
    with np.load(next(partial.glob("chunk-*.npz"))) as chunk:
        journalled = {h.decode() for h in chunk["content_hash"]}
    files = sorted(p for p in data.rglob("img_*"))
    gone = [p for p in files if file_sha256(p) in journalled][:3]
    assert len(gone) == 3
    for p in gone:
        p.unlink()
    summary = run(data, tiny_config, cache_path)
    assert (summary.n_files, summary.n_resumed, summary.n_reused, summary.n_new) == (9, 1, 0, 8)
    assert summary.n_rows == 9 and not set(load(cache_path).content_hash) & (
        journalled - {file_sha256(p) for p in files if p.exists()}
    )


def test_unicode_and_spaces_in_names(tmp_path: Path, tiny_config, cache_path, shared_runtime) -> None:
    root = tmp_path / "data"
    save_image(root / "crème brûlée" / "photo 1.png", pixels((200, 180, 120), 1))
    save_image(root / "crème brûlée" / "фото.jpg", pixels((200, 180, 120), 2), quality=95)
    save_image(root / "日本" / "写真 3.PNG", pixels((20, 30, 200), 3))
    (root / "日本" / "Ø.png").write_bytes(b"")
    run(root, tiny_config, cache_path)
    c = load(cache_path)
    assert sorted(c.paths) == sorted(["crème brûlée/photo 1.png", "crème brûlée/фото.jpg", "日本/写真 3.PNG"])
    assert c.class_names == ["crème brûlée", "日本"] and c.skipped[0][0] == "日本/Ø.png"
    assert all(c.class_names[l] == p.split("/")[0] for p, l in zip(c.paths, c.labels))


@pytest.mark.slow
def test_tflite_rows_match_keras_rows(
    tmp_path: Path, tiny_config, cache_path, shared_runtime, tiny_tflite, monkeypatch
) -> None:
    """A run crashed under Keras and resumed under TFLite: one cache, both runtimes, the same features.

    The fingerprint leaves the runtime out, so rows from both may share a cache; that is only sound
    when they agree. The conversion extract asks for hands over the session's (the same configuration,
    converted once per test run: about 9 s).
    """
    import pipeline.runtime as runtime_module

    conversions: list[Path] = []

    def session_conversion(model, path, **options):
        conversions.append(Path(path))
        return Path(shutil.copy(tiny_tflite.path, path))

    monkeypatch.setattr(runtime_module, "convert_to_tflite", session_conversion)
    data = make_dataset(tmp_path / "data", per_class=6)
    with monkeypatch.context() as mp:
        flaky_flush(mp, 1, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(data, tiny_config, cache_path, chunk_size=4, runtime="keras")
    messages: list[str] = []
    summary = extract(
        data, tiny_config, cache=cache_path, batch_size=4, runtime="tflite", progress=False, log=messages.append
    )
    assert (summary.n_resumed, summary.n_new, summary.runtime) == (4, 14, "tflite")
    converted = cache_path.parent / f"MobileNetV2-32-{tiny_config.resolved().fingerprint()}.tflite"
    assert conversions == [converted] and any("converting the backbone to TFLite" in m for m in messages)
    c = load(cache_path)
    assert sorted(c.runtime) == ["keras"] * 4 + ["tflite"] * 14

    reference = run(data, tiny_config, tmp_path / "keras.h5", runtime="keras")
    want = features_by_hash(load(reference.cache_path))
    assert_same_features(c.features, np.stack([want[h] for h in c.content_hash]))

    import pipeline.extract as extract_module

    monkeypatch.setattr(extract_module, "make_runtime", runtime_module.make_runtime)  # no memo: really load it
    messages.clear()  # a second cache in the same folder reuses the conversion
    again = extract(
        data, tiny_config, cache=cache_path.with_name("other.h5"), runtime="tflite", progress=False, log=messages.append
    )
    assert again.n_new == 18 and not any("converting" in m for m in messages) and len(conversions) == 1
    assert_same_features(load(again.cache_path).features, load(reference.cache_path).features)
