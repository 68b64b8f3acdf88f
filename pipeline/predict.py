"""New images to classes, with exactly the backbone configuration the head was trained on."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .backbones import BackboneConfig
from .errors import UserError
from .heads import Head, load_head
from .images import ImageFile, scan_paths
from .params import Interval, check_params
from .runtime import load_model_file, read_sidecar
from .sources import SourcesRuntime, cached_features, head_sources
from .stream import RUN_CONSTRAINTS, hash_files, stream_features


@dataclass
class Prediction:
    """The top-k classes of one image (or why it could not be classified)."""

    path: str
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""


def _top_k(path: str, proba: np.ndarray, classes: Sequence[str], k: int) -> Prediction:
    order = np.argsort(-proba, kind="stable")[:k]
    return Prediction(path, [classes[i] for i in order], [float(proba[i]) for i in order])


def _head_predictions(head: Head, files: list[ImageFile], top_k: int, batch_size: int, workers: int | None,
                      runtime: str, threads: int | None, log: Callable[[str], None]) -> Iterator[Prediction]:
    """Features from the head's caches where they all hold the image, from the backbones otherwise."""
    hashes = hash_files([f.path for f in files], workers)
    sources = head_sources(head.meta)
    known = cached_features(sources, [h for h in hashes if isinstance(h, str)], log)
    hash_of = {id(f): h for f, h in zip(files, hashes)}
    cached = [f for f in files if isinstance(hash_of[id(f)], str) and hash_of[id(f)] in known]
    for file in files:
        if isinstance(hash_of[id(file)], Exception):
            yield Prediction(file.relpath, error=f"unreadable: {hash_of[id(file)]}")
    if cached:
        proba = head.predict_proba(np.stack([known[hash_of[id(f)]] for f in cached]))
        yield from (_top_k(f.relpath, p, head.classes, top_k) for f, p in zip(cached, proba))
    rest = [f for f in files if isinstance(hash_of[id(f)], str) and hash_of[id(f)] not in known]
    if not rest:
        return
    engine = SourcesRuntime(sources, runtime, threads=threads, log=log)
    log(f"{len(cached)} images found in the cache; computing features of {len(rest)} with {engine.name}")
    for batch in stream_features(rest, engine, engine.resize, batch_size, workers):
        yield from (Prediction(f.relpath, error=reason) for f, reason in batch.failed)
        if batch.files:
            proba = head.predict_proba(batch.features)
            yield from (_top_k(f.relpath, p, head.classes, top_k) for f, p in zip(batch.files, proba))


def _model_predictions(model: str | os.PathLike, files: list[ImageFile], top_k: int, batch_size: int,
                       workers: int | None) -> Iterator[Prediction]:
    """An exported or fine-tuned model file: pixels in, probabilities out."""
    runtime, meta = load_model_file(model)
    classes = meta["classes"]
    for batch in stream_features(files, runtime, meta.get("resize", "bilinear"), batch_size, workers):
        yield from (Prediction(f.relpath, error=reason) for f, reason in batch.failed)
        yield from (_top_k(f.relpath, p, classes, top_k) for f, p in zip(batch.files, batch.features))


def predict(paths: Sequence[str | os.PathLike], head: str | os.PathLike | None = None, *,
            model: str | os.PathLike | None = None, top_k: int = 3,
            out: str | os.PathLike | None = None, batch_size: int = 32, workers: int | None = None,
            runtime: str = "auto", threads: int | None = None, trust_pickle: bool = False,
            log: Callable[[str], None] = print) -> list[Prediction]:
    """Classify image files or folders with a fitted head or a model file; write a CSV when out is given."""
    check_params(dict(top_k=top_k, batch_size=batch_size, workers=workers, threads=threads, runtime=runtime),
                 {"top_k": [Interval(1, 1000, integer=True)],
                  **{k: RUN_CONSTRAINTS[k] for k in ("batch_size", "workers", "threads", "runtime")}})
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    loaded = load_head(head, trust_pickle) if head is not None else None
    files, ignored = scan_paths(list(paths))
    if ignored:
        log(f"{len(ignored)} non-image files ignored")
    if not files:
        raise UserError("no image files found in " + ", ".join(map(str, paths)) + ".")
    if loaded is not None:
        top_k = min(top_k, len(loaded.classes))
        stream = _head_predictions(loaded, files, top_k, batch_size, workers, runtime, threads, log)
    else:
        top_k = min(top_k, len(read_sidecar(model)["classes"]))
        stream = _model_predictions(model, files, top_k, batch_size, workers)
    order = {f.relpath: k for k, f in reversed(list(enumerate(files)))}
    predictions = sorted(stream, key=lambda p: order[p.path])  # as given, whatever the source of features
    if out:
        write_csv(predictions, out, top_k)
    return predictions


