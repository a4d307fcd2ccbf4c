"""supervoxels -> region graph: each block's graph over supervoxel ids, then one merged graph.

==============  =====  ==========================================================================
stage           tasks  reads -> writes (under OUTPUT/segmentation/, see deepem3d.stages.workdir)
==============  =====  ==========================================================================
region-graph    block  local_graphs/B.npz + tables/B.npy + the low neighbours' faces and tables
                       -> graphs/B.npz (the block's graph over supervoxel ids)
merge-graph     1      every graphs/B.npz -> graph.npz (the merged region graph)
==============  =====  ==========================================================================

A region-graph task needs no map and no label volume: the supervoxel task counted the pairs
inside its block over local labels, and the faces its low neighbours kept close it across block
faces. Statistics are integer sums over voxel pairs each owned by one block, so the merged graph
is the same arrays whatever the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cloudvolume.lib import Bbox

from deepem3d.segmentation.region_graph import (
    ChunkGraph,
    RegionGraph,
    finish_chunk_graph,
    merge_graphs,
)
from deepem3d.stages.blocks import block_id
from deepem3d.stages.frame import Markers, stage_task
from deepem3d.stages.workdir import get_table, work_files
from deepem3d.storage.npz import get_many_npz, get_npz, put_npz


@stage_task
def RegionGraphTask(  # noqa: N802  (taskqueue registers tasks by function name)
    output_path: str, bounds: list[int], below: list[str | None],
) -> dict:
    """The region graph of the voxel pairs one block owns, over supervoxel ids.

    `below[c]` is the id of the block under this one on axis c (x, y, z), None at the
    segmented region's low face. Reads the block's `ChunkGraph` and table and, per low
    neighbour, its high face and table: no map, no label volume.
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
    graph = finish_chunk_graph(local, get_table(files, task_id), neighbours)
    stored = put_npz(files, f"graphs/{task_id}.npz", graph.to_arrays())
    voxels = int(np.prod(np.subtract(bounds[3:], bounds[:3])))
    return {"voxels": voxels, "supervoxels": int(graph.ids.size), "edges": graph.n_edges,
            "stored_bytes": stored}


def merge_in_batches(graphs: Iterable[RegionGraph]) -> RegionGraph:
    """`merge_graphs` of many chunk graphs with bounded memory: pending graphs are merged
    into the total once they hold as many edges as it does, and at least 8 M entries (so the
    total is merged O(log n) times, and memory stays within a small multiple of the result or
    about 300 MB). Merging is associative and order-free, so the result is the same arrays
    bit for bit."""
    total = RegionGraph.empty()
    pending: list[RegionGraph] = []
    size = 0
    for graph in graphs:
        pending.append(graph)
        size += graph.n_edges + graph.ids.size
        if size >= max(total.n_edges + total.ids.size, 1 << 23):
            total, pending, size = merge_graphs([total, *pending]), [], 0
    return merge_graphs([total, *pending]) if pending else total


@stage_task
def MergeGraphTask(output_path: str) -> dict:  # noqa: N802
    """Merge every block's region graph into the one graph the agglomeration needs."""
    ids = Markers(output_path, "region-graph").task_ids()  # sorted: a fixed order
    files = work_files(output_path)
    graph = merge_in_batches(
        RegionGraph.from_arrays(a) for a in get_many_npz(files, [f"graphs/{i}.npz" for i in ids])
    )
    stored = put_npz(files, "graph.npz", graph.to_arrays())
    return {"blocks": len(ids), "supervoxels": int(graph.ids.size), "edges": graph.n_edges,
            "graph_bytes": graph.nbytes, "stored_bytes": stored}
