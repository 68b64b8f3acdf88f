"""CacheWriter: the one writer of a cache. It knows where every content's features are (a shard, a journal
chunk, or a format-1 cache file), queues new rows into journal chunks, and commits them: one new shard, one
new index, swapped in whole."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..artifacts import TMP_MARK, process_alive
from ..errors import UserError
from . import shards
from .format import (
    IDENTITY_KEYS,
    Layout,
    Row,
    describe_mismatch,
    indexed_shards,
    layout,
    read_attrs,
    shard_files,
    shards_dir,
    str_list,
    write_index,
)
from .journal import Journal


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


@dataclass(frozen=True)
class _Source:
    """A file holding feature rows: a shard (kept as it is), a journal chunk or a format-1 cache (copied)."""

    path: Path
    kind: str  # "shard", "journal" or "legacy"


class CacheWriter:
    """Appends features chunk by chunk (journal files) and commits them into the cache atomically."""

    def __init__(
        self, path: str | os.PathLike, identity: dict[str, Any], fingerprint: str, chunk_size: int = 256
    ) -> None:
        self.path = Path(path)
        self.journal = Journal(self.path, fingerprint)
        self.partial_dir = self.journal.folder
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
                "or give another --cache path."
            )
        with h5py.File(self.path, "r") as f:
            self.dim = int(f["features"].shape[1]) if f["features"].shape[0] else None
            hashes = str_list(f["content_hash"])
            if "shards" in f:
                names = shard_files(f)
                ids = [self._add_source(self.path.parent / n, "shard") for n in names]
                self._shard_rows.update(zip(ids, f["shards/rows"][()].tolist()))
                self._first_free_number = int(f["shards"].attrs.get("next", 1))
                present = [(self.path.parent / n).is_file() for n in names]
                for h, s, r, runtime in zip(
                    hashes, f["shards/row_shard"][()], f["shards/row_in_shard"][()], str_list(f["runtime"])
                ):
                    if present[s]:
                        self._source[h], self._runtime[h] = (ids[s], int(r)), runtime
                    else:
                        self.lost_hashes.add(h)
            else:  # format 1: the rows live in this very file; the commit copies them into a shard
                legacy = self._add_source(self.path, "legacy")
                self._source.update((h, (legacy, i)) for i, h in enumerate(hashes))
            self._skipped.update(
                (h, r) for h, r in zip(str_list(f["skipped/content_hash"]), str_list(f["skipped/reasons"])) if h
            )

    def _open_journal(self) -> None:
        for chunk in self.journal.chunks():
            index = self._add_source(chunk.path, "journal")
            self._n_journal += 1
            if chunk.dim is not None:
                self.dim = chunk.dim
            for row, h in enumerate(chunk.hashes):
                if h not in self._source:
                    self.resumed_hashes.add(h)
                self._source[h] = (index, row)
            self._skipped.update(chunk.skipped)

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
        hashes = [h for h, _, _ in self._pending]
        features = (
            np.stack([f for _, f, _ in self._pending]) if self._pending else np.zeros((0, self.dim or 0), np.float32)
        )
        try:
            part = self.journal.write(
                self._n_journal, hashes, features, [r for _, _, r in self._pending], self._pending_skipped
            )
        except OSError as exc:
            raise self._write_error(exc, self.partial_dir) from None
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
            + (f" and the {self._n_journal} finished chunks in {self.partial_dir} are kept" if self._n_journal else "")
            + "; free some space (or choose --cache elsewhere) and run extract again to resume."
        )

    # -- committing --------------------------------------------------------------------------
    def commit(
        self,
        rows: Sequence[Row],
        class_names: Sequence[str],
        attrs: dict[str, Any],
        unreadable: Sequence[tuple[str, str]] = (),
        compact: bool = False,
    ) -> tuple[int, int]:
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
        skipped = [
            (r.path, r.content_hash, self._skipped[r.content_hash])
            for r in rows
            if r.content_hash not in self._source and r.content_hash in self._skipped
        ]
        skipped += [(p, "", reason) for p, reason in unreadable]
        dim = self.dim or 0
        hashes = [r.content_hash for r in kept]
        fresh = list(dict.fromkeys(h for h in hashes if self._sources[self._source[h][0]].kind != "shard"))
        planned, mapping = shards.plan(hashes, fresh, self._source)
        if compact or shards.fragmented(mapping, [self._size_of(s, len(fresh)) for s in planned]):
            fresh = list(dict.fromkeys(hashes))
            planned, mapping = shards.plan(hashes, fresh, self._source)
        sizes = [self._size_of(s, len(fresh)) for s in planned]
        number = shards.next_number(self.shards_dir, self._first_free_number)
        new_shard = shards.shard_path(self.shards_dir, self.fingerprint, number) if fresh else None
        target = new_shard or self.path  # what was being written, for the message if it fails
        try:
            needed = len(fresh) * dim * 4 + len(kept) * 256 + (1 << 20) * 4
            if shutil.disk_usage(self.path.parent).free < needed:
                raise OSError(errno.ENOSPC, "No space left on device (checked before writing)")
            if new_shard is not None:
                runtimes = shards.write_shard(new_shard, fresh, dim, self.fingerprint, self._read_rows)
                self._runtime.update(zip(fresh, runtimes))
            names = [
                f"{self.shards_dir.name}/{(new_shard if s is None else self._sources[s].path).name}" for s in planned
            ]
            target = self.path
            write_index(
                self.path,
                {**attrs, **self.identity, "fingerprint": self.fingerprint},
                kept,
                class_names,
                [self._runtime[h] for h in hashes],
                skipped,
                names,
                sizes,
                mapping,
                dim,
                number + 1,
            )
        except BaseException as exc:
            if new_shard is not None and new_shard.name not in indexed_shards(self.path):
                new_shard.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._write_error(exc, target) from None
            raise
        self.journal.discard()
        self._remove_unreferenced_shards()
        return len(kept), len(skipped)

    def _size_of(self, source: int | None, n_fresh: int) -> int:
        """Rows in a shard of the plan (None: the new shard)."""
        return n_fresh if source is None else self._shard_rows[source]

    def _read_rows(self, hashes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Features and runtime names of these contents, wherever they sit, read file by file."""
        values = np.empty((len(hashes), self.dim or 0), np.float32)
        names: dict[int, str] = {}
        by_source: dict[int, list[tuple[int, int]]] = {}
        for k, h in enumerate(hashes):
            source, index = self._source[h]
            by_source.setdefault(source, []).append((k, index))
        for source, pairs in by_source.items():
            feats, kinds = self._read_source(source, sorted({i for _, i in pairs}))
            for k, index in pairs:
                values[k], names[k] = feats[index], kinds[index]
        return values, [names[k] for k in range(len(hashes))]

    def _read_source(self, source: int, indices: list[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        src = self._sources[source]
        if src.kind == "journal":
            return Journal.read_rows(src.path, indices)
        idx = np.asarray(indices)
        with h5py.File(src.path, "r") as f:
            feats, names = f["features"][idx], f["runtime"].asstr()[idx]
        return {i: feats[n] for n, i in enumerate(indices)}, {i: str(names[n]) for n, i in enumerate(indices)}

    def _remove_unreferenced_shards(self) -> None:
        """Shards the index on disk does not name (compacted away, or left by a crash before a commit)."""
        referenced = indexed_shards(self.path)
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
    journal = Journal(path, attrs["fingerprint"])
    if any(journal.folder.glob("chunk-*.npz")):
        raise UserError(
            f"{journal.folder} holds finished chunks of an interrupted extract; run extract again to "
            "fold them in, then compact."
        )
    identity = {k: attrs[k] for k in IDENTITY_KEYS}
    writer = CacheWriter(path, identity, attrs["fingerprint"])
    if writer.lost_hashes:
        raise UserError(
            f"{path} has lost shard files ({len(writer.lost_hashes)} rows); run extract again "
            "to rebuild them, then compact."
        )
    with h5py.File(path, "r") as f:
        rows = [
            Row(p, int(label), s, h)
            for p, label, s, h in zip(
                str_list(f["paths"]), f["labels"][()], str_list(f["split"]), str_list(f["content_hash"])
            )
        ]
        class_names = str_list(f["class_names"])
        skipped = list(
            zip(str_list(f["skipped/paths"]), str_list(f["skipped/content_hash"]), str_list(f["skipped/reasons"]))
        )
    rows += [Row(p, -1, "", h) for p, h, _ in skipped if h]
    kept_attrs = {k: v for k, v in attrs.items() if k not in ("format_version", "fingerprint", "feature_dim")}
    writer.commit(rows, class_names, kept_attrs, [(p, r) for p, h, r in skipped if not h], compact=True)
    return before, layout(path)
