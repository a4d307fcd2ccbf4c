"""One-call segmentation of a map: the whole array at once, or chunk by chunk in memory.

`segment` is the public face (like `waterz.agglomerate`): a uint8 or float map in, uint64
segmentations out. `segment_chunked` runs the very functions the queue tasks will run, one
chunk at a time with the halo each stage declares, and must give the same arrays bit for bit.
Both take `sigma`: DeepEM3D's optional in-plane Gaussian on the map before the watershed
(`deepem3d.segmentation.smoothing`), 0 for none.

Arrays are x, y, z (CloudVolume order): a boundary map is (x, y, z), an affinity map
(x, y, z, 3) with channel c the affinity between v and v - e_c (c = 0 for x).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from deepem3d.segmentation.agglomeration import Method, _check_unit, agglomerate, remap
from deepem3d.segmentation.chunks import SUPERVOXEL_HALO, Chunk, as_map, chunk_grid, chunks_below
from deepem3d.segmentation.octree import BlockFaces, Octree, octree_dust, octree_segments
from deepem3d.segmentation.octree_reduce import reduce_octree
from deepem3d.segmentation.region_graph import (
    RegionGraph,
    chunk_graph,
    finish_chunk_graph,
    region_graph,
)
from deepem3d.segmentation.smoothing import smooth_chunk, smooth_map, smoothing_bounds
from deepem3d.segmentation.supervoxels import (
    relabel,
    supervoxel_chunk,
    supervoxels,
)

__all__ = ["chunk_stages", "segment", "segment_chunked", "segment_each", "smooth_chunked",
           "supervoxels_chunked"]

Thresholds = float | Sequence[float]


def _finish(
    sv: np.ndarray,
    graph: RegionGraph,
    method: Method,
    threshold: Thresholds,
    dust_size: int,
    dust_mode: Literal["merge", "zero"],
) -> np.ndarray | list[np.ndarray]:
    tables = agglomerate(graph, method, threshold, dust_size, dust_mode)
    results = [remap(sv, graph.ids, table) for table in tables]
    return results[0] if np.isscalar(threshold) else results


def segment(
    boundary_or_affinity: np.ndarray,
    method: Method = "mean",
    threshold: Thresholds = 0.5,
    *,
    dust_size: int = 0,
    dust_mode: Literal["merge", "zero"] = "merge",
    sigma: float = 0.0,
) -> np.ndarray | list[np.ndarray]:
    """Segment a whole map in one go: supervoxels, region graph, agglomeration, remap.

    `method` "mean": `threshold` on 1 - mean affinity, as waterz; "watershed": `threshold` is
    h, the h-minima depth in [0, 1] (DeepEM3D used 0.19). A list of thresholds gives a list of
    uint64 (x, y, z) segmentations; a single one gives one array. `sigma` > 0 first smooths
    the map in x and y (`smooth_map`), as DeepEM3D did.
    """
    values = smooth_map(boundary_or_affinity, sigma)
    sv = supervoxels(values)
    return _finish(sv, region_graph(sv, values), method, threshold, dust_size, dust_mode)


def segment_each(
    boundary_or_affinity: np.ndarray,
    groups: Sequence[tuple[Method, Sequence[float], int]],
    *,
    dust_mode: Literal["merge", "zero"] = "merge",
    sigma: float = 0.0,
) -> Iterator[list[np.ndarray]]:
    """`segment` for several (method, thresholds, dust size) groups of one map and sigma:
    per group, in order, the list `segment` gives for those thresholds, from one pass of
    supervoxels and region graph. Yielded one group at a time, so a caller that keeps only a
    part of each holds one group's segmentations at once."""
    values = smooth_map(boundary_or_affinity, sigma)
    sv = supervoxels(values)
    graph = region_graph(sv, values)
    for method, thresholds, dust in groups:
        yield _finish(sv, graph, method, list(thresholds), dust, dust_mode)


