"""Cached augmented views: K seeded augmentations of every image, their features stored beside the clean ones.

Frozen-feature tools usually turn their cache off when augmentation is on; here each view is an
augmentation of the decoded uint8 image (random resized crop, horizontal flip, mild colour jitter)
computed once, like any cached row, and reused by every later fit. A cache's views live in a companion
cache (`<cache>.views.h5`, see artifacts.VIEWS_SUFFIX): one row per image (keyed by its content hash,
as in the clean cache), its K views side by side, so the features of view v (1..K) of a row are the
columns [(v-1)*D, v*D). The recipe (K, seed, flip, crop and jitter ranges) is in its attributes and in
its fingerprint: another recipe is another cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError
from .params import SEED, Interval, check_params, define

# `extract --views K` and `study --views K`: how many augmented views of each image (fit-head --views is a switch)
define(views=[Interval(0, 64, integer=True)], views_seed=[SEED])

VIEWS_ATTR = "views_json"  # the recipe, as JSON, in the views cache's attributes


@dataclass(frozen=True)
class ViewRecipe:
    """How the K views of an image are drawn: the seed and the ranges of each augmentation."""

    k: int
    seed: int = 0
    flip: bool = True
    scale: tuple[float, float] = (0.6, 1.0)  # area of the crop, as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop
    jitter: float = 0.1  # brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter]

    def to_json(self) -> str:
        """The recipe as a canonical JSON string (what the fingerprint and the cache attributes hold)."""
        return json.dumps(asdict(self), sort_keys=True)

    def as_flags(self) -> str:
        """The options that make this recipe, as extract, fit-head and train take them."""
        return f"--views {self.k} --views-seed {self.seed}" + ("" if self.flip else " --no-flip")

    def fingerprint(self, features_fingerprint: str) -> str:
        """The views cache's fingerprint: the clean features' configuration and this recipe."""
        return hashlib.sha256(f"{features_fingerprint} {self.to_json()}".encode()).hexdigest()[:16]


def _rng(image: np.ndarray, recipe: ViewRecipe, view: int) -> np.random.Generator:
    """A generator seeded by the recipe's seed, the view number and the image's pixels: the same view of
    the same image is the same whenever and wherever it is computed."""
    digest = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
    return np.random.default_rng([recipe.seed, view, digest])


def augment(image: np.ndarray, recipe: ViewRecipe, view: int, resize: str = "bilinear") -> np.ndarray:
    """View number `view` (1..K) of a decoded uint8 (size, size, 3) image: random resized crop, flip, jitter."""
    from PIL import Image

    from .images import RESIZE_METHODS

    rng = _rng(image, recipe, view)
    size = image.shape[0]
    for _ in range(10):  # torchvision's RandomResizedCrop: draw until the crop fits
        area = size * size * rng.uniform(*recipe.scale)
        aspect = np.exp(rng.uniform(np.log(recipe.ratio[0]), np.log(recipe.ratio[1])))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= size and 0 < h <= size:
            break
    else:
        w = h = size
    left, top = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    crop = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((size, size), RESIZE_METHODS[resize])
    x = np.asarray(crop, dtype=np.float32)
    if recipe.flip and rng.random() < 0.5:
        x = x[:, ::-1]
    low, high = 1 - recipe.jitter, 1 + recipe.jitter
    brightness, contrast, saturation = rng.uniform(low, high, 3)
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey[..., None]) * saturation + grey[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class ViewsRuntime:
    """A runtime whose outputs are the K views' features of each image side by side: (n, K * dim) per output."""

    def __init__(self, inner: Any, recipe: ViewRecipe, resize: str = "bilinear") -> None:
        self.inner, self.recipe, self.resize = inner, recipe, resize
        self.name = inner.name
        self.image_size = inner.image_size
        self.dims = [recipe.k * d for d in (getattr(inner, "dims", None) or [inner.dim])]
        self.dim = self.dims[0]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        from .stream import as_outputs

        n, k = len(batch), self.recipe.k
        views = np.stack([augment(image, self.recipe, v, self.resize) for image in batch for v in range(1, k + 1)])
        return [out.reshape(n, k * out.shape[1]) for out in as_outputs(self.inner(views))]


def views_path(cache_path: str | os.PathLike) -> Path:
    """The companion cache holding a cache's augmented views."""
    from .artifacts import VIEWS_SUFFIX

    path = Path(cache_path)
    return path.with_name(path.stem + VIEWS_SUFFIX)


def load_views(cache_path: str | os.PathLike, hashes: Sequence[str]) -> tuple[np.ndarray, ViewRecipe]:
    """(n, K, D) features of the views of each content hash (in that order) and their recipe; UserError when
    the cache has no views, or lacks the views of some of these images."""
    from .cache import lookup, read_attrs

    path = views_path(cache_path)
    if not path.is_file():
        raise UserError(
            f"{cache_path} has no augmented views ({path} is missing); run `cnncodes extract "
            "DATA_DIR --views K` with the same options first, or drop --views."
        )
    attrs = read_attrs(path)
    recipe = recipe_from_attrs(attrs)
    found = lookup(path, hashes)
    missing = [h for h in dict.fromkeys(hashes) if h not in found]
    if missing:
        raise UserError(
            f"{path} lacks the views of {len(missing)} images of {cache_path}; run `cnncodes extract "
            "DATA_DIR --views K` again to bring it up to date."
        )
    block = np.stack([found[h] for h in hashes])
    return block.reshape(len(hashes), recipe.k, -1), recipe


def refuse_other_recipe(cache_path: str | os.PathLike, recipe: ViewRecipe) -> None:
    """UserError when the cache's views were made with another recipe (they are never mixed), naming the
    options that made them."""
    from .cache import read_attrs

    path = views_path(cache_path)
    attrs = read_attrs(path) if path.is_file() else {}
    if VIEWS_ATTR in attrs and (found := recipe_from_attrs(attrs)) != recipe:
        raise UserError(
            f"{path} holds views made with {found.as_flags()}; give those options to reuse them, or delete "
            f"the file to make views with {recipe.as_flags()}."
        )


def recipe_from_attrs(attrs: dict[str, Any]) -> ViewRecipe:
    """The recipe recorded in a views cache."""
    values = json.loads(attrs[VIEWS_ATTR])
    return ViewRecipe(**{**values, "scale": tuple(values["scale"]), "ratio": tuple(values["ratio"])})


def load_view_features(
    cache_paths: Sequence[str | os.PathLike], hashes: Sequence[str]
) -> tuple[np.ndarray, ViewRecipe]:
    """(n, K, D) views of these images for a head on these caches: each view's sources combined as the clean
    features are (pipeline.sources.combine); every cache's views must follow one recipe."""
    from .sources import combine

    loaded = [load_views(p, hashes) for p in cache_paths]
    recipes = {recipe for _, recipe in loaded}
    if len(recipes) > 1:
        raise UserError(
            f"the views of {', '.join(map(str, cache_paths))} follow different recipes; extract them "
            "with the same --views and --flip options."
        )
    recipe = loaded[0][1]
    return np.stack([combine([block[:, v] for block, _ in loaded]) for v in range(recipe.k)], axis=1), recipe


def view_recipe(k: int, seed: int = 0, flip: bool = True) -> ViewRecipe | None:
    """The recipe of `--views K` (None for 0), checked at the boundary."""
    check_params({"views": k, "views_seed": seed})
    return ViewRecipe(k, seed, flip) if k else None
