"""A head's feature sources: one cache, or several joined by content hash (a hypercolumn: layers of one
backbone; an ensemble: several backbones).

The one place that knows how sources combine: fit-head joins caches here; predict, serve, compare,
export and audit --head ask this module for a head's sources, for the cached features of known images
(images held by every cache skip the backbones) and for the features of new images (each backbone run
once per batch, all of its layers from that one forward pass). With several sources each source's
rows are L2-normalised before they are concatenated, so no source outweighs another by its scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import output_dir
from .cache import FeatureCache, describe_mismatch, load, lookup, read_attrs
from .errors import UserError

logger = logging.getLogger(__name__)

SOURCES_KEY = "sources"  # head.json: the list of sources of a head with several (absent: one, the legacy keys)


@dataclass(frozen=True)
class Source:
    """One feature source of a head: the cache it was fitted on and the backbone configuration behind it."""

    cache_path: str
    cache_fingerprint: str
    backbone_config: dict[str, Any]  # BackboneConfig fields, the layer included
    identity: dict[str, Any]
    feature_dim: int

    def to_json(self) -> dict[str, Any]:
        """The head.json entry."""
        return asdict(self)


def source_of(cache: FeatureCache) -> Source:
    """The source a loaded cache provides."""
    return Source(
        str(Path(cache.path).resolve()),
        cache.attrs["fingerprint"],
        json.loads(cache.attrs["config_json"]),
        cache.identity,
        int(cache.features.shape[1]),
    )


def head_sources(meta: dict[str, Any]) -> list[Source]:
    """The sources a head.json names: its `sources` list, or the single source of a one-cache head."""
    if SOURCES_KEY in meta:
        return [Source(**s) for s in meta[SOURCES_KEY]]
    return [
        Source(
            meta.get("cache_path", ""),
            meta.get("cache_fingerprint", ""),
            meta.get("backbone_config", {}),
            meta.get("identity", {}),
            int(meta.get("feature_dim", 0)),
        )
    ]


def combined_fingerprint(fingerprints: Sequence[str]) -> str:
    """The fingerprint of several caches' features side by side (order matters)."""
    return hashlib.sha256(json.dumps(list(fingerprints)).encode()).hexdigest()[:16]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def combine(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The head's input from each source's features: one source as it is; several L2-normalised, concatenated."""
    return np.asarray(parts[0]) if len(parts) == 1 else np.hstack([unit_rows(p) for p in parts])


def join_caches(
    paths: Sequence[str | os.PathLike], log: Callable[[str], None] = logger.info
) -> tuple[FeatureCache, list[Source]]:
    """The caches at paths loaded and joined (see join)."""
    return join([load(p) for p in paths], log)


def join(caches: Sequence[FeatureCache], log: Callable[[str], None] = logger.info) -> tuple[FeatureCache, list[Source]]:
    """The caches as one: rows of the first whose content every cache holds, their features combined.

    One cache comes back as it is. Several must list the same classes; images missing from any of them
    are left out (and counted in a message).
    """
    sources = [source_of(c) for c in caches]
    if len(caches) == 1:
        return caches[0], sources
    first = caches[0]
    for other in caches[1:]:
        if other.class_names != first.class_names:
            raise UserError(
                f"{other.path} has classes {other.class_names}, {first.path} has {first.class_names}; "
                "give caches of one dataset (extract each backbone or layer on the same folder)."
            )
    rows_of = [{h: i for i, h in enumerate(c.content_hash)} for c in caches[1:]]
    rows = np.array([i for i, h in enumerate(first.content_hash) if all(h in r for r in rows_of)], np.int64)
    every = set(first.content_hash).union(*(c.content_hash for c in caches[1:]))
    kept = {first.content_hash[i] for i in rows}
    if len(rows) == 0:
        raise UserError(f"no image is in all of {', '.join(str(c.path) for c in caches)}; give caches of one dataset.")
    log(
        f"joined {len(caches)} feature sources: {len(kept)} images in all of them, "
        f"{len(every) - len(kept)} dropped (not in every cache)"
    )
    hashes = [first.content_hash[i] for i in rows]
    parts = [first.features[rows]] + [c.features[[r[h] for h in hashes]] for c, r in zip(caches[1:], rows_of)]
    attrs = {**first.attrs, "fingerprint": combined_fingerprint([s.cache_fingerprint for s in sources])}
    joined = replace(
        first,
        path=Path("+".join(Path(c.path).stem for c in caches)),
        features=combine(parts),
        labels=first.labels[rows],
        paths=[first.paths[i] for i in rows],
        content_hash=hashes,
        split=[first.split[i] for i in rows],
        runtime=[first.runtime[i] for i in rows],
        attrs=attrs,
    )
    return joined, sources


def cached_features(
    sources: Sequence[Source], hashes: Sequence[str], log: Callable[[str], None] = logger.info
) -> dict[str, np.ndarray]:
    """Combined features of the images that every source's cache holds (the caches only save work: a cache
    that moved, broke or changed is passed over, and its images go through the backbones)."""
    found: list[dict[str, np.ndarray]] = []
    for source in sources:
        path = Path(source.cache_path)
        try:
            if not path.is_file() or read_attrs(path).get("fingerprint") != source.cache_fingerprint:
                return {}
            found.append(lookup(path, hashes))
        except UserError as exc:
            log(f"note: not using the head's cache ({exc})")
            return {}
    common = [h for h in dict.fromkeys(hashes) if all(h in f for f in found)]
    if not common:
        return {}
    features = combine([np.stack([f[h] for h in common]) for f in found])
    return dict(zip(common, features))


def _backbones(sources: Sequence[Source]) -> list[tuple[Any, list[int]]]:
    """Sources grouped by backbone (the configuration without its layer), in order: (resolved config, indices)."""
    from .backbones import BackboneConfig

    groups: dict[str, tuple[Any, list[int]]] = {}
    for k, source in enumerate(sources):
        config = BackboneConfig(**source.backbone_config).resolved()
        identity = config.identity()
        if identity != source.identity:
            raise UserError(
                f"the head was trained on other features than backbone {config.backbone} gives "
                f"({describe_mismatch(source.identity, identity)}; source {source.cache_path}). "
                "Fit a head on a cache of this configuration."
            )
        key = replace(config, layer=None).fingerprint()
        groups.setdefault(key, (config, []))[1].append(k)
    return list(groups.values())


def input_size(sources: Sequence[Source]) -> int:
    """The head's pixel input: the largest input size of its backbones (smaller ones get resized copies)."""
    return max(int(s.identity["image_size"]) for s in sources)


