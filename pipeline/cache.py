"""The HDF5 feature cache: written in one place (CacheWriter), read in one place (load).

Crash safety: the cache file itself is only ever replaced whole (write a temporary file, fsync,
os.replace), so it is always the last complete cache. While extracting, each finished chunk of
features is written atomically as its own small journal file in `<cache>.partial/`; a run that
was killed leaves those behind and the next run starts from them, redoing at most one chunk.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import UserError

FORMAT_VERSION = 1
HASH_DTYPE = "S64"
STR_DTYPE = h5py.string_dtype("utf-8")
# Attributes that define the features; two caches with equal values hold interchangeable rows.
IDENTITY_KEYS = ("backbone", "weights", "layer", "pooling", "image_size", "resize", "alpha", "decoder")
BLOCK_ROWS = 2048  # rows copied at a time when a cache is rewritten: memory stays flat


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


def _str_list(dataset: h5py.Dataset) -> list[str]:
    if dataset.dtype.kind == "S":
        return [v.decode() for v in dataset[()]]
    return list(dataset.asstr()[()])


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """A cache's attributes only (cheap); raise UserError if it is not a cache we can read."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `python cli.py extract DATA_DIR` first.") from None
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 cache ({exc}).") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has cache format {attrs.get('format_version')!r}; this version of "
                        f"cnncodes reads format {FORMAT_VERSION}. Run extract again to rebuild it.")
    return attrs


def load(path: str | os.PathLike) -> FeatureCache:
    """Read a whole cache into memory."""
    attrs = read_attrs(path)
    with h5py.File(path, "r") as f:
        return FeatureCache(
            path=Path(path), features=f["features"][()], labels=f["labels"][()],
            class_names=_str_list(f["class_names"]), paths=_str_list(f["paths"]),
            content_hash=_str_list(f["content_hash"]), split=_str_list(f["split"]),
            runtime=_str_list(f["runtime"]),
            skipped=list(zip(_str_list(f["skipped/paths"]), _str_list(f["skipped/reasons"]))),
            attrs=attrs)


