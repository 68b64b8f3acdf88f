"""The HDF5 feature cache: written in one place (CacheWriter), read in one place (load).

Modules: format (the files and how they are read), journal (chunks of an unfinished run), shards (planning and
writing immutable shard files), writer (CacheWriter, compact).

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

from .format import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    FeatureCache,
    Layout,
    Row,
    copy_cache,
    describe_mismatch,
    layout,
    layout_line,
    load,
    lookup,
    read_attrs,
    shards_dir,
)
from .writer import CacheWriter, compact

__all__ = [
    "FORMAT_VERSION",
    "IDENTITY_KEYS",
    "CacheWriter",
    "FeatureCache",
    "Layout",
    "Row",
    "compact",
    "copy_cache",
    "describe_mismatch",
    "layout",
    "layout_line",
    "load",
    "lookup",
    "read_attrs",
    "shards_dir",
]
