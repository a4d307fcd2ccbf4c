"""region graph -> segments over a tree of the blocks: no task holds the whole graph.

=====================  =====  ===================================================================
stage                  tasks  reads -> writes (under OUTPUT/segmentation/octree/RUN/)
=====================  =====  ===================================================================
agglomerate-L0 .. LH   node   level 0: ../../graphs/B.npz (the block's graph and faces); above:
                              the children's agglomerate/L(L-1)/N.npz -> agglomerate/LL/N.npz
                              (the node's decisions and its residual for its parent)
segments-LH .. L1      node   agglomerate/LL/N.npz, segments/LL/N.npz (from its parent; none at
                              the root) and the children's residual names -> segments/L(L-1)/C.npz
                              per child C: the segment id, home level and size of each name
dust-L0 .. LH          node   (dust merge only) level 0: the block's graph and its segments
                              (agglomerate/L0 + segments/L0); above: children -> dust/LL/N.npz
dust-segments-LH .. 1  node   as segments, for the ids after dust -> dust-segments/L(L-1)/C.npz
remap                  block  labels/B.npz + tables/B.npy + the block's level-0 results and
                              slices -> the segmentation layer
=====================  =====  ===================================================================

Each task does, with I/O, exactly one node of `deepem3d.segmentation.octree` (as
`deepem3d.segmentation.pipeline.segment_chunked` runs them in memory), so the layer equals the
global agglomeration bit for bit. RUN is the run's tuning key: a task of another run never
reads this run's files. N is a node's grid coordinates x_y_z at its level (level 0: the
block's).
"""

from __future__ import annotations

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume.lib import Bbox

from deepem3d.segmentation.agglomeration import remap
from deepem3d.segmentation.octree import (
    EMPTY_SLICE,
    BlockFaces,
    BlockSegments,
    Octree,
    Residual,
    agglomerate_node,
    dust_arrays,
    dust_from_arrays,
    dust_leaf,
    dust_node,
    node_arrays,
    node_from_arrays,
    segments_of,
    slice_arrays,
    slice_from_arrays,
)
from deepem3d.segmentation.region_graph import RegionGraph
from deepem3d.segmentation.supervoxels import relabel
from deepem3d.stages.blocks import block_at, block_id, node_name
from deepem3d.stages.frame import stage_task
from deepem3d.stages.workdir import get_table, map_volume, work_files
from deepem3d.storage.layers import cloudpath, write_block
from deepem3d.storage.npz import get_npz, put_npz

_U64 = np.uint64


def octree_of(grid: list[int], task_shape: list[int]) -> Octree:
    return Octree.of(grid, task_shape)


def _key(run: str, kind: str, level: int, node) -> str:
    return f"octree/{run}/{kind}/L{level}/{node_name(node)}.npz"


def block_graph_arrays(graph: RegionGraph, faces: BlockFaces) -> dict[str, np.ndarray]:
    """A block's graph and faces as the region-graph task stores them (graphs/B.npz)."""
    out = graph.to_arrays()
    out["faces_inside"] = faces.inside
    out.update({f"faces_{k}": f for k, f in enumerate(faces.faces)})
    return out


def _block_graph(files: CloudFiles, task_id: str) -> tuple[RegionGraph, BlockFaces]:
    arrays = get_npz(files, f"graphs/{task_id}.npz")
    faces = BlockFaces(np.asarray(arrays.pop("faces_inside")).astype(_U64),
                       tuple(np.asarray(arrays.pop(f"faces_{k}")).astype(_U64)
                             for k in range(6)))
    return RegionGraph.from_arrays(arrays), faces


def _slice(files: CloudFiles, run: str, kind: str, level: int, node, height: int):
    """A node's slice from its parent (the root has none)."""
    if level == height:
        return EMPTY_SLICE if kind == "segments" else {}
    arrays = get_npz(files, _key(run, kind, level, node))
    if kind == "segments":
        return slice_from_arrays(arrays)
    return dict(zip(arrays["anchor"].astype(_U64).tolist(), arrays["id"].astype(_U64).tolist()))


def _block_segments(files: CloudFiles, run: str, node, height: int) -> BlockSegments:
    """A block's segments: its level-0 node's decisions read through its slice."""
    result = node_from_arrays(get_npz(files, _key(run, "agglomerate", 0, node)))
    above = _slice(files, run, "segments", 0, node, height)
    return BlockSegments(*segments_of(result, 0, above, result.names))


