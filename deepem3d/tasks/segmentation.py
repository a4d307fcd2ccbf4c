"""Segmentation as queue tasks: smooth (optional), supervoxels, reduce, region graph, merge,
agglomerate, remap. Each task reads, calls a pure function of deepem3d.segmentation, writes, then
marks done; the stages run in this order with a barrier (their completion markers) between them.

The stages do, with I/O, exactly what `deepem3d.segmentation.pipeline.segment_chunked` does in
memory, so the segmentation layer is the same bytes whatever the task shape, and equal to
`pipeline.segment` on the whole array. Task blocks are aligned to the output's chunk grid.

==============  =====  ==========================================================================
stage           tasks  reads -> writes (under OUTPUT/)
==============  =====  ==========================================================================
smooth          block  map block + x,y halo -> the smoothed map layer segmentation/smoothed
                       (only with --sigma > 0; the stages below then read it as their map),
                       and the smoothed block's halo slabs segmentation/halo/B/*.npz
halo            block  map block -> its halo slabs segmentation/halo/B/*.npz (only without
                       --sigma, and with more than one block)
supervoxels     block  map block + the slabs around it -> segmentation/labels/B.npz (local labels),
                       exits/B.npz, local_graphs/B.npz (graph over local labels, low faces),
                       faces/B.npz (high faces)
reduce          1      every exits/B.npz -> segmentation/tables/B.npy (local label -> id)
region-graph    block  local_graphs/B.npz + tables/B.npy + the low neighbours' faces and tables
                       -> segmentation/graphs/B.npz (the block's graph over supervoxel ids)
merge-graph     1      every graphs/B.npz -> segmentation/graph.npz (the merged region graph)
agglomerate     1      graph.npz -> segmentation/segments.npz (supervoxel -> segment table)
remap           block  labels/B.npz + tables/B.npy + segments.npz -> the segmentation layer
                       (compressed_segmentation chunks encoded by deepem3d.cseg)
==============  =====  ==========================================================================

Planning, creating the tasks and running the stages: deepem3d.tasks.segmentation_stages.
B is a block id, x0-x1_y0-y1_z0-z1 in absolute voxels. Markers: OUTPUT/tasks/STAGE/done/*.json,
manifests: OUTPUT/tasks/STAGE/manifest.json (their parameters hold the run's key). Once the
supervoxels are complete, halo/ is deleted; once the reduce is, exits/; once region-graph is,
local_graphs/ and faces/; once merge-graph is, graphs/. What stays is the supervoxels, as
labels/ (per block, uint32 local labels, zstd) and tables/ (local label -> supervoxel id), and
graph.npz: a run with another
method, threshold or dust size redoes only agglomerate and remap (the smoothed map stays too:
it is a result worth viewing, and what a sigma's supervoxels were computed from).

Why halo slabs: a supervoxel task needs 1-2 voxels of the map beyond its block, and reading them
from the map decompresses each whole chunk they lie in (an interior 128^3 block of 64^3 chunks:
64 chunks for its 8). Each block publishes instead the few voxels its neighbours need
(`chunks.halo_slabs`: its first 2 and last 1 voxels along each axis), and a supervoxel task
decompresses only its own chunks and assembles the rest from slabs (`assemble_halo_box`). With
--sigma the smooth task, which has the smoothed block in memory, publishes them.

Why the map is read once more only: the supervoxel task has the map and the labels in memory, so it
accumulates the region graph of the pairs inside its block over local labels there, and keeps
the planes of local labels on its faces. After the reduce, a region-graph task needs only those
records, the tables and its three low neighbours' high faces (a few per cent of a block) to
have the block's graph over supervoxel ids, and the remap composes local label -> supervoxel ->
segment into one small table per block. No stage writes or reads a volume of uint64 supervoxel
ids (that layer's compressed_segmentation encoding and decoding were a third of the
segmentation's time on 128^3 blocks).

Ids: the reduce numbers supervoxels by the segmented region (--bounds) and then translates them
to 1 + the voxel's index in the whole layer (x + X * (y + Y * z) from its voxel offset). The map
is monotone, so every tie-break and every "smallest id" keeps its winner: a run on bounds gives
the segmentation of the cropped map, with ids that mean the same voxel in every run.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.exceptions import EmptyVolumeException
from cloudvolume.lib import Bbox
from taskqueue import queueable

from deepem3d.errors import InputError
from deepem3d.layers import cloudpath, write_block
from deepem3d.segmentation.agglomeration import agglomerate, remap
from deepem3d.segmentation.chunks import (
    SUPERVOXEL_HALO,
    Chunk,
    assemble_halo_box,
    halo_slabs,
)
from deepem3d.segmentation.region_graph import (
    ChunkGraph,
    RegionGraph,
    chunk_graph,
    finish_chunk_graph,
    merge_graphs,
)
from deepem3d.segmentation.smoothing import smooth_chunk, smoothing_bounds
from deepem3d.segmentation.supervoxels import (
    ChunkExits,
    relabel,
    resolve_supervoxels,
    supervoxel_chunk,
)
from deepem3d.tasks.markers import Stage

log = logging.getLogger("deepem3d.tasks.segmentation")

#: the stages, in order; the first six depend only on the map, sigma and the chunking
STAGES = ("smooth", "halo", "supervoxels", "reduce", "region-graph", "merge-graph",
          "agglomerate", "remap")
CHUNK_STAGES = STAGES[:6]
TUNING_STAGES = STAGES[6:]
WORK = "segmentation"  # the work directory, OUTPUT/segmentation/
#: where the supervoxels are kept: per block, local labels and their table to supervoxel ids
SUPERVOXEL_FILES = (f"{WORK}/labels/", f"{WORK}/tables/")
SMOOTHED_LAYER = f"{WORK}/smoothed"
COMPRESS = "zstd"  # how the work directory's files are compressed
COMPRESS_LEVEL = 1


# ---------------------------------------------------------------------------------------------
# Paths and storage


def block_id(bounds: Bbox) -> str:
    """A block's id and file name, as CloudVolume names chunks (x0-x1_y0-y1_z0-z1)."""
    return "_".join(f"{int(a)}-{int(b)}" for a, b in zip(bounds.minpt, bounds.maxpt))


