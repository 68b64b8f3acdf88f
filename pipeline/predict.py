"""New images to classes, with exactly the backbone configuration the head was trained on."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backbones import BackboneConfig
from .errors import UserError
from .heads import Head, load_head
from .images import ImageFile, scan_paths
from .params import Interval, as_number, check_params, define
from .runtime import load_model_file, read_sidecar
from .sources import SourcesRuntime, cached_features, head_sources
from .storage import storage_options as resolve_storage_options
from .stream import as_outputs, hash_files, stream_features

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The top-k classes of one image (or why it could not be classified), and whether it is unknown."""

    path: str
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""
    unknown: bool | None = None  # None: no detector (an old head, a model without one, or --no-unknown)
    unknown_score: float | None = None


define(unknown_threshold=[Interval(), None])


@dataclass
class UnknownRule:
    """Which images are unknown: a score above threshold (None: no detector, or turned off)."""

    threshold: float | None

    def decide(self, scores: np.ndarray | None) -> list[tuple[bool | None, float | None]]:
        """(unknown, score) per image."""
        if scores is None or self.threshold is None:
            return [(None, None)] * (0 if scores is None else len(scores))
        return [(bool(s > self.threshold), float(s)) for s in scores]


def unknown_rule(
    detector: Any, accept: float | None = None, threshold: float | None = None, enabled: bool = True
) -> UnknownRule:
    """The threshold to use: --unknown-threshold, else the one accepting --accept of known images, else the
    head's own (fitted at its accept rate); none without a detector or with --no-unknown."""
    if detector is None or not enabled:
        return UnknownRule(None)
    if threshold is not None:
        return UnknownRule(float(threshold))
    return UnknownRule(detector.threshold_for(accept) if accept is not None else detector.threshold)


def check_unknown_options(accept: Any, unknown_threshold: Any, no_unknown: bool) -> tuple[Any, Any]:
    """--accept and --unknown-threshold as numbers (they may come as text), checked; at most one of them."""
    accept, unknown_threshold = as_number("accept", accept), as_number("unknown_threshold", unknown_threshold)
    check_params(dict(accept=accept, unknown_threshold=unknown_threshold))
    if accept is not None and unknown_threshold is not None:
        raise UserError("give at most one of --accept and --unknown-threshold.")
    if no_unknown and (accept is not None or unknown_threshold is not None):
        raise UserError("--no-unknown turns the detector off; drop --accept / --unknown-threshold.")
    return accept, unknown_threshold


def _top_k(
    path: str,
    proba: np.ndarray,
    classes: Sequence[str],
    k: int,
    unknown: tuple[bool | None, float | None] = (None, None),
) -> Prediction:
    order = np.argsort(-proba, kind="stable")[:k]
    return Prediction(path, [classes[i] for i in order], [float(proba[i]) for i in order], "", *unknown)


def _head_rows(head: Head, rule: UnknownRule, paths: list[str], features: np.ndarray, top_k: int) -> list[Prediction]:
    """Predictions of feature rows: calibrated top-k and the unknown decision."""
    proba = head.predict_proba(features)
    scores = head.unknown_scores(features, proba) if rule.threshold is not None else None
    decisions = rule.decide(scores) if scores is not None else [(None, None)] * len(paths)
    return [_top_k(path, p, head.classes, top_k, d) for path, p, d in zip(paths, proba, decisions)]


def _head_predictions(
    head: Head,
    rule: UnknownRule,
    files: list[ImageFile],
    top_k: int,
    batch_size: int,
    workers: int | None,
    runtime: str,
    threads: int | None,
    log: Callable[[str], None],
    storage_options: dict[str, Any],
) -> Iterator[Prediction]:
    """Features from the head's caches where they all hold the image, from the backbones otherwise."""
    hashes = hash_files([f.path for f in files], workers, storage_options)
    sources = head_sources(head.meta)
    known = cached_features(sources, [h for h in hashes if isinstance(h, str)], log)
    hash_of = {id(f): h for f, h in zip(files, hashes)}
    cached = [f for f in files if isinstance(hash_of[id(f)], str) and hash_of[id(f)] in known]
    for file in files:
        if isinstance(hash_of[id(file)], Exception):
            yield Prediction(file.relpath, error=f"unreadable: {hash_of[id(file)]}")
    if cached:
        yield from _head_rows(
            head, rule, [f.relpath for f in cached], np.stack([known[hash_of[id(f)]] for f in cached]), top_k
        )
    rest = [f for f in files if isinstance(hash_of[id(f)], str) and hash_of[id(f)] not in known]
    if not rest:
        return
    engine = SourcesRuntime(sources, runtime, threads=threads, log=log)
    log(f"{len(cached)} images found in the cache; computing features of {len(rest)} with {engine.name}")
    for batch in stream_features(rest, engine, engine.resize, batch_size, workers, storage_options):
        yield from (Prediction(f.relpath, error=reason) for f, reason in batch.failed)
        if batch.files:
            yield from _head_rows(head, rule, [f.relpath for f in batch.files], batch.features, top_k)


