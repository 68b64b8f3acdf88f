"""What a study studies: backbone specs, their layers (`auto` picks earlier stages), and a timing probe.

Listing a backbone's layers and probing them builds Keras models; everything else here is plain parsing.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones import BackboneConfig, build_backbone, is_model_file, layer_names
from .errors import UserError
from .images import Dataset, ImageError, decode_image

AUTO_STAGES = 2  # earlier stages `auto` adds to the top
TIMING_IMAGES = 16  # decoded images per probe of a layer's inference time
SPEC_KEYS = {"alpha": float, "weights": str, "size": int, "pooling": str}


def parse_backbone(spec: str) -> tuple[str, BackboneConfig]:
    """'NAME-or-PATH[:alpha=A][:weights=W][:size=N][:pooling=P]' -> (its label, the resolved config)."""
    name, *options = spec.strip().split(":")
    values: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise UserError(
                f"--backbones: {option!r} in {spec!r} is not one of "
                f"{', '.join(k + '=...' for k in SPEC_KEYS)} (e.g. MobileNet:alpha=0.25)."
            )
        try:
            values[key] = SPEC_KEYS[key](value)
        except ValueError:
            raise UserError(f"--backbones: {key}={value!r} in {spec!r} is not a {SPEC_KEYS[key].__name__}.") from None
    config = BackboneConfig(
        name,
        values.get("weights", "imagenet"),
        None,
        values.get("pooling", "avg"),
        values.get("size"),
        "bilinear",
        values.get("alpha"),
    ).resolved()
    return ":".join([Path(name).stem if is_model_file(name) else name, *options]), config


def split_list(text: str, option: str) -> list[str]:
    """Comma-separated items, stripped; UserError when there are none or one is repeated."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or len(set(items)) != len(items):
        raise UserError(f"--{option} is {text!r}; give a comma-separated list without repeats.")
    return items


def earlier_stages(layers: Sequence[tuple[str, str]], count: int = AUTO_STAGES) -> list[str]:
    """The last layer of each of the `count` deepest spatial resolutions above the top's, deepest first.

    layers: (name, output shape without batch) in model order, as backbones.layer_names gives them.
    A resolution held by fewer than three layers is a padding step, not a stage.
    """
    spatial = [
        (name, shape[0])
        for name, shape in ((n, ast.literal_eval(s)) for n, s in layers)
        if len(shape) == 3 and shape[0] is not None
    ]
    if not spatial:
        return []
    top_size = spatial[-1][1]
    sizes = [size for _, size in spatial]
    last_of = {size: name for name, size in spatial if size > top_size and sizes.count(size) >= 3}
    return [last_of[size] for size in sorted(last_of)[:count]]


@dataclass
class Plan:
    """One backbone's part of a study: its layers, its hypercolumns and what the probe measured."""

    label: str
    config: BackboneConfig
    layers: dict[str, str | None] = field(default_factory=dict)  # row label -> layer (None: the top)
    hypercolumns: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)  # backbone ms per image, per layer label
    params: dict[str, int] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    caches: dict[str, Path] = field(default_factory=dict)  # filled by extraction
    images_per_s: float | None = None
    failed: str | None = None  # why the backbone could not be studied


def plan_layers(plan: Plan, tokens: Sequence[str], skipped: list[dict[str, str]]) -> None:
    """Fill plan.layers and plan.hypercolumns from --layers (top, auto, NAME, A+B); unknown layers are skipped."""
    wants_auto = any("auto" in token.split("+") for token in tokens)
    shapes = dict(layer_names(plan.config)) if any(t != "top" for t in tokens) else {}
    auto = earlier_stages(list(shapes.items())) if wants_auto else []
    if wants_auto:
        plan.notes.append(
            "auto: top, " + ", ".join(f"{n} {shapes[n]}" for n in auto)
            if auto
            else "auto: no earlier stage found, the top only"
        )

    def resolve(token: str) -> tuple[str, str | None] | None:
        if token == "top":
            return "top", None
        name = (auto[0] if auto else None) if token == "auto" else token
        if name in shapes:
            return name, name
        return None

    for token in tokens:
        parts = [resolve(p) for p in (["top", *auto] if token == "auto" else token.split("+"))]
        if None in parts:
            missing = [p for p, r in zip(token.split("+"), parts) if r is None]
            reason = (
                "no earlier stage found for auto"
                if missing == ["auto"]
                else f"{plan.label} has no layer {missing[0]!r} (`cnncodes backbones --layers` lists them)"
            )
            skipped.append({"config": f"{plan.label} {token}", "reason": reason})
            continue
        plan.layers.update(dict(parts))
        if "+" in token:
            plan.hypercolumns.append((parts[0][0], parts[1][0]))


def probe(plan: Plan, images: dict[int, np.ndarray]) -> None:
    """Backbone ms per image, parameters and feature width of each layer (Keras, on decoded images)."""
    from .runtime import KerasRuntime

    for label, layer in plan.layers.items():
        model = build_backbone(replace(plan.config, layer=layer))
        runtime = KerasRuntime(model)
        batch = images[runtime.image_size]
        seconds = []
        for _ in range(3):  # the first run pays one-off costs; the best of the rest is the least disturbed
            start = time.perf_counter()
            runtime(batch)
            seconds.append(time.perf_counter() - start)
        plan.ms[label] = 1000 * min(seconds) / len(batch)
        plan.params[label], plan.dims[label] = int(model.count_params()), runtime.dim


def timing_images(dataset: Dataset, size: int, n: int = TIMING_IMAGES) -> np.ndarray:
    """n of the dataset's images, decoded at size (grey where a file cannot be read: the time is what counts)."""

    def one(path: Path) -> np.ndarray:
        try:
            return decode_image(path, size)
        except ImageError:
            return np.full((size, size, 3), 128, np.uint8)

    picks = np.linspace(0, len(dataset.files) - 1, min(n, len(dataset.files))).astype(int)
    return np.stack([one(dataset.files[k].path) for k in picks])
