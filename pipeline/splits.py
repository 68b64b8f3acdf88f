"""Which rows train and which test: folder splits or seeded stratified splits, duplicate groups, CV folds.

Byte-identical files (and, on request, near-duplicates) form groups that never straddle the split
or a fold, so a test score is never flattered by a copy of a training image.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .cache import FeatureCache
from .errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Which rows train and which test, how that was decided, and what the duplicates look like."""

    train: np.ndarray
    test: np.ndarray
    source: str
    group: np.ndarray  # a group id per row: rows of one group stay on one side of the split and of every fold
    notes: list[str] = field(default_factory=list)
    duplicate_groups: int = 0
    leaked_groups: int = 0
    near_duplicate_groups: int = 0  # groups that near-duplicate links joined (beyond byte-identical files)


def content_groups(content_hash: Sequence[str]) -> tuple[np.ndarray, dict[int, list[int]]]:
    """A group id per row (rows with identical bytes share one) and the multi-row groups."""
    ids: dict[str, int] = {}
    group = np.array([ids.setdefault(h, len(ids)) for h in content_hash], dtype=np.int64)
    return group, _multi_row_groups(group)


def merge_groups(group: np.ndarray, links: Sequence[tuple[int, int]]) -> np.ndarray:
    """Group ids where every linked pair of rows (near-duplicates, say) shares one group (union-find)."""
    parent = list(range(int(group.max()) + 1 if len(group) else 0))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for a, b in links:
        ra, rb = root(int(group[a])), root(int(group[b]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(int(g)) for g in group], dtype=np.int64)