def model_unknown_rule(
    sidecar: dict[str, Any], accept: float | None, threshold: float | None, enabled: bool
) -> UnknownRule:
    """The threshold for an exported model: its sidecar's unknown entry (no --accept: no training scores)."""
    entry = sidecar.get("unknown")
    if entry is None or not enabled:
        return UnknownRule(None)
    if accept is not None:
        raise UserError(
            "--accept needs the head's training scores; with --model give --unknown-threshold "
            f"(the model's own is {entry['threshold']:.4f}, accepting {entry['accept']:.0%} of knowns)."
        )
    return UnknownRule(float(threshold) if threshold is not None else float(entry["threshold"]))


def _model_predictions(
    model: str | os.PathLike,
    rule: UnknownRule,
    files: list[ImageFile],
    top_k: int,
    batch_size: int,
    workers: int | None,
    storage_options: dict[str, Any],
) -> Iterator[Prediction]:
    """An exported or fine-tuned model file: pixels in, probabilities (and its unknown score) out."""
    runtime, meta = load_model_file(model)
    classes = meta["classes"]
    for batch in stream_features(files, runtime, meta.get("resize", "bilinear"), batch_size, workers, storage_options):
        yield from (Prediction(f.relpath, error=reason) for f, reason in batch.failed)
        proba, scores = split_outputs(batch.outputs)
        decisions = rule.decide(scores) if scores is not None else [(None, None)] * len(batch.files)
        yield from (_top_k(f.relpath, p, classes, top_k, d) for f, p, d in zip(batch.files, proba, decisions))


