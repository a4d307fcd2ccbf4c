"""Agglomeration: greedy mean merging against a slow reference, the dynamics rule, dust, remap."""

from __future__ import annotations

import numpy as np
import pytest

from deepem3d.segmentation.agglomeration import (
    agglomerate,
    agglomerate_mean,
    agglomerate_watershed,
    merge_dust,
    remap,
)
from deepem3d.segmentation.region_graph import RegionGraph, region_graph
from deepem3d.segmentation.supervoxels import supervoxels


def graph(ids, sizes, edges, floors=None) -> RegionGraph:
    """A hand-made graph; edges are (u, v, count, affinity_sum, saddle)."""
    e = np.array(edges, dtype=np.uint64).reshape(-1, 5)
    return RegionGraph(
        ids=np.array(ids, np.uint64),
        sizes=np.array(sizes, np.uint64),
        floors=np.array(floors if floors is not None else [0] * len(ids), np.uint8),
        u=e[:, 0].copy(),
        v=e[:, 1].copy(),
        count=e[:, 2].copy(),
        affinity_sum=e[:, 3].copy(),
        saddle=e[:, 4].astype(np.uint8),
    )


def slow_mean(g: RegionGraph, threshold: float) -> np.ndarray:
    """Greedy merging, recomputing every region pair's statistics from the original edges."""
    ea = np.searchsorted(g.ids, g.u)
    eb = np.searchsorted(g.ids, g.v)
    region = list(range(g.ids.size))  # min node index of each node's region
    while True:
        stats: dict[tuple[int, int], list] = {}
        for e in range(g.n_edges):
            ra, rb = region[ea[e]], region[eb[e]]
            if ra == rb:
                continue
            s = stats.setdefault((min(ra, rb), max(ra, rb)), [0.0, 0.0, e])
            s[0] += float(g.count[e])
            s[1] += float(g.affinity_sum[e])
            s[2] = min(s[2], e)
        if not stats:
            break
        (ra, rb), (count, total, _) = min(
            stats.items(), key=lambda kv: (1.0 - (kv[1][1] / kv[1][0]) / 255.0, kv[1][2])
        )
        if not 1.0 - (total / count) / 255.0 < threshold:
            break
        region = [ra if r == rb else r for r in region]
    return g.ids[np.array(region)]


def test_mean_matches_a_slow_greedy_reference_with_ties() -> None:
    rng = np.random.default_rng(2)
    for trial in range(12):
        affinity = bool(trial % 2)
        shape = (7, 6, 4) + ((3,) if affinity else ())
        m = rng.integers(0, 4, shape).astype(np.uint8) * 60  # few values: many equal means
        g = region_graph(supervoxels(m), m)
        thresholds = [0.2, 0.5, 0.8, 1.0]
        ours = agglomerate_mean(g, thresholds)
        for t, table in zip(thresholds, ours):
            np.testing.assert_array_equal(table, slow_mean(g, t))


