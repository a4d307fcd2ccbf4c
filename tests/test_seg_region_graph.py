"""Region graph: statistics against a pair-by-pair count; chunked merges equal the whole graph."""

from __future__ import annotations

import numpy as np
import pytest

from deepem3d.segmentation.chunks import GRAPH_HALO, SUPERVOXEL_HALO, Chunk, as_map, chunk_grid
from deepem3d.segmentation.pipeline import chunk_stages, supervoxels_chunked
from deepem3d.segmentation.region_graph import (
    ChunkGraph,
    RegionGraph,
    chunk_graph,
    finish_chunk_graph,
    merge_graphs,
    region_graph,
    region_graph_chunk,
)
from deepem3d.segmentation.supervoxels import supervoxel_chunk, supervoxels


def brute_graph(sv: np.ndarray, m: np.ndarray) -> dict:
    """Every 6-neighbour pair once, in plain Python."""
    affinity = m.ndim == 4
    nodes: dict[int, list[int]] = {}
    edges: dict[tuple[int, int], list[int]] = {}
    big_x, big_y, big_z = sv.shape
    for x in range(big_x):
        for y in range(big_y):
            for z in range(big_z):
                a = int(sv[x, y, z])
                node = nodes.setdefault(a, [0, 255])
                node[0] += 1
                if not affinity:
                    node[1] = min(node[1], int(m[x, y, z]))
                for c, (dx, dy, dz) in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1)]):
                    u = (x - dx, y - dy, z - dz)
                    if min(u) < 0:
                        continue
                    b = int(sv[u])
                    if affinity:
                        w = 255 - int(m[x, y, z, c])
                    else:
                        w = max(int(m[x, y, z]), int(m[u]))
                    if a == b:
                        if affinity:
                            node[1] = min(node[1], w)
                        continue
                    e = edges.setdefault((min(a, b), max(a, b)), [0, 0, 255])
                    e[0] += 1
                    e[1] += 255 - w
                    e[2] = min(e[2], w)
    return {"nodes": nodes, "edges": edges}


def as_dict(g: RegionGraph) -> dict:
    return {
        "nodes": {int(i): [int(s), int(f)] for i, s, f in zip(g.ids, g.sizes, g.floors)},
        "edges": {
            (int(u), int(v)): [int(c), int(t), int(s)]
            for u, v, c, t, s in zip(g.u, g.v, g.count, g.affinity_sum, g.saddle)
        },
    }


def chunk_graphs(sv: np.ndarray, m: np.ndarray, shape: tuple[int, int, int]) -> list[RegionGraph]:
    out = []
    for c in chunk_grid(sv.shape, shape):
        box = c.slices(*GRAPH_HALO)
        out.append(region_graph_chunk(sv[box], m[box], c.bounds(*GRAPH_HALO)[0], c))
    return out


@pytest.mark.parametrize("affinity", [False, True], ids=["boundary", "affinity"])
def test_statistics_match_a_pair_by_pair_count(affinity: bool) -> None:
    rng = np.random.default_rng(11)
    for _ in range(6):
        shape = tuple(int(s) for s in rng.integers(2, 9, 3))
        m = rng.integers(0, 6, shape + ((3,) if affinity else ())).astype(np.uint8)
        sv = supervoxels(m)
        expected = brute_graph(sv, m)
        g = region_graph(sv, m)
        assert as_dict(g) == expected
        assert np.all(g.u < g.v)
        assert np.all(np.diff(g.ids.astype(np.float64)) > 0)
        for c in [(1, 1, 1), (3, 2, 4), (4, 4, 2)]:
            assert merge_graphs(chunk_graphs(sv, m, c)).equals(g)


@pytest.mark.parametrize("affinity", [False, True], ids=["boundary", "affinity"])
def test_merge_is_independent_of_order_and_grouping(affinity: bool) -> None:
    rng = np.random.default_rng(5)
    shape = (23, 17, 9)
    m = rng.integers(0, 40, shape + ((3,) if affinity else ())).astype(np.uint8)
    sv = supervoxels_chunked(m, (8, 8, 4))
    parts = chunk_graphs(sv, m, (5, 6, 4))
    whole = region_graph(sv, m)
    assert merge_graphs(parts).equals(whole)
    for _ in range(3):
        order = rng.permutation(len(parts))
        shuffled = [parts[k] for k in order]
        assert merge_graphs(shuffled).equals(whole)
        cut = int(rng.integers(1, len(parts)))
        grouped = merge_graphs([merge_graphs(shuffled[cut:]), merge_graphs(shuffled[:cut])])
        assert grouped.equals(whole)
    dtypes = {k: v.dtype for k, v in whole.to_arrays().items()}
    assert dtypes["count"] == dtypes["affinity_sum"] == dtypes["u"] == np.uint64
    assert dtypes["saddle"] == dtypes["floors"] == np.uint8
    assert RegionGraph.from_arrays(whole.to_arrays()).equals(whole)


