"""The segmentation's work directory, OUTPUT/segmentation/: where its stages leave what the
next ones read, and the map reads every segmentation stage shares.

    halo/B/NAME.npz        a block's halo slabs (halo or smooth stage; deleted after supervoxels)
    labels/B.npz           a block's supervoxels as local labels (uint32, kept)
    exits/B.npz            what the reduce needs of a block (deleted after the reduce)
    reduce/LL/N.npz        a reduce node's resolutions and residual (deleted after the reduce)
    reduce-down/LL/N.npz   a reduce node's ids from its parent (deleted after the reduce)
    local_graphs/B.npz     a block's region graph over local labels (deleted after region-graph)
    faces/B.npz            a block's high faces of local labels (deleted after region-graph)
    tables/B.npy           local label -> supervoxel id, per block (tables-L1; kept)
    graphs/B.npz           a block's region graph over supervoxel ids and its faces (kept: the
                           octree's leaves, where a retune starts)
    octree/RUN/...         the octree's nodes: decisions, residuals, slices (deepem3d.stages.octree)
    smoothed/              the smoothed map, a uint8 layer (with --sigma; kept, worth viewing)

B is a block id, x0-x1_y0-y1_z0-z1 in absolute voxels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.segmentation.chunks import Chunk
from deepem3d.storage.layers import cloudpath, read_block
from deepem3d.storage.npz import COMPRESS
from deepem3d.units import format_bounds

WORK = "segmentation"
#: where the supervoxels are kept: per block, local labels and their table to supervoxel ids
SUPERVOXEL_FILES = (f"{WORK}/labels/", f"{WORK}/tables/")
SMOOTHED_LAYER = f"{WORK}/smoothed"


def smoothed_layer_path(output_path: str) -> str:
    """The smoothed map layer that the smooth stage writes, inside OUTPUT."""
    return f"{cloudpath(output_path).rstrip('/')}/{SMOOTHED_LAYER}"


def work_files(output_path: str) -> CloudFiles:
    return CloudFiles(f"{cloudpath(output_path).rstrip('/')}/{WORK}")


def put_table(files: CloudFiles, task_id: str, table: np.ndarray) -> dict:
    """A block's table as an item for `put_many`."""
    buffer = io.BytesIO()
    np.save(buffer, table)
    return {"path": f"tables/{task_id}.npy", "content": buffer.getvalue(), "compress": COMPRESS}


def get_table(files: CloudFiles, task_id: str) -> np.ndarray:
    data = files.get(f"tables/{task_id}.npy")
    if data is None:
        raise FileNotFoundError(f"{files.cloudpath}/tables/{task_id}.npy is missing: was its "
                                "stage reset while this task waited? Re-run the segmentation")
    return np.load(io.BytesIO(data), allow_pickle=False)


def map_volume(path: str, mip: int) -> CloudVolume:
    # not cached: a layer re-created by --overwrite must not be seen with its old info
    return CloudVolume(path, mip=mip, progress=False, non_aligned_writes=False)


def map_box(vol: CloudVolume, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """The map over [lo, hi): x, y, z for a boundary map, x, y, z, 3 for affinities. A float
    map's values outside [0, 1] (NaN, logits) are the same on every retry: bad input, the
    one-line InputError naming the layer and the box."""
    box = read_block(vol, lo, hi, "complete that layer first (or segment only the --bounds "
                     "it covers)")
    if box.dtype.kind == "f" and not (np.isfinite(box).all() and box.min() >= 0
                                      and box.max() <= 1):
        raise InputError(f"{vol.cloudpath} holds values outside [0, 1] (or NaN) in "
                         f"{format_bounds(Bbox(lo, hi))}: a "
                         "float32 map holds probabilities; write it as such (or as uint8 "
                         "round(255 p))")
    return box[..., 0] if box.shape[3] == 1 else box


def chunk_of(bounds: list[int], dataset: list[int]) -> tuple[Chunk, np.ndarray]:
    """The block as a Chunk of the segmented region, and the region's absolute origin."""
    origin = np.asarray(dataset[:3], dtype=int)
    lo, hi = np.asarray(bounds[:3], dtype=int), np.asarray(bounds[3:], dtype=int)
    shape = np.asarray(dataset[3:], dtype=int) - origin
    return Chunk(tuple(lo - origin), tuple(hi - lo), tuple(shape)), origin
