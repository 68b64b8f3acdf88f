"""The HDF5 feature cache: written in one place (CacheWriter), read in one place (load).

Layout (format 2): `<cache>.h5` is a small index (attributes, the per-row datasets, and `features`
as an HDF5 virtual dataset) over immutable shard files in `<cache>.h5.shards/`, so a run that adds
images writes one shard of its new rows and a new index, not the whole cache. Readers see one
ordinary `(N, D)` `features` dataset either way. Format 1 caches (one file of real datasets) still
load, and the next extract moves their rows into a shard.

Crash safety: a shard is written under a temporary name and renamed when complete; the index is
only ever replaced whole (temporary file, fsync, os.replace), so it is always the last complete
cache and it only names complete shards. While extracting, each finished chunk of features is
written atomically as its own small journal file in `<cache>.partial/`; a run that was killed
leaves those behind and the next run starts from them, redoing at most one chunk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .artifacts import TMP_MARK, atomic_path, atomic_write, process_alive
from .errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HASH_DTYPE = "S64"
STR_DTYPE = h5py.string_dtype("utf-8")
# Attributes that define the features; two caches with equal values hold interchangeable rows.
IDENTITY_KEYS = ("backbone", "weights", "layer", "pooling", "image_size", "resize", "alpha", "decoder")
BLOCK_ROWS = 2048  # rows copied at a time into a shard: memory stays flat
SHARDS_SUFFIX = ".shards"
SHARD_PATTERN = re.compile(r"shard-[0-9a-f]+-(\d+)\.h5")
# When an index would exceed any of these, its rows are rewritten into one shard (compaction):
MAX_SHARDS = 64  # shard files
MAX_RUNS_BASE, ROWS_PER_RUN = 64, 16  # runs (contiguous blocks read from one shard): 64 + rows / 16
# ...and when the shards hold more unreferenced rows (deleted or replaced images) than referenced ones.


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


def _str_list(dataset: h5py.Dataset) -> list[str]:
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
        raise UserError(f"{path} has cache format {attrs.get('format_version')!r}; this version of "
                        f"cnncodes reads formats {' and '.join(map(str, READABLE_VERSIONS))}. "
                        "Run extract again to rebuild it.")
    return attrs


def _shard_files(f: h5py.File) -> list[str]:
    return _str_list(f["shards/files"]) if "shards" in f else []


def _indexed_shards(path: Path) -> set[str]:
    """File names of the shards the index at path names now (empty if it cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            return {Path(n).name for n in _shard_files(f)}
    except OSError:
        return set()


def _check_shards(path: Path, f: h5py.File) -> None:
    """A virtual dataset reads a missing shard as fill values: refuse instead, naming the file."""
    missing = [name for name in _shard_files(f) if not (path.parent / name).is_file()]
    if missing:
        raise UserError(f"{path} is missing its shard file {path.parent / missing[0]} ({len(missing)} missing). "
                        f"A cache is the index {path.name} and its folder {shards_dir(path).name}/: copy or "
                        "move them together (pipeline.cache.copy_cache), or run extract again to rebuild it.")


def load(path: str | os.PathLike) -> FeatureCache:
    """Read a whole cache into memory."""
    attrs = read_attrs(path)
    path = Path(path)
    with h5py.File(path, "r") as f:
        _check_shards(path, f)
        return FeatureCache(
            path=path, features=f["features"][()], labels=f["labels"][()],
            class_names=_str_list(f["class_names"]), paths=_str_list(f["paths"]),
            content_hash=_str_list(f["content_hash"]), split=_str_list(f["split"]),
            runtime=_str_list(f["runtime"]),
            skipped=list(zip(_str_list(f["skipped/paths"]), _str_list(f["skipped/reasons"]))),
            attrs=attrs)


def lookup(path: str | os.PathLike, hashes: Sequence[str]) -> dict[str, np.ndarray]:
    """Features of the given content hashes that the cache holds (reads only those rows)."""
    read_attrs(path)
    with h5py.File(path, "r") as f:
        _check_shards(Path(path), f)
        row_of = {h: i for i, h in enumerate(_str_list(f["content_hash"]))}
        rows = sorted({row_of[h] for h in hashes if h in row_of})
        if not rows:
            return {}
        block = f["features"][np.asarray(rows)]
        hash_of = {i: h for h, i in row_of.items()}
        return {hash_of[r]: block[k] for k, r in enumerate(rows)}


def _count_runs(mapping: Sequence[tuple[int, int]]) -> int:
    """Contiguous blocks: consecutive index rows stored at consecutive rows of one shard."""
    return sum(1 for i, (s, r) in enumerate(mapping) if i == 0 or mapping[i - 1] != (s, r - 1))


def _garbage(mapping: Sequence[tuple[int, int]], sizes: Sequence[int]) -> int:
    return sum(sizes) - len(set(mapping))


def layout(path: str | os.PathLike) -> Layout:
    """Shards, runs and unreferenced rows of a cache (what compaction would improve)."""
    read_attrs(path)
    path = Path(path)
    with h5py.File(path, "r") as f:
        size = path.stat().st_size + sum((path.parent / n).stat().st_size for n in _shard_files(f))
        n = int(f["labels"].shape[0])
        if "shards" not in f:
            return Layout(n, 0, 1 if n else 0, 0, size)
        mapping = list(zip(f["shards/row_shard"][()].tolist(), f["shards/row_in_shard"][()].tolist()))
        sizes = f["shards/rows"][()].tolist()
    return Layout(n, len(sizes), _count_runs(mapping), _garbage(mapping, sizes), size)


def layout_line(stats: Layout) -> str:
    """'N rows in S shards (R runs, G unreferenced rows, X MB)' for messages."""
    return (f"{stats.n_rows} rows in {stats.shards} shard{'s' * (stats.shards != 1)} ({stats.runs} runs, "
            f"{stats.garbage_rows} unreferenced rows, {stats.bytes / 1e6:.1f} MB)")


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
        names = [f"{shards_dir(target).name}/{Path(n).name}" for n in _shard_files(f)]
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)
        with h5py.File(tmp, "r+") as f:
            dim = f["features"].shape[1]
            mapping = list(zip(f["shards/row_shard"][()].tolist(), f["shards/row_in_shard"][()].tolist()))
            sizes = f["shards/rows"][()].tolist()
            del f["features"], f["shards/files"]
            f.create_dataset("shards/files", data=names, dtype=STR_DTYPE)
            _virtual_features(f, names, sizes, mapping, dim)
    return target


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'key: cached -> asked' for every identity key that differs."""
    return "; ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_KEYS
                     if found.get(k) != wanted.get(k))


def _is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


def _remove_dead_temporaries(folder: Path, prefix: str) -> None:
    """Temporary files (`.<name>.tmp-<pid>-...`) of runs that were killed while writing them."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(f".{prefix}*{TMP_MARK}*"):
        pid = tmp.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _virtual_features(f: h5py.File, shard_names: Sequence[str], sizes: Sequence[int],
                      mapping: Sequence[tuple[int, int]], dim: int) -> None:
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
            layout_[start:i] = sources[shard][row:row + i - start]
            start = i
    f.create_virtual_dataset("features", layout_, fillvalue=np.nan)  # a lost shard reads as NaN, not zeros


