"""Helpers for the head, report and predict tests: synthetic feature caches written without TensorFlow."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.backbones import BackboneConfig  # noqa: E402
from pipeline.cache import CacheWriter, Row  # noqa: E402

# The configuration synthetic caches claim to come from (resolving it needs no TensorFlow).
SYNTH_CONFIG = BackboneConfig("MobileNetV2", "none", None, "avg", 32, "bilinear", 0.35)
CLASS_NAMES3 = ["ant", "bee", "cat"]


def fake_hash(key: object) -> str:
    """A 64-hex content hash standing for a file's bytes; equal keys give equal hashes."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


def blobs(
    n_classes: int = 3, per_class: int | Sequence[int] = 30, dim: int = 16, sep: float = 3.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs with unit noise around random centres drawn with standard deviation sep per
    dimension: sep=3 puts the centres about 17 noise standard deviations apart (every dimension
    separates the classes, so standardising the features keeps them separable)."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * n_classes if isinstance(per_class, int) else list(per_class)
    centres = rng.normal(0, sep, (n_classes, dim))
    X = np.vstack([centre + rng.normal(0, 1, (n, dim)) for centre, n in zip(centres, counts)])
    y = np.repeat(np.arange(n_classes), counts)
    return X.astype(np.float32), y.astype(np.int32)


def noise(n_classes: int = 3, per_class: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features that carry no information about the labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, (n_classes * per_class, dim)).astype(np.float32)
    y = np.repeat(np.arange(n_classes), per_class).astype(np.int32)
    return X, y


def write_cache(
    path: Path,
    X: np.ndarray,
    y: Sequence[int],
    class_names: Sequence[str] | None = None,
    split: Sequence[str] | None = None,
    hashes: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    config: BackboneConfig = SYNTH_CONFIG,
) -> Path:
    """Write a cache through CacheWriter, as extract would; rows sharing a hash share their features
    (the first row's vector is the one kept, as for byte-identical files)."""
    path = Path(path)
    y = [int(v) for v in y]
    n = len(y)
    class_names = list(class_names or [f"class{c}" for c in range(max(y, default=-1) + 1)])
    split = list(split) if split is not None else [""] * n
    hashes = list(hashes) if hashes is not None else [fake_hash(("row", path.name, i)) for i in range(n)]
    paths = (
        list(paths)
        if paths is not None
        else ["/".join(p for p in (split[i], class_names[y[i]], f"img_{i:04d}.png") if p) for i in range(n)]
    )
    resolved = config.resolved()
    writer = CacheWriter(path, resolved.identity(), resolved.fingerprint())
    seen: set[str] = set()
    for h, vector in zip(hashes, X):
        if h not in seen:
            seen.add(h)
            writer.add(h, vector, "keras")
    rows = [Row(paths[i], y[i], split[i], hashes[i]) for i in range(n)]
    attrs = {"config_json": json.dumps(resolved.__dict__), "dataset_root": str(path.parent / "data")}
    writer.commit(rows, class_names, attrs)
    return path
