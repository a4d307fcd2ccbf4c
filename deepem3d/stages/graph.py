"""supervoxels -> region graph: each block's graph over supervoxel ids, and its faces.

==============  =====  ==========================================================================
stage           tasks  reads -> writes (under OUTPUT/segmentation/, see deepem3d.stages.workdir)
==============  =====  ==========================================================================
region-graph    block  local_graphs/B.npz + labels/B.npz + tables/B.npy + the low neighbours'
                       faces and tables -> graphs/B.npz (the block's graph over supervoxel ids,
                       and which supervoxels it holds and has on each face: the octree's leaf)
==============  =====  ==========================================================================

A region-graph task needs no map: the supervoxel task counted the pairs inside its block over
local labels, and the faces its low neighbours kept close it across block faces. Statistics are
integer sums over voxel pairs each owned by one block, so the blocks' graphs add up to the
whole graph whatever the blocks; no stage merges them (deepem3d.stages.octree).
"""

from __future__ import annotations

import numpy as np
from cloudvolume.lib import Bbox

from deepem3d.segmentation.octree import BlockFaces
from deepem3d.segmentation.region_graph import ChunkGraph, finish_chunk_graph
from deepem3d.stages.blocks import block_id
from deepem3d.stages.frame import stage_task
from deepem3d.stages.octree import block_graph_arrays
from deepem3d.stages.workdir import get_table, work_files
from deepem3d.storage.npz import get_npz, put_npz


@stage_task
def RegionGraphTask(  # noqa: N802  (taskqueue registers tasks by function name)
    output_path: str, bounds: list[int], below: list[str | None],
) -> dict:
    """The region graph of the voxel pairs one block owns, over supervoxel ids, and the
    block's faces (`BlockFaces`).

    `below[c]` is the id of the block under this one on axis c (x, y, z), None at the
    segmented region's low face. Reads the block's `ChunkGraph`, labels and table and, per low
    neighbour, its high face and table: no map.
    """
    task_id = block_id(Bbox(bounds[:3], bounds[3:]))
    files = work_files(output_path)
    local = ChunkGraph.from_arrays(get_npz(files, f"local_graphs/{task_id}.npz"))
    neighbours = []
    for c, other in enumerate(below):
        if other is None:
            neighbours.append(None)
            continue
        face = get_npz(files, f"faces/{other}.npz")[f"high_labels_{c}"]
        neighbours.append((face.astype(np.uint32, copy=False), get_table(files, other)))
    table = get_table(files, task_id)
    graph = finish_chunk_graph(local, table, neighbours)
    faces = BlockFaces.of(get_npz(files, f"labels/{task_id}.npz")["labels"], table)
    stored = put_npz(files, f"graphs/{task_id}.npz", block_graph_arrays(graph, faces))
    voxels = int(np.prod(np.subtract(bounds[3:], bounds[:3])))
    return {"voxels": voxels, "supervoxels": int(graph.ids.size), "edges": graph.n_edges,
            "stored_bytes": stored}