def write_csv(predictions: Sequence[Prediction], out: str | os.PathLike, top_k: int) -> None:
    """path, class_1, prob_1, ..., class_k, prob_k, error."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("class", "prob")]
                        + ["error"])
        for p in predictions:
            cells = [c for pair in zip(p.classes, (f"{q:.6f}" for q in p.probabilities)) for c in pair]
            writer.writerow([p.path] + cells + [""] * (2 * top_k - len(cells)) + [p.error])


def prediction_lines(predictions: Sequence[Prediction], limit: int = 50) -> list[str]:
    """Human-readable lines: path, then the top classes with probabilities; errors last."""
    good = [p for p in predictions if not p.error]
    bad = [p for p in predictions if p.error]
    lines = [f"{p.path}: " + ", ".join(f"{c} {q:.3f}" for c, q in zip(p.classes, p.probabilities))
             for p in good[:limit]]
    if len(good) > limit:
        lines.append(f"... {len(good) - limit} more (use --out FILE.csv for all)")
    lines.append(f"{len(good)} images classified, {len(bad)} skipped")
    lines += [f"  skipped {p.path}: {p.error}" for p in bad]
    return lines


# -- one classifier loaded once, pixels to probabilities (the web server's path) ------------------
@dataclass
class Classifier:
    """A head with its backbone, or a model file, loaded once: uint8 pixels in, class probabilities out."""

    classes: list[str]
    image_size: int
    resize: str
    backbone: str  # a readable name of the backbone configuration (for /health)
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(n, n_classes) probabilities of a uint8 batch (n, image_size, image_size, 3)."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images of shape (n, {self.image_size}, {self.image_size}, 3), "
                             f"got {images.shape}")
        return np.asarray(self.run(images), dtype=np.float64)


def load_classifier(head: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                    runtime: str = "auto", threads: int | None = None, *,
                    scratch_dir: str | os.PathLike | None = None,
                    log: Callable[[str], None] = print) -> Classifier:
    """Load a head (and the backbone recorded in it) or a .keras/.tflite model file, once.

    A head's backbone converted to TFLite is reused from beside its cache, as predict does; when it
    is not there yet, scratch_dir (if given) receives the conversion instead of the cache's folder.
    """
    check_params(dict(runtime=runtime, threads=threads), {k: RUN_CONSTRAINTS[k] for k in ("runtime", "threads")})
    if (head is None) == (model is None):
        raise UserError("give exactly one of --head HEAD_DIR or --model FILE.")
    if model is not None:
        engine, meta = load_model_file(model)
        name = BackboneConfig(**meta["backbone_config"]).short_name if meta.get("backbone_config") \
            else Path(model).name
        return Classifier(list(meta["classes"]), engine.image_size, meta.get("resize", "bilinear"), name, engine)
    loaded = load_head(head)
    sources = head_sources(loaded.meta)
    engine = SourcesRuntime(sources, runtime, threads=threads, scratch_dir=scratch_dir, log=log)
    name = " + ".join(BackboneConfig(**s.backbone_config).resolved().short_name for s in sources)
    return Classifier(loaded.classes, engine.image_size, engine.resize, name,
                      lambda images: loaded.predict_proba(engine(images)))