def _resized(images: np.ndarray, size: int, resize: str) -> np.ndarray:
    """A uint8 batch resized to size x size with the decoder's filter (for a backbone of smaller input)."""
    from PIL import Image

    from .images import RESIZE_METHODS

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), RESIZE_METHODS[resize])) for img in images])


class SourcesRuntime:
    """Raw pixels to a head's features: each backbone once per batch (all of its layers from one forward pass),
    fed a resized copy where its input is smaller than the head's; sources combined as at fit time."""

    def __init__(
        self,
        sources: Sequence[Source],
        kind: str = "auto",
        *,
        threads: int | None = None,
        scratch_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] = logger.info,
    ) -> None:
        from .runtime import make_runtime, tflite_path

        self.sources = list(sources)
        self.image_size = input_size(sources)
        self.resize = sources[0].identity["resize"]
        self.dim = sum(s.feature_dim for s in sources)
        self.parts = []
        for config, members in _backbones(sources):
            layers = [sources[k].backbone_config.get("layer") for k in members]
            many = layers if len(layers) > 1 else None
            built = replace(config, layer=None) if many else config
            # the conversion is cached beside the features; a head whose cache folder is gone converts into
            # scratch_dir, else into cache/
            folder = Path(sources[members[0]].cache_path).parent
            if not folder.is_dir() or (scratch_dir is not None and not tflite_path(built, folder, many).is_file()):
                folder = Path(scratch_dir) if scratch_dir is not None else output_dir("cache")
            engine = make_runtime(built, kind, tflite_dir=folder, threads=threads, log=log, layers=many)
            self.parts.append((engine, members, int(config.image_size)))
        self.name = " + ".join(f"{sources[m[0]].backbone_config['backbone']}" for _, m, _ in self.parts)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, dim) features of a uint8 batch (n, image_size, image_size, 3)."""
        from .stream import as_outputs

        out: list[np.ndarray] = [np.empty(0)] * len(self.sources)
        for engine, members, size in self.parts:
            batch = images if size == self.image_size else _resized(images, size, self.resize)
            for k, features in zip(members, as_outputs(engine(batch))):
                out[k] = features
        return combine(out)


def build_feature_model(sources: Sequence[Source]) -> Any:
    """The Keras model of SourcesRuntime: pixels (the largest input size) in, the head's features out.

    One source is exactly build_backbone's model. Several: each backbone a branch (resized inside the
    model where its input is smaller), one pooled output per layer, each L2-normalised, concatenated.
    """
    import keras

    from .backbones import build_backbone

    groups = _backbones(sources)
    if len(sources) == 1:
        return build_backbone(groups[0][0])
    size = input_size(sources)
    resize = sources[0].identity["resize"]
    interpolation = resize if resize in ("bilinear", "bicubic", "lanczos3", "nearest", "area") else "bilinear"
    inputs = keras.Input((size, size, 3), name="pixels")
    out: list[Any] = [None] * len(sources)
    for g, (config, members) in enumerate(groups):
        layers = [sources[k].backbone_config.get("layer") for k in members]
        inner = build_backbone(replace(config, layer=None), layers)
        branch = keras.Model(inner.inputs, inner.outputs, name=f"backbone_{g}")
        x = (
            inputs
            if config.image_size == size
            else keras.layers.Resizing(
                config.image_size, config.image_size, interpolation=interpolation, name=f"resize_{g}"
            )(inputs)
        )
        outputs = branch(x)
        for k, features in zip(members, outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            out[k] = keras.layers.UnitNormalization(axis=-1, name=f"source_{k}_l2")(features)
    return keras.Model(inputs, keras.layers.Concatenate(name="sources")(out), name="cnncodes_sources")