def slow_dust(g: RegionGraph, segments: np.ndarray, size: int) -> np.ndarray:
    """Dust merging step by step: the smallest segment under `size` (ties: smaller id) that
    has a neighbour joins the one it shares most contact with (ties: smaller id)."""
    seg = {int(i): int(s) for i, s in zip(g.ids, segments)}
    while True:
        sizes: dict[int, int] = {}
        for i, n in zip(g.ids, g.sizes):
            sizes[seg[int(i)]] = sizes.get(seg[int(i)], 0) + int(n)
        contact: dict[int, dict[int, int]] = {}
        for u, v, c in zip(g.u, g.v, g.count):
            a, b = seg[int(u)], seg[int(v)]
            if a != b:
                for x, y in ((a, b), (b, a)):
                    contact.setdefault(x, {})[y] = contact.get(x, {}).get(y, 0) + int(c)
        small = sorted((n, s) for s, n in sizes.items() if n < size and s in contact)
        if not small:
            return np.array([seg[int(i)] for i in g.ids], np.uint64)
        _, s = small[0]
        into = min(contact[s].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = min(s, into)
        seg = {i: merged if t in (s, into) else t for i, t in seg.items()}


def test_mean_and_dust_match_the_references_on_graphs_with_hubs() -> None:
    # a wide range of sums: some regions grow to neighbour most of the graph, so merges move
    # long edge lists and fold many edges at once
    rng = np.random.default_rng(5)
    for trial in range(4):
        affinity = bool(trial % 2)
        shape = (12, 10, 5) + ((3,) if affinity else ())
        m = rng.integers(0, 6, shape).astype(np.uint8) * 40
        g = region_graph(supervoxels(m), m)
        thresholds = [0.3, 0.6, 0.9]
        for t, table in zip(thresholds, agglomerate_mean(g, thresholds)):
            np.testing.assert_array_equal(table, slow_mean(g, t))
            for size in (5, 40):
                np.testing.assert_array_equal(merge_dust(g, table, size),
                                              slow_dust(g, table, size))


def test_thresholds_come_back_in_the_order_given_and_nest() -> None:
    rng = np.random.default_rng(4)
    m = rng.integers(0, 256, (12, 12, 6)).astype(np.uint8)
    g = region_graph(supervoxels(m), m)
    shuffled = agglomerate_mean(g, [0.7, 0.1, 0.4])
    single = [agglomerate_mean(g, [t])[0] for t in (0.7, 0.1, 0.4)]
    for a, b in zip(shuffled, single):
        np.testing.assert_array_equal(a, b)
    fine, mid, coarse = single[1], single[2], single[0]
    for lower, higher in [(fine, mid), (mid, coarse)]:  # each segment lies inside one above
        for s in np.unique(lower):
            assert len(np.unique(higher[lower == s])) == 1
    np.testing.assert_array_equal(agglomerate_mean(g, [0.0])[0], g.ids)


def test_segment_id_is_the_smallest_supervoxel_id() -> None:
    g = graph([3, 8, 20], [1, 1, 1], [(3, 8, 1, 250, 5), (8, 20, 1, 240, 15)])
    np.testing.assert_array_equal(agglomerate_mean(g, [0.5])[0], [3, 3, 3])
    np.testing.assert_array_equal(agglomerate_mean(g, [0.03])[0], [3, 3, 20])


def test_watershed_merges_by_dynamics_in_saddle_order() -> None:
    """1D map [0, 30, 5, 100, 20, 60, 1]: basins A{0,1} B{2,3} C{4} D{5,6}.

    Saddles: A-B 30, C-D 60, B-C 100. Floors 0, 5, 20, 1. Ids are 1 + the root's index.
    """
    m = np.array([0, 30, 5, 100, 20, 60, 1], np.uint8).reshape(7, 1, 1)
    sv = supervoxels(m)
    np.testing.assert_array_equal(sv.ravel(), [1, 1, 3, 3, 5, 7, 7])
    g = region_graph(sv, m)
    np.testing.assert_array_equal(g.floors, [0, 5, 20, 1])

    def run(h255: float) -> list[int]:
        return remap(sv, g.ids, agglomerate_watershed(g, h255 / 255)).ravel().tolist()

    assert run(0) == [1, 1, 3, 3, 5, 7, 7]  # nothing has a dynamic below 0
    assert run(24.5) == [1, 1, 3, 3, 5, 7, 7]  # B: 30 - 5 = 25
    assert run(25.5) == [1, 1, 1, 1, 5, 7, 7]  # B into A (A is deeper)
    assert run(39.5) == [1, 1, 1, 1, 5, 7, 7]  # C: 60 - 20 = 40 against D
    assert run(40.5) == [1, 1, 1, 1, 5, 5, 5]  # C into D; segment id = smallest sv id
    assert run(98.5) == [1, 1, 1, 1, 5, 5, 5]  # CD (floor 1) meets AB (floor 0) at 100: 99
    assert run(99.5) == [1] * 7


def test_watershed_equal_floors_break_on_the_supervoxel_id() -> None:
    """Two basins of floor 0 meeting at 10: with h above 10, the later id is merged."""
    m = np.array([0, 10, 0], np.uint8).reshape(3, 1, 1)
    sv = supervoxels(m)
    g = region_graph(sv, m)
    assert agglomerate_watershed(g, 11 / 255).tolist() == [1, 1]
    assert agglomerate_watershed(g, 9 / 255).tolist() == [1, 3]


def test_dust_merges_into_the_largest_contact_smallest_first() -> None:
    g = graph(
        [1, 2, 3, 4],
        [100, 3, 2, 50],
        [(1, 2, 5, 0, 0), (2, 3, 2, 0, 0), (2, 4, 5, 0, 0), (3, 4, 1, 0, 0)],
    )
    own = g.ids.copy()
    # 3 (size 2) joins 2 (contact 2 > 1); {2,3} (size 5) then joins 4 (contact 5 + 1 > 5)
    np.testing.assert_array_equal(merge_dust(g, own, 10), [1, 2, 2, 2])
    np.testing.assert_array_equal(merge_dust(g, own, 10, "zero"), [1, 0, 0, 4])
    np.testing.assert_array_equal(merge_dust(g, own, 0), own)
    # ties on contact go to the smaller id
    tie = graph([1, 2, 3], [9, 1, 9], [(1, 2, 4, 0, 0), (2, 3, 4, 0, 0)])
    np.testing.assert_array_equal(merge_dust(tie, tie.ids.copy(), 5), [1, 1, 3])
    # a segment with no neighbour at all is kept
    alone = graph([7], [1], [])
    np.testing.assert_array_equal(merge_dust(alone, alone.ids.copy(), 5), [7])


def test_agglomerate_dispatches_and_checks_its_arguments() -> None:
    g = graph([1, 2], [5, 5], [(1, 2, 1, 255, 0)], floors=[0, 0])
    assert [t.tolist() for t in agglomerate(g, "mean", [0.5, 0.0])] == [[1, 1], [1, 2]]
    assert [t.tolist() for t in agglomerate(g, "watershed", 0.1)] == [[1, 1]]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            agglomerate(g, "mean", bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            agglomerate(g, "watershed", bad)
    with pytest.raises(ValueError, match="method"):
        agglomerate(g, "single", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dust mode"):
        agglomerate(g, "mean", 0.5, dust_size=3, dust_mode="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        agglomerate(g, "mean", [])


def test_remap() -> None:
    sv = np.array([[[5, 5, 9]], [[0, 12, 9]]], np.uint64)
    ids = np.array([5, 9, 12], np.uint64)
    seg = np.array([5, 5, 12], np.uint64)
    out = remap(sv, ids, seg)
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, [[[5, 5, 5]], [[0, 12, 5]]])
    with pytest.raises(ValueError, match="not in the region graph"):
        remap(np.array([[[4]]], np.uint64), ids, seg)
