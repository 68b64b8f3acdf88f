"""Shard planning: which immutable shard files a new index reads its rows from, when the layout has grown
fragmented enough to rewrite it into one shard (compaction), and the writing of one new shard."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable, Sequence

import h5py
import numpy as np

from ..artifacts import atomic_path
from .format import FORMAT_VERSION, HASH_DTYPE, SHARD_PATTERN, STR_DTYPE, count_runs, garbage

BLOCK_ROWS = 2048  # rows copied at a time into a shard: memory stays flat
# When an index would exceed any of these, its rows are rewritten into one shard (compaction):
MAX_SHARDS = 64  # shard files
MAX_RUNS_BASE, ROWS_PER_RUN = 64, 16  # runs (contiguous blocks read from one shard): 64 + rows / 16
# ...and when the shards hold more unreferenced rows (deleted or replaced images) than referenced ones.

# (values, runtime names) of some contents, in the order asked: how a new shard gathers its rows
ReadRows = Callable[[Sequence[str]], tuple[np.ndarray, list[str]]]


def plan(
    hashes: Sequence[str], fresh: Sequence[str], place: dict[str, tuple[Hashable, int]]
) -> tuple[list[Hashable | None], list[tuple[int, int]]]:
    """The index's shards and each row's (shard position, row in that shard).

    hashes are the index's rows in order; fresh, the contents that go into the new shard (None in the
    returned list of shards); place, where every other content already sits: (its shard, its row there).
    """
    new_row = {h: i for i, h in enumerate(fresh)}
    shards: list[Hashable | None] = list(dict.fromkeys(place[h][0] for h in hashes if h not in new_row))
    shards += [None] if fresh else []
    position = {s: i for i, s in enumerate(shards)}
    return shards, [
        (position[None], new_row[h]) if h in new_row else (position[place[h][0]], place[h][1]) for h in hashes
    ]


def fragmented(mapping: Sequence[tuple[int, int]], sizes: Sequence[int]) -> bool:
    """Too many files or runs to read fast, or more dead rows than live ones: time to compact."""
    live = len(set(mapping))
    return (
        len(sizes) > MAX_SHARDS
        or count_runs(mapping) > MAX_RUNS_BASE + len(mapping) // ROWS_PER_RUN
        or garbage(mapping, sizes) > live
    )


def next_number(folder: Path, first_free: int) -> int:
    """A shard number never used before: numbers only grow, past the index's record and every file."""
    numbers = [int(m.group(1)) for p in folder.glob("shard-*.h5") if (m := SHARD_PATTERN.fullmatch(p.name))]
    return max([first_free - 1, *numbers]) + 1


def shard_path(folder: Path, fingerprint: str, number: int) -> Path:
    """The file of shard `number` of a cache with this fingerprint."""
    return folder / f"shard-{fingerprint}-{number:06d}.h5"


def write_shard(path: Path, hashes: Sequence[str], dim: int, fingerprint: str, read_rows: ReadRows) -> list[str]:
    """An immutable shard of these contents' features, gathered one block at a time; their runtime names."""
    runtimes: list[str] = []
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"fingerprint": fingerprint, "format_version": FORMAT_VERSION})
            out = f.create_dataset("features", (len(hashes), dim), np.float32)
            for start in range(0, len(hashes), BLOCK_ROWS):
                values, names = read_rows(hashes[start : start + BLOCK_ROWS])
                out[start : start + len(values)] = values
                runtimes += names
            f["content_hash"] = np.array(list(hashes), dtype=HASH_DTYPE)
            f.create_dataset("runtime", data=runtimes, dtype=STR_DTYPE)
    return runtimes