def rows_of_hash_pairs(content_hash: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """Row pairs for pairs of content hashes (near-duplicates found on other features of the same images);
    a pair with a hash these rows lack is dropped. Byte-identical rows are grouped anyway, so one row per hash
    is enough."""
    row_of = {h: i for i, h in enumerate(content_hash)}
    return [(row_of[a], row_of[b]) for a, b in pairs if a in row_of and b in row_of]


def _multi_row_groups(group: np.ndarray) -> dict[int, list[int]]:
    members: dict[int, list[int]] = defaultdict(list)
    for row, g in enumerate(group):
        members[int(g)].append(row)
    return {g: rows for g, rows in members.items() if len(rows) > 1}


def grouped_stratified_split(labels: np.ndarray, group: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A mask of the rows held out: round(fraction * groups) per class, whole duplicate groups, by seed.

    Every class with at least two groups keeps at least one on each side.
    """
    rng = np.random.default_rng(seed)
    first_row: dict[int, int] = {}
    for row, g in enumerate(group):
        first_row.setdefault(int(g), row)
    held_out = []
    for label in np.unique(labels):
        class_groups = np.array([g for g, row in first_row.items() if labels[row] == label])
        rng.shuffle(class_groups)
        n_out = int(round(fraction * len(class_groups)))
        n_out = min(max(n_out, 1), len(class_groups) - 1) if len(class_groups) > 1 else 0
        held_out.extend(class_groups[:n_out].tolist())
    return np.isin(group, held_out)


# A near-duplicate group larger than this share of the images is a chain (A~B, B~C, ...) more than copies of one
# photograph: rps_moroney_28px's renderings of one hand chain into groups of 120 to 480 of 2892 images (4 to
# 17%); the largest group of the other ../shared datasets holds under 3% (at most 7 images). On a small dataset a
# handful of copies is no chain: a group must also exceed COARSE_GROUP_MIN images.
COARSE_GROUP = 0.03
COARSE_GROUP_MIN = 9


def split_rows(
    cache: FeatureCache, test_size: float = 0.2, seed: int = 0, near_duplicates: Sequence[tuple[int, int]] = ()
) -> Split:
    """Folder splits when the cache has them, else a stratified split by seed over duplicate groups.

    near_duplicates: pairs of rows to keep together as well (fit-head --group-near-duplicates).
    """
    group, duplicates = content_groups(cache.content_hash)
    n_exact = len(duplicates)
    n_near = 0
    if len(near_duplicates):
        exact = group
        group = merge_groups(group, near_duplicates)
        duplicates = _multi_row_groups(group)
        n_near = sum(1 for rows in duplicates.values() if len(set(exact[rows])) > 1)
    kind = "byte-identical or near-duplicate" if len(near_duplicates) else "byte-identical"
    split = np.asarray(cache.split)
    labels = cache.labels
    notes = []
    conflicts = [rows for rows in duplicates.values() if len(set(labels[rows])) > 1]
    if conflicts:
        notes.append(
            f"{len(conflicts)} groups of identical files carry different labels, e.g. "
            + " | ".join(cache.paths[r] for r in conflicts[0])
        )
    test_name = "test" if (split == "test").any() else "val" if (split == "val").any() else ""
    if test_name:
        train = np.flatnonzero((split != test_name) & (split != ""))
        test = np.flatnonzero(split == test_name)
        leaked = [rows for rows in duplicates.values() if len({s == test_name for s in split[rows]}) > 1]
        source = f"folders ({test_name} is the test part)"
        if leaked:
            notes.append(
                f"LEAKAGE: {len(leaked)} groups of {kind} files span the {test_name} folder and "
                "the training folders, e.g. "
                + " | ".join(cache.paths[r] for r in leaked[0])
                + "; fix the folders to trust the test score."
            )
        return Split(train, test, source, group, notes, n_exact, len(leaked), n_near)
    in_test = grouped_stratified_split(labels, group, test_size, seed)
    if duplicates:
        notes.append(
            f"{len(duplicates)} groups of {kind} files "
            f"({sum(len(r) for r in duplicates.values())} files) kept on one side of the split."
        )
    largest = max((len(rows) for rows in duplicates.values()), default=1)
    if n_near and largest > max(COARSE_GROUP * len(labels), COARSE_GROUP_MIN):
        notes.append(
            f"near-duplicate links chain {largest} of {len(labels)} images into one group: the split keeps whole "
            "chains apart, so the test score is for images unlike any in training (renderings of one object, "
            "bursts of one scene). If they are not copies of each other, raise --group-near-duplicates "
            "(e.g. 0.7) or set it to 0, and look at the pairs with `cnncodes audit`."
        )
    return Split(
        np.flatnonzero(~in_test),
        np.flatnonzero(in_test),
        f"stratified by class, test_size {test_size}, seed {seed}, duplicates grouped",
        group,
        notes,
        n_exact,
        0,
        n_near,
    )


def cv_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    n_splits: int,
    seed: int,
    class_names: Sequence[str],
    log: Callable[[str], None] = logger.info,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, duplicate-grouped K-fold over the training part; fewer folds if a class is small."""
    from sklearn.model_selection import StratifiedGroupKFold

    present = np.unique(labels)
    missing = [class_names[c] for c in range(len(class_names)) if c not in present]
    if len(present) < 2:
        raise UserError("the training part holds one class only; a classifier needs at least two.")
    if missing:
        raise UserError(
            f"class {', '.join(missing)} has no training images (only test images, or none "
            "readable); add training images or remove the class folder."
        )
    # folds split groups of identical files, so what limits them is distinct images per class
    distinct = {c: len(np.unique(groups[labels == c])) for c in present}
    smallest_class = min(distinct, key=distinct.get)
    smallest = distinct[smallest_class]
    if smallest < 2:
        raise UserError(
            f"class {class_names[smallest_class]} has {smallest} distinct training image; "
            "cross-validation needs at least 2 per class: add images or remove the class folder."
        )
    if smallest < n_splits:
        log(
            f"note: class {class_names[smallest_class]} has {smallest} distinct training images, so CV uses "
            f"{smallest} folds instead of {n_splits}."
        )
        n_splits = smallest
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


@dataclass
class Parts:
    """Row indices of the training, validation and test parts of a cache."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str


def finetune_parts(
    cache: FeatureCache, test_size: float, val_size: float, seed: int, near_duplicates: Sequence[tuple[int, int]] = ()
) -> Parts:
    """fit-head's train/test split (near_duplicates: row pairs kept together, as fit-head's); validation is the
    `val` folder, or carved from training by seed."""
    split = split_rows(cache, test_size, seed, near_duplicates)
    folders = np.asarray(cache.split)
    if split.source.startswith("folders") and (folders == "val").any() and (folders == "test").any():
        return Parts(
            np.flatnonzero(folders == "train"),
            np.flatnonzero(folders == "val"),
            split.test,
            split.source + "; val folder validates",
        )
    held = grouped_stratified_split(cache.labels[split.train], split.group[split.train], val_size, seed)
    return Parts(
        split.train[~held],
        split.train[held],
        split.test,
        split.source + f"; validation carved from training (val_size {val_size})",
    )
