"""Spatial neighbours of each cell: its k nearest cells within a radius (µm), from a KD-tree.

The PAST cell encoder builds each cell's local graph (GAT) from these neighbours.

* Search among ALL cells of the slide that pass QC: the caller passes their positions, so a cell
  at the edge of a shard still sees its neighbours in other shards, and a cell dropped by QC is
  never anyone's neighbour. ``indices`` are rows of that same array (so they index its token rows).
* A cell is never its own neighbour; a *different* cell at the same position (distance 0) is.
* The radius is inclusive (distance <= radius_um).
* Neighbours are sorted by distance; the first ``counts[i]`` columns of row i are real, the rest
  are missing: index -1, offset NaN, distance inf.

What a shard sample stores: only the real neighbours, m = counts[i] <= k rows:
``nbr_tokens.npy`` int32 (m, L) and ``nbr_offsets.npy`` float32 (m, 2) µm, neighbour minus centre.
No padding rows: the GAT builds its graph from the neighbours that are present, and an isolated
cell has m = 0 (arrays of shape (0, L) and (0, 2)). ``neighbour_sample`` cuts one cell's arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from common.errors import InputError, finite_points

PAD_TOKEN = 1  # Nicheformer's pad id, for the dense (n, k, L) view only
_QUERY_ROWS = 1 << 20


class Neighbours(NamedTuple):
    """k-nearest neighbours of n cells.

    indices: (n, k) int64, rows of the positions array, -1 where missing.
    offsets_um: (n, k, 2) float32, neighbour (x, y) minus centre (x, y) in µm, NaN where missing.
    distances_um: (n, k) float32, inf where missing.
    counts: (n,) int64 real neighbours per cell (they fill the first counts[i] columns).
    """

    indices: np.ndarray
    offsets_um: np.ndarray
    distances_um: np.ndarray
    counts: np.ndarray


def find_neighbours(
    xy_um: np.ndarray, k: int = 8, radius_um: float | None = 50.0, workers: int = -1, path=None
) -> Neighbours:
    """The k nearest other cells of every cell within ``radius_um`` (None: no radius).

    xy_um: (n, 2) cell centroids (x, y) in µm. ``path`` only names the source in errors.
    """
    xy = finite_points(xy_um, path, "cell positions (x, y) [µm]")
    if int(k) < 1:
        raise InputError(None, "neighbours.k", "k >= 1", k)
    if radius_um is not None and not (radius_um >= 0):
        raise InputError(None, "neighbours.radius_um", "a radius >= 0 µm or null", radius_um)
    k = int(k)
    n = len(xy)
    if n == 0:
        return Neighbours(
            np.empty((0, k), np.int64),
            np.empty((0, k, 2), np.float32),
            np.empty((0, k), np.float32),
            np.empty(0, np.int64),
        )

    # cKDTree keeps only distances strictly below the bound; nudge it up to make the radius inclusive
    bound = np.inf if radius_um is None else np.nextafter(float(radius_um), np.inf)
    tree = cKDTree(xy)
    indices = np.empty((n, k), np.int64)
    offsets = np.empty((n, k, 2), np.float32)
    distances = np.empty((n, k), np.float32)
    for start in range(0, n, _QUERY_ROWS):  # chunks bound the (rows, k + 1) temporaries for 10M cells
        rows = slice(start, min(start + _QUERY_ROWS, n))
        indices[rows], offsets[rows], distances[rows] = _query(tree, xy, rows, k, bound, workers)
    counts = (indices >= 0).sum(axis=1).astype(np.int64)
    return Neighbours(indices, offsets, distances, counts)


def _query(tree: cKDTree, xy: np.ndarray, rows: slice, k: int, bound: float, workers: int):
    centre = xy[rows]
    m = len(centre)
    # k + 1: the cell itself comes back at distance 0 (unless > k duplicates share its position)
    distances, indices = tree.query(centre, k=k + 1, distance_upper_bound=bound, workers=workers)  # (m, k + 1)
    is_self = indices == np.arange(rows.start, rows.start + m)[:, None]
    keep = ~is_self
    # rows where the cell itself was crowded out by duplicates: drop the farthest column instead
    keep[:, -1] &= is_self.any(axis=1)
    indices = indices[keep].reshape(m, k)
    distances = distances[keep].reshape(m, k)

    missing = ~np.isfinite(distances)  # cKDTree marks them with index n and distance inf
    indices = np.where(missing, -1, indices)
    offsets = xy[np.where(missing, 0, indices)] - centre[:, None, :]  # (m, k, 2) neighbour minus centre
    offsets[missing] = np.nan
    return indices, offsets, distances


def neighbour_sample(i: int, tokens: np.ndarray, neighbours: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """Cell i's real neighbours for a shard sample: (nbr_tokens (m, L) int32, nbr_offsets (m, 2) float32 µm)."""
    m = int(neighbours.counts[i])
    rows = neighbours.indices[i, :m]
    return (
        np.ascontiguousarray(tokens[rows], dtype=np.int32),
        np.ascontiguousarray(neighbours.offsets_um[i, :m], dtype=np.float32),
    )


def gather_neighbour_tokens(tokens: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Dense (n, k, L) int32 neighbour token rows; missing neighbours (-1) get PAD-only rows.

    tokens: (N, L) int32 token rows of all cells; indices: (n, k) rows of ``tokens`` or -1.
    For batches of cells: 10M cells x 8 x 300 tokens would not fit in memory at once.
    """
    tokens = np.asarray(tokens)
    indices = np.asarray(indices)
    gathered = tokens[np.where(indices < 0, 0, indices)].astype(np.int32, copy=False)  # (n, k, L)
    gathered[indices < 0] = PAD_TOKEN
    return gathered