def lookup(path: str | os.PathLike, hashes: Sequence[str]) -> dict[str, np.ndarray]:
    """Features of the given content hashes that the cache holds (reads only those rows)."""
    read_attrs(path)
    with h5py.File(path, "r") as f:
        row_of = {h: i for i, h in enumerate(_str_list(f["content_hash"]))}
        rows = sorted({row_of[h] for h in hashes if h in row_of})
        if not rows:
            return {}
        block = f["features"][np.asarray(rows)]
        hash_of = {i: h for h, i in row_of.items()}
        return {hash_of[r]: block[k] for k, r in enumerate(rows)}


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'key: cached -> asked' for every identity key that differs."""
    return "; ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_KEYS
                     if found.get(k) != wanted.get(k))


def _is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Row:
    """One file of the current dataset scan, as the cache will record it."""

    path: str
    label: int
    split: str
    content_hash: str


class CacheWriter:
    """Appends features chunk by chunk (journal files) and commits them into the cache atomically."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], fingerprint: str,
                 chunk_size: int = 256) -> None:
        self.path = Path(path)
        self.partial_dir = self.path.with_name(self.path.name + ".partial")
        self.identity, self.fingerprint, self.chunk_size = identity, fingerprint, chunk_size
        self._source: dict[str, tuple[int, int]] = {}  # hash -> (source, row); source -1 is the old cache
        self._parts: list[Path] = []
        self._skipped: dict[str, str] = {}  # hash -> reason
        self._pending: list[tuple[str, np.ndarray, str]] = []
        self._pending_skipped: dict[str, str] = {}
        self.resumed_hashes: set[str] = set()  # rows found in the journal of an interrupted run
        self.dim: int | None = None
        self._remove_stale_temporaries()
        if self.path.exists():
            self._open_existing()
        self._open_journal()

    def _remove_stale_temporaries(self) -> None:
        """Half-written caches of runs that were killed while committing (their process is gone)."""
        for tmp in self.path.parent.glob(self.path.name + ".tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    # -- reading what is already there -------------------------------------------------------
    def _open_existing(self) -> None:
        attrs = read_attrs(self.path)
        if attrs.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.path} was written with another configuration ({describe_mismatch(attrs, self.identity)}). "
                "It is not reused: omit --cache for a file named after this configuration, "
                "or give another --cache path.")
        with h5py.File(self.path, "r") as f:
            self.dim = int(f["features"].shape[1]) if f["features"].shape[0] else None
            self._source.update((h, (-1, i)) for i, h in enumerate(_str_list(f["content_hash"])))
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
            index = len(self._parts)
            self._parts.append(part)
            for row, h in enumerate(hashes):
                if h not in self._source:
                    self.resumed_hashes.add(h)
                self._source[h] = (index, row)
            self._skipped.update((h, str(r)) for h, r in skipped.items())

    def has(self, content_hash: str) -> bool:
        """True when this content's features, or its reason for being skipped, are known."""
        return content_hash in self._source or content_hash in self._skipped

    def has_features(self, content_hash: str) -> bool:
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
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        part = self.partial_dir / f"chunk-{len(self._parts):06d}-{os.getpid()}-{time.time_ns()}.npz"
        hashes = [h for h, _, _ in self._pending]
        features = (np.stack([f for _, f, _ in self._pending]) if self._pending
                    else np.zeros((0, self.dim or 0), np.float32))
        tmp = part.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, fingerprint=np.array(self.fingerprint),
                         content_hash=np.array(hashes, dtype=HASH_DTYPE), features=features,
                         runtime=np.array([r for _, _, r in self._pending], dtype=str),
                         skipped_hash=np.array(list(self._pending_skipped), dtype=HASH_DTYPE),
                         skipped_reason=np.array(list(self._pending_skipped.values()), dtype=str))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, part)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(exc, tmp) from None
        index = len(self._parts)
        self._parts.append(part)
        self._source.update((h, (index, row)) for row, h in enumerate(hashes))
        self._skipped.update(self._pending_skipped)
        if self._pending:
            self.dim = features.shape[1]
        self._pending, self._pending_skipped = [], {}

    def _write_error(self, exc: OSError, target: Path) -> UserError:
        what = "the disk is full" if _is_disk_full(exc) else f"{exc}"
        return UserError(
            f"could not write {target}: {what}. The previous cache {self.path} is intact"
            + (f" and the {len(self._parts)} finished chunks in {self.partial_dir} are kept" if self._parts else "")
            + "; free some space (or choose --cache elsewhere) and run extract again to resume.")

    # -- committing --------------------------------------------------------------------------
    def commit(self, rows: Sequence[Row], class_names: Sequence[str], attrs: dict[str, Any],
               unreadable: Sequence[tuple[str, str]] = ()) -> tuple[int, int]:
        """Rewrite the cache with these rows (those whose features are known), atomically.

        Rows whose content could not be used are recorded under skipped/ with their reason (every
        path of byte-identical files). unreadable lists (path, reason) of files that could not even
        be read (no content hash; recorded with an empty one). Returns (rows written, files skipped).
        The journal is removed once the new cache is in place.
        """
        self.flush()
        kept = [r for r in rows if r.content_hash in self._source]
        skipped = [(r.path, r.content_hash, self._skipped[r.content_hash]) for r in rows
                   if r.content_hash not in self._source and r.content_hash in self._skipped]
        skipped += [(p, "", reason) for p, reason in unreadable]
        dim = self.dim or 0
        needed = len(kept) * dim * 4 + (1 << 20) * 4
        free = shutil.disk_usage(self.path.parent).free
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            if free < needed:
                raise OSError(errno.ENOSPC, "No space left on device (checked before writing)")
            with h5py.File(tmp, "w") as f:
                f.attrs.update({**attrs, **self.identity, "fingerprint": self.fingerprint,
                                "format_version": FORMAT_VERSION, "feature_dim": dim})
                features = f.create_dataset("features", (len(kept), dim), np.float32,
                                            chunks=(min(len(kept), 256), dim) if kept and dim else None)
                runtime = np.empty(len(kept), dtype=object)
                self._copy_features(kept, features, runtime)
                f["labels"] = np.array([r.label for r in kept], dtype=np.int32)
                f.create_dataset("class_names", data=list(class_names), dtype=STR_DTYPE)
                f.create_dataset("paths", data=[r.path for r in kept], dtype=STR_DTYPE)
                f["content_hash"] = np.array([r.content_hash for r in kept], dtype=HASH_DTYPE)
                f.create_dataset("split", data=[r.split for r in kept], dtype=STR_DTYPE)
                f.create_dataset("runtime", data=list(runtime), dtype=STR_DTYPE)
                group = f.create_group("skipped")
                group.create_dataset("paths", data=[p for p, _, _ in skipped], dtype=STR_DTYPE)
                group["content_hash"] = np.array([h for _, h, _ in skipped], dtype=HASH_DTYPE)
                group.create_dataset("reasons", data=[r for _, _, r in skipped], dtype=STR_DTYPE)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(exc, tmp) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return len(kept), len(skipped)

    def _copy_features(self, kept: Sequence[Row], out: h5py.Dataset, runtime: np.ndarray) -> None:
        """Gather each row's features from the old cache or the journal, one block at a time."""
        old = h5py.File(self.path, "r") if self.path.exists() else None
        try:
            for start in range(0, len(kept), BLOCK_ROWS):
                block = kept[start:start + BLOCK_ROWS]
                values = np.empty((len(block), out.shape[1]), np.float32)
                by_source: dict[int, list[tuple[int, int]]] = {}
                for k, row in enumerate(block):
                    source, index = self._source[row.content_hash]
                    by_source.setdefault(source, []).append((k, index))
                for source, pairs in by_source.items():
                    feats, names = self._read_source(source, old, sorted({i for _, i in pairs}))
                    for k, index in pairs:
                        values[k], runtime[start + k] = feats[index], names[index]
                out[start:start + len(block)] = values
        finally:
            if old is not None:
                old.close()

    def _read_source(self, source: int, old: h5py.File | None,
                     indices: list[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        if source == -1:
            assert old is not None
            idx = np.asarray(indices)
            feats, names = old["features"][idx], old["runtime"].asstr()[idx]
            return {i: feats[n] for n, i in enumerate(indices)}, {i: names[n] for n, i in enumerate(indices)}
        with np.load(self._parts[source]) as data:
            feats, names = data["features"], data["runtime"]
            return {i: feats[i] for i in indices}, {i: str(names[i]) for i in indices}

