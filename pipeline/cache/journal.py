"""The journal of an unfinished extract: each finished chunk of features is one small `.npz` file in
`<cache>.partial/`, written atomically, so a run that was killed loses at most the chunk it was computing
and the next run starts from the rest."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..artifacts import atomic_write
from .format import HASH_DTYPE


@dataclass(frozen=True)
class Chunk:
    """One journal file: its rows' content hashes, the files it skipped (hash -> reason), the feature width."""

    path: Path
    hashes: list[str]
    skipped: dict[str, str]
    dim: int | None


class Journal:
    """The chunk files of one cache; only chunks of this fingerprint (this configuration) are read back."""

    def __init__(self, cache_path: Path, fingerprint: str) -> None:
        self.folder = cache_path.with_name(cache_path.name + ".partial")
        self.fingerprint = fingerprint

    def chunks(self) -> Iterator[Chunk]:
        """The finished chunks an interrupted run left behind, oldest first."""
        if not self.folder.is_dir():
            return
        for part in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(part) as data:
                    if str(data["fingerprint"]) != self.fingerprint:
                        continue
                    hashes = [h.decode() for h in data["content_hash"]]
                    skipped = {h.decode(): str(r) for h, r in zip(data["skipped_hash"], data["skipped_reason"])}
                    dim = int(data["features"].shape[1]) if len(hashes) else None
            except (OSError, ValueError, KeyError):
                continue  # a torn journal file cannot exist (atomic rename); ignore anything foreign
            yield Chunk(part, hashes, skipped, dim)

    def write(
        self, number: int, hashes: Sequence[str], features: np.ndarray, runtimes: Sequence[str], skipped: dict[str, str]
    ) -> Path:
        """One chunk file, written atomically; OSError (disk full...) is the caller's to word."""
        part = self.folder / f"chunk-{number:06d}-{os.getpid()}-{time.time_ns()}.npz"
        with atomic_write(part, "wb") as handle:
            np.savez(
                handle,
                fingerprint=np.array(self.fingerprint),
                content_hash=np.array(list(hashes), dtype=HASH_DTYPE),
                features=features,
                runtime=np.array(list(runtimes), dtype=str),
                skipped_hash=np.array(list(skipped), dtype=HASH_DTYPE),
                skipped_reason=np.array(list(skipped.values()), dtype=str),
            )
        return part

    @staticmethod
    def read_rows(part: Path, indices: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Features and runtime names of some rows of one chunk file."""
        with np.load(part) as data:
            features, runtimes = data["features"], data["runtime"]
            return {i: features[i] for i in indices}, {i: str(runtimes[i]) for i in indices}

    def discard(self) -> None:
        """Remove the journal once a committed index holds its rows."""
        shutil.rmtree(self.folder, ignore_errors=True)
