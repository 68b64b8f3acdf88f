"""pipeline.cache format 2: shards under a virtual-dataset index, incremental commits, compaction, format 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from heads_fixtures import SYNTH_CONFIG, fake_hash, write_cache

import pipeline.cache.shards as cache_shards
from pipeline.cache import CacheWriter, Row, compact, copy_cache, layout, load, lookup, read_attrs, shards_dir
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIM = 8


def rows_for(n: int, start: int = 0, step: int = 1) -> tuple[list[str], np.ndarray]:
    """Hashes and features of rows start, start+step, ... (features encode the row number)."""
    ids = list(range(start, start + n * step, step))
    X = np.array([[i] + [i / 7] * (DIM - 1) for i in ids], np.float32)
    return [fake_hash(("row", i)) for i in ids], X


def write(
    path: Path,
    ids: list[int],
    chunk_size: int = 256,
    compact_now: bool = False,
    extra: dict[str, np.ndarray] | None = None,
) -> CacheWriter:
    """Commit rows with these ids (in this order), adding the features of those the cache lacks."""
    config = SYNTH_CONFIG.resolved()
    writer = CacheWriter(path, config.identity(), config.fingerprint(), chunk_size)
    for i in ids:
        h = fake_hash(("row", i))
        if not writer.has(h):
            writer.add(h, np.array([i] + [i / 7] * (DIM - 1), np.float32), "keras")
    rows = [Row(f"c{i % 2}/img_{i:05d}.png", i % 2, "", fake_hash(("row", i))) for i in ids]
    writer.commit(rows, ["c0", "c1"], {"dataset_root": str(path.parent)}, compact=compact_now)
    return writer


def assert_rows(path: Path, ids: list[int]) -> None:
    c = load(path)
    assert c.paths == [f"c{i % 2}/img_{i:05d}.png" for i in ids]
    assert c.content_hash == [fake_hash(("row", i)) for i in ids]
    np.testing.assert_array_equal(c.features[:, 0], np.array(ids, np.float32))
    with h5py.File(path, "r") as f:  # h5py alone reads the same rows
        np.testing.assert_array_equal(f["features"][()], c.features)


def shard_files(path: Path) -> list[Path]:
    return sorted(shards_dir(path).glob("shard-*.h5"))


def test_index_is_a_virtual_dataset_over_immutable_shards(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(100)))
    assert read_attrs(path)["format_version"] == 2
    with h5py.File(path, "r") as f:
        assert f["features"].is_virtual and f["features"].shape == (100, DIM)
        assert {s.file_name for s in f["features"].virtual_sources()} == {f"c.h5.shards/{shard_files(path)[0].name}"}
    assert_rows(path, list(range(100)))
    first = shard_files(path)[0]
    before = first.stat()

    # 5 new rows, spread through the scan order: one new shard of 5 rows, the old one untouched
    ids = sorted(list(range(100)) + [1000 + k for k in range(5)], key=lambda i: (i % 1000) * 10 + (i >= 1000))
    write(path, ids)
    shards = shard_files(path)
    assert len(shards) == 2 and first in shards
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with h5py.File(next(s for s in shards if s != first), "r") as f:
        assert f["features"].shape == (5, DIM)
    assert_rows(path, ids)
    stats = layout(path)
    assert (stats.n_rows, stats.shards, stats.garbage_rows) == (105, 2, 0) and stats.runs == 11
    found = lookup(path, [fake_hash(("row", 1003)), fake_hash(("row", 7)), "nope"])
    assert sorted(v[0] for v in found.values()) == [7, 1003]


def test_deleted_rows_are_garbage_until_compaction(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(50)))
    write(path, list(range(50, 60)) + list(range(20, 40)))  # 30 of 50 rows deleted, 10 new first, reordered
    stats = layout(path)
    assert stats.shards == 2 and stats.garbage_rows == 30 and stats.runs == 2
    assert_rows(path, list(range(50, 60)) + list(range(20, 40)))
    before, after = compact(path)
    assert before == stats
    assert (after.shards, after.runs, after.garbage_rows, after.n_rows) == (1, 1, 0, 30)
    assert after.bytes < before.bytes
    assert [p.name[-9:] for p in shard_files(path)] == ["000003.h5"]  # the old shards are gone
    assert_rows(path, list(range(50, 60)) + list(range(20, 40)))
    write(path, list(range(50, 61)) + list(range(20, 40)))
    assert [p.name[-9:] for p in shard_files(path)] == ["000003.h5", "000004.h5"]  # numbers are never reused
    assert_rows(path, list(range(50, 61)) + list(range(20, 40)))


def test_fragmented_layout_is_compacted_automatically(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(0, 400, 2)))
    # 200 new rows interleaved with the old ones: 400 runs (more than 64 + 400 / 16), so one shard
    write(path, list(range(400)))
    assert (layout(path).shards, layout(path).runs) == (1, 1)
    assert_rows(path, list(range(400)))
    # a few rows interleaved: under the threshold, one new small shard
    write(path, list(range(200)) + [1001] + list(range(200, 400)) + [1002, 1003])
    assert (layout(path).shards, layout(path).runs) == (2, 4)


def test_many_shards_are_compacted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_shards, "MAX_SHARDS", 3)
    path = tmp_path / "c.h5"
    ids: list[int] = []
    for k in range(4):
        ids += [10 * k, 10 * k + 1]
        write(path, ids)
    assert layout(path).shards == 1 and len(shard_files(path)) == 1
    assert_rows(path, ids)


def test_moving_the_cache_folder_keeps_it_readable(tmp_path: Path) -> None:
    path = tmp_path / "a" / "c.h5"
    write(path, list(range(20)))
    write(path, list(range(25)))
    moved = tmp_path / "b" / "elsewhere"
    shutil.move(str(tmp_path / "a"), str(moved))
    assert_rows(moved / "c.h5", list(range(25)))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import h5py, sys; f = h5py.File(sys.argv[1]); print(int(f['features'][()][:, 0].sum()))",
            "elsewhere/c.h5",
        ],
        cwd=moved.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == str(sum(range(25))), out.stderr  # opened by a relative path from another folder

    lonely = tmp_path / "lonely" / "c.h5"  # the index alone: refused, naming the missing shard
    lonely.parent.mkdir()
    shutil.copy(moved / "c.h5", lonely)
    with pytest.raises(UserError, match=r"missing its shard file .*c\.h5\.shards/shard-.*copy or move them together"):
        load(lonely)
    for target in (tmp_path / "copy" / "c.h5", tmp_path / "copy" / "renamed.h5"):
        copy_cache(moved / "c.h5", target)
        assert_rows(target, list(range(25)))
    assert shards_dir(tmp_path / "copy" / "renamed.h5").is_dir()


def test_lost_shard_rows_are_extracted_again(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(10)))
    write(path, list(range(14)))
    newest = max(shard_files(path), key=lambda p: p.name)
    newest.unlink()
    writer = write(path, list(range(14)))
    assert writer.lost_hashes == {fake_hash(("row", i)) for i in range(10, 14)}
    assert_rows(path, list(range(14)))


def write_format_1(path: Path, ids: list[int]) -> None:
    """A cache as cnncodes wrote it before shards: one file of real datasets."""
    config = SYNTH_CONFIG.resolved()
    string = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {
                **config.identity(),
                "fingerprint": config.fingerprint(),
                "format_version": 1,
                "feature_dim": DIM,
                "dataset_root": str(path.parent),
                "config_json": json.dumps(config.__dict__),
            }
        )
        f["features"] = np.array([[i] + [i / 7] * (DIM - 1) for i in ids], np.float32)
        f["labels"] = np.array([i % 2 for i in ids], np.int32)
        f.create_dataset("class_names", data=["c0", "c1"], dtype=string)
        f.create_dataset("paths", data=[f"c{i % 2}/img_{i:05d}.png" for i in ids], dtype=string)
        f["content_hash"] = np.array([fake_hash(("row", i)) for i in ids], dtype="S64")
        f.create_dataset("split", data=[""] * len(ids), dtype=string)
        f.create_dataset("runtime", data=["keras"] * len(ids), dtype=string)
        group = f.create_group("skipped")
        group.create_dataset("paths", data=["c0/bad.png"], dtype=string)
        group["content_hash"] = np.array([fake_hash("bad")], dtype="S64")
        group.create_dataset("reasons", data=["not an image"], dtype=string)


def test_format_1_loads_and_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    write_format_1(path, list(range(30)))
    assert_rows(path, list(range(30)))
    assert load(path).skipped == [("c0/bad.png", "not an image")]
    assert layout(path).shards == 0
    writer = write(path, list(range(32)))
    assert writer.skip_reason(fake_hash("bad")) == "not an image"  # remembered from the old file
    assert read_attrs(path)["format_version"] == 2
    assert layout(path).shards == 1 and layout(path).runs == 1
    assert_rows(path, list(range(32)))
    assert load(path).runtime == ["keras"] * 32


def test_failed_index_write_keeps_the_old_cache_and_the_journal(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(10)))
    before = path.read_bytes()
    real_file = h5py.File

    def index_fails(name, mode="r", *args, **kwargs):
        if mode == "w" and ".shards" not in str(name):  # the shard is written, then the index fails
            raise OSError(28, "No space left on device")
        return real_file(name, mode, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(h5py, "File", index_fails)
        with pytest.raises(UserError, match="disk is full"):
            write(path, list(range(13)), chunk_size=2)
    assert path.read_bytes() == before and len(shard_files(path)) == 1  # the orphan shard is removed
    assert len(list(path.with_name("c.h5.partial").glob("chunk-*.npz"))) == 2
    writer = write(path, list(range(13)))
    assert len(writer.resumed_hashes) == 3 and not path.with_name("c.h5.partial").exists()
    assert_rows(path, list(range(13)))


def test_shards_of_a_killed_commit_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write(path, list(range(10)))
    orphan = shards_dir(path) / "shard-0000000000000000-000099.h5"
    shutil.copy(shard_files(path)[0], orphan)  # a shard whose index never replaced the old one
    stale = shards_dir(path) / ".shard-x.h5.tmp-999999999-abc.h5"  # a half-written one of a dead process
    stale.write_bytes(b"partial")
    write(path, list(range(11)))
    assert not orphan.exists() and not stale.exists() and len(shard_files(path)) == 2


def test_compact_refuses_an_unfinished_journal_and_cli_prints_the_layout(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "synth.h5", np.ones((6, DIM), np.float32), [0, 1] * 3)
    write(tmp_path / "c.h5", list(range(10)))
    write(tmp_path / "c.h5", list(range(5)))
    done = subprocess.run(
        [sys.executable, "cli.py", "compact", str(tmp_path / "c.h5")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split(" -> ")
    assert "5 rows in 1 shard (1 runs, 5 unreferenced rows" in before  # rows 5..9 were deleted
    assert "5 rows in 1 shard (1 runs, 0 unreferenced rows" in after
    partial = path.with_name(path.name + ".partial")
    partial.mkdir()
    shutil.copy(path, partial / "chunk-000000-1-1.npz")
    with pytest.raises(UserError, match="interrupted extract"):
        compact(path)
