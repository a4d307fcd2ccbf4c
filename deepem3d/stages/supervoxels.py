"""map -> supervoxels: the tasks that read the map.

==============  =====  ==========================================================================
stage           tasks  reads -> writes (under OUTPUT/segmentation/, see deepem3d.stages.workdir)
==============  =====  ==========================================================================
smooth          block  map block + x,y halo -> the smoothed map layer smoothed/ (only with
                       sigma > 0; the stages below then read it as their map), and the smoothed
                       block's halo slabs halo/B/*.npz
halo            block  map block -> its halo slabs halo/B/*.npz (only without sigma, and with
                       more than one block)
supervoxels     block  map block + the slabs around it -> labels/B.npz (local labels),
                       exits/B.npz, local_graphs/B.npz (graph over local labels, low faces),
                       faces/B.npz (high faces)
reduce-L0..LH   node   level 0: exits/B.npz; above: the children's reduce/L(L-1)/N.nodes.npz
                       and, one child at a time, N.faces.npz -> reduce/LL/N.nodes.npz (its
                       unresolved nodes), N.faces.npz (its outer faces), N.resolved.npz (what
                       it resolved); a tree of the blocks, deepem3d.segmentation.octree_reduce
tables-LH..L1   node   reduce/LL/N.resolved.npz + reduce-down/LL/N.npz (its parent's ids; none
                       at the root) + the children's N.nodes.npz -> reduce-down/L(L-1)/C.npz per
                       child; at level 1, from the children's N.resolved.npz, their
                       tables/B.npy (local label -> supervoxel id). One block: reduce-L0 writes it
==============  =====  ==========================================================================

Why halo slabs: a supervoxel task needs 1-2 voxels of the map beyond its block, and reading them
from the map decompresses each whole chunk they lie in (an interior 128^3 block of 64^3 chunks:
64 chunks for its 8). Each block publishes instead the few voxels its neighbours need
(`chunks.halo_slabs`: its first 2 and last 1 voxels along each axis), and a supervoxel task
decompresses only its own chunks and assembles the rest from slabs (`assemble_halo_box`). With
a sigma the smooth task, which has the smoothed block in memory, publishes them.

Why the map is read once only: the supervoxel task has the map and the labels in memory, so it
accumulates the region graph of the pairs inside its block over local labels there, and keeps
the planes of local labels on its faces (deepem3d.stages.graph finishes that graph).

Ids: the reduce numbers supervoxels by the segmented region (--bounds) and then translates them
to 1 + the voxel's index in the whole layer (x + X * (y + Y * z) from its voxel offset). The map
is monotone, so every tie-break and every "smallest id" keeps its winner: a run on bounds gives
the segmentation of the cropped map, with ids that mean the same voxel in every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.segmentation.chunks import SUPERVOXEL_HALO, assemble_halo_box, halo_slabs
from deepem3d.segmentation.octree import Octree
from deepem3d.segmentation.octree_reduce import (
    NO_FACES,
    Faces,
    Resolved,
    down,
    faces_from_arrays,
    reduce_arrays,
    reduce_leaf,
    reduce_node,
    residual_from_arrays,
    resolved_from_arrays,
)
from deepem3d.segmentation.region_graph import chunk_graph
from deepem3d.segmentation.smoothing import smooth_chunk, smoothing_bounds
from deepem3d.segmentation.supervoxels import ChunkExits, supervoxel_chunk
from deepem3d.stages.blocks import block_at, block_id, node_name
from deepem3d.stages.frame import stage_task
from deepem3d.stages.workdir import (
    chunk_of,
    map_box,
    map_volume,
    put_table,
    smoothed_layer_path,
    work_files,
)
from deepem3d.storage.layers import write_block
from deepem3d.storage.npz import get_npz, put_npz


@stage_task
def SmoothTask(  # noqa: N802  (taskqueue registers tasks by function name)
    map_path: str, output_path: str, bounds: list[int], dataset: list[int], mip: int,
    sigma: float, publish_halo: bool = False,
) -> dict:
    """DeepEM3D's in-plane Gaussian on one block of the map (read with its x, y halo).

    Writes the block, uint8 round(255 p), to the smoothed layer (mip 0 there: it has the map's
    geometry at `mip`). The halo stops at the segmented region, which is smoothed as if it were
    the volume, so every block's voxels equal the whole region's `smooth_map` bit for bit.
    With `publish_halo`, also writes the smoothed block's halo slabs (the halo stage's work).
    """
    chunk, origin = chunk_of(bounds, dataset)
    lo, hi = smoothing_bounds(chunk, sigma)
    box = map_box(map_volume(map_path, mip), origin + lo, origin + hi)
    smoothed = smooth_chunk(box, lo, chunk, sigma)
    write_block(map_volume(smoothed_layer_path(output_path), 0), bounds[:3], smoothed)
    if publish_halo:
        _put_halo(output_path, block_id(Bbox(bounds[:3], bounds[3:])), smoothed)
    return {"voxels": int(np.prod(chunk.shape)), "read_voxels": int(np.prod(np.subtract(hi, lo)))}


def _put_halo(output_path: str, task_id: str, block: np.ndarray) -> None:
    files = work_files(output_path)
    sides = SUPERVOXEL_HALO["boundary" if block.ndim == 3 else "affinity"]
    for name, slab in halo_slabs(block, *sides).items():
        put_npz(files, f"halo/{task_id}/{name}.npz", {"slab": slab})


@stage_task
def HaloTask(map_path: str, output_path: str, bounds: list[int], mip: int) -> dict:  # noqa: N802
    """Publish the map voxels of one block that its neighbours' supervoxel tasks read as halo
    (its first 2 and last 1 voxels along each axis), so that those decompress no chunk of it."""
    block = map_box(map_volume(map_path, mip), bounds[:3], bounds[3:])
    _put_halo(output_path, block_id(Bbox(bounds[:3], bounds[3:])), block)
    return {"voxels": int(np.prod(block.shape[:3]))}


def _read_box(vol: CloudVolume, output_path: str, bounds: list[int], dataset: list[int],
              task_shape: list[int] | None, box_lo, box_hi) -> np.ndarray:
    """The map over box_lo..box_hi (absolute): the block from its own chunks and, with
    `task_shape` (the halo stage or the smooth stage published slabs), the rest from the
    slabs of the blocks around it; without, one cutout of the whole box."""
    if task_shape is None:
        return map_box(vol, box_lo, box_hi)
    files = work_files(output_path)

    def slab(lo: tuple[int, ...], hi: tuple[int, ...], name: str) -> np.ndarray:
        return get_npz(files, f"halo/{block_id(Bbox(lo, hi))}/{name}.npz")["slab"]

    return assemble_halo_box(map_box(vol, bounds[:3], bounds[3:]), (bounds[:3], bounds[3:]),
                             (box_lo, box_hi), (dataset[:3], dataset[3:]), task_shape, slab)


@stage_task
def SupervoxelTask(  # noqa: N802
    map_path: str, output_path: str, bounds: list[int], dataset: list[int], mip: int,
    task_shape: list[int] | None = None,
) -> dict:
    """Steepest-descent basins of one block (map read with the 1-2 voxel halo they need), and
    the block's region graph over their local labels (the only stage that reads the map).

    `bounds` is the block, `dataset` the segmented region, both x0,y0,z0,x1,y1,z1 absolute.
    With `task_shape` (the grid's), the halo comes from the slabs the halo or smooth stage
    published, else from the map. Writes the block's local labels, its exits (what the reduce
    needs), its `ChunkGraph` and its high faces (what the low neighbours' region-graph tasks
    need) to the work dir.
    """
    task_id = block_id(Bbox(bounds[:3], bounds[3:]))
    vol = map_volume(map_path, mip)
    kind = "boundary" if vol.num_channels == 1 else "affinity"
    chunk, origin = chunk_of(bounds, dataset)
    lo, hi = chunk.bounds(*SUPERVOXEL_HALO[kind])
    box = _read_box(vol, output_path, bounds, dataset, task_shape, origin + lo, origin + hi)
    labels, exits = supervoxel_chunk(box, lo, chunk)
    local = chunk_graph(labels, box, lo, chunk)
    arrays = local.to_arrays()
    faces = {name: arrays.pop(name) for name in [f"high_labels_{c}" for c in range(3)]}
    files = work_files(output_path)
    stored = sum(put_npz(files, f"{folder}/{task_id}.npz", data) for folder, data in (
        ("labels", {"labels": labels}), ("exits", exits.to_arrays()),
        ("local_graphs", arrays), ("faces", faces)))
    return {"voxels": int(labels.size), "local_labels": exits.n_labels,
            "local_edges": local.graph.n_edges, "exits_bytes": exits.nbytes,
            "stored_bytes": stored}


def volume_ids(table: np.ndarray, origin: Sequence[int], region_shape: Sequence[int],
               volume_shape: Sequence[int]) -> np.ndarray:
    """Supervoxel ids 1 + (index in the region) as 1 + (index in the whole layer); 0 stays 0.

    Both indices run x fastest; the map is strictly increasing, so orders and minima of ids,
    on which every decision rests, are unchanged.
    """
    table = np.asarray(table, dtype=np.uint64)
    if all(int(o) == 0 for o in origin) and tuple(region_shape) == tuple(volume_shape):
        return table
    out = table.copy()
    nonzero = table != 0
    index = table[nonzero] - np.uint64(1)
    bx, by = (np.uint64(s) for s in region_shape[:2])
    x, y, z = index % bx, index // bx % by, index // (bx * by)
    ox, oy, oz = (np.uint64(o) for o in origin)
    big_x, big_y = (np.uint64(s) for s in volume_shape[:2])
    out[nonzero] = np.uint64(1) + (x + ox) + big_x * ((y + oy) + big_y * (z + oz))
    return out


def _linear(node, dataset: list[int], task_shape: list[int]) -> int:
    """A block's index in the region's grid, x fastest: its keys' high 32 bits."""
    grid = [-(-(b - a) // t) for a, b, t in zip(dataset[:3], dataset[3:], task_shape)]
    return int(node[0] + grid[0] * (node[1] + grid[1] * node[2]))


def _reduce_key(level: int, node, part: str = "nodes") -> str:
    """One of a reduce node's stored files (`octree_reduce.PARTS`)."""
    return f"reduce/L{level}/{node_name(node)}.{part}.npz"


def _read_faces(files, key: str) -> Faces:
    return faces_from_arrays(get_npz(files, key))


def _write_table(files, node, dataset, volume, task_shape, resolved: Resolved,
                 above: tuple[np.ndarray, np.ndarray]) -> int:
    """A block's table, from its level-0 node's resolutions and its parent's ids."""
    keys = resolved.key  # a level-0 node resolves its own block's labels only
    table = np.zeros(int((keys & np.uint64(0xFFFFFFFF)).max(initial=0)) + 1, np.uint64)
    table[(keys & np.uint64(0xFFFFFFFF)).astype(np.int64)] = down(resolved, above, keys)
    origin = np.asarray(dataset[:3]) - np.asarray(volume[:3])
    shape = np.asarray(dataset[3:]) - np.asarray(dataset[:3])
    table = volume_ids(table, origin, shape, volume[3:])
    files.put(**put_table(files, block_at(node, dataset, task_shape), table))
    return int(table.size) - 1


@stage_task
def ReduceNodeTask(  # noqa: N802
    output_path: str, level: int, node: list[int], grid: list[int], task_shape: list[int],
    dataset: list[int], volume: list[int],
) -> dict:
    """One node of the reduce's octree (deepem3d.segmentation.octree_reduce) over the voxels
    of its blocks; at level 0 one block's exits. `volume` is the layer's voxel offset and size
    (6 integers), for the ids' translation when the octree is one block."""
    files = work_files(output_path)
    tree = Octree.of(grid, task_shape)
    if level == 0:
        task_id = block_at(node, dataset, task_shape)
        exits = ChunkExits.from_arrays(get_npz(files, f"exits/{task_id}.npz"))
        children = [reduce_leaf(exits, _linear(node, dataset, task_shape))]
        faces_in = len(exits.face_index)
    else:
        children, faces_in = [], 0
        for c in tree.children(level, node):
            arrays = get_npz(files, _reduce_key(level - 1, c))
            faces_in += int(arrays["face_count"])
            children.append(residual_from_arrays(arrays, partial(
                _read_faces, files, _reduce_key(level - 1, c, "faces"))))
        del arrays
    lo, hi = tree.bounds(level, node)
    region = np.asarray(dataset[3:]) - np.asarray(dataset[:3])
    low = (lo * np.asarray(task_shape)).tolist()
    high = np.minimum(hi * np.asarray(task_shape), region).tolist()
    resolved, residual = reduce_node(children, low, high, region.tolist())
    stored = sum(put_npz(files, _reduce_key(level, node, part), arrays)
                 for part, arrays in reduce_arrays(resolved, residual).items())
    out = {"nodes": sum(len(c) for c in children), "faces": faces_in,
           "residual_nodes": len(residual), "stored_bytes": stored}
    if tree.height == 0:
        out["local_labels"] = _write_table(files, node, dataset, volume, task_shape, resolved,
                                           NO_IDS)
    return out


@stage_task
def ReduceDownTask(  # noqa: N802
    output_path: str, level: int, node: list[int], grid: list[int], task_shape: list[int],
    dataset: list[int], volume: list[int],
) -> dict:
    """The reduce's way down at one node: each child's ids for what it handed up; at level 1,
    the children's block tables."""
    files = work_files(output_path)
    tree = Octree.of(grid, task_shape)
    resolved = resolved_from_arrays(get_npz(files, _reduce_key(level, node, "resolved")))
    above = NO_IDS if level == tree.height else _ids(get_npz(
        files, f"reduce-down/L{level}/{node_name(node)}.npz"))
    labels = 0
    for child in tree.children(level, node):
        keys = residual_from_arrays(get_npz(files, _reduce_key(level - 1, child)),
                                    NO_FACES).key  # sorted
        ids = down(resolved, above, keys)
        if level == 1:
            child_resolved = resolved_from_arrays(
                get_npz(files, _reduce_key(level - 1, child, "resolved")))
            labels += _write_table(files, child, dataset, volume, task_shape, child_resolved,
                                   (keys, ids))
        else:
            put_npz(files, f"reduce-down/L{level - 1}/{node_name(child)}.npz",
                    {"key": keys, "id": ids})
    return {"children": len(tree.children(level, node)), "local_labels": labels}


#: the ids a root's parent would hand down: none (sorted keys, ids)
NO_IDS = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))


def _ids(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(arrays["key"]).astype(np.uint64, copy=False),
            np.asarray(arrays["id"]).astype(np.uint64, copy=False))
