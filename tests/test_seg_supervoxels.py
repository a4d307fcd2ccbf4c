"""Supervoxels: the descent and plateau rules against a brute-force reference, chunk by chunk."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deepem3d.segmentation.chunks import SUPERVOXEL_HALO, Chunk, as_map, chunk_grid
from deepem3d.segmentation.pipeline import supervoxels_chunked
from deepem3d.segmentation.supervoxels import (
    ChunkExits,
    relabel,
    resolve_supervoxels,
    supervoxel_chunk,
    supervoxels,
)

NEIGHBOURS = [(0, 0, -1), (0, -1, 0), (-1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]


def brute_supervoxels(array: np.ndarray) -> np.ndarray:
    """The documented rules, written out voxel by voxel with dicts (x, y, z arrays)."""
    m, kind = as_map(array)
    big_x, big_y, big_z = m.shape[:3]

    def gi(p):
        return p[0] + big_x * (p[1] + big_y * p[2])

    def nbrs(p):
        for d in NEIGHBOURS:
            q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
            if 0 <= q[0] < big_x and 0 <= q[1] < big_y and 0 <= q[2] < big_z:
                yield d, q

    def affinity(p, d, q):
        c = next(i for i in range(3) if d[i] != 0)
        return int(m[p + (c,)]) if sum(d) < 0 else int(m[q + (c,)])

    points = list(itertools.product(range(big_x), range(big_y), range(big_z)))
    pointer, flat = {}, set()
    if kind == "affinity":
        top = {p: max([affinity(p, d, q) for d, q in nbrs(p)], default=-1) for p in points}
    for p in points:
        if kind == "boundary":
            lowest = min(((int(m[q]), gi(q), q) for _, q in nbrs(p)), default=None)
            if lowest is not None and lowest[0] < m[p]:
                pointer[p] = lowest[2]
            else:
                flat.add(p)
        else:
            # in-plane edges before z edges, then the lower global index
            up = [(d[2] != 0, gi(q), q) for d, q in nbrs(p)
                  if affinity(p, d, q) == top[p] and top[q] > top[p]]
            if up:
                pointer[p] = min(up)[2]
            else:
                flat.add(p)
    parent = {p: p for p in flat}

    def find(p):
        while parent[p] != p:
            p = parent[p]
        return p

    def equal(p, d, q):
        if kind == "boundary":
            return m[p] == m[q]
        return affinity(p, d, q) == top[p]  # p flat: then top[q] == top[p] too

    rim = {}  # flat set -> its rim voxels (equal neighbours that descend)
    for p in flat:
        for d, q in nbrs(p):
            if q in flat and equal(p, d, q):
                parent[find(p)] = find(q)
    for p in flat:
        for d, q in nbrs(p):
            if q not in flat and equal(p, d, q):
                rim.setdefault(find(p), []).append((gi(q), q))
    lowest_index = {}
    for p in flat:
        r = find(p)
        lowest_index[r] = min(lowest_index.get(r, 1 << 62), gi(p))
    out = np.zeros((big_x, big_y, big_z), np.uint64)
    for p in points:
        q = p
        while True:
            while q in pointer:
                q = pointer[q]
            if find(q) not in rim:
                break
            q = min(rim[find(q)])[1]  # the flat set drains through its lowest rim voxel
        out[p] = lowest_index[find(q)] + 1
    return out


def random_map(rng: np.random.Generator, affinity: bool) -> np.ndarray:
    shape = tuple(int(s) for s in rng.integers(1, 8, 3))
    levels = int(rng.choice([1, 2, 3, 5, 256]))  # few levels: plateaus and ties everywhere
    if affinity:
        shape = shape + (3,)
    return rng.integers(0, levels, shape).astype(np.uint8)


CHUNKS = [(1, 1, 1), (2, 3, 1), (3, 2, 2), (4, 4, 2), (5, 7, 3)]


@pytest.mark.parametrize("affinity", [False, True], ids=["boundary", "affinity"])
def test_matches_brute_force_whole_and_chunked(affinity: bool) -> None:
    rng = np.random.default_rng(7 + affinity)
    for _ in range(25):
        m = random_map(rng, affinity)
        expected = brute_supervoxels(m)
        whole = supervoxels(m)
        assert whole.dtype == np.uint64
        np.testing.assert_array_equal(whole, expected)
        for shape in CHUNKS:
            np.testing.assert_array_equal(supervoxels_chunked(m, shape), expected)


@pytest.mark.parametrize("affinity", [False, True], ids=["boundary", "affinity"])
def test_constant_map_is_one_basin_named_by_voxel_zero(affinity: bool) -> None:
    shape = (9, 7, 5, 3) if affinity else (9, 7, 5)
    m = np.full(shape, 77, np.uint8)
    for chunk in [(9, 7, 5), (2, 2, 2), (4, 3, 2)]:
        sv = supervoxels_chunked(m, chunk)
        assert np.all(sv == 1), np.unique(sv)


def test_u_shaped_plateau_is_one_basin_across_chunks() -> None:
    """The two arms of a flat minimum meet only in a chunk far from where they start."""
    m = np.full((12, 9, 1), 200, np.uint8)
    m[2, 1:8, 0] = 10  # left arm
    m[9, 1:8, 0] = 10  # right arm
    m[2:10, 7, 0] = 10  # the bottom joins them at y = 7
    u_index = np.flatnonzero(m.ravel(order="F") == 10)
    sv = supervoxels(m)
    assert len(np.unique(sv[m == 10])) == 1
    assert sv[2, 1, 0] == u_index.min() + 1
    for chunk in [(3, 3, 1), (5, 2, 1), (1, 1, 1)]:
        np.testing.assert_array_equal(supervoxels_chunked(m, chunk), sv)


def test_a_plateau_with_an_exit_drains_whole_through_its_lowest_rim_voxel() -> None:
    """[50, 50, 50, 10]: voxel 2 descends to 10; flat {0, 1} drains through its rim, voxel 2."""
    m = np.array([50, 50, 50, 10], np.uint8).reshape(4, 1, 1)
    np.testing.assert_array_equal(supervoxels(m).ravel(), [4, 4, 4, 4])
    # two exits, [5, 50, 50, 50, 50, 50, 1]: rims are voxels 1 and 5; the flat set {2, 3, 4}
    # goes whole through voxel 1 (lowest index), to the basin of 5, not the deeper one
    m = np.array([5, 50, 50, 50, 50, 50, 1], np.uint8).reshape(7, 1, 1)
    np.testing.assert_array_equal(supervoxels(m).ravel(), [1, 1, 1, 1, 1, 7, 7])
    for chunk in [(1, 1, 1), (2, 1, 1), (3, 1, 1)]:
        np.testing.assert_array_equal(
            supervoxels_chunked(m, chunk).ravel(), [1, 1, 1, 1, 1, 7, 7]
        )


def test_affinity_descent_breaks_ties_in_plane_before_z() -> None:
    """v = (1, 0, 1) has two strongest edges (100): to (1, 0, 0) below it, the lower index,
    and to (2, 0, 1) beside it; both lead on to stronger edges. It follows the in-plane one."""
    a = np.zeros((3, 1, 2, 3), np.uint8)  # x, y, z, channel c: affinity of w and w - e_c
    a[1, 0, 1, 2] = 100  # v - (1, 0, 0)
    a[2, 0, 1, 0] = 100  # v - (2, 0, 1)
    a[1, 0, 1, 0] = 10   # v - (0, 0, 1)
    a[1, 0, 0, 0] = 200  # (1, 0, 0) - (0, 0, 0): basin of index 0
    a[2, 0, 1, 2] = 200  # (2, 0, 1) - (2, 0, 0): basin of index 2
    a[0, 0, 1, 2] = 50   # (0, 0, 1) descends to (0, 0, 0)
    sv = supervoxels(a)
    assert sv[1, 0, 0] == 1 and sv[2, 0, 1] == 3
    assert sv[1, 0, 1] == 3  # in-plane; by the global index alone it would be 1


def test_boundary_descent_breaks_ties_on_the_global_index() -> None:
    """The centre has two lowest neighbours of equal value: it follows the lower index."""
    m = np.full((3, 3, 1), 100, np.uint8)
    m[1, 1, 0] = 50
    m[1, 0, 0] = 5  # index 1
    m[0, 1, 0] = 5  # index 3
    sv = supervoxels(m)
    assert sv[1, 1, 0] == 2  # joins the basin rooted at index 1


def test_reduce_does_not_depend_on_chunk_order_and_exits_round_trip() -> None:
    rng = np.random.default_rng(3)
    m = rng.integers(0, 4, (10, 9, 6)).astype(np.uint8)
    chunks = chunk_grid(m.shape, (3, 4, 2))
    low, high = SUPERVOXEL_HALO["boundary"]
    results = [
        supervoxel_chunk(m[c.slices(low, high)], c.bounds(low, high)[0], c) for c in chunks
    ]
    tables = resolve_supervoxels([ex for _, ex in results])
    order = rng.permutation(len(chunks))
    shuffled = resolve_supervoxels(
        [ChunkExits.from_arrays(results[k][1].to_arrays()) for k in order]
    )
    for position, k in enumerate(order):
        np.testing.assert_array_equal(shuffled[position], tables[k])
    out = np.zeros(m.shape, np.uint64)
    for c, (labels, _), table in zip(chunks, results, tables):
        assert labels.dtype == np.uint32 and labels.shape == c.shape
        out[c.slices()] = relabel(labels, table)
    np.testing.assert_array_equal(out, supervoxels(m))


def test_exits_are_compact() -> None:
    """A chunk's record is about its faces, not its volume."""
    rng = np.random.default_rng(0)
    m = rng.integers(0, 256, (40, 40, 40)).astype(np.uint8)
    chunk = Chunk((10, 10, 10), (20, 20, 20), m.shape)
    _, exits = supervoxel_chunk(m[9:31, 9:31, 9:31], (9, 9, 9), chunk)
    face_voxels = 6 * 20 * 20
    assert exits.face_index.size <= face_voxels
    assert exits.exit_label.size <= face_voxels


def test_box_must_hold_the_halo() -> None:
    m = np.zeros((8, 8, 8), np.uint8)
    chunk = Chunk((2, 2, 2), (4, 4, 4), m.shape)
    with pytest.raises(ValueError, match="does not cover"):
        supervoxel_chunk(m[2:6, 2:6, 2:6], (2, 2, 2), chunk)
    a = np.zeros((8, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="does not cover"):  # affinities need 2 on the high side
        supervoxel_chunk(a[1:7, 1:7, 1:7], (1, 1, 1), chunk)


def test_float_maps_are_quantised_like_layers() -> None:
    rng = np.random.default_rng(1)
    p = rng.random((6, 5, 4))
    np.testing.assert_array_equal(
        supervoxels(p), supervoxels(np.rint(p * 255).astype(np.uint8))
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4), np.uint8), "x,y,z"),
        (np.zeros((4, 4, 4, 2), np.uint8), "x,y,z"),
        (np.zeros((4, 4, 4), np.int32), "uint8 or float"),
        (np.full((4, 4, 4), 2.0), r"\[0, 1\]"),
    ],
)
def test_bad_maps_are_refused(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        supervoxels(bad)