def test_bytes_per_edge() -> None:
    m = np.random.default_rng(0).integers(0, 255, (16, 16, 8)).astype(np.uint8)
    g = region_graph(supervoxels(m), m)
    assert g.nbytes == 33 * g.n_edges + 17 * g.ids.size


def test_merging_nothing_is_empty() -> None:
    assert merge_graphs([]).equals(RegionGraph.empty())


def test_box_must_hold_the_low_halo() -> None:
    sv = np.ones((8, 8, 8), np.uint64)
    m = np.zeros((8, 8, 8), np.uint8)
    chunk = Chunk((2, 2, 2), (4, 4, 4), (8, 8, 8))
    with pytest.raises(ValueError, match="low halo"):
        region_graph_chunk(sv[2:6, 2:6, 2:6], m[2:6, 2:6, 2:6], (2, 2, 2), chunk)
    with pytest.raises(ValueError, match="differ"):
        region_graph_chunk(sv[1:6, 1:6, 1:6], m[1:6, 1:6, 1:7], (1, 1, 1), chunk)


@pytest.mark.parametrize("affinity", [False, True], ids=["boundary", "affinity"])
def test_local_graphs_finished_with_tables_and_faces_equal_each_chunks_graph(affinity) -> None:
    """What the supervoxel task counts over local labels, renamed by the reduce's tables and
    closed with the low neighbours' faces, is `region_graph_chunk` of the supervoxel ids, chunk
    by chunk, bit for bit: plateaus and ties (few values), labels that become one supervoxel
    (their pairs lower its floor), chunks of one voxel and shapes that do not divide."""
    rng = np.random.default_rng(11)
    for trial in range(12):
        shape = tuple(int(v) for v in rng.integers(3, 13, 3))
        m = (rng.integers(0, 5, shape + ((3,) if affinity else ())) * 50).astype(np.uint8)
        chunk_shape = (1, 1, 1) if trial == 0 else tuple(int(v) for v in rng.integers(1, 7, 3))
        chunks, _, _, graphs = chunk_stages(m, chunk_shape)
        sv = supervoxels_chunked(m, chunk_shape)
        values, _ = as_map(m)
        for chunk, graph in zip(chunks, graphs):
            start, _ = chunk.bounds(*GRAPH_HALO)
            box = chunk.slices(*GRAPH_HALO)
            assert graph.equals(region_graph_chunk(sv[box], values[box], start, chunk)), (
                f"trial {trial}, chunk {chunk.offset}")


def test_a_stored_chunk_graph_comes_back_whole() -> None:
    m = np.random.default_rng(2).integers(0, 255, (9, 8, 7, 3)).astype(np.uint8)
    chunk = Chunk((3, 4, 0), (3, 4, 7), (9, 8, 7))
    start, _ = chunk.bounds(*SUPERVOXEL_HALO["affinity"])
    box = m[chunk.slices(*SUPERVOXEL_HALO["affinity"])]
    labels, exits = supervoxel_chunk(box, start, chunk)
    local = chunk_graph(labels, box, start, chunk)
    back = ChunkGraph.from_arrays(local.to_arrays())
    assert back.graph.equals(local.graph) and back.affinity
    for name in ("low_labels", "low_values", "high_labels"):
        for mine, theirs in zip(getattr(local, name), getattr(back, name)):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    assert [p.size > 0 for p in local.low_labels] == [True, True, False]
    assert [p.size > 0 for p in local.high_labels] == [True, False, False]
    table = np.arange(exits.n_labels + 1, dtype=np.uint64)
    with pytest.raises(ValueError, match="low neighbour on axis x"):
        finish_chunk_graph(local, table, [None, None, None])