def parse_block_id(task_id: str) -> Bbox:
    """The inverse of `block_id`."""
    ranges = [tuple(int(v) for v in part.split("-")) for part in task_id.split("_")]
    return Bbox([r[0] for r in ranges], [r[1] for r in ranges])


def smoothed_layer_path(output_path: str) -> str:
    """The smoothed map layer that the smooth stage writes, inside OUTPUT."""
    return f"{cloudpath(output_path).rstrip('/')}/{SMOOTHED_LAYER}"


def _files(output_path: str) -> CloudFiles:
    return CloudFiles(f"{cloudpath(output_path).rstrip('/')}/{WORK}")


def _narrow(array: np.ndarray) -> np.ndarray:
    """An unsigned array in the smallest unsigned type that holds its values. Region-graph
    ids and counts rarely need 64 bits: stored narrow, an ISBI 2012 graph shrinks from 86 to
    ~40 MB before compression, and zstd has half the work. Readers cast back (`from_arrays`)."""
    if array.dtype.kind != "u" or array.size == 0:
        return array
    top = int(array.max())
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype) if dtype().itemsize < array.itemsize else array
    return array


def _put_npz(files: CloudFiles, key: str, arrays: dict[str, np.ndarray]) -> int:
    """Store arrays, narrowed, as an npz compressed with zstd at level 1 (as small as zip's
    deflate, ten times as fast; level 1 is faster than zstd's default 3 and, on region graphs,
    smaller: measured 0.15 s and 14.4 MB against 0.2 s and 14.9 MB for an 86 MB graph)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: _narrow(a) for name, a in arrays.items()})
    files.put(key, buffer.getvalue(), content_type="application/octet-stream", compress=COMPRESS,
              compression_level=COMPRESS_LEVEL)
    return buffer.tell()


def _get_npz(files: CloudFiles, key: str) -> dict[str, np.ndarray]:
    data = files.get(key)
    if data is None:
        raise FileNotFoundError(f"{files.cloudpath}/{key} is missing: was its stage reset while "
                                "this task waited? Re-run `deepem3d segment`")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _local(files: CloudFiles) -> bool:
    """file:// paths: CloudFiles' batch calls run a thread pool that polls with sleeps
    (about 0.1 s per call, measured), where a loop of plain reads or writes takes 2 ms."""
    return files.protocol == "file"


def _get_many_npz(files: CloudFiles, keys: list[str]) -> Iterable[dict[str, np.ndarray]]:
    """npz files in the order of `keys`, fetched in parallel batches (one by one on file://)."""
    step = 1 if _local(files) else 64
    for start in range(0, len(keys), step):
        batch = keys[start:start + step]
        if step == 1:
            fetched = {batch[0]: files.get(batch[0])}
        else:
            fetched = {r["path"]: r["content"] for r in files.get(batch, parallel=1)}
        for key in batch:
            if fetched.get(key) is None:
                raise FileNotFoundError(f"{files.cloudpath}/{key} is missing")
            with np.load(io.BytesIO(fetched[key]), allow_pickle=False) as npz:
                yield {name: npz[name] for name in npz.files}


def _put_many(files: CloudFiles, items: list[dict]) -> None:
    """Write {"path", "content", "compress"} items: one batch, or a loop on file://."""
    if _local(files):
        for item in items:
            files.put(item["path"], item["content"], compress=item["compress"],
                      compression_level=COMPRESS_LEVEL, content_type="application/octet-stream")
    else:
        files.puts(items, content_type="application/octet-stream",
                   compression_level=COMPRESS_LEVEL)


def _cutout(vol: CloudVolume, lo, hi) -> np.ndarray:
    try:
        return np.asarray(vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    except EmptyVolumeException:
        raise InputError(f"{vol.cloudpath} has missing chunks in {list(lo)}..{list(hi)}: "
                         "complete that layer first") from None


def _map_box(vol: CloudVolume, lo, hi) -> np.ndarray:
    """The map over [lo, hi): x, y, z for a boundary map, x, y, z, 3 for affinities."""
    box = _cutout(vol, lo, hi)
    return box[..., 0] if box.shape[3] == 1 else box


def _volume(path: str, mip: int, compress: bool | None = None) -> CloudVolume:
    # not cached: a layer re-created by --overwrite must not be seen with its old info
    return CloudVolume(path, mip=mip, progress=False, non_aligned_writes=False,
                       compress=compress)


# ---------------------------------------------------------------------------------------------
# Task bookkeeping shared by every stage


def _should_run(stage: Stage, task_id: str, key: str) -> bool:
    """False for a task whose marker exists, or one left in a queue by an earlier run.

    A task carries the key of the run that made it; a stage's manifest holds the current
    run's. A stale task (from before an --overwrite with other parameters) must not write.
    """
    if stage.is_done(task_id):
        return False
    manifest = stage.manifest() or {}
    if manifest.get("parameters", {}).get("key") != key:
        log.warning("task %s of stage %s belongs to an earlier run: skipped", task_id, stage.name)
        return False
    return True


def _mark(stage: Stage, task_id: str, task: str, start: float, **record) -> None:
    stage.mark_done(task_id, {
        "task": task,
        "seconds": round(time.perf_counter() - start, 4),
        **record,
        "worker_peak_rss_mib": round(_peak_rss() / 2**20, 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def _peak_rss() -> int:
    """Peak resident bytes of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _chunk(bounds: list[int], dataset: list[int]) -> tuple[Chunk, np.ndarray]:
    """The block as a Chunk of the segmented region, and the region's absolute origin."""
    origin = np.asarray(dataset[:3], dtype=int)
    lo, hi = np.asarray(bounds[:3], dtype=int), np.asarray(bounds[3:], dtype=int)
    shape = np.asarray(dataset[3:], dtype=int) - origin
    return Chunk(tuple(lo - origin), tuple(hi - lo), tuple(shape)), origin


# ---------------------------------------------------------------------------------------------
# The tasks (taskqueue registers them by module and function name: N802 is on purpose)


@queueable
def SmoothTask(  # noqa: N802
    map_path: str, output_path: str, bounds: list[int], dataset: list[int], mip: int,
    sigma: float, key: str, publish_halo: bool = False,
) -> None:
    """DeepEM3D's in-plane Gaussian on one block of the map (read with its x, y halo).

    Writes the block, uint8 round(255 p), to the smoothed layer (mip 0 there: it has the map's
    geometry at `mip`). The halo stops at the segmented region, which is smoothed as if it were
    the volume, so every block's voxels equal the whole region's `smooth_map` bit for bit.
    With `publish_halo`, also writes the smoothed block's halo slabs (the halo stage's work).
    """
    stage, task_id = Stage(output_path, "smooth"), block_id(Bbox(bounds[:3], bounds[3:]))
    if not _should_run(stage, task_id, key):
        return
    start = time.perf_counter()
    chunk, origin = _chunk(bounds, dataset)
    lo, hi = smoothing_bounds(chunk, sigma)
    box = _map_box(_volume(map_path, mip), origin + lo, origin + hi)
    smoothed = smooth_chunk(box, lo, chunk, sigma)
    vol = _volume(smoothed_layer_path(output_path), 0)
    write_block(vol, bounds[:3], smoothed)
    if publish_halo:
        _put_halo(output_path, task_id, smoothed)
    _mark(stage, task_id, "SmoothTask", start, voxels=int(np.prod(chunk.shape)),
          read_voxels=int(np.prod(np.subtract(hi, lo))))


def _halo_sides(values: np.ndarray) -> tuple[int, int]:
    """(low, high) halo of the supervoxel stage for a map block (x, y, z or x, y, z, 3)."""
    return SUPERVOXEL_HALO["boundary" if values.ndim == 3 else "affinity"]


def _put_halo(output_path: str, task_id: str, block: np.ndarray) -> None:
    files = _files(output_path)
    for name, slab in halo_slabs(block, *_halo_sides(block)).items():
        _put_npz(files, f"halo/{task_id}/{name}.npz", {"slab": slab})


@queueable
def HaloTask(  # noqa: N802
    map_path: str, output_path: str, bounds: list[int], mip: int, key: str,
) -> None:
    """Publish the map voxels of one block that its neighbours' supervoxel tasks read as halo
    (its first 2 and last 1 voxels along each axis), so that those decompress no chunk of it."""
    stage, task_id = Stage(output_path, "halo"), block_id(Bbox(bounds[:3], bounds[3:]))
    if not _should_run(stage, task_id, key):
        return
    start = time.perf_counter()
    block = _map_box(_volume(map_path, mip), bounds[:3], bounds[3:])
    _put_halo(output_path, task_id, block)
    _mark(stage, task_id, "HaloTask", start, voxels=int(np.prod(block.shape[:3])))


def _read_box(vol: CloudVolume, output_path: str, bounds: list[int], dataset: list[int],
              task_shape: list[int] | None, box_lo, box_hi) -> np.ndarray:
    """The map over box_lo..box_hi (absolute): the block from its own chunks and, with
    `task_shape` (the halo stage or the smooth stage published slabs), the rest from the
    slabs of the blocks around it; without, one cutout of the whole box."""
    if task_shape is None:
        return _map_box(vol, box_lo, box_hi)
    files = _files(output_path)

    def slab(lo, hi, name):
        return _get_npz(files, f"halo/{block_id(Bbox(lo, hi))}/{name}.npz")["slab"]

    return assemble_halo_box(_map_box(vol, bounds[:3], bounds[3:]), (bounds[:3], bounds[3:]),
                             (box_lo, box_hi), (dataset[:3], dataset[3:]), task_shape, slab)


@queueable
def SupervoxelTask(  # noqa: N802
    map_path: str, output_path: str, bounds: list[int], dataset: list[int], mip: int, key: str,
    task_shape: list[int] | None = None,
) -> None:
    """Steepest-descent basins of one block (map read with the 1-2 voxel halo they need), and
    the block's region graph over their local labels (the only stage that reads the map).

    `bounds` is the block, `dataset` the segmented region, both x0,y0,z0,x1,y1,z1 absolute.
    With `task_shape` (the grid's), the halo comes from the slabs the halo or smooth stage
    published, else from the map. Writes the block's local labels, its exits (what the reduce
    needs), its `ChunkGraph` and its high faces (what the low neighbours' region-graph tasks
    need) to the work dir.
    """
    stage, task_id = Stage(output_path, "supervoxels"), block_id(Bbox(bounds[:3], bounds[3:]))
    if not _should_run(stage, task_id, key):
        return
    start = time.perf_counter()
    vol = _volume(map_path, mip)
    kind = "boundary" if vol.num_channels == 1 else "affinity"
    chunk, origin = _chunk(bounds, dataset)
    lo, hi = chunk.bounds(*SUPERVOXEL_HALO[kind])
    box = _read_box(vol, output_path, bounds, dataset, task_shape, origin + lo, origin + hi)
    labels, exits = supervoxel_chunk(box, lo, chunk)
    local = chunk_graph(labels, box, lo, chunk)
    arrays = local.to_arrays()
    faces = {name: arrays.pop(name) for name in [f"high_labels_{c}" for c in range(3)]}
    files = _files(output_path)
    stored = sum(_put_npz(files, f"{kind}/{task_id}.npz", data) for kind, data in (
        ("labels", {"labels": labels}), ("exits", exits.to_arrays()),
        ("local_graphs", arrays), ("faces", faces)))
    _mark(stage, task_id, "SupervoxelTask", start, voxels=int(labels.size),
          local_labels=exits.n_labels, local_edges=local.graph.n_edges,
          exits_bytes=exits.nbytes, stored_bytes=stored)


def volume_ids(table: np.ndarray, origin, region_shape, volume_shape) -> np.ndarray:
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


@queueable
def ReduceTask(  # noqa: N802
    output_path: str, dataset: list[int], volume: list[int], key: str,
) -> None:
    """Resolve every block's exits into supervoxel ids: one table per block.

    `volume` is the layer's voxel offset and size (6 integers), for the ids' translation.
    Memory grows with the region: 1.4-2.6 bytes per voxel with 128^3 blocks (measured by
    benchmarks/segmentation.py; the exits are a quarter of it and shrink with larger blocks).
    """
    stage = Stage(output_path, "reduce")
    if not _should_run(stage, "reduce", key):
        return
    start = time.perf_counter()
    ids = Stage(output_path, "supervoxels").task_ids()
    files = _files(output_path)
    exits = [ChunkExits.from_arrays(a) for a in _get_many_npz(files, [f"exits/{i}.npz"
                                                                      for i in ids])]
    tables = resolve_supervoxels(exits)
    origin = np.asarray(dataset[:3]) - np.asarray(volume[:3])
    shape = np.asarray(dataset[3:]) - np.asarray(dataset[:3])
    supervoxels = 0
    puts = []
    for task_id, table in zip(ids, tables):
        table = volume_ids(table, origin, shape, volume[3:])
        buffer = io.BytesIO()
        np.save(buffer, table)
        puts.append({"path": f"tables/{task_id}.npy", "content": buffer.getvalue(),
                     "compress": COMPRESS})
        supervoxels += int(table.size) - 1
    _put_many(files, puts)
    _mark(stage, "reduce", "ReduceTask", start, blocks=len(ids),
          exits_bytes=sum(e.nbytes for e in exits), local_labels=supervoxels)


def _get_table(files: CloudFiles, task_id: str) -> np.ndarray:
    data = files.get(f"tables/{task_id}.npy")
    if data is None:
        raise FileNotFoundError(f"{files.cloudpath}/tables/{task_id}.npy is missing: was its "
                                "stage reset while this task waited? Re-run `deepem3d segment`")
    return np.load(io.BytesIO(data), allow_pickle=False)


@queueable
def RegionGraphTask(  # noqa: N802
    output_path: str, bounds: list[int], below: list[str | None], key: str,
) -> None:
    """The region graph of the voxel pairs one block owns, over supervoxel ids.

    `below[c]` is the id of the block under this one on axis c (x, y, z), None at the
    segmented region's low face. Reads the block's `ChunkGraph` and table and, per low
    neighbour, its high face and table: no map, no label volume.
    """
    stage, task_id = Stage(output_path, "region-graph"), block_id(Bbox(bounds[:3], bounds[3:]))
    if not _should_run(stage, task_id, key):
        return
    start = time.perf_counter()
    files = _files(output_path)
    local = ChunkGraph.from_arrays(_get_npz(files, f"local_graphs/{task_id}.npz"))
    neighbours = []
    for c, other in enumerate(below):
        if other is None:
            neighbours.append(None)
            continue
        face = _get_npz(files, f"faces/{other}.npz")[f"high_labels_{c}"]
        neighbours.append((face.astype(np.uint32, copy=False), _get_table(files, other)))
    graph = finish_chunk_graph(local, _get_table(files, task_id), neighbours)
    stored = _put_npz(files, f"graphs/{task_id}.npz", graph.to_arrays())
    voxels = int(np.prod(np.subtract(bounds[3:], bounds[:3])))
    _mark(stage, task_id, "RegionGraphTask", start, voxels=voxels,
          supervoxels=int(graph.ids.size), edges=graph.n_edges, stored_bytes=stored)


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


@queueable
def MergeGraphTask(output_path: str, key: str) -> None:  # noqa: N802
    """Merge every block's region graph into the one graph the agglomeration needs."""
    stage = Stage(output_path, "merge-graph")
    if not _should_run(stage, "merge-graph", key):
        return
    start = time.perf_counter()
    ids = Stage(output_path, "region-graph").task_ids()  # sorted: a fixed order
    files = _files(output_path)
    graph = merge_in_batches(
        RegionGraph.from_arrays(a) for a in _get_many_npz(files, [f"graphs/{i}.npz" for i in ids])
    )
    stored = _put_npz(files, "graph.npz", graph.to_arrays())
    _mark(stage, "merge-graph", "MergeGraphTask", start, blocks=len(ids),
          supervoxels=int(graph.ids.size), edges=graph.n_edges, graph_bytes=graph.nbytes,
          stored_bytes=stored)


@queueable
def AgglomerateTask(  # noqa: N802
    output_path: str, method: str, threshold: float, dust_size: int, dust_mode: str, key: str,
) -> None:
    """Agglomerate the merged region graph: the supervoxel -> segment table."""
    stage = Stage(output_path, "agglomerate")
    if not _should_run(stage, "agglomerate", key):
        return
    start = time.perf_counter()
    files = _files(output_path)
    graph = RegionGraph.from_arrays(_get_npz(files, "graph.npz"))
    loaded = time.perf_counter()
    (segments,) = agglomerate(graph, method, [float(threshold)], int(dust_size), dust_mode)
    seconds = time.perf_counter() - loaded
    _put_npz(files, "segments.npz", {"ids": graph.ids, "segments": segments,
                                     "key": np.array(key)})
    count = int(np.count_nonzero(segments == graph.ids))  # a segment's id is one of its own
    _mark(stage, "agglomerate", "AgglomerateTask", start, supervoxels=int(graph.ids.size),
          edges=graph.n_edges, segments=count, agglomerate_seconds=round(seconds, 4))


@lru_cache(maxsize=2)
def _segments(output_path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The agglomeration's table, loaded once per worker process and run."""
    arrays = _get_npz(_files(output_path), "segments.npz")
    if str(arrays["key"]) != key:
        raise RuntimeError(f"{output_path}/{WORK}/segments.npz belongs to another run")
    return arrays["ids"].astype(np.uint64), arrays["segments"].astype(np.uint64)


@queueable
def RemapTask(output_path: str, bounds: list[int], key: str) -> None:  # noqa: N802
    """Write one block of the segmentation layer: its local labels through their table and
    the agglomeration's."""
    stage, task_id = Stage(output_path, "remap"), block_id(Bbox(bounds[:3], bounds[3:]))
    if not _should_run(stage, task_id, key):
        return
    start = time.perf_counter()
    ids, segments = _segments(cloudpath(output_path), key)
    files = _files(output_path)
    labels = _get_npz(files, f"labels/{task_id}.npz")["labels"]
    # local label -> supervoxel -> segment, composed into one table of the block's labels
    seg = relabel(labels, remap(_get_table(files, task_id), ids, segments))
    vol = _volume(cloudpath(output_path), 0)
    write_block(vol, bounds[:3], seg)
    _mark(stage, task_id, "RemapTask", start, voxels=int(seg.size))