def smooth_chunked(
    boundary_or_affinity: np.ndarray, chunk_shape: Sequence[int], sigma: float
) -> np.ndarray:
    """`smooth_map` computed chunk by chunk (SmoothTask), each from its box with halo."""
    values, _ = as_map(boundary_or_affinity)
    out = np.zeros_like(values, order="F")
    for chunk in chunk_grid(values.shape[:3], chunk_shape):
        start, stop = smoothing_bounds(chunk, sigma)
        box = values[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
        out[chunk.slices()] = smooth_chunk(box, start, chunk, sigma)
    return out


def chunk_stages(
    boundary_or_affinity: np.ndarray, chunk_shape: Sequence[int]
) -> tuple[list[Chunk], list[np.ndarray], list[np.ndarray], list[RegionGraph]]:
    """The chunk stages in memory: per chunk, supervoxel labels and its `ChunkGraph` from one
    box with halo (SupervoxelTask); the reduce; per chunk, the graph finished with its table
    and the faces of its low neighbours (RegionGraphTask). Returns, per chunk of
    `chunk_grid`, (chunks, local labels, tables, graphs over supervoxel ids)."""
    values, kind = as_map(boundary_or_affinity)
    chunks = chunk_grid(values.shape[:3], chunk_shape)
    low, high = SUPERVOXEL_HALO[kind]
    labels, exits, local = [], [], []
    for chunk in chunks:
        start, _ = chunk.bounds(low, high)
        box = values[chunk.slices(low, high)]
        lab, ex = supervoxel_chunk(box, start, chunk)
        labels.append(lab)
        exits.append(ex)
        local.append(chunk_graph(lab, box, start, chunk))
    tables = _reduce(chunks, exits, chunk_shape)
    graphs = [
        finish_chunk_graph(local[i], tables[i], [
            None if j is None else (local[j].high_labels[c], tables[j]) for c, j in enumerate(below)
        ])
        for i, below in enumerate(chunks_below(chunks, chunk_shape))
    ]
    return chunks, labels, tables, graphs


def _reduce(chunks: list[Chunk], exits: list, chunk_shape: Sequence[int]) -> list[np.ndarray]:
    """The reduce, node by node over the tree of the chunks (`octree_reduce`)."""
    step = [int(s) for s in chunk_shape]
    dataset = chunks[0].dataset_shape
    tree = Octree.of([math.ceil(d / s) for d, s in zip(dataset, step)], step)
    blocks = [tuple(o // s for o, s in zip(c.offset, step)) for c in chunks]
    return reduce_octree(tree, blocks, exits, step, dataset)


def supervoxels_chunked(boundary_or_affinity: np.ndarray, chunk_shape: Sequence[int]) -> np.ndarray:
    """Supervoxel ids (uint64, x, y, z) computed chunk by chunk: SupervoxelTask + reduce."""
    values, kind = as_map(boundary_or_affinity)
    chunks = chunk_grid(values.shape[:3], chunk_shape)
    low, high = SUPERVOXEL_HALO[kind]
    labels, exits = [], []
    for chunk in chunks:
        start, _ = chunk.bounds(low, high)
        lab, ex = supervoxel_chunk(values[chunk.slices(low, high)], start, chunk)
        labels.append(lab)
        exits.append(ex)
    tables = _reduce(chunks, exits, chunk_shape)
    sv = np.zeros(values.shape[:3], dtype=np.uint64, order="F")
    for chunk, lab, table in zip(chunks, labels, tables):
        sv[chunk.slices()] = relabel(lab, table)
    return sv


def segment_chunked(
    boundary_or_affinity: np.ndarray,
    chunk_shape: Sequence[int],
    method: Method = "mean",
    threshold: Thresholds = 0.5,
    *,
    dust_size: int = 0,
    dust_mode: Literal["merge", "zero"] = "merge",
    sigma: float = 0.0,
) -> np.ndarray | list[np.ndarray]:
    """`segment`, run as the queue tasks will, with no global graph: per-chunk stages in memory.

    Smoothing per chunk when `sigma` > 0 (x, y halo `smoothing_halo(sigma)`); per chunk,
    supervoxel labels and the local region graph from one box (halo `SUPERVOXEL_HALO`); the
    reduce; per chunk, the graph over supervoxel ids (its own records, its table and its low
    neighbours' faces and tables); the agglomeration and dust removal node by node over an
    tree of the chunks (`deepem3d.segmentation.octree`); a remap per chunk, local label ->
    supervoxel -> segment. `chunk_shape` need not divide the volume. The result equals
    `segment(...)` bit for bit.
    """
    values, _ = as_map(boundary_or_affinity)
    if sigma != 0:  # a bad sigma (negative, nan) raises there, as in `segment`
        values = smooth_chunked(values, chunk_shape, sigma)
    chunks, labels, tables, graphs = chunk_stages(values, chunk_shape)
    step = [int(s) for s in chunk_shape]
    blocks = [tuple(o // s for o, s in zip(c.offset, step)) for c in chunks]
    tree = Octree.of([math.ceil(d / s) for d, s in zip(values.shape[:3], step)], step)
    faces = [BlockFaces.of(lab, table) for lab, table in zip(labels, tables)]
    values_t = [threshold] if np.isscalar(threshold) else list(threshold)  # type: ignore[list-item]
    results = []
    for t in _check_unit(values_t, "thresholds").tolist():
        slices, _ = octree_segments(tree, blocks, graphs, faces, method, t)
        final = octree_dust(tree, blocks, graphs, slices, dust_size, dust_mode)
        out = np.zeros(values.shape[:3], dtype=np.uint64, order="F")
        for chunk, lab, table, block, segments in zip(chunks, labels, tables, slices, final):
            out[chunk.slices()] = relabel(lab, remap(table, block.ids, segments))
        results.append(out)
    return results[0] if np.isscalar(threshold) else results