@stage_task
def OctreeNodeTask(  # noqa: N802  (taskqueue registers tasks by function name)
    output_path: str, sweep: str, level: int, node: list[int], grid: list[int],
    task_shape: list[int], region: list[int], method: str, threshold: float, dust_size: int,
    table: str,
) -> dict:
    """One node of the octree's up sweep (`sweep`: "agglomerate" or "dust"); `table` is the
    run's tuning key (RUN in the file names)."""
    run = table
    files = work_files(output_path)
    tree = octree_of(grid, task_shape)
    if level == 0:
        task_id = block_at(node, region, task_shape)
        graph, faces = _block_graph(files, task_id)
    if sweep == "agglomerate":
        if level == 0:
            children = [Residual.of_block(graph, faces, node)]
        else:
            children = [node_from_arrays(get_npz(files, _key(run, sweep, level - 1, c))).residual
                        for c in tree.children(level, node)]
        regions = int(sum(c.ids.size for c in children))
        edges = int(sum(c.ru.size for c in children))
        result = agglomerate_node(children, tree.bounds(level, node), tree.grid, method,
                                  float(threshold))  # empties `children`: freed before it peaks
        stored = put_npz(files, _key(run, sweep, level, node), node_arrays(result))
        return {"regions": regions, "edges": edges,
                "final": int(result.final.size), "residual_bytes": result.residual.nbytes,
                "stored_bytes": stored}
    if level == 0:
        dust_children = [dust_leaf(graph, _block_segments(files, run, node, tree.height))]
    else:
        dust_children = [dust_from_arrays(get_npz(files, _key(run, sweep, level - 1, c))).residual
                         for c in tree.children(level, node)]
    dust = dust_node(dust_children, level, int(dust_size))
    stored = put_npz(files, _key(run, sweep, level, node), dust_arrays(dust))
    return {"regions": sum(len(c.regions) for c in dust_children), "joined": len(dust.joined),
            "final": len(dust.final), "stored_bytes": stored}


@stage_task
def OctreeDownTask(  # noqa: N802
    output_path: str, sweep: str, level: int, node: list[int], grid: list[int],
    task_shape: list[int], table: str,
) -> dict:
    """One node of a down pass: the slice of each child, from the node's result and its own
    slice (`sweep`: "agglomerate" writes segments/, "dust" writes dust-segments/)."""
    run = table
    files = work_files(output_path)
    tree = octree_of(grid, task_shape)
    kind = "segments" if sweep == "agglomerate" else "dust-segments"
    above = _slice(files, run, kind, level, node, tree.height)
    written = 0
    if sweep == "agglomerate":
        result = node_from_arrays(get_npz(files, _key(run, sweep, level, node)))
        for child in tree.children(level, node):
            names = node_from_arrays(get_npz(files, _key(run, sweep, level - 1, child)))
            part = segments_of(result, level, above, names.residual.ids)
            written += put_npz(files, _key(run, kind, level - 1, child), slice_arrays(part))
    else:
        dust = dust_from_arrays(get_npz(files, _key(run, sweep, level, node)))
        for child in tree.children(level, node):
            anchors = sorted(dust_from_arrays(get_npz(
                files, _key(run, sweep, level - 1, child))).residual.regions)
            ids = [dust.id_of(a, above) for a in anchors]
            written += put_npz(files, _key(run, kind, level - 1, child),
                               {"anchor": np.asarray(anchors, _U64), "id": np.asarray(ids, _U64)})
    return {"children": len(tree.children(level, node)), "stored_bytes": written}


@stage_task
def RemapTask(  # noqa: N802
    output_path: str, bounds: list[int], node: list[int], grid: list[int],
    task_shape: list[int], dust_size: int, dust_mode: str, table: str,
) -> dict:
    """Write one block of the segmentation layer: local label -> supervoxel (its table) ->
    segment (its slices of the octree's decisions) -> id after dust, composed into one table."""
    run = table
    task_id = block_id(Bbox(bounds[:3], bounds[3:]))
    files = work_files(output_path)
    height = octree_of(grid, task_shape).height
    block = _block_segments(files, run, node, height)
    segments = block.segments
    if dust_size > 0 and dust_mode == "zero":
        segments = np.where(block.sizes < dust_size, _U64(0), segments).astype(_U64)
    elif dust_size > 0:
        dust = dust_from_arrays(get_npz(files, _key(run, "dust", 0, node)))
        above = _slice(files, run, "dust-segments", 0, node, height)
        segments = np.asarray([dust.id_of(s, above) for s in segments.tolist()], _U64)
    labels = get_npz(files, f"labels/{task_id}.npz")["labels"]
    seg = relabel(labels, remap(get_table(files, task_id), block.ids, segments))
    write_block(map_volume(cloudpath(output_path), 0), bounds[:3], seg)
    return {"voxels": int(seg.size)}
