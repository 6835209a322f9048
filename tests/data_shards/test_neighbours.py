"""Spatial neighbours: KD-tree answers against brute force, conventions, sample arrays."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InputError
from data_shards.neighbours import PAD_TOKEN, find_neighbours, gather_neighbour_tokens, neighbour_sample


def brute_force(xy: np.ndarray, k: int, radius: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cell: (indices, distances) of its <= k nearest other cells within radius (inclusive)."""
    out = []
    for i in range(len(xy)):
        d = np.hypot(*(xy - xy[i]).T)
        d[i] = np.inf
        ok = np.flatnonzero(d <= (np.inf if radius is None else radius))
        ok = ok[np.argsort(d[ok], kind="stable")][:k]
        out.append((ok, d[ok]))
    return out


@pytest.mark.parametrize("radius", [12.0, None])
def test_matches_brute_force_on_random_points(radius):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (400, 2))
    k = 8
    nb = find_neighbours(xy, k=k, radius_um=radius)
    assert nb.indices.shape == (400, k) and nb.indices.dtype == np.int64
    assert nb.offsets_um.shape == (400, k, 2) and nb.offsets_um.dtype == np.float32
    assert nb.distances_um.shape == (400, k) and nb.counts.shape == (400,)
    assert nb.distances_um.dtype == np.float32
    truth = brute_force(xy, k, radius)
    for i, (idx, dist) in enumerate(truth):
        m = nb.counts[i]
        assert m == len(idx)
        np.testing.assert_array_equal(nb.indices[i, :m], idx)  # continuous points: no ties
        np.testing.assert_allclose(nb.distances_um[i, :m], dist, rtol=1e-6)
        assert (nb.indices[i, m:] == -1).all() and np.isinf(nb.distances_um[i, m:]).all()
        assert np.isnan(nb.offsets_um[i, m:]).all()
    if radius is not None:
        assert (nb.counts < k).any() and (nb.counts == k).any()  # the radius really cut some
    else:
        assert (nb.counts == k).all()


def test_offsets_are_neighbour_minus_centre_in_um():
    xy = np.array([[100.0, 50.0], [110.0, 47.0], [300.0, 300.0]])
    nb = find_neighbours(xy, k=2, radius_um=20.0)
    assert nb.indices[0, 0] == 1 and nb.indices[1, 0] == 0
    np.testing.assert_allclose(nb.offsets_um[0, 0], [10.0, -3.0])
    np.testing.assert_allclose(nb.offsets_um[1, 0], [-10.0, 3.0])
    assert nb.counts.tolist() == [1, 1, 0]  # the far cell is isolated


def test_radius_is_inclusive():
    xy = np.array([[0.0, 0.0], [3.0, 4.0]])  # 5 µm apart
    assert find_neighbours(xy, k=1, radius_um=5.0).counts.tolist() == [1, 1]
    assert find_neighbours(xy, k=1, radius_um=4.999).counts.tolist() == [0, 0]


def test_duplicate_positions_are_neighbours_but_never_self():
    # 12 cells on one spot (more than k + 1, so the KD-tree may leave a cell out of its own answer)
    xy = np.concatenate([np.zeros((12, 2)), [[1.0, 0.0], [50.0, 50.0]]])
    nb = find_neighbours(xy, k=8, radius_um=5.0)
    for i in range(12):
        assert nb.counts[i] == 8
        assert i not in nb.indices[i]
        assert set(nb.indices[i]) <= set(range(12)) and len(set(nb.indices[i])) == 8
        np.testing.assert_array_equal(nb.distances_um[i], 0.0)
    # the nearby cell sees 8 of the stacked cells, all at 1 µm, offset (-1, 0)
    assert nb.counts[12] == 8 and set(nb.indices[12]) <= set(range(12))
    np.testing.assert_allclose(nb.offsets_um[12], np.tile([-1.0, 0.0], (8, 1)))
    # two cells at the same spot, k larger than the slide: each is the other's only neighbour
    pair = find_neighbours(np.zeros((2, 2)), k=8, radius_um=1.0)
    assert pair.counts.tolist() == [1, 1] and pair.indices[:, 0].tolist() == [1, 0]


def test_neighbour_sample_keeps_only_real_neighbours():
    rng = np.random.default_rng(1)
    xy = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 6.0], [500.0, 500.0]])
    tokens = rng.integers(30, 1000, (4, 7)).astype(np.int32)  # (n, L)
    nb = find_neighbours(xy, k=8, radius_um=10.0)
    nbr_tokens, nbr_offsets = neighbour_sample(0, tokens, nb)
    assert nbr_tokens.shape == (2, 7) and nbr_tokens.dtype == np.int32
    assert nbr_offsets.shape == (2, 2) and nbr_offsets.dtype == np.float32
    np.testing.assert_array_equal(nbr_tokens, tokens[[1, 2]])  # nearest first
    np.testing.assert_allclose(nbr_offsets, [[5.0, 0.0], [0.0, 6.0]])
    lonely_tokens, lonely_offsets = neighbour_sample(3, tokens, nb)
    assert lonely_tokens.shape == (0, 7) and lonely_offsets.shape == (0, 2)


def test_gather_pads_missing_neighbours():
    tokens = np.arange(12, dtype=np.int32).reshape(4, 3) + 30
    indices = np.array([[2, -1], [0, 3]])
    dense = gather_neighbour_tokens(tokens, indices)  # (n, k, L)
    assert dense.shape == (2, 2, 3) and dense.dtype == np.int32
    np.testing.assert_array_equal(dense[0, 0], tokens[2])
    np.testing.assert_array_equal(dense[0, 1], [PAD_TOKEN] * 3)
    np.testing.assert_array_equal(dense[1], tokens[[0, 3]])


def test_bad_positions_raise_input_error_naming_the_field():
    xy = np.array([[0.0, 1.0], [np.nan, 2.0]])
    with pytest.raises(InputError, match=r"cell positions.*row 1"):
        find_neighbours(xy, path="cells.parquet")
    with pytest.raises(InputError, match="shape"):
        find_neighbours(np.zeros((3, 3)))
    with pytest.raises(InputError, match="neighbours.k"):
        find_neighbours(np.zeros((3, 2)), k=0)


def test_chunked_query_matches_one_pass(monkeypatch):
    import data_shards.neighbours as neighbours

    rng = np.random.default_rng(2)
    xy = np.round(rng.uniform(0, 30, (300, 2)))  # integer grid: duplicates included
    whole = find_neighbours(xy, k=5, radius_um=3.0)
    monkeypatch.setattr(neighbours, "_QUERY_ROWS", 7)
    chunked = find_neighbours(xy, k=5, radius_um=3.0)
    np.testing.assert_array_equal(chunked.counts, whole.counts)
    np.testing.assert_array_equal(chunked.distances_um, whole.distances_um)
    for i in range(len(xy)):
        assert i not in chunked.indices[i]


def test_empty_input():
    nb = find_neighbours(np.zeros((0, 2)), k=4)
    assert nb.indices.shape == (0, 4) and nb.offsets_um.shape == (0, 4, 2)
