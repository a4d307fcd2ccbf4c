"""region graph -> segments: agglomerate the merged graph, then write the segmentation layer.

==============  =====  ==========================================================================
stage           tasks  reads -> writes
==============  =====  ==========================================================================
agglomerate     1      segmentation/graph.npz -> segmentation/segments.npz (supervoxel ->
                       segment table)
remap           block  labels/B.npz + tables/B.npy + segments.npz -> the segmentation layer
                       (compressed_segmentation chunks encoded by deepem3d.storage.cseg)
==============  =====  ==========================================================================

The remap composes local label -> supervoxel -> segment into one small table per block; no
stage writes or reads a volume of uint64 supervoxel ids.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
from cloudvolume.lib import Bbox

from deepem3d.segmentation.agglomeration import agglomerate, remap
from deepem3d.segmentation.region_graph import RegionGraph
from deepem3d.segmentation.supervoxels import relabel
from deepem3d.stages.blocks import block_id
from deepem3d.stages.frame import stage_task
from deepem3d.stages.workdir import WORK, get_table, map_volume, work_files
from deepem3d.storage.layers import cloudpath, write_block
from deepem3d.storage.npz import get_npz, put_npz


@stage_task
def AgglomerateTask(  # noqa: N802  (taskqueue registers tasks by function name)
    output_path: str, method: str, threshold: float, dust_size: int, dust_mode: str, table: str,
) -> dict:
    """Agglomerate the merged region graph: the supervoxel -> segment table.

    `table` names this run's table (the remap tasks check it: a table of another run is never
    applied)."""
    files = work_files(output_path)
    graph = RegionGraph.from_arrays(get_npz(files, "graph.npz"))
    loaded = time.perf_counter()
    (segments,) = agglomerate(graph, method, [float(threshold)], int(dust_size), dust_mode)
    seconds = time.perf_counter() - loaded
    put_npz(files, "segments.npz", {"ids": graph.ids, "segments": segments,
                                    "key": np.array(table)})
    count = int(np.count_nonzero(segments == graph.ids))  # a segment's id is one of its own
    return {"supervoxels": int(graph.ids.size), "edges": graph.n_edges, "segments": count,
            "agglomerate_seconds": round(seconds, 4)}


@lru_cache(maxsize=2)
def _segments(output_path: str, table: str) -> tuple[np.ndarray, np.ndarray]:
    """The agglomeration's table, loaded once per worker process and run."""
    arrays = get_npz(work_files(output_path), "segments.npz")
    if str(arrays["key"]) != table:
        raise RuntimeError(f"{output_path}/{WORK}/segments.npz belongs to another run")
    return arrays["ids"].astype(np.uint64), arrays["segments"].astype(np.uint64)


@stage_task
def RemapTask(output_path: str, bounds: list[int], table: str) -> dict:  # noqa: N802
    """Write one block of the segmentation layer: its local labels through their table and
    the agglomeration's."""
    task_id = block_id(Bbox(bounds[:3], bounds[3:]))
    ids, segments = _segments(cloudpath(output_path), table)
    files = work_files(output_path)
    labels = get_npz(files, f"labels/{task_id}.npz")["labels"]
    # local label -> supervoxel -> segment, composed into one table of the block's labels
    seg = relabel(labels, remap(get_table(files, task_id), ids, segments))
    write_block(map_volume(cloudpath(output_path), 0), bounds[:3], seg)
    return {"voxels": int(seg.size)}
