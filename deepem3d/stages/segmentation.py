"""The segmentation's plan: check the inputs, decide what a run reuses, declare its stages.

The tasks are in the modules of each arrow of the data flow: deepem3d.stages.supervoxels (map ->
supervoxels), deepem3d.stages.graph (-> region graph per block), deepem3d.stages.octree (->
segments, node by node over a tree of the blocks); what they leave for each other is
described in deepem3d.stages.workdir. They do, with I/O, exactly what
`deepem3d.segmentation.pipeline.segment_chunked` does in memory, so the layer is the same bytes
whatever the task shape, and equal to `pipeline.segment` on the whole array.

A plan is "new", "resume" (same parameters: finished tasks are skipped), "retune" (same map,
sigma, bounds and task shape, another method, threshold or dust: the smoothed map, the
supervoxels and the blocks' region graphs are kept, the octree's stages and remap run again) or
"rebuild". Which one is read from the stages' run records, whose key is a digest of what
decides that stage's output. What each stage's tasks cost (memory, seconds) is
deepem3d.stages.segment_costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.segmentation.octree import Octree
from deepem3d.segmentation.smoothing import smoothing_halo
from deepem3d.stages.blocks import (
    BlockGrid,
    align_to_chunks,
    block_grid,
    block_id,
    bounds_list,
    check_bounds,
    check_task_shape,
    node_name,
)
from deepem3d.stages.frame import Markers, Stage, TaskList, digest
from deepem3d.stages.graph import RegionGraphTask
from deepem3d.stages.octree import OctreeDownTask, OctreeNodeTask, RemapTask
from deepem3d.stages.segment_costs import (
    AGGLOMERATE_SECONDS_PER_VOXEL,
    DEFAULT_EDGES_PER_VOXEL,
    SECONDS_PER_VOXEL,
    SMOOTH_EDGES_PER_VOXEL,
    SegmentCosts,
)
from deepem3d.stages.supervoxels import (
    HaloTask,
    ReduceDownTask,
    ReduceNodeTask,
    SmoothTask,
    SupervoxelTask,
)
from deepem3d.stages.workdir import SMOOTHED_LAYER, SUPERVOXEL_FILES, WORK, smoothed_layer_path
from deepem3d.storage.layers import (
    check_layer_role,
    check_output_apart,
    cloudpath,
    create_layer,
    delete_prefixes,
    info_exists,
    layer_geometry,
    layer_holds_data,
    layer_processing,
    open_layer,
    record_provenance,
)
from deepem3d.storage.sharding import block_sharding, check_on_shards
from deepem3d.storage.sharding import default_chunk as sharded_chunk
from deepem3d.storage.sharding import shard_shape as shape_of
from deepem3d.units import format_bounds, format_bytes

#: the stages that depend only on the map, sigma and the chunking, in order, the reduce's octree
#: (`REDUCE_STAGES`: a stage per level up, per level down) between supervoxels and region-graph;
#: then come the agglomeration's octree (`SegmentPlan.tuning_stages`) and remap
CHUNK_STAGES = ("smooth", "halo", "supervoxels", "region-graph")
REDUCE_STAGES = ("reduce-L", "tables-L")
#: the prefixes of the agglomeration octree's stage names, and what its files live under
OCTREE_STAGES = ("agglomerate-L", "segments-L", "dust-L", "dust-segments-L")
OCTREE_WORK = f"{WORK}/octree/"
METHODS = ("mean", "watershed")
DUST_MODES = ("merge", "zero")
MAP_DTYPES = ("uint8", "float32")
DEFAULT_TASK_SHAPE = (512, 512, 64)  # rounded up to whole output chunks
MAX_SIGMA = 16.0  # a halo of 64 voxels; beyond it the map is blurred past any membrane


# ---------------------------------------------------------------------------------------------
# Planning: check everything, decide what a run reuses; writes nothing


@dataclass
class SegmentPlan(SegmentCosts):
    """What `deepem3d segment` will do, computed without writing anything."""

    map_path: str
    output_path: str
    mip: int
    kind: str
    map_dtype: str
    method: str
    threshold: float
    dust_size: int
    dust_mode: str
    resolution: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    size: tuple[int, int, int]
    chunk_size: tuple[int, int, int]
    task_shape: tuple[int, int, int]
    bounds: Bbox
    blocks: BlockGrid
    map_fingerprint: str
    #: the map's provenance records what wrote its data: without it, nothing shows that data
    #: unchanged since the kept supervoxels were made, and --overwrite makes them again
    map_recorded: bool = True
    #: DeepEM3D's in-plane Gaussian on the map before the watershed, in voxels; 0: none
    sigma: float = 0.0
    #: the output layers' sharding spec (a shard per block: deepem3d.storage.sharding); None:
    #: a file per chunk
    sharding: dict | None = None
    #: region-graph edges per voxel the plan sizes the octree's tasks with (a map's density is
    #: unknown before its supervoxels exist: --edges-per-voxel)
    edges_per_voxel: float = DEFAULT_EDGES_PER_VOXEL
    #: where that density comes from, in describe()'s words
    density_source: str = "--edges-per-voxel"
    #: "new" (nothing there), "resume" (same parameters), "retune" (keep the supervoxels and
    #: graph, redo agglomerate + remap), "rebuild" (everything again)
    action: str = "new"
    reset_layer: bool = False
    reset_chunk_stages: bool = False
    reset_tuning_stages: bool = False
    notes: list[str] = field(default_factory=list)
    #: one-line warnings the CLI prints on stderr (`deepem3d: warning: ...`)
    warnings: list[str] = field(default_factory=list)

    @property
    def region(self) -> list[int]:
        return [int(v) for v in (*self.bounds.minpt, *self.bounds.maxpt)]

    @property
    def volume(self) -> list[int]:
        return [*self.voxel_offset, *self.size]

    @property
    def grid(self) -> list[int]:
        """Blocks per axis."""
        return [-(-int(s) // t) for s, t in zip(self.bounds.size3(), self.task_shape)]

    @property
    def octree(self) -> Octree:
        return Octree.of(self.grid, self.task_shape)

    @property
    def merges_dust(self) -> bool:
        return self.dust_size > 0 and self.dust_mode == "merge"

    def tuning_stages(self) -> tuple[str, ...]:
        """The stages after the chunk stages: the octree's levels up, then down, for the
        segments and (dust merge) for the ids after dust; then remap."""
        height = self.octree.height
        up = tuple(range(height + 1))
        down = tuple(range(height, 0, -1))
        names = [f"agglomerate-L{k}" for k in up] + [f"segments-L{k}" for k in down]
        if self.merges_dust:
            names += [f"dust-L{k}" for k in up] + [f"dust-segments-L{k}" for k in down]
        return (*names, "remap")

    def chunk_stages(self) -> tuple[str, ...]:
        """The stages that depend only on the map, sigma and the chunking, in order."""
        height = self.octree.height
        reduce = [f"reduce-L{k}" for k in range(height + 1)]
        reduce += [f"tables-L{k}" for k in range(height, 0, -1)]
        return (*CHUNK_STAGES[:3], *reduce, CHUNK_STAGES[3])

    @property
    def stages(self) -> tuple[str, ...]:
        return self.chunk_stages() + self.tuning_stages()

    def chunk_parameters(self) -> dict:
        """What decides the supervoxels and the region graph."""
        return {
            "map": self.map_path,
            "map_fingerprint": self.map_fingerprint,
            "mip": self.mip,
            "kind": self.kind,
            "region": self.region,
            "task_shape": list(self.task_shape),
            "chunk_size": list(self.chunk_size),
            "sigma": self.sigma,
        }

    @property
    def smoothed(self) -> bool:
        return self.sigma > 0

    @property
    def segmented_map(self) -> tuple[str, int]:
        """(path, mip) of the map the supervoxel and region-graph tasks read: the smoothed
        layer (at mip 0, it has the map's geometry at --mip) when --sigma > 0."""
        if self.smoothed:
            return smoothed_layer_path(self.output_path), 0
        return self.map_path, self.mip

    def tuning_parameters(self) -> dict:
        """What decides the segments, given the graph."""
        return {"method": self.method, "threshold": self.threshold,
                "dust_size": self.dust_size, "dust_mode": self.dust_mode}

    @property
    def chunk_key(self) -> str:
        return digest(self.chunk_parameters())

    @property
    def tuning_key(self) -> str:
        return digest({**self.chunk_parameters(), **self.tuning_parameters()})

    def key(self, stage: str) -> str:
        return self.chunk_key if is_chunk_stage(stage) else self.tuning_key

    def stage_parameters(self, stage: str) -> dict:
        """What the stage's run record keeps: the parameters behind its key."""
        if is_chunk_stage(stage):
            return self.chunk_parameters()
        return {**self.chunk_parameters(), **self.tuning_parameters()}

    @property
    def segmentation_bytes(self) -> int:
        """An upper bound of the segmentation layer's size: uint64 per voxel, before the
        compressed_segmentation encoding (which typically stores a few bits per voxel)."""
        return 8 * math.prod(int(s) for s in self.bounds.size3())

    @property
    def publishes_halo(self) -> bool:
        """Whether blocks publish halo slabs: only when they have neighbours to read them."""
        return len(self.blocks) > 1

    def task_count(self, stage: str) -> int:
        if stage == "smooth" and not self.smoothed:
            return 0
        if stage == "halo" and (self.smoothed or not self.publishes_halo):
            return 0  # the smooth tasks publish the slabs, or no block has a neighbour
        if stage.startswith(OCTREE_STAGES + REDUCE_STAGES):
            return math.prod(self.octree.shape(int(stage.rsplit("L", 1)[1])))
        return len(self.blocks)

    def stage_memory_bytes(self, stage: str, edges_per_voxel: float | None = None) -> int:
        """Peak bytes of the stage's largest task at `edges_per_voxel` (default: the plan's)."""
        density = self.edges_per_voxel if edges_per_voxel is None else edges_per_voxel
        if stage.startswith(REDUCE_STAGES):
            return self.reduce_memory_bytes(int(stage.rsplit("L", 1)[1]))
        if stage.startswith(OCTREE_STAGES):
            level = int(stage.rsplit("L", 1)[1])
            memory = self.node_memory_bytes(level, density)
            down = stage.startswith(("segments-L", "dust-segments-L"))
            return memory // 4 if down else memory  # a down task holds names, not edges
        return self.task_memory_bytes

    def stage_seconds(self, stage: str) -> float:
        """Seconds of one task of the stage on one core (`SECONDS_PER_VOXEL`)."""
        per_voxel = (AGGLOMERATE_SECONDS_PER_VOXEL if stage.startswith(OCTREE_STAGES)
                     else SECONDS_PER_VOXEL[stage.split("-L")[0]])
        return per_voxel * math.prod(self.block_extent)

    @property
    def block_extent(self) -> list[int]:
        """The largest block's shape: the task shape, clipped to the segmented region."""
        return [min(t, int(s)) for t, s in zip(self.task_shape, self.bounds.size3())]

    def describe(self) -> str:
        shape = " x ".join(map(str, self.block_extent))
        counts = ", ".join(f"{s} {self.task_count(s)}" for s in self.stages)
        what = {
            "new": "computing every stage",
            "resume": "resuming: finished tasks are skipped",
            "retune": ("reusing the smoothed map, " if self.smoothed else "reusing ")
            + "the supervoxels and region graphs, redoing the octree's stages and remap",
            "rebuild": "replacing everything OUTPUT held",
        }[self.action]
        dust = f", dust < {self.dust_size} voxels ({self.dust_mode})" if self.dust_size else ""
        smooth = (f", in-plane Gaussian sigma {self.sigma:g} first (halo "
                  f"{smoothing_halo(self.sigma)}; kept at {smoothed_layer_path(self.output_path)})"
                  if self.smoothed else "")
        lines = [
            f"segment {self.map_path} ({self.kind} map, {self.map_dtype}) into "
            f"{self.output_path}: {self.method}, threshold {self.threshold:g}{dust}{smooth}; "
            f"{what}",
            f"{len(self.blocks)} block(s) of {shape} voxels (x,y,z) over "
            f"{self.bounds.minpt.tolist()}..{self.bounds.maxpt.tolist()}; tasks per stage: "
            f"{counts}; about {self.task_memory_bytes / 2**20:.3g} MiB per block task",
        ]
        if self.sharding is not None:
            shard = shape_of(self.sharding, self.size, self.chunk_size)
            lines.append(f"sharded: a shard file per block, of {' x '.join(map(str, shard))} "
                         f"voxels in chunks of {' x '.join(map(str, self.chunk_size))} "
                         + ("(segmentation and smoothed map)" if self.smoothed
                            else "(segmentation)"))
        tree = self.octree
        lines.append(f"tree of {tree.height + 1} level(s) over {'x'.join(map(str, self.grid))}"
                     " blocks (children per level: "
                     + (", ".join("x".join(map(str, f)) for f in tree.factors) or "none") + "); "
                     f"sized at {self.edges_per_voxel:.3g} region-graph edges per voxel "
                     f"({self.density_source}), and for a smooth map at "
                     f"{SMOOTH_EDGES_PER_VOXEL:g}:")
        for stage in (*(s for s in self.chunk_stages() if s.startswith(REDUCE_STAGES)),
                      *(s for s in self.tuning_stages() if s != "remap")):
            smooth = self.stage_memory_bytes(stage, SMOOTH_EDGES_PER_VOXEL)
            lines.append(f"  {stage:<22}{self.task_count(stage):>9} task(s), largest about "
                         f"{format_bytes(self.stage_memory_bytes(stage))}; smooth "
                         f"{format_bytes(smooth)}")
        return "\n".join(lines + self.notes)

    def check_task_memory(self, limit: int) -> None:
        """An InputError naming the first stage whose largest task needs more than `limit`."""
        for stage in self.stages:
            if self.task_count(stage) == 0:
                continue
            need = self.stage_memory_bytes(stage)
            if need > limit:
                # an octree node above the blocks holds faces across the volume: a smaller
                # task shape does not shrink it, a smaller region does
                upper = "-L" in stage and int(stage.rsplit("L", 1)[1]) > 0
                fix = ("segment a smaller --bounds" if upper else "choose a smaller --task-shape")
                raise InputError(f"stage {stage} needs about {format_bytes(need)} per task, "
                                 f"above --max-task-memory {format_bytes(limit)} ({fix}, or "
                                 "workers with more memory)")


def measured_edges_per_voxel(region_graph: Stage) -> float | None:
    """Region-graph edges per voxel as the finished region-graph tasks counted them (their
    completion markers), or None before any finished."""
    records = region_graph.markers.records()
    voxels = sum(int(r.get("voxels", 0)) for r in records)
    edges = sum(int(r.get("edges", 0)) for r in records)
    return edges / voxels if voxels and edges else None


def recorded_settings(map_path: str) -> dict | None:
    """The segmentation settings the map's model records (written into the map's provenance
    by `deepem3d infer`), or None."""
    for entry in reversed(layer_processing(map_path)):
        settings = (entry.get("method") or {}).get("segmentation")
        if settings:
            return dict(settings)
    return None


def choose_settings(given: dict, recorded: dict | None,
                    where: str) -> tuple[dict, str | None]:
    """The method, threshold, sigma and dust size of a run: with neither method nor threshold
    given, the `recorded` settings (those of the map's model) fill whatever was not given;
    otherwise the defaults (no smoothing, no dust merging). `where` names the map or model in
    messages. Returns (settings, a line saying what was chosen, or None)."""
    if given.get("method") is None and given.get("threshold") is None:
        if recorded is None:
            raise InputError(f"{where} records no segmentation settings (its model is not a "
                             "shipped one, or another tool made it): give --method and "
                             "--threshold (e.g. mean 0.5; `deepem3d tune` then chooses them "
                             "on a labelled region)")
        keys = ("method", "threshold", "sigma", "dust_size")
        chosen = {k: given[k] if given.get(k) is not None else recorded[k] for k in keys}
        what = ", ".join(f"{k} {chosen[k]}" for k in keys if given.get(k) is None)
        line = f"settings recorded by the map's model: {what}"
        mine = ", ".join(f"{k} {chosen[k]}" for k in keys if given.get(k) is not None)
        if mine:
            line += f"; given: {mine}"
        if recorded.get("resolution"):  # the model ran at another resolution (--force)
            line += ("; they were chosen at the model's "
                     f"{','.join(f'{r:g}' for r in recorded['resolution'])} nm and the map was "
                     "made at another with --force: choose them on a labelled region with "
                     "`deepem3d tune`")
        return chosen, line
    missing = [f"--{k}" for k in ("method", "threshold") if given.get(k) is None]
    if missing:
        raise InputError(f"give {' and '.join(missing)} too (or neither, to use the settings "
                         "the map's model records)")
    return {"sigma": 0.0, "dust_size": 0, **{k: v for k, v in given.items() if v is not None}}, None


def settings_for_map(map_path: str, given: dict) -> tuple[dict, str | None]:
    """`choose_settings` with the settings the map layer records; a layer that is positively
    no map is refused first (rather than for recording no settings)."""
    recorded = recorded_settings(map_path)
    if recorded is None and given.get("method") is None and given.get("threshold") is None:
        check_layer_role(map_path, "map")
    return choose_settings(given, recorded, map_path)


#: provenance entries that add levels to a layer without changing its full-resolution data
DOWNSAMPLING_TASKS = ("DownsampleTask", "ImageShardDownsampleTask")


def map_fingerprint(map_path: str, mip: int = 0,
                    processing: list[dict] | None = None) -> str:
    """A digest of what the map layer's data at `mip` comes from: its info less the other
    scales, and what its provenance says processed it, less downsampling. A re-made map is
    another map; the same map with mip levels added (igneous adds those to the info and to
    the provenance's processing and sources) is not."""
    files = CloudFiles(cloudpath(map_path))
    info = files.get_json("info") or {}
    info = {**info, "scales": (info.get("scales") or [])[mip:mip + 1]}
    if processing is None:  # (`map_processing`, read once by a caller that needs it too)
        processing = map_processing(map_path)
    return digest({"info": info, "processing": processing})[:20]


def map_processing(map_path: str) -> list[dict]:
    """What the map's provenance says wrote its full-resolution data: its processing, less
    downsampling. Empty for a map another tool wrote without provenance, whose fingerprint is
    then its info alone (the same after its voxels are rewritten in place)."""
    return [entry for entry in layer_processing(map_path)
            if (entry.get("method") or {}).get("task") not in DOWNSAMPLING_TASKS]


def _manifest_key(output_path: str, stage: str) -> str | None:
    return Markers(output_path, stage).current_key()


def _check_block_size(plan: SegmentPlan) -> None:
    """The supervoxel kernels index a block's voxels (halo included) with 32 bits."""
    extent = plan.block_extent
    if math.prod(e + 3 for e in extent) >= 2**31:
        raise InputError(
            f"--task-shape {','.join(map(str, plan.task_shape))} makes blocks of "
            f"{' x '.join(map(str, extent))} voxels: a block with its halo must hold fewer "
            "than 2**31 (about 1,290^3), and would need about 70 bytes per voxel anyway; "
            "choose a smaller --task-shape")


def plan_segment(
    map_path: str,
    output_path: str,
    *,
    method: str,
    threshold: float,
    dust_size: int = 0,
    dust_mode: str = "merge",
    task_shape: tuple[int, int, int] | None = None,
    chunk_size: tuple[int, int, int] | None = None,
    bounds: Bbox | None = None,
    mip: int = 0,
    overwrite: bool = False,
    sigma: float = 0.0,
    edges_per_voxel: float = DEFAULT_EDGES_PER_VOXEL,
    max_task_memory: int | None = None,
    sharded: bool = False,
    keep_unchanged: bool = False,
) -> SegmentPlan:
    """Check every input and decide what the run does; reads infos and manifests only.
    `overwrite` replaces what OUTPUT holds, even a segmentation made the same way; with
    `keep_unchanged`, only one made otherwise (`deepem3d run --overwrite`).

    `sigma` > 0 adds the smooth stage: DeepEM3D's in-plane Gaussian (in voxels) on the map,
    written to OUTPUT/segmentation/smoothed, which the later stages then segment. The octree's
    tasks are sized at `edges_per_voxel`; a plan whose largest task needs more than
    `max_task_memory` bytes is refused before anything is written. `sharded` writes the
    segmentation and the smoothed map a shard file per block (the blocks on the shard grid;
    without --chunk-size, chunks of the block split in 2^k per axis).
    """
    map_path, output_path = cloudpath(map_path).rstrip("/"), cloudpath(output_path).rstrip("/")
    check_output_apart(output_path, {"map": map_path})
    if method not in METHODS:
        raise InputError(f"--method {method!r}: choose mean or watershed")
    if not (isinstance(threshold, int | float) and math.isfinite(threshold)
            and 0 <= threshold <= 1):
        raise InputError(f"--threshold {threshold} is outside [0, 1]: mean thresholds are on "
                         "1 - mean affinity, watershed thresholds are h; both lie in [0, 1]")
    if dust_size < 0:
        raise InputError(f"--dust-size {dust_size} must be 0 (off) or a number of voxels")
    if dust_mode not in DUST_MODES:
        raise InputError(f"--dust-mode {dust_mode!r}: choose merge or zero")
    if not (math.isfinite(edges_per_voxel) and 0 < edges_per_voxel <= 3):
        raise InputError(f"--edges-per-voxel {edges_per_voxel} must lie in (0, 3]: a voxel "
                         "has 3 pairs it can count (about 0.02 for a smooth map, 0.14-0.3 for "
                         "real ones)")
    if not (isinstance(sigma, int | float) and not isinstance(sigma, bool)
            and math.isfinite(sigma) and 0 <= sigma <= MAX_SIGMA):
        raise InputError(f"--sigma {sigma} must lie in [0, {MAX_SIGMA}]: the in-plane "
                         "Gaussian's standard deviation in voxels (0: no smoothing; DeepEM3D "
                         "used about 1; each task reads a halo of 4 sigma)")
    vol = open_layer(map_path, mip=mip)
    # refuses an EM image or labels on positive evidence, and other than 1 or 3 channels
    warning = check_layer_role(map_path, "map", vol)
    dtype = str(np.dtype(vol.dtype))
    if dtype not in MAP_DTYPES:
        raise InputError(f"{map_path} holds {dtype}: a boundary or affinity map is uint8 "
                         "(round(255 p)) or float32 probabilities")
    channels = int(vol.num_channels)
    offset = tuple(int(v) for v in vol.voxel_offset)
    size = tuple(int(v) for v in vol.volume_size)
    if sharded and chunk_size is None:
        chunk_size = sharded_chunk(task_shape or DEFAULT_TASK_SHAPE)
    chunk = tuple(int(c) for c in (chunk_size or vol.meta.chunk_size(mip)))
    if task_shape is None:
        task_shape = tuple(-(-t // c) * c for t, c in zip(DEFAULT_TASK_SHAPE, chunk))
    task_shape = check_task_shape(task_shape, chunk)
    asked = bounds = check_bounds(bounds, offset, size, map_path, mip)
    processing = map_processing(map_path)
    bounds = align_to_chunks(bounds, offset, size, chunk)
    sharding = None
    if sharded:
        sharding = block_sharding(size, chunk, task_shape)
        check_on_shards(bounds.minpt, offset, size, task_shape)
    if mip == 0:
        _check_map_covers(map_path, bounds, asked, chunk)
    plan = SegmentPlan(
        map_path=map_path, output_path=output_path, mip=mip,
        kind="boundary" if channels == 1 else "affinity", map_dtype=dtype, method=method,
        threshold=float(threshold), dust_size=int(dust_size), dust_mode=dust_mode,
        resolution=tuple(float(r) for r in vol.resolution), voxel_offset=offset, size=size,
        chunk_size=chunk, task_shape=task_shape, bounds=bounds,
        blocks=block_grid(bounds, task_shape),
        map_fingerprint=map_fingerprint(map_path, mip, processing),
        map_recorded=bool(processing),
        sigma=float(sigma), warnings=[warning] if warning else [],
        edges_per_voxel=float(edges_per_voxel), sharding=sharding,
    )
    _check_block_size(plan)
    if max_task_memory is not None:
        plan.check_task_memory(max_task_memory)
    _decide(plan, overwrite, keep_unchanged)
    return plan


def _check_map_covers(map_path: str, bounds: Bbox, asked: Bbox,
                      chunk: Sequence[int]) -> None:
    """A map `deepem3d infer` wrote must be complete over the region (`asked`, grown to
    OUTPUT's `chunk` grid: `bounds`): its tasks would otherwise fail one by one on missing
    chunks. Checked from the map's inference run record."""
    markers = Markers(map_path, "inference")
    record = markers.run_record()
    if record is None:
        return  # made by another tool: the tasks read what is there
    made = record.get("parameters", {}).get("bounds")

    def predicted(box: Bbox) -> bool:
        return Bbox(made[:3], made[3:]).contains_bbox(box)

    if made and not predicted(bounds):
        fix = (f" (--bounds {format_bounds(asked)} grown to OUTPUT's chunks of "
               f"{','.join(map(str, chunk))}): give a --chunk-size whose grid the predicted "
               "region follows, or --bounds a chunk inside it" if predicted(asked) else
               ": pass --bounds within it (or predict the rest of the map first)")
        raise InputError(f"{map_path} was predicted over {','.join(map(str, made))} only, "
                         f"and the region to segment is {format_bounds(bounds)}{fix}")
    remaining = markers.remaining()
    if remaining:
        raise InputError(f"{map_path} is incomplete: {len(remaining)} of "
                         f"{len(markers.task_ids())} inference task(s) have not finished; run "
                         "the same `deepem3d infer` command again (or its workers) first")


def _layer_geometry(plan: SegmentPlan, layer_type: str) -> dict:
    """The geometry (as layers.layer_geometry reads it) of a layer the run writes: the map's
    at --mip, with OUTPUT's chunk size."""
    return {
        "type": layer_type,
        "data_type": "uint64" if layer_type == "segmentation" else "uint8",
        "num_channels": 1 if layer_type == "segmentation" or plan.kind == "boundary" else 3,
        "resolution": list(plan.resolution), "voxel_offset": list(plan.voxel_offset),
        "size": list(plan.size), "chunk_size": list(plan.chunk_size),
        "sharding": plan.sharding,
    }


def _check_geometry(path: str, wanted: dict, overwrite: bool) -> tuple[bool, bool]:
    """(differs, holds data) for the layer at `path`; an InputError for a layer of another
    geometry that holds data, without --overwrite."""
    existing = layer_geometry(path) if info_exists(path) else None
    holds = existing is not None and layer_holds_data(path)
    differs = existing is not None and existing != wanted
    if differs and holds and not overwrite:
        diffs = "; ".join(f"{k} {existing.get(k)} (want {v})"
                          for k, v in wanted.items() if existing.get(k) != v)
        raise InputError(f"{path} holds a layer of another geometry ({diffs}): pass "
                         "--overwrite to replace it, or choose another OUTPUT")
    return differs, holds


def _decide(plan: SegmentPlan, overwrite: bool, keep_unchanged: bool = False) -> None:
    """Fill in plan.action and the resets, or refuse (InputError) what would lose data."""
    out = plan.output_path
    differs, holds = _check_geometry(out, _layer_geometry(plan, "segmentation"), overwrite)
    # the smoothed map is kept, and the later stages read it: one of another geometry (a run
    # at another --mip or --chunk-size, or a layer put there by hand) is not reused
    smoothed_differs = plan.smoothed and _check_geometry(
        smoothed_layer_path(out), _layer_geometry(plan, "image"), overwrite)[0]
    if differs:
        plan.reset_layer = plan.reset_chunk_stages = plan.reset_tuning_stages = True
        plan.action = "rebuild" if holds else "new"
        return
    # the first stage's manifest is written first: a run stopped during it resumes too
    chunks_same = (_manifest_key(out, CHUNK_STAGES[0]) == plan.chunk_key
                   and _manifest_key(out, "supervoxels") in (None, plan.chunk_key)
                   and not smoothed_differs)
    if chunks_same and overwrite and not plan.map_recorded:
        chunks_same = False
        plan.warnings.append(
            f"{plan.map_path} records no provenance, so nothing shows its data unchanged "
            "since the kept supervoxels were made: --overwrite makes them again (a map "
            "whose provenance records what wrote it keeps them)")
    # --overwrite replaces the segmentation even when made the same way (unless it is to keep
    # what is unchanged); the chunk stages are a cache of the map, kept whenever their key
    # matches; so is the first tuning stage's (remap's, the last, is None until the octree is
    # done)
    first_tuning = plan.tuning_stages()[0]
    tuning_same = (_manifest_key(out, first_tuning) == plan.tuning_key
                   and _manifest_key(out, "remap") in (None, plan.tuning_key)
                   and chunks_same and (keep_unchanged or not overwrite))
    if holds and not tuning_same and not overwrite:
        if Markers(out, "remap").run_record() is None:
            raise InputError(f"{out} holds data that `deepem3d segment` did not write: pass "
                             "--overwrite to replace it, or choose another OUTPUT")
        raise InputError(f"{out} holds a segmentation made with other parameters: pass "
                         "--overwrite to replace it (the supervoxels and region graph are "
                         "reused when the map, --sigma, --bounds and --task-shape are the "
                         "same)")
    plan.reset_chunk_stages = not chunks_same
    plan.reset_tuning_stages = not tuning_same
    if tuning_same:
        plan.action = "resume"
    elif chunks_same:
        plan.action = "retune"
    else:
        plan.action = "rebuild" if holds else "new"


# ---------------------------------------------------------------------------------------------
# Creating the tasks and running the stages


def provenance(plan: SegmentPlan) -> dict:
    return {
        "task": "deepem3d segment",
        **plan.tuning_parameters(),
        "sigma": plan.sigma,
        "map": plan.map_path,
        "map_kind": plan.kind,
        "map_dtype": plan.map_dtype,
        "mip": plan.mip,
        "bounds": plan.region,
        "task_shape": list(plan.task_shape),
        "sharded": plan.sharding is not None,
        "stages": list(plan.stages),
        "work_dir": f"{WORK}/ (supervoxels: local labels {SUPERVOXEL_FILES[0]} and tables "
                    f"{SUPERVOXEL_FILES[1]} per block, region graphs {WORK}/graphs/ per block, "
                    f"the octree's nodes {OCTREE_WORK}"
                    + (f", smoothed map {SMOOTHED_LAYER})" if plan.smoothed else ")"),
        "ids": "1 + the global voxel index (x + X * (y + Y * z)) of a voxel of the segment",
    }


#: the markers of the stages that made the segmentation's levels, meshes and skeletons: reset
#: with the segments they were made of (the standalone commands, which record no source key,
#: found them complete and ran nothing over the new segments)
PRODUCT_STAGES = ("tasks/downsample-", "tasks/mesh-", "tasks/skeleton-")


def _segmentation_prefixes(info: dict | None) -> list[str]:
    """What a segmentation layer's data occupies: every scale, its meshes and skeletons."""
    info = info or {}
    prefixes = [scale["key"].rstrip("/") + "/" for scale in info.get("scales", [])]
    return prefixes + [f"{info.get(k) or k}/" for k in ("mesh", "skeletons")]


def prepare_output(plan: SegmentPlan) -> None:
    """Apply the plan's resets, then (re)write the output, supervoxel and smoothed layers'
    infos."""
    out = plan.output_path
    info = CloudFiles(out).get_json("info")
    if plan.reset_chunk_stages:
        delete_prefixes(out, [f"tasks/{s}/" for s in CHUNK_STAGES]
                         + [f"tasks/{s}" for s in REDUCE_STAGES] + [f"{WORK}/"])
    if plan.reset_tuning_stages:
        delete_prefixes(out, [f"tasks/{s}" for s in OCTREE_STAGES] + ["tasks/remap/",
                                                                       OCTREE_WORK]
                         + _segmentation_prefixes(info) + list(PRODUCT_STAGES))
    if plan.reset_layer or plan.reset_tuning_stages:
        vol = create_layer(
            out, layer_type="segmentation", dtype="uint64", resolution=plan.resolution,
            size=plan.size, voxel_offset=plan.voxel_offset, chunk_size=plan.chunk_size,
            overwrite=plan.reset_layer, sharding=plan.sharding,
        )
        record_provenance(vol, provenance(plan), replace=True)
    smoothed_path = smoothed_layer_path(out)
    if plan.smoothed and (plan.reset_chunk_stages or not info_exists(smoothed_path)):
        create_layer(
            smoothed_path, layer_type="image", dtype="uint8", resolution=plan.resolution,
            size=plan.size, voxel_offset=plan.voxel_offset, chunk_size=plan.chunk_size,
            num_channels=1 if plan.kind == "boundary" else 3, overwrite=True,
            sharding=plan.sharding, provenance={
                "task": "deepem3d segment (smooth)", **plan.chunk_parameters(),
                "filter": "scipy.ndimage.gaussian_filter on x and y (sigma 0 on z), mode "
                          "reflect at the bounds of the segmented region, truncate 4, on the "
                          "uint8 map; stored as uint8 round(value)",
            },
        )


def segment_stages(plan: SegmentPlan, *, needs: tuple[str, ...] = ()) -> list[Stage]:
    """The segmentation's stages, in order, as the frame runs them. `needs` names the stages
    the first one waits for (the map's inference, in a pipeline)."""
    out = plan.output_path

    def each_block() -> Iterator[tuple[str, list[int]]]:
        return ((block_id(b), bounds_list(b)) for b in plan.blocks)

    segmented, segmented_mip = plan.segmented_map
    chunked = {"map_path": segmented, "dataset": plan.region, "mip": segmented_mip}
    tree = plan.octree
    geometry = {"grid": plan.grid, "task_shape": list(plan.task_shape), "table": plan.tuning_key}

    def per_block(task: Callable[..., None], **kwargs: Any) -> TaskList:
        return lambda: ((i, partial(task, bounds=b, output_path=out, **kwargs))
                        for i, b in each_block())

    def per_node(task: Callable[..., None], level: int, *, with_table: bool = True,
                 **kwargs: Any) -> TaskList:
        """A task per node of `level`; the reduce's take no run key (`with_table` False)."""
        extra = geometry if with_table else {k: geometry[k] for k in ("grid", "task_shape")}
        return lambda: ((node_name(n), partial(task, output_path=out, level=level, node=list(n),
                                               **extra, **kwargs))
                        for n in tree.nodes(level))

    def node_of(bounds: list[int]) -> list[int]:
        return [(b - r) // t for b, r, t in zip(bounds[:3], plan.region[:3], plan.task_shape)]

    halo = plan.task_count("halo") > 0
    specs = [
        ("smooth", per_block(SmoothTask, map_path=plan.map_path, dataset=plan.region,
                             mip=plan.mip, sigma=plan.sigma, publish_halo=plan.publishes_halo),
         None if plan.smoothed else "off (--sigma 0)"),
        ("halo", per_block(HaloTask, map_path=segmented, mip=segmented_mip),
         None if halo else "published by smooth" if plan.smoothed else "not needed (one block)"),
        ("supervoxels", per_block(SupervoxelTask, **chunked, task_shape=list(plan.task_shape)
                                  if plan.publishes_halo else None), None),
        *((name, per_node(ReduceNodeTask if name.startswith("reduce-L") else ReduceDownTask,
                          int(name.rsplit("L", 1)[1]), dataset=plan.region,
                          volume=plan.volume, with_table=False), None)
          for name in plan.chunk_stages() if name.startswith(REDUCE_STAGES)),
        ("region-graph", lambda: ((i, partial(RegionGraphTask, output_path=out, bounds=b,
                                              below=_blocks_below(b, plan)))
                                  for i, b in each_block()), None),
    ]
    memory = {name: plan.stage_memory_bytes(name) for name, _, _ in specs
              if name.startswith(REDUCE_STAGES)}
    agglomerate = {"region": plan.region, "method": plan.method, "threshold": plan.threshold,
                   "dust_size": plan.dust_size}
    for name in plan.tuning_stages():
        if name == "remap":
            specs.append(("remap", lambda: ((i, partial(
                RemapTask, output_path=out, bounds=b, node=node_of(b), dust_size=plan.dust_size,
                dust_mode=plan.dust_mode, **geometry)) for i, b in each_block()), None))
            continue
        kind, level = name.rsplit("-L", 1)
        level = int(level)
        sweep = "dust" if kind.startswith("dust") else "agglomerate"
        if kind in ("agglomerate", "dust"):
            specs.append((name, per_node(OctreeNodeTask, level, sweep=sweep, **agglomerate),
                          None))
        else:
            specs.append((name, per_node(OctreeDownTask, level, sweep=sweep), None))
        memory[name] = plan.stage_memory_bytes(name)
    stages = []
    previous = needs
    for name, make, note in specs:
        count = 0 if note else plan.task_count(name)
        stage = Stage(
            name=name, layer=out, key=plan.key(name), parameters=plan.stage_parameters(name),
            make_tasks=make if count else (lambda: iter(())), task_count=count,
            memory_bytes=memory.get(name, plan.task_memory_bytes) if count else 0,
            needs=tuple(previous), note=note, seconds_per_task=plan.stage_seconds(name),
            output_bytes=(plan.segmentation_bytes if name == "remap" else 0),
            finish=partial(clean_intermediates, plan),
            starts_over=(plan.reset_chunk_stages if is_chunk_stage(name)
                         else plan.reset_tuning_stages),
        )
        stages.append(stage)
        previous = (name,)
    stages[0].prepare = partial(prepare_output, plan)
    return stages


def is_chunk_stage(stage: str) -> bool:
    """Whether a stage depends only on the map, sigma and the chunking."""
    return stage in CHUNK_STAGES or stage.startswith(REDUCE_STAGES)


def _blocks_below(bounds: list[int], plan: SegmentPlan) -> list[str | None]:
    """Per axis, the id of the block under `bounds` in the plan's grid (None at the segmented
    region's low face): blocks are task_shape apart from the region's corner, so the one
    below is a whole task_shape long on that axis."""
    below = []
    for c in range(3):
        if bounds[c] <= plan.region[c]:
            below.append(None)
            continue
        lo, hi = list(bounds[:3]), list(bounds[3:])
        lo[c], hi[c] = bounds[c] - plan.task_shape[c], bounds[c]
        below.append(block_id(Bbox(lo, hi)))
    return below


def clean_intermediates(plan: SegmentPlan) -> None:
    """Delete what no later stage reads: the halo slabs once the supervoxels are complete, the
    exits once the reduce is, local graphs and faces once every block's graph is. The
    supervoxels (labels/ and tables/), the blocks' graphs and the smoothed map are kept: the
    input of a retune, and a result to view."""
    out = plan.output_path
    if Markers(out, "supervoxels").is_complete():
        delete_prefixes(out, [f"{WORK}/halo/"])
    if Markers(out, plan.chunk_stages()[-2]).is_complete():  # the reduce's last stage
        delete_prefixes(out, [f"{WORK}/exits/", f"{WORK}/reduce/", f"{WORK}/reduce-down/"])
    if Markers(out, "region-graph").is_complete():
        delete_prefixes(out, [f"{WORK}/local_graphs/", f"{WORK}/faces/"])