@dataclass(frozen=True)
class Row:
    """One file of the current dataset scan, as the cache will record it."""

    path: str
    label: int
    split: str
    content_hash: str


@dataclass(frozen=True)
class _Source:
    """A file holding feature rows: a shard (kept as it is), a journal chunk or a format-1 cache (copied)."""

    path: Path
    kind: str  # "shard", "journal" or "legacy"


class CacheWriter:
    """Appends features chunk by chunk (journal files) and commits them into the cache atomically."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], fingerprint: str,
                 chunk_size: int = 256) -> None:
        self.path = Path(path)
        self.partial_dir = self.path.with_name(self.path.name + ".partial")
        self.shards_dir = shards_dir(self.path)
        self.identity, self.fingerprint, self.chunk_size = identity, fingerprint, chunk_size
        self._sources: list[_Source] = []
        self._source: dict[str, tuple[int, int]] = {}  # hash -> (index into _sources, row in that file)
        self._runtime: dict[str, str] = {}  # hash -> runtime, for rows already in shards
        self._shard_rows: dict[int, int] = {}  # source id of a shard -> its number of rows
        self._skipped: dict[str, str] = {}  # hash -> reason
        self._pending: list[tuple[str, np.ndarray, str]] = []
        self._pending_skipped: dict[str, str] = {}
        self._n_journal = 0
        self._first_free_number = 1  # the next shard number the index records (numbers are never reused)
        self.resumed_hashes: set[str] = set()  # rows found in the journal of an interrupted run
        self.lost_hashes: set[str] = set()  # rows of the index whose shard file is gone (extracted again)
        self.dim: int | None = None
        _remove_dead_temporaries(self.path.parent, self.path.name)
        _remove_dead_temporaries(self.shards_dir, "")
        _remove_dead_temporaries(self.partial_dir, "")
        if self.path.exists():
            self._open_existing()
        self._open_journal()

    # -- reading what is already there -------------------------------------------------------
    def _add_source(self, path: Path, kind: str) -> int:
        self._sources.append(_Source(path, kind))
        return len(self._sources) - 1

    def _open_existing(self) -> None:
        attrs = read_attrs(self.path)
        if attrs.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.path} was written with another configuration ({describe_mismatch(attrs, self.identity)}). "
                "It is not reused: omit --cache for a file named after this configuration, "
                "or give another --cache path.")
        with h5py.File(self.path, "r") as f:
            self.dim = int(f["features"].shape[1]) if f["features"].shape[0] else None
            hashes = _str_list(f["content_hash"])
            if "shards" in f:
                names = _shard_files(f)
                ids = [self._add_source(self.path.parent / n, "shard") for n in names]
                self._shard_rows.update(zip(ids, f["shards/rows"][()].tolist()))
                self._first_free_number = int(f["shards"].attrs.get("next", 1))
                present = [(self.path.parent / n).is_file() for n in names]
                for h, s, r, runtime in zip(hashes, f["shards/row_shard"][()], f["shards/row_in_shard"][()],
                                            _str_list(f["runtime"])):
                    if present[s]:
                        self._source[h], self._runtime[h] = (ids[s], int(r)), runtime
                    else:
                        self.lost_hashes.add(h)
            else:  # format 1: the rows live in this very file; the commit copies them into a shard
                legacy = self._add_source(self.path, "legacy")
                self._source.update((h, (legacy, i)) for i, h in enumerate(hashes))
            self._skipped.update((h, r) for h, r in zip(_str_list(f["skipped/content_hash"]),
                                                        _str_list(f["skipped/reasons"])) if h)

    def _open_journal(self) -> None:
        if not self.partial_dir.is_dir():
            return
        for part in sorted(self.partial_dir.glob("chunk-*.npz")):
            try:
                with np.load(part) as data:
                    if str(data["fingerprint"]) != self.fingerprint:
                        continue
                    hashes = [h.decode() for h in data["content_hash"]]
                    skipped = dict(zip((h.decode() for h in data["skipped_hash"]), data["skipped_reason"]))
                    if len(hashes):
                        self.dim = int(data["features"].shape[1])
            except (OSError, ValueError, KeyError):
                continue  # a torn journal file cannot exist (atomic rename); ignore anything foreign
            index = self._add_source(part, "journal")
            self._n_journal += 1
            for row, h in enumerate(hashes):
                if h not in self._source:
                    self.resumed_hashes.add(h)
                self._source[h] = (index, row)
            self._skipped.update((h, str(r)) for h, r in skipped.items())

    def has(self, content_hash: str) -> bool:
        """True when this content's features, or its reason for being skipped, are known."""
        return content_hash in self._source or content_hash in self._skipped

    def has_features(self, content_hash: str) -> bool:
        """True when this content's features are known."""
        return content_hash in self._source

    def skip_reason(self, content_hash: str) -> str | None:
        """Why this content could not be used, or None."""
        return None if content_hash in self._source else self._skipped.get(content_hash)

    # -- adding ------------------------------------------------------------------------------
    def add(self, content_hash: str, features: np.ndarray, runtime: str) -> None:
        """Queue one image's features; a full chunk goes to the journal."""
        self._pending.append((content_hash, np.asarray(features, dtype=np.float32), runtime))
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def add_skipped(self, content_hash: str, reason: str) -> None:
        """Record a file that could not be used, with the reason."""
        self._pending_skipped[content_hash] = reason

    def flush(self) -> None:
        """Write the queued rows as one journal file (atomically)."""
        if not self._pending and not self._pending_skipped:
            return
        part = self.partial_dir / f"chunk-{self._n_journal:06d}-{os.getpid()}-{time.time_ns()}.npz"
        hashes = [h for h, _, _ in self._pending]
        features = (np.stack([f for _, f, _ in self._pending]) if self._pending
                    else np.zeros((0, self.dim or 0), np.float32))
        try:
            with atomic_write(part, "wb") as handle:
                np.savez(handle, fingerprint=np.array(self.fingerprint),
                         content_hash=np.array(hashes, dtype=HASH_DTYPE), features=features,
                         runtime=np.array([r for _, _, r in self._pending], dtype=str),
                         skipped_hash=np.array(list(self._pending_skipped), dtype=HASH_DTYPE),
                         skipped_reason=np.array(list(self._pending_skipped.values()), dtype=str))
        except OSError as exc:
            raise self._write_error(exc, part) from None
        index = self._add_source(part, "journal")
        self._n_journal += 1
        self._source.update((h, (index, row)) for row, h in enumerate(hashes))
        self._skipped.update(self._pending_skipped)
        if self._pending:
            self.dim = features.shape[1]
        self._pending, self._pending_skipped = [], {}

    def _write_error(self, exc: OSError, target: Path) -> UserError:
        what = "the disk is full" if _is_disk_full(exc) else f"{exc}"
        return UserError(
            f"could not write {target}: {what}. The previous cache {self.path} is intact"
            + (f" and the {self._n_journal} finished chunks in {self.partial_dir} are kept"
               if self._n_journal else "")
            + "; free some space (or choose --cache elsewhere) and run extract again to resume.")

    # -- committing --------------------------------------------------------------------------
    def commit(self, rows: Sequence[Row], class_names: Sequence[str], attrs: dict[str, Any],
               unreadable: Sequence[tuple[str, str]] = (), compact: bool = False) -> tuple[int, int]:
        """Make the cache hold these rows (those whose features are known): one new shard, one new index.

        Rows whose content could not be used are recorded under skipped/ with their reason (every
        path of byte-identical files). unreadable lists (path, reason) of files that could not even
        be read (no content hash; recorded with an empty one). New rows (from the journal or a
        format-1 cache) go into one new shard; with compact, or when the layout has grown too
        fragmented, every row is rewritten into one shard in index order. Returns (rows written,
        files skipped). The journal and unreferenced shards are removed once the new index is in place.
        """
        self.flush()
        kept = [r for r in rows if r.content_hash in self._source]
        skipped = [(r.path, r.content_hash, self._skipped[r.content_hash]) for r in rows
                   if r.content_hash not in self._source and r.content_hash in self._skipped]
        skipped += [(p, "", reason) for p, reason in unreadable]
        dim = self.dim or 0
        fresh = list(dict.fromkeys(r.content_hash for r in kept
                                   if self._sources[self._source[r.content_hash][0]].kind != "shard"))
        shards, mapping = self._plan(kept, fresh)
        if compact or self._fragmented(mapping, [self._size_of(s, len(fresh)) for s in shards]):
            fresh = list(dict.fromkeys(r.content_hash for r in kept))
            shards, mapping = self._plan(kept, fresh)
        sizes = [self._size_of(s, len(fresh)) for s in shards]
        number = self._next_number()
        new_shard = self.shards_dir / f"shard-{self.fingerprint}-{number:06d}.h5" if fresh else None
        target = new_shard or self.path  # what was being written, for the message if it fails
        try:
            needed = len(fresh) * dim * 4 + len(kept) * 256 + (1 << 20) * 4
            if shutil.disk_usage(self.path.parent).free < needed:
                raise OSError(errno.ENOSPC, "No space left on device (checked before writing)")
            if new_shard is not None:
                self._write_shard(new_shard, fresh, dim)
            names = [f"{self.shards_dir.name}/{(new_shard if s is None else self._sources[s].path).name}"
                     for s in shards]
            target = self.path
            with atomic_path(self.path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.attrs.update({**attrs, **self.identity, "fingerprint": self.fingerprint,
                                    "format_version": FORMAT_VERSION, "feature_dim": dim})
                    _virtual_features(f, names, sizes, mapping, dim)
                    f["labels"] = np.array([r.label for r in kept], dtype=np.int32)
                    f.create_dataset("class_names", data=list(class_names), dtype=STR_DTYPE)
                    f.create_dataset("paths", data=[r.path for r in kept], dtype=STR_DTYPE)
                    f["content_hash"] = np.array([r.content_hash for r in kept], dtype=HASH_DTYPE)
                    f.create_dataset("split", data=[r.split for r in kept], dtype=STR_DTYPE)
                    f.create_dataset("runtime", data=[self._runtime[r.content_hash] for r in kept],
                                     dtype=STR_DTYPE)
                    group = f.create_group("skipped")
                    group.create_dataset("paths", data=[p for p, _, _ in skipped], dtype=STR_DTYPE)
                    group["content_hash"] = np.array([h for _, h, _ in skipped], dtype=HASH_DTYPE)
                    group.create_dataset("reasons", data=[r for _, _, r in skipped], dtype=STR_DTYPE)
                    layout_group = f.create_group("shards")
                    layout_group.create_dataset("files", data=names, dtype=STR_DTYPE)
                    layout_group["rows"] = np.array(sizes, dtype=np.int64)
                    layout_group["row_shard"] = np.array([s for s, _ in mapping], dtype=np.int32)
                    layout_group["row_in_shard"] = np.array([r for _, r in mapping], dtype=np.int64)
                    layout_group.attrs["next"] = number + 1
        except BaseException as exc:
            if new_shard is not None and new_shard.name not in _indexed_shards(self.path):
                new_shard.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._write_error(exc, target) from None
            raise
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self._remove_unreferenced_shards()
        return len(kept), len(skipped)

    def _plan(self, kept: Sequence[Row], fresh: Sequence[str]) -> tuple[list[int | None], list[tuple[int, int]]]:
        """The index's shards (source ids, then None for the new shard) and each row's (shard, row in it)."""
        new_row = {h: i for i, h in enumerate(fresh)}
        shards: list[int | None] = list(dict.fromkeys(
            self._source[r.content_hash][0] for r in kept if r.content_hash not in new_row))
        shards += [None] if fresh else []
        position = {s: i for i, s in enumerate(shards)}
        return shards, [(position[None], new_row[h]) if h in new_row else
                        (position[self._source[h][0]], self._source[h][1]) for h in (r.content_hash for r in kept)]

    def _size_of(self, source: int | None, n_fresh: int) -> int:
        """Rows in a shard of the plan (None: the new shard)."""
        return n_fresh if source is None else self._shard_rows[source]

    @staticmethod
    def _fragmented(mapping: Sequence[tuple[int, int]], sizes: Sequence[int]) -> bool:
        """Too many files or runs to read fast, or more dead rows than live ones: time to compact."""
        live = len(set(mapping))
        return (len(sizes) > MAX_SHARDS or _count_runs(mapping) > MAX_RUNS_BASE + len(mapping) // ROWS_PER_RUN
                or _garbage(mapping, sizes) > live)

    def _next_number(self) -> int:
        """A shard number never used before: numbers only grow, past the index's record and every file."""
        numbers = [int(m.group(1)) for p in self.shards_dir.glob("shard-*.h5")
                   if (m := SHARD_PATTERN.fullmatch(p.name))]
        return max([self._first_free_number - 1, *numbers]) + 1

    def _write_shard(self, path: Path, hashes: Sequence[str], dim: int) -> None:
        """An immutable shard of these contents' features, gathered one block at a time."""
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs.update({"fingerprint": self.fingerprint, "format_version": FORMAT_VERSION})
                out = f.create_dataset("features", (len(hashes), dim), np.float32)
                runtimes: list[str] = []
                for start in range(0, len(hashes), BLOCK_ROWS):
                    block = hashes[start:start + BLOCK_ROWS]
                    values = np.empty((len(block), dim), np.float32)
                    by_source: dict[int, list[tuple[int, int]]] = {}
                    for k, h in enumerate(block):
                        source, index = self._source[h]
                        by_source.setdefault(source, []).append((k, index))
                    names: dict[int, str] = {}
                    for source, pairs in by_source.items():
                        feats, kinds = self._read_source(source, sorted({i for _, i in pairs}))
                        for k, index in pairs:
                            values[k], names[k] = feats[index], kinds[index]
                    out[start:start + len(block)] = values
                    runtimes += [names[k] for k in range(len(block))]
                f["content_hash"] = np.array(list(hashes), dtype=HASH_DTYPE)
                f.create_dataset("runtime", data=runtimes, dtype=STR_DTYPE)
        self._runtime.update(zip(hashes, runtimes))

    def _read_source(self, source: int, indices: list[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        src = self._sources[source]
        if src.kind == "journal":
            with np.load(src.path) as data:
                feats, names = data["features"], data["runtime"]
                return {i: feats[i] for i in indices}, {i: str(names[i]) for i in indices}
        idx = np.asarray(indices)
        with h5py.File(src.path, "r") as f:
            feats, names = f["features"][idx], f["runtime"].asstr()[idx]
        return {i: feats[n] for n, i in enumerate(indices)}, {i: str(names[n]) for n, i in enumerate(indices)}

    def _remove_unreferenced_shards(self) -> None:
        """Shards the index on disk does not name (compacted away, or left by a crash before a commit)."""
        referenced = _indexed_shards(self.path)
        for shard in self.shards_dir.glob("shard-*.h5"):
            if shard.name not in referenced:
                shard.unlink(missing_ok=True)
        if self.shards_dir.is_dir() and not any(self.shards_dir.iterdir()):
            self.shards_dir.rmdir()


def compact(path: str | os.PathLike) -> tuple[Layout, Layout]:
    """Rewrite a cache's rows into one shard in index order (reclaims deleted rows); (before, after)."""
    path = Path(path)
    attrs = read_attrs(path)
    before = layout(path)
    partial = path.with_name(path.name + ".partial")
    if any(partial.glob("chunk-*.npz")):
        raise UserError(f"{partial} holds finished chunks of an interrupted extract; run extract again to "
                        "fold them in, then compact.")
    identity = {k: attrs[k] for k in IDENTITY_KEYS}
    writer = CacheWriter(path, identity, attrs["fingerprint"])
    if writer.lost_hashes:
        raise UserError(f"{path} has lost shard files ({len(writer.lost_hashes)} rows); run extract again "
                        "to rebuild them, then compact.")
    with h5py.File(path, "r") as f:
        rows = [Row(p, int(label), s, h) for p, label, s, h in zip(
            _str_list(f["paths"]), f["labels"][()], _str_list(f["split"]), _str_list(f["content_hash"]))]
        class_names = _str_list(f["class_names"])
        skipped = list(zip(_str_list(f["skipped/paths"]), _str_list(f["skipped/content_hash"]),
                           _str_list(f["skipped/reasons"])))
    rows += [Row(p, -1, "", h) for p, h, _ in skipped if h]
    kept_attrs = {k: v for k, v in attrs.items() if k not in ("format_version", "fingerprint", "feature_dim")}
    writer.commit(rows, class_names, kept_attrs, [(p, r) for p, h, r in skipped if not h], compact=True)
    return before, layout(path)
