"""Near-duplicate search on feature rows: which images are nearly the same photograph.

Used by `audit` (to list the pairs) and by `fit-head --group-near-duplicates` (to keep them on one
side of the split); nothing here imports another stage.
"""

from __future__ import annotations

import numpy as np

# Cosine of comparable_rows (whitened features) at or above which two images count as
# near-duplicates. On Lite0 avg_pool features of oxford_flowers12 (checked by eye) the pairs from
# 0.6 up are one photograph re-encoded, resized, cropped, mirrored or re-shot a moment later; from
# 0.55 to 0.6 most are, and a few are two different daisies or sunflowers. Copies resized to 90% and
# saved as JPEG quality 70 score 0.54 to 0.89 (all but 1 of 60 planted in three subsets from 0.55):
# the default leans to finding leaks, at the price of a few look-alikes to dismiss.
DEFAULT_THRESHOLD = 0.55
WHITENING_SHRINK = 0.15  # added to every direction's spread, as a fraction of the largest spread
BLOCK_ROWS = 2048  # rows per block of the exact search: two blocks' product is 2048 x 2048 floats (16 MB)
EXACT_LIMIT = 50_000  # above this many rows an HNSW index (faiss, when installed) replaces the exact search
HNSW_NEIGHBOURS = 32  # neighbours per image the index returns: an image with more near-copies loses some


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def comparable_rows(features: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """What near-duplicate and outlier cosines compare: unit rows, centred, whitened with shrinkage, unit again.

    Each principal direction of the centred unit rows is divided by its spread plus WHITENING_SHRINK
    times the largest spread. The few directions every image of a kind shares (what makes a daisy a
    daisy) stop dominating the cosine, and what is particular to one photograph decides it; the
    shrinkage keeps the many weak directions from amplifying noise. On Lite0 features of
    oxford_flowers12 a copy resized to 90% and saved as JPEG quality 70 scores 0.89 to 0.98 in plain
    cosine, no more than two different daisies (0.93, 0.94), and 0.64 to 0.89 here, where those
    daisies score 0.55 and 0.53. The covariance is summed over blocks of rows: memory stays at the
    features' size. With few images (tens) the directions are poorly estimated; exact copies still
    score 1.
    """
    unit = unit_rows(features)
    centred = unit - unit.mean(axis=0)
    if len(centred) < centred.shape[1]:
        # Fewer images than dimensions: every row lies in the span of the n right singular vectors of the
        # rows (the covariance's directions of nonzero spread, the singular values their spreads), and the
        # other directions add nothing to the projection. The thin SVD finds them in O(n^2 d) instead of
        # the O(d^3) of the d x d covariance's eigh: comparable_rows of 260 x 1280 Lite0 rows takes 0.12 s instead
        # of 0.41 s, with cosines within 1e-6 of the eigh path's.
        _, spread, directions_t = np.linalg.svd(centred, full_matrices=False)
        directions = directions_t.T
    else:
        covariance = np.zeros((unit.shape[1], unit.shape[1]))
        for start in range(0, len(centred), block):
            part = centred[start : start + block].astype(np.float64)
            covariance += part.T @ part
        # float32 is ample: the shrinkage swamps the error of the small eigenvalues, at a quarter of the time
        variance, directions = np.linalg.eigh(covariance.astype(np.float32))
        spread = np.sqrt(np.clip(variance, 0, None))
    weights = directions / (spread + WHITENING_SHRINK * spread.max() + 1e-12)
    return unit_rows(centred @ weights)


def _exact_pairs(unit: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found_i, found_j, found_c = [], [], []
    n = len(unit)
    for a in range(0, n, block):
        for b in range(a, n, block):
            sims = unit[a : a + block] @ unit[b : b + block].T
            rows, cols = np.nonzero(sims >= threshold)
            i, j = rows + a, cols + b
            keep = i < j
            found_i.append(i[keep])
            found_j.append(j[keep])
            found_c.append(sims[rows[keep], cols[keep]])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_c)


def _hnsw_pairs(unit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(unit.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 2 * HNSW_NEIGHBOURS
    index.add(np.ascontiguousarray(unit))
    sims, ids = index.search(np.ascontiguousarray(unit), HNSW_NEIGHBOURS + 1)
    rows = np.repeat(np.arange(len(unit)), ids.shape[1])
    sims, ids = sims.ravel(), ids.ravel()
    keep = (ids >= 0) & (ids != rows) & (sims >= threshold)
    i, j = np.minimum(rows[keep], ids[keep]), np.maximum(rows[keep], ids[keep])
    # a pair found from both ends appears twice
    _, first = np.unique(i.astype(np.int64) * len(unit) + j, return_index=True)
    return i[first], j[first], sims[keep][first]


def pairs_above(
    unit: np.ndarray, threshold: float, block: int = BLOCK_ROWS, exact_limit: int = EXACT_LIMIT
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i < j) of unit rows with cosine >= threshold, most similar first, and how they were found:
    'exact', or 'hnsw (faiss)' beyond exact_limit rows."""
    method = "exact"
    if len(unit) > exact_limit:
        try:
            import faiss  # noqa: F401

            method = "hnsw (faiss)"
        except ImportError:
            method = "exact (faiss not installed)"
    i, j, cosine = _hnsw_pairs(unit, threshold) if method.startswith("hnsw") else _exact_pairs(unit, threshold, block)
    order = np.lexsort((j, i, -cosine))
    return (
        i[order].astype(np.int64),
        j[order].astype(np.int64),
        np.minimum(cosine[order].astype(np.float64), 1.0),
        method,
    )


def near_duplicate_pairs(
    features: np.ndarray, threshold: float, block: int = BLOCK_ROWS, exact_limit: int = EXACT_LIMIT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs (i < j) whose features are nearly identical, most similar first: cosine of
    comparable_rows >= threshold (DEFAULT_THRESHOLD is 0.55; exact copies score 1).

    Exact below exact_limit rows: products of blocks of the rows, so memory stays at two blocks
    whatever the row count. Beyond it an approximate HNSW index (faiss) when it is installed.
    """
    i, j, cosine, _ = pairs_above(comparable_rows(features, block), threshold, block, exact_limit)
    return i, j, cosine