def split_outputs(outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """A model file's outputs as (probabilities, unknown scores or None: a model exported or fine-tuned without a
    detector, or before detectors existed); see keras_head.calibrated_model."""
    return np.asarray(outputs[0]), (np.asarray(outputs[1]).reshape(-1) if len(outputs) > 1 else None)


def predict(
    paths: Sequence[str | os.PathLike],
    head: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    top_k: int = 3,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    trust_pickle: bool = False,
    accept: float | str | None = None,
    unknown_threshold: float | str | None = None,
    no_unknown: bool = False,
    log: Callable[[str], None] = logger.info,
    storage_options: str | dict[str, Any] | None = None,
) -> list[Prediction]:
    """Classify image files or folders (local, or object-store URLs: see pipeline.storage) with a fitted head or
    a model file; write a CSV when out is given.

    With a head that has an unknown detector (or an exported model with its score), each prediction says
    whether the image is unknown: at the head's threshold, the one accepting `accept` of known images, or
    unknown_threshold; no_unknown turns it off.
    """
    check_params(dict(top_k=top_k, batch_size=batch_size, workers=workers, threads=threads, runtime=runtime))
    accept, unknown_threshold = check_unknown_options(accept, unknown_threshold, no_unknown)
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    loaded = load_head(head, trust_pickle) if head is not None else None
    if loaded is not None and loaded.detector is None and not no_unknown:
        log(f"note: head {head} has no unknown detector (fitted before they existed); fit it again to get one")
    options = resolve_storage_options(storage_options)
    files, ignored = scan_paths(list(paths), options)
    if ignored:
        log(f"{len(ignored)} non-image files ignored")
    if not files:
        raise UserError("no image files found in " + ", ".join(map(str, paths)) + ".")
    n_classes = len(loaded.classes) if loaded is not None else len(read_sidecar(model)["classes"])
    if top_k > n_classes:
        log(f"note: top_k {top_k} is more than the {n_classes} classes; every class is listed")
        top_k = n_classes
    if loaded is not None:
        rule = unknown_rule(loaded.detector, accept, unknown_threshold, not no_unknown)
        stream = _head_predictions(loaded, rule, files, top_k, batch_size, workers, runtime, threads, log, options)
    else:
        sidecar = read_sidecar(model)
        rule = model_unknown_rule(sidecar, accept, unknown_threshold, not no_unknown)
        stream = _model_predictions(model, rule, files, top_k, batch_size, workers, options)
    order = {f.relpath: k for k, f in reversed(list(enumerate(files)))}
    predictions = sorted(stream, key=lambda p: order[p.path])  # as given, whatever the source of features
    if out:
        write_csv(predictions, out, top_k)
    return predictions


def write_csv(predictions: Sequence[Prediction], out: str | os.PathLike, top_k: int) -> None:
    """path, class_1, prob_1, ..., class_k, prob_k, unknown, unknown_score, error (unknown empty: no detector)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path"]
            + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("class", "prob")]
            + ["unknown", "unknown_score", "error"]
        )
        for p in predictions:
            cells = [c for pair in zip(p.classes, (f"{q:.6f}" for q in p.probabilities)) for c in pair]
            unknown = "" if p.unknown is None else str(p.unknown).lower()
            score = "" if p.unknown_score is None else f"{p.unknown_score:.4f}"
            writer.writerow([p.path] + cells + [""] * (2 * top_k - len(cells)) + [unknown, score, p.error])


def prediction_lines(predictions: Sequence[Prediction], limit: int = 50) -> list[str]:
    """Human-readable lines: path, then the top classes with probabilities; errors last."""
    good = [p for p in predictions if not p.error]
    bad = [p for p in predictions if p.error]
    lines = [
        f"{p.path}: "
        + ("UNKNOWN (not one of the classes; closest: " if p.unknown else "")
        + ", ".join(f"{c} {q:.3f}" for c, q in zip(p.classes, p.probabilities))
        + (")" if p.unknown else "")
        for p in good[:limit]
    ]
    if len(good) > limit:
        lines.append(f"... {len(good) - limit} more (use --out FILE.csv for all)")
    n_unknown = sum(bool(p.unknown) for p in good)
    lines.append(
        f"{len(good)} images classified, {len(bad)} skipped"
        + (f", {n_unknown} unknown" if any(p.unknown is not None for p in good) else "")
    )
    lines += [f"  skipped {p.path}: {p.error}" for p in bad]
    return lines


# -- one classifier loaded once, pixels to probabilities (the web server's path) ------------------
@dataclass
class Classifier:
    """A head with its backbone, or a model file, loaded once: uint8 pixels in, calibrated class probabilities
    and unknown scores out."""

    classes: list[str]
    image_size: int
    resize: str
    backbone: str  # a readable name of the backbone configuration (for /health)
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]] = field(repr=False)
    unknown_threshold: float | None = None  # None: no unknown detector

    def predict_scored(self, images: np.ndarray) -> np.ndarray:
        """(n, n_classes + 1): the probabilities of a uint8 batch (n, image_size, image_size, 3), then its
        unknown score in the last column (NaN without a detector). One array, so a batch splits by rows."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected images of shape (n, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        proba, scores = self.run(images)
        scores = np.full(len(proba), np.nan) if scores is None or self.unknown_threshold is None else scores
        return np.column_stack([np.asarray(proba, dtype=np.float64), scores])

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(n, n_classes) probabilities of a uint8 batch (n, image_size, image_size, 3)."""
        return self.predict_scored(images)[:, :-1]


def load_classifier(
    head: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    *,
    scratch_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = logger.info,
) -> Classifier:
    """Load a head (and the backbone recorded in it) or a .keras/.tflite model file, once.

    A head's backbone converted to TFLite is reused from beside its cache, as predict does; when it
    is not there yet, scratch_dir (if given) receives the conversion instead of the cache's folder.
    """
    check_params(dict(runtime=runtime, threads=threads))
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    if model is not None:
        engine, meta = load_model_file(model)
        name = BackboneConfig(**meta["backbone_config"]).short_name if meta.get("backbone_config") else Path(model).name
        threshold = meta["unknown"]["threshold"] if "unknown" in meta else None
        return Classifier(
            list(meta["classes"]),
            engine.image_size,
            meta.get("resize", "bilinear"),
            name,
            lambda images: split_outputs(as_outputs(engine(images))),
            threshold,
        )
    loaded = load_head(head)
    sources = head_sources(loaded.meta)
    engine = SourcesRuntime(sources, runtime, threads=threads, scratch_dir=scratch_dir, log=log)
    name = " + ".join(BackboneConfig(**s.backbone_config).resolved().short_name for s in sources)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        features = engine(images)
        proba = loaded.predict_proba(features)
        return proba, loaded.unknown_scores(features, proba)

    detector = loaded.detector
    return Classifier(
        loaded.classes,
        engine.image_size,
        engine.resize,
        name,
        run,
        detector.threshold if detector is not None else None,
    )
