"""The cache's file format, written in one place (write_index) and read in one place (load).

See pipeline/cache/__init__.py for the layout; docs/formats.md documents it for readers without this package.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..artifacts import atomic_path
from ..errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HASH_DTYPE = "S64"
STR_DTYPE = h5py.string_dtype("utf-8")
# Attributes that define the features; two caches with equal values hold interchangeable rows.
IDENTITY_KEYS = ("backbone", "weights", "layer", "pooling", "image_size", "resize", "alpha", "decoder")
SHARDS_SUFFIX = ".shards"
SHARD_PATTERN = re.compile(r"shard-[0-9a-f]+-(\d+)\.h5")


@dataclass(frozen=True)
class Row:
    """One file of the current dataset scan, as the cache will record it."""

    path: str
    label: int
    split: str
    content_hash: str


@dataclass
class FeatureCache:
    """Everything a cache holds, in memory: one row per image file."""

    path: Path
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int32, index into class_names
    class_names: list[str]
    paths: list[str]  # relative to the dataset root, '/'-separated
    content_hash: list[str]  # sha256 hex of the file bytes
    split: list[str]  # 'train' / 'val' / 'test', or '' when the dataset has no split folders
    runtime: list[str]  # which runtime computed each row ('keras' or 'tflite')
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        """The backbone configuration these features come from."""
        return {k: self.attrs[k] for k in IDENTITY_KEYS}

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Layout:
    """How an index maps its rows onto shard files (format 1: one file, no shards)."""

    n_rows: int
    shards: int  # shard files referenced
    runs: int  # contiguous blocks of rows read from one shard (the virtual dataset's mappings)
    garbage_rows: int  # shard rows no index row points to (deleted or replaced images)
    bytes: int  # the index plus its shards on disk


def str_list(dataset: h5py.Dataset) -> list[str]:
    if dataset.dtype.kind == "S":
        return [v.decode() for v in dataset[()]]
    return list(dataset.asstr()[()])


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def shards_dir(path: str | os.PathLike) -> Path:
    """The folder of a cache's shard files: `<cache>.h5.shards/` beside the index."""
    path = Path(path)
    return path.with_name(path.name + SHARDS_SUFFIX)


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """A cache's attributes only (cheap); raise UserError if it is not a cache we can read."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `cnncodes extract DATA_DIR` first.") from None
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 cache ({exc}).") from None
    if attrs.get("format_version") not in READABLE_VERSIONS:
        raise UserError(
            f"{path} has cache format {attrs.get('format_version')!r}; this version of "
            f"cnncodes reads formats {' and '.join(map(str, READABLE_VERSIONS))}. "
            "Run extract again to rebuild it."
        )
    return attrs


def shard_files(f: h5py.File) -> list[str]:
    return str_list(f["shards/files"]) if "shards" in f else []


def indexed_shards(path: Path) -> set[str]:
    """File names of the shards the index at path names now (empty if it cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            return {Path(n).name for n in shard_files(f)}
    except OSError:
        return set()


def _check_shards(path: Path, f: h5py.File) -> None:
    """A virtual dataset reads a missing shard as fill values: refuse instead, naming the file."""
    missing = [name for name in shard_files(f) if not (path.parent / name).is_file()]
    if missing:
        raise UserError(
            f"{path} is missing its shard file {path.parent / missing[0]} ({len(missing)} missing). "
            f"A cache is the index {path.name} and its folder {shards_dir(path).name}/: copy or "
            "move them together (pipeline.cache.copy_cache), or run extract again to rebuild it."
        )


def load(path: str | os.PathLike) -> FeatureCache:
    """Read a whole cache into memory."""
    attrs = read_attrs(path)
    path = Path(path)
    with h5py.File(path, "r") as f:
        _check_shards(path, f)
        return FeatureCache(
            path=path,
            features=f["features"][()],
            labels=f["labels"][()],
            class_names=str_list(f["class_names"]),
            paths=str_list(f["paths"]),
            content_hash=str_list(f["content_hash"]),
            split=str_list(f["split"]),
            runtime=str_list(f["runtime"]),
            skipped=list(zip(str_list(f["skipped/paths"]), str_list(f["skipped/reasons"]))),
            attrs=attrs,
        )


def lookup(path: str | os.PathLike, hashes: Sequence[str]) -> dict[str, np.ndarray]:
    """Features of the given content hashes that the cache holds (reads only those rows)."""
    read_attrs(path)
    with h5py.File(path, "r") as f:
        _check_shards(Path(path), f)
        row_of = {h: i for i, h in enumerate(str_list(f["content_hash"]))}
        rows = sorted({row_of[h] for h in hashes if h in row_of})
        if not rows:
            return {}
        block = f["features"][np.asarray(rows)]
        hash_of = {i: h for h, i in row_of.items()}
        return {hash_of[r]: block[k] for k, r in enumerate(rows)}


def count_runs(mapping: Sequence[tuple[int, int]]) -> int:
    """Contiguous blocks: consecutive index rows stored at consecutive rows of one shard."""
    return sum(1 for i, (s, r) in enumerate(mapping) if i == 0 or mapping[i - 1] != (s, r - 1))


def garbage(mapping: Sequence[tuple[int, int]], sizes: Sequence[int]) -> int:
    return sum(sizes) - len(set(mapping))


def layout(path: str | os.PathLike) -> Layout:
    """Shards, runs and unreferenced rows of a cache (what compaction would improve)."""
    read_attrs(path)
    path = Path(path)
    with h5py.File(path, "r") as f:
        size = path.stat().st_size + sum((path.parent / n).stat().st_size for n in shard_files(f))
        n = int(f["labels"].shape[0])
        if "shards" not in f:
            return Layout(n, 0, 1 if n else 0, 0, size)
        mapping = list(zip(f["shards/row_shard"][()].tolist(), f["shards/row_in_shard"][()].tolist()))
        sizes = f["shards/rows"][()].tolist()
    return Layout(n, len(sizes), count_runs(mapping), garbage(mapping, sizes), size)


def layout_line(stats: Layout) -> str:
    """'N rows in S shards (R runs, G unreferenced rows, X MB)' for messages."""
    return (
        f"{stats.n_rows} rows in {stats.shards} shard{'s' * (stats.shards != 1)} ({stats.runs} runs, "
        f"{stats.garbage_rows} unreferenced rows, {stats.bytes / 1e6:.1f} MB)"
    )


def copy_cache(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a cache (its index and its shards) to a new path; the copy's shard folder follows its name."""
    source, target = Path(source), Path(target)
    attrs = read_attrs(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    if attrs["format_version"] == 1 or not shards_dir(source).is_dir():
        shutil.copy2(source, target)
        return target
    shutil.copytree(shards_dir(source), shards_dir(target), dirs_exist_ok=True)
    if target.name == source.name:
        shutil.copy2(source, target)
        return target
    # the index names its shards by a path relative to its folder: rewrite it for the new name
    with h5py.File(source, "r") as f:
        names = [f"{shards_dir(target).name}/{Path(n).name}" for n in shard_files(f)]
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)
        with h5py.File(tmp, "r+") as f:
            dim = f["features"].shape[1]
            mapping = list(zip(f["shards/row_shard"][()].tolist(), f["shards/row_in_shard"][()].tolist()))
            sizes = f["shards/rows"][()].tolist()
            del f["features"], f["shards/files"]
            f.create_dataset("shards/files", data=names, dtype=STR_DTYPE)
            virtual_features(f, names, sizes, mapping, dim)
    return target


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'key: cached -> asked' for every identity key that differs."""
    return "; ".join(
        f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_KEYS if found.get(k) != wanted.get(k)
    )


def virtual_features(
    f: h5py.File, shard_names: Sequence[str], sizes: Sequence[int], mapping: Sequence[tuple[int, int]], dim: int
) -> None:
    """`features` as a virtual dataset: each run of rows maps onto a block of one shard's `features`."""
    if not mapping:
        f.create_dataset("features", (0, dim), np.float32)
        return
    layout_ = h5py.VirtualLayout((len(mapping), dim), np.float32)
    # relative names: HDF5 resolves them against the index's own folder, so the pair can move together
    sources = [h5py.VirtualSource(name, "features", shape=(size, dim)) for name, size in zip(shard_names, sizes)]
    start = 0
    for i in range(1, len(mapping) + 1):
        if i == len(mapping) or mapping[i] != (mapping[i - 1][0], mapping[i - 1][1] + 1):
            shard, row = mapping[start]
            layout_[start:i] = sources[shard][row : row + i - start]
            start = i
    f.create_virtual_dataset("features", layout_, fillvalue=np.nan)  # a lost shard reads as NaN, not zeros


def write_index(
    path: Path,
    attrs: dict[str, Any],
    rows: Sequence[Row],
    class_names: Sequence[str],
    runtimes: Sequence[str],
    skipped: Sequence[tuple[str, str, str]],
    shard_names: Sequence[str],
    sizes: Sequence[int],
    mapping: Sequence[tuple[int, int]],
    dim: int,
    next_number: int,
) -> None:
    """Replace the index at path whole (temporary file, fsync, rename): attributes, per-row datasets, the
    skipped files (path, content hash, reason), the shard table and `features` as a virtual dataset."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({**attrs, "format_version": FORMAT_VERSION, "feature_dim": dim})
            virtual_features(f, shard_names, sizes, mapping, dim)
            f["labels"] = np.array([r.label for r in rows], dtype=np.int32)
            f.create_dataset("class_names", data=list(class_names), dtype=STR_DTYPE)
            f.create_dataset("paths", data=[r.path for r in rows], dtype=STR_DTYPE)
            f["content_hash"] = np.array([r.content_hash for r in rows], dtype=HASH_DTYPE)
            f.create_dataset("split", data=[r.split for r in rows], dtype=STR_DTYPE)
            f.create_dataset("runtime", data=list(runtimes), dtype=STR_DTYPE)
            group = f.create_group("skipped")
            group.create_dataset("paths", data=[p for p, _, _ in skipped], dtype=STR_DTYPE)
            group["content_hash"] = np.array([h for _, h, _ in skipped], dtype=HASH_DTYPE)
            group.create_dataset("reasons", data=[r for _, _, r in skipped], dtype=STR_DTYPE)
            layout_group = f.create_group("shards")
            layout_group.create_dataset("files", data=list(shard_names), dtype=STR_DTYPE)
            layout_group["rows"] = np.array(sizes, dtype=np.int64)
            layout_group["row_shard"] = np.array([s for s, _ in mapping], dtype=np.int32)
            layout_group["row_in_shard"] = np.array([r for _, r in mapping], dtype=np.int64)
            layout_group.attrs["next"] = next_number
