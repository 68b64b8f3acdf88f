"""Cached augmented views (pipeline/views.py): the recipe, the views cache, fit-head --views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heads_fixtures import blobs, write_cache
from model_fixtures import World, pattern, quiet

from pipeline.errors import UserError
from pipeline.heads import fit_head, training_rows
from pipeline.splits import cv_splits
from pipeline.views import ViewRecipe, augment, load_views, views_path


def test_augment_is_seeded_by_recipe_view_and_pixels() -> None:
    image = pattern("bars", 1)[:32, :32]
    recipe = ViewRecipe(4, seed=0)
    a = augment(image, recipe, 1)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, augment(image.copy(), recipe, 1))  # the same view of the same image
    assert not np.array_equal(a, augment(image, recipe, 2))  # another view
    assert not np.array_equal(a, augment(image, ViewRecipe(4, seed=1), 1))  # another seed
    assert ViewRecipe(4).fingerprint("f") != ViewRecipe(4, flip=False).fingerprint("f")


def test_views_of_one_image_never_straddle_the_split_or_a_fold() -> None:
    X, y = blobs(3, 12, dim=8)
    group = np.arange(len(y))
    train = np.arange(0, len(y), 2)
    k = 3
    views = np.repeat(X[train][:, None], k, axis=1) + 0.01
    X_fit, y_fit, g_fit, scored = training_rows(X, y, group, train, views)
    assert len(X_fit) == len(train) * (k + 1) and scored.sum() == len(train)
    assert set(g_fit) == set(group[train])  # every view in the group of a training image: none in the test part
    for tr, va in cv_splits(y_fit, g_fit, 3, 0, ["a", "b", "c"]):
        assert not set(g_fit[tr]) & set(g_fit[va])  # an image and its views in one fold


def test_fit_head_views_without_views_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import cli

    X, y = blobs(3, 10, dim=8)
    cache = write_cache(tmp_path / "c.h5", X, y, ["ant", "bee", "cat"])
    with pytest.raises(UserError, match="no augmented views"):
        fit_head(cache, views=True, out=tmp_path / "head", n_jobs=1, log=quiet())
    result = CliRunner().invoke(cli.app, ["fit-head", str(cache), "--views", "--out", str(tmp_path / "h")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "extract DATA_DIR --views K" in lines[0]


@pytest.mark.slow
def test_extract_views_then_fit_head_views(world: World, tmp_path: Path) -> None:
    from pipeline.extract import extract

    cache = tmp_path / "tiny.h5"
    recipe = ViewRecipe(2, seed=5)
    extract(world.data, world.config, cache=cache, runtime="keras", progress=False, log=quiet(), views=recipe)
    from pipeline.cache import load

    clean, views = load(cache), load(views_path(cache))
    assert views.content_hash == clean.content_hash
    assert views.features.shape == (len(clean), 2 * clean.features.shape[1])
    assert views.attrs["fingerprint"] == recipe.fingerprint(clean.attrs["fingerprint"])
    block, got = load_views(cache, clean.content_hash[:3])
    assert got == recipe and block.shape == (3, 2, clean.features.shape[1])
    assert not np.allclose(block[:, 0], clean.features[:3], rtol=1e-3, atol=0)  # a view is not the clean image
    messages: list[str] = []
    extract(world.data, world.config, cache=cache, runtime="keras", progress=False, log=quiet(messages), views=recipe)
    assert not any("extracting" in m for m in messages)  # a re-run reuses the clean rows and the views
    result = fit_head(cache, views=True, out=tmp_path / "head", n_jobs=1, l2_normalize=False, log=quiet())
    assert result.metrics["views"] == 2 and result.metrics["n_train"] == len(result.split.train)
    assert any("2 per training image" in note for note in result.metrics["split_notes"])
