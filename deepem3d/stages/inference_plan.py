"""What an inference run will do, worked out before anything is written: `plan_inference`
checks the image, the models, the options and any existing output, and chooses the geometry
(abutting tiles with the receptive field as margin by default, `tile_geometry`), the tasks and
the memory one task needs (`_task_memory`, followed through a shape-only copy of the model).
It reads infos and checkpoints and writes nothing; `deepem3d.stages.inference` turns a plan
into its stage.
"""

from __future__ import annotations

import functools
import json
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.models.sliding import (
    HEAD_CHANNELS,
    TTA_CHOICES,
    PatchGeometry,
    Predictor,
    abutting_tiles,
    input_box,
    patch_count,
)
from deepem3d.stages.blocks import (
    BlockGrid,
    align_to_chunks,
    block_grid,
    check_bounds,
    check_task_shape,
)
from deepem3d.stages.frame import Markers
from deepem3d.stages.model_refs import ModelRef, inspect_model
from deepem3d.storage.layers import (
    check_output_apart,
    cloudpath,
    info_exists,
    layer_geometry,
    layer_holds_data,
    open_layer,
)
from deepem3d.storage.sharding import block_sharding, check_on_shards
from deepem3d.storage.sharding import default_chunk as sharded_chunk
from deepem3d.units import MAX_THREADS

if TYPE_CHECKING:
    import torch

    from deepem3d.models.network import DeepEM3DNet

STAGE = "inference"
DEVICES = ("auto", "cpu", "cuda")


# In-plane task size (rounded up to whole chunks) for a geometry of overlapping patches
# (--patch-size/--patch-output/--overlap given): wide blocks share fewer patches with their
# neighbours; a block's depth costs no shared patch at all (each section is its own patches).
DEFAULT_TASK_XY = 1024


# The default geometry: abutting output tiles of this many px (rounded up to whole chunks),
# each read with a margin of the models' receptive field rounded up to 16 px (230 -> 240):
# (2048 + 2 x 240)^2 / 2048^2 = 1.52 network evaluations per output voxel, against 4.25
# for 512 px patches with 384 px outputs and 64 px overlap at 1024 px tasks (--dry-run).
TILE_OUTPUT = 2048


# What the default geometry lets one task hold (the tile and batch shrink to fit): a CPU
# worker per core on a machine of 4 GiB per core.
TASK_MEMORY_BUDGET = 4 * 2**30


RESOLUTION_TOLERANCE = 0.05  # relative: 4 nm and 4.1 nm are the same resolution


# A forward's peak memory over `activation_bytes`: the CPU inference form's buffers, oneDNN's
# workspaces, and the heap's fragments while a CPU task reuses the pages it frees
# (deepem3d.memory.reusing_freed_memory). `python benchmarks/inference.py --methods tiles
# --sections 2 --preset P` (2528 px tiles, 2 threads): a task's own peak less the plan's other
# terms was 2.2x the activations with the tiny preset, 1.9x with the small one (it was under
# 2x before freed pages were reused, the factor then).
ACTIVATION_FACTOR = 3

# What a task's process holds beyond its arrays and the model's activations (allocator and
# oneDNN caches, decompression buffers): the gap measured by benchmarks/inference.py.
RUNTIME_BYTES = 64 * 2**20


@dataclass
class InferencePlan:
    """What an inference run will do, computed without writing anything."""

    image_path: str
    output_path: str
    mip: int
    models: list[ModelRef]
    head: str
    in_sections: list[int]
    dtype: str
    tta: int
    geometry: PatchGeometry
    resolution: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    size: tuple[int, int, int]
    chunk_size: tuple[int, int, int]
    task_shape: tuple[int, int, int]
    bounds: Bbox
    blocks: BlockGrid
    memory_bytes: int
    compute_factor: float
    #: network input pixels x sections over all tasks' forward passes (one model, one TTA
    #: variant) per output voxel: what a voxel costs, context and recomputed patches included
    evaluations: float = 0.0
    #: in-plane patches every task together computes, summed over sections, in one variant's
    #: units (affinity with tta 16 computes half a section more per slab: not whole)
    patches: float = 0.0
    fill_missing: bool = False
    mask: str | None = None
    mask_mip: int = 0
    threads: int = 1
    device: str = "auto"
    amp: bool = True
    warnings: list[str] = field(default_factory=list)
    output_exists: bool = False
    #: the segmentation settings the model records for this TTA (None for your own models)
    segmentation: dict | None = None
    #: the map's sharding spec (a shard per task: deepem3d.storage.sharding); None: a file
    #: per chunk
    sharding: dict | None = None
    #: lines the plan adds to its description (what it chose for the user)
    notes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return HEAD_CHANNELS[self.head]

    @property
    def task_count(self) -> int:
        return len(self.blocks)

    @property
    def slabs(self) -> int:
        """Chunk-deep slabs per task (predict_slabs; a shard is written whole, in one)."""
        return 1 if self.sharding else -(-int(self.task_shape[2]) // int(self.chunk_size[2]))

    def describe(self) -> str:
        # a task writes no more than the bounds hold (a region smaller than one tile)
        shape = " x ".join(str(min(int(s), int(b)))
                           for s, b in zip(self.task_shape, self.bounds.size3()))
        g = self.geometry
        names = ", ".join(os.path.basename(m.location) for m in self.models)
        windows = (f"tiles {g.size} px in, {g.output} px out, abutting (a margin of {g.margin} "
                   f"px each side; no blending), batch {g.batch}" if g.overlap == 0 else
                   f"patches {g.size} px in, {g.output} px out, overlap {g.overlap}, "
                   f"batch {g.batch}, {g.window} window")
        return (
            f"{self.task_count} InferenceTask(s) of {shape} voxels (x,y,z) at mip {self.mip}, "
            f"{self.head} map ({self.channels} channel(s), {self.dtype}) from {names}; "
            f"tta {self.tta}; {windows}; about {self.memory_bytes / 2**20:.0f} MiB "
            f"per task; patch compute x{self.compute_factor:.2f} of one whole-volume pass\n"
            f"evaluations per output voxel: {self.evaluations:.2f}"
            + (f"\neach task predicts up to {self.slabs} slabs of {self.chunk_size[2]} "
               "section(s), reading the next one's input and writing the last one's map "
               "meanwhile" if self.slabs > 1 else "")
            + (f"\nsharded: a shard file per task, in chunks of "
               f"{' x '.join(map(str, self.chunk_size))}" if self.sharding else "")
            + "".join(f"\n{note}" for note in self.notes)
        )

    def values(self) -> dict:
        """The parameters that decide the output's values (a resumed run must share them)."""
        return {
            "image": self.image_path,
            "mip": self.mip,
            "models": [m.to_json() for m in self.models],
            "tta": self.tta,
            "patch": self.geometry.to_dict(),
            "dtype": self.dtype,
            "fill_missing": self.fill_missing,
            "mask": self.mask,
            "mask_mip": self.mask_mip,
        }

    def parameters(self) -> dict:
        """Everything the run was given: manifest and provenance."""
        return {
            **self.values(),
            "task": "InferenceTask",
            "head": self.head,
            "task_shape": list(self.task_shape),
            "bounds": [int(v) for v in (*self.bounds.minpt, *self.bounds.maxpt)],
            "threads": self.threads,
            "device": self.device,
            "amp": self.amp,
        }


def _fmt(values) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def check_resolution(ref: ModelRef, vol: CloudVolume, mip: int) -> str | None:
    """A message when the model was trained at another resolution or anisotropy, else None."""
    trained = ref.meta.get("resolution")
    layer = [float(r) for r in vol.meta.resolution(mip)]
    name = os.path.basename(ref.location)
    if not trained:
        return f"model {name} records no training resolution: cannot check it against the layer"
    trained = [float(r) for r in trained]
    if all(abs(a - b) <= RESOLUTION_TOLERANCE * b for a, b in zip(layer, trained)):
        return None
    aniso = trained[2] / min(trained[:2]), layer[2] / min(layer[:2])
    what = "anisotropy" if abs(aniso[0] - aniso[1]) > RESOLUTION_TOLERANCE * aniso[0] else \
        "resolution"
    better = [
        m for m in vol.available_mips
        if all(abs(float(a) - b) <= RESOLUTION_TOLERANCE * b
               for a, b in zip(vol.meta.resolution(m), trained))
    ]
    from deepem3d.stages.resample import within_resample_range

    if better:
        fix = f"use --mip {better[0]}"
    elif within_resample_range(layer, trained):
        fix = ("resample it first (`deepem3d resample IMAGE OUTPUT --resolution "
               f"{','.join(f'{r:g}' for r in trained)}`)")
    else:  # too far for linear interpolation
        fix = ("fine-tune the model on labelled sections of this data (`deepem3d train "
               "--init`)")
    return (f"model {name} was trained at {_fmt(trained)} nm (anisotropy {aniso[0]:.3g}) but "
            f"{vol.cloudpath} at mip {mip} is {_fmt(layer)} nm (anisotropy {aniso[1]:.3g}): "
            f"{what} differs; {fix}, or pass --force to run anyway")


def _model_mip(refs: list[ModelRef], vol: CloudVolume) -> int:
    """The first mip at every model's training resolution, when mip 0 is not at it; else 0."""
    trained = [[float(r) for r in ref.meta["resolution"]] for ref in refs
               if ref.meta.get("resolution")]

    def matches(m: int) -> bool:
        return all(abs(float(a) - b) <= RESOLUTION_TOLERANCE * b
                   for t in trained for a, b in zip(vol.meta.resolution(m), t))

    if not trained or matches(0):
        return 0
    return next((m for m in vol.available_mips if matches(m)), 0)


def _zyx_box(bbox: Bbox, offset) -> tuple:
    lo = np.asarray(bbox.minpt, dtype=int) - np.asarray(offset, dtype=int)
    hi = np.asarray(bbox.maxpt, dtype=int) - np.asarray(offset, dtype=int)
    return tuple(int(v) for v in lo[::-1]), tuple(int(v) for v in hi[::-1])


def activation_bytes(config: dict, size: int, batch: int) -> int:
    """Peak bytes of the activations alive at once in one forward pass (float32), found by
    following tensor lifetimes on a shape-only (meta) copy of the module as trained; a task
    plans ACTIVATION_FACTOR times this. Remembered per process: a plan asks for the same
    shapes for several blocks, and a run plans again after each stage (0.2 s each)."""
    return _activation_bytes(json.dumps(config, sort_keys=True), int(size), int(batch))


@functools.lru_cache(maxsize=64)
def _activation_bytes(config_json: str, size: int, batch: int) -> int:
    import torch

    from deepem3d.models import build_model

    with torch.device("meta"):
        model = build_model(**json.loads(config_json)).eval()
        x = torch.empty(batch, 1, model.in_sections, size, size)
    live: dict[int, int] = {}
    peak = 0

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal peak
        key = id(output)
        live[key] = output.numel() * 4
        weakref.finalize(output, live.pop, key, None)
        peak = max(peak, sum(live.values()))

    for module in model.modules():
        module.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    return peak


def _task_memory(models, predictors_meta, block, dataset, geometry, tta, dtype,
                 slab_depth: int, image_chunk_depth: int) -> int:
    """Peak bytes of a task over `block` predicted in slabs `slab_depth` sections deep: one
    slab's work, plus, when there are several, the input pieces held and read ahead (whole
    image chunks of `image_chunk_depth` sections, up to two beyond the slab's own input) and
    the last slab's map being written (predict_slabs)."""
    (z0, y0, x0), (z1, y1, x1) = block
    slab = ((z0, y0, x0), (min(z1, z0 + slab_depth), y1, x1))
    total = _slab_memory(models, predictors_meta, slab, dataset, geometry, tta, dtype)
    if slab[1][0] < z1:
        (lz, ly, lx), (hz, hy, hx) = input_box(predictors_meta, slab, dataset, geometry, tta)
        total += (hy - ly) * (hx - lx) * (hz - lz + 2 * image_chunk_depth)
        channels = HEAD_CHANNELS[predictors_meta[0].head]
        total += 2 * channels * math.prod(b - a for a, b in zip(*slab)) * np.dtype(dtype).itemsize
    return total


def _slab_memory(models, predictors_meta, block, dataset, geometry, tta, dtype) -> int:
    (z0, y0, x0), (z1, y1, x1) = block
    voxels = (z1 - z0) * (y1 - y0) * (x1 - x0)
    channels = HEAD_CHANNELS[predictors_meta[0].head]
    box_lo, box_hi = input_box(predictors_meta, block, dataset, geometry, tta)
    read = math.prod(b - a for a, b in zip(box_lo, box_hi))
    per_patch = patch_count(dataset, block, geometry)
    maps = len(models) + (len(models) > 1)
    total = 3 * read  # the pieces read, their concatenation, its reflected gathered copy
    # float32 section maps per model (+ their combination): sections are combined as they come
    total += maps * channels * (y1 - y0) * (x1 - x0) * 4
    # quantize_tensor's float64 temporaries, two alive at a time, for one section
    total += 2 * channels * (y1 - y0) * (x1 - x0) * 8
    total += 2 * channels * voxels * np.dtype(dtype).itemsize  # the output and its transpose
    total += 2 * per_patch * channels * geometry.output**2 * 4  # open patches (2 sections)
    g = geometry
    total += g.batch * (max(p.in_sections for p in predictors_meta) + channels) * g.size**2 * 4
    for ref in models:
        weights = sum(p.numel() * 4 for p in _meta_model(ref.meta["model"]).parameters())
        total += weights + ACTIVATION_FACTOR * activation_bytes(ref.meta["model"], g.size,
                                                                g.batch)
    return int(total) + RUNTIME_BYTES


def _extreme_blocks(blocks: list[Bbox]) -> list[Bbox]:
    """The blocks that may need the most memory: those first, middle and last along each axis
    (blocks differ where they are cut at the bounds and where the layer's edges reflect their
    input), at most 27, not every block of a large run."""
    keep = []
    for axis in range(3):
        starts = sorted({int(b.minpt[axis]) for b in blocks})
        keep.append({starts[0], starts[len(starts) // 2], starts[-1]})
    return [b for b in blocks if all(int(b.minpt[a]) in keep[a] for a in range(3))]


def tile_geometry(refs: Sequence[ModelRef], nets: Sequence[DeepEM3DNet],
                  shapes: Sequence[Predictor], chunk: Sequence[int], dataset: Sequence[int],
                  tta: int, dtype: str, *, batch: int | None = None,
                  window: str = PatchGeometry.window) -> PatchGeometry:
    """The default geometry: abutting output tiles of TILE_OUTPUT px, a multiple of the chunk
    size and of the models' divisor, cut down to the layer's extent (a 512 px volume does not
    pay for a 2048 px tile; the layer's, not the bounds', so that the tiles, and the bytes, are
    the same whatever --bounds), each read with a margin of the models' in-plane receptive field
    rounded up to the divisor. So every voxel sees the network's whole receptive field, is
    computed once, and is what one whole-section forward gives. The tile halves until a task
    fits TASK_MEMORY_BUDGET. One tile per forward unless `batch` is given: a tile is already
    a large forward, a task holds few tiles (a batch larger than that only pads), and on this
    project's CPU the forward's time per pixel grows with the batch at 1504 px (the tiny
    preset: 978 ns at batch 1, 1274 at batch 4, 742 for 512 px patches at batch 4)."""
    divisor = max(int(net.divisor) for net in nets)
    context = max(max(int(c) for c in net.context[:2]) for net in nets)
    step = math.lcm(int(chunk[0]), int(chunk[1]), divisor)
    # sized by the layer, not the bounds: the same tiles (so the same bytes) whatever --bounds
    extent = max(int(dataset[1]), int(dataset[2]))
    depth = min(int(chunk[2]), int(dataset[0]))

    def tiles(t: int, b: int) -> PatchGeometry:
        return abutting_tiles(extent, context, divisor=divisor, step=step, tile=t, batch=b,
                              window=window)

    def fits(g: PatchGeometry) -> bool:
        block = ((0, 0, 0), (depth, min(g.output, dataset[1]), min(g.output, dataset[2])))
        return _slab_memory(refs, shapes, block, dataset, g, tta, dtype) <= TASK_MEMORY_BUDGET

    geometry = tiles(TILE_OUTPUT, batch or 1)
    while geometry.output > step and not fits(geometry):
        geometry = tiles(max(step, (geometry.output // 2) // step * step), batch or 1)
    return geometry


def _meta_model(config: dict) -> torch.nn.Module:
    import torch

    from deepem3d.models import build_model

    with torch.device("meta"):
        return build_model(**config)


@dataclass
class _Shape:
    """Just what input_box needs from a predictor (no weights at planning time)."""

    in_sections: int
    head: str

    def __call__(self, batch):  # pragma: no cover - never called
        raise NotImplementedError


def plan_inference(
    image_path: str,
    output_path: str,
    *,
    models: list[str | None] | None = None,
    mip: int | None = None,
    task_shape: tuple[int, int, int] | None = None,
    chunk_size: tuple[int, int, int] | None = None,
    tta: int = 1,
    bounds: Bbox | None = None,
    patch: dict | PatchGeometry | None = None,
    float32: bool = False,
    fill_missing: bool = False,
    mask: str | None = None,
    mask_mip: int = 0,
    threads: int = 1,
    device: str = "auto",
    amp: bool = True,
    force: bool = False,
    overwrite: bool = False,
    keep_unchanged: bool = False,
    sharded: bool = False,
) -> InferencePlan:
    """Check every input and work out the tasks; reads infos and checkpoints, writes nothing.

    `mip` None: the first mip at the models' training resolution when mip 0 is not and no
    --bounds are given (said in the plan), else 0.

    patch: PatchGeometry fields given by the user. Without size, output and overlap the
    geometry is `tile_geometry`'s (batch and window still apply); with any of them, patches
    of PatchGeometry's defaults for the rest, blended where they overlap. `sharded` writes
    the map a shard file per task (without `chunk_size`, chunks of the task split in 2^k per
    axis; the tasks on the shard grid). `overwrite` replaces an OUTPUT that holds data;
    with `keep_unchanged`, only one that holds another map (`deepem3d run --overwrite`).
    """
    image_path, output_path = cloudpath(image_path), cloudpath(output_path)
    check_output_apart(output_path, {"image": image_path, "mask": mask})
    vol = open_layer(image_path, mip=mip or 0)
    if vol.dtype != np.uint8:
        raise InputError(f"{image_path} holds {vol.dtype}: deepem3d infers on uint8 EM images "
                         "(`deepem3d ingest FILES DEST --to-uint8` rescales the source files "
                         "to uint8; a layer's, `deepem3d export LAYER OUT.zarr` writes first)")
    if vol.num_channels != 1:
        raise InputError(f"{image_path} has {vol.num_channels} channels: the network reads "
                         "one-channel (grey) EM images")
    if tta not in TTA_CHOICES:
        raise InputError(f"--tta {tta}: choose one of {', '.join(map(str, TTA_CHOICES))}")
    if device not in DEVICES:
        raise InputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if not 1 <= threads <= MAX_THREADS:
        raise InputError(f"--threads {threads} must be from 1 to {MAX_THREADS}")
    patch = patch.to_dict() if isinstance(patch, PatchGeometry) else dict(patch or {})
    unknown = set(patch) - set(PatchGeometry.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown patch setting(s) {', '.join(sorted(unknown))}")
    tiled = not {"size", "output", "overlap"} & set(patch)
    try:
        if not tiled:
            geometry = PatchGeometry(**patch)
            geometry.check()
        elif "window" in patch or "batch" in patch:
            PatchGeometry(size=16, output=16, overlap=0, **patch).check()
    except ValueError as err:
        options = {"size": "--patch-size", "output": "--patch-output", "overlap": "--overlap"}
        defaults = PatchGeometry.__dataclass_fields__
        unset = [f"{flag} {defaults[k].default}" for k, flag in options.items() if k not in patch]
        note = f" (not given, so {', '.join(unset)})" if unset and not tiled else ""
        raise InputError(f"patch geometry: {err}{note}") from None

    from deepem3d.models.shipped import expand_models, recommended_settings

    refs, nets = [], []
    for name in expand_models(models):
        ref, net = inspect_model(name)
        refs.append(ref)
        nets.append(net)
    heads = {net.head for net in nets}
    if len(heads) > 1:
        raise InputError("the models have different heads (boundary and affinity): an "
                         "ensemble combines maps of one kind; run them separately")
    head = heads.pop()
    notes = []
    if mip is None:
        mip = _model_mip(refs, vol) if bounds is None else 0
        if mip:
            vol = open_layer(image_path, mip=mip)
            notes.append(f"reading mip {mip} ({_fmt(vol.meta.resolution(mip))} nm), the "
                         f"models' training resolution (mip 0 is "
                         f"{_fmt(vol.meta.resolution(0))} nm); the map has mip {mip}'s")
    warnings = []
    segmentation = recommended_settings(models, tta)
    for ref in refs:
        problem = check_resolution(ref, vol, mip)
        if problem is None:
            continue
        if force or "records no training resolution" in problem:
            warnings.append(problem.replace(", or pass --force to run anyway", ""))
            if segmentation and ref.meta.get("resolution"):  # forced: say where they hold
                segmentation["resolution"] = [float(r) for r in ref.meta["resolution"]]
        else:
            raise InputError(problem)
    offset = tuple(int(v) for v in vol.voxel_offset)
    size = tuple(int(v) for v in vol.volume_size)
    resolution = tuple(float(r) for r in vol.resolution)
    chunk = tuple(int(c) for c in (chunk_size or vol.meta.chunk_size(mip)))
    bounds = check_bounds(bounds, offset, size, image_path, mip)
    bounds = align_to_chunks(bounds, offset, size, chunk)
    dtype = "float32" if float32 else "uint8"
    shapes = [_Shape(net.in_sections, net.head) for net in nets]
    dataset = size[::-1]
    if tiled:
        geometry = tile_geometry(refs, nets, shapes, chunk, dataset, tta, dtype,
                                 batch=patch.get("batch"),
                                 window=patch.get("window", PatchGeometry.window))
    if head == "affinity" and tta > 1 and geometry.margin < 1:
        raise InputError("affinity test-time augmentation needs --patch-output smaller than "
                         "--patch-size")
    if task_shape is None:
        xy = geometry.output if tiled else DEFAULT_TASK_XY
        task_shape = (-(-xy // chunk[0]) * chunk[0], -(-xy // chunk[1]) * chunk[1], chunk[2])
    if sharded and chunk_size is None:  # the task split in 2^k chunks per axis
        task_shape = tuple(min(int(t), int(v)) for t, v in zip(task_shape, size))
        chunk = sharded_chunk(task_shape)
        bounds = align_to_chunks(bounds, offset, size, chunk)
    task_shape = check_task_shape(task_shape, chunk)
    sharding = None
    if sharded:
        sharding = block_sharding(size, chunk, task_shape)
        check_on_shards(bounds.minpt, offset, size, task_shape, region_hi=bounds.maxpt)
    if tiled:
        # default tiles: tasks are the cells of the tile grid anchored at the layer's offset,
        # clipped to the bounds, however these lie (a block straddling tiles would compute each
        # of them); cells are whole chunks from the offset, so clipped ones stay aligned
        task_shape = tuple(min(t, int(v)) for t, v in zip(task_shape, size))
        blocks = block_grid(bounds, task_shape, anchor=offset)
    else:
        task_shape = tuple(min(t, int(b)) for t, b in zip(task_shape, bounds.size3()))
        blocks = block_grid(bounds, task_shape)
    whole = _zyx_box(bounds, offset)
    slab_depth = int(task_shape[2]) if sharded else int(chunk[2])  # predict_slabs' slabs
    # affinity with z-reversed variants (tta 16): those 8 of the 16 also predict the section
    # below each slab (sliding's `extra`), half a section per slab in one variant's units
    below = 0.5 if head == "affinity" and tta == 16 else 0.0

    def sections(b: Bbox) -> float:
        depth = int(b.size3()[2])
        return depth + below * -(-depth // slab_depth)

    computed = sum(patch_count(dataset, _zyx_box(b, offset), geometry) * sections(b)
                   for b in blocks)
    single = patch_count(dataset, whole, geometry) * int(bounds.size3()[2])
    image_chunk_depth = int(vol.meta.chunk_size(mip)[2])
    memory = max(_task_memory(refs, shapes, _zyx_box(b, offset), dataset, geometry, tta, dtype,
                              slab_depth, image_chunk_depth)
                 for b in _extreme_blocks(blocks))
    evaluations = computed * geometry.size**2 / math.prod(int(v) for v in bounds.size3())

    plan = InferencePlan(
        image_path=image_path, output_path=output_path, mip=mip, models=refs, head=head,
        in_sections=[net.in_sections for net in nets], dtype=dtype, tta=tta, geometry=geometry,
        resolution=resolution, voxel_offset=offset, size=size, chunk_size=chunk,
        task_shape=task_shape, bounds=bounds, blocks=blocks, memory_bytes=memory,
        compute_factor=computed / single, evaluations=evaluations, patches=computed,
        fill_missing=fill_missing,
        mask=cloudpath(mask) if mask else None, mask_mip=mask_mip, threads=threads,
        device=device, amp=amp, warnings=warnings,
        segmentation=segmentation, sharding=sharding, notes=notes,
    )
    if mask:
        open_layer(plan.mask, mip=mask_mip)  # fails now, not in every task
    plan.output_exists = _check_output(plan, overwrite, keep_unchanged)
    return plan


def _wanted_info(plan: InferencePlan) -> dict:
    """The output's geometry, as layers.layer_geometry reads it."""
    return {
        "type": "image",
        "data_type": plan.dtype,
        "num_channels": plan.channels,
        "resolution": [float(r) for r in plan.resolution],
        "voxel_offset": list(plan.voxel_offset),
        "size": list(plan.size),
        "chunk_size": list(plan.chunk_size),
        "sharding": plan.sharding,
    }


def _check_output(plan: InferencePlan, overwrite: bool, keep_unchanged: bool = False) -> bool:
    """Whether this is a resumed run (OUTPUT holds a map of this geometry and these
    parameters); InputError when OUTPUT exists with another geometry or holds other data.
    `overwrite` replaces it whatever it holds; with `keep_unchanged` only where it differs (a
    run's --overwrite, after settings of a later stage changed, keeps the map)."""
    if not info_exists(plan.output_path) or (overwrite and not keep_unchanged):
        return False
    try:
        return _resumable(plan)
    except InputError:
        if overwrite:
            return False
        raise


def _resumable(plan: InferencePlan) -> bool:
    existing = layer_geometry(plan.output_path)
    wanted = _wanted_info(plan)
    if existing != wanted:
        diffs = [f"{k} {existing.get(k) if existing else None} (want {v})"
                 for k, v in wanted.items() if not existing or existing.get(k) != v]
        raise InputError(f"{plan.output_path} exists with another geometry: "
                         f"{'; '.join(diffs)}: pass --overwrite to replace it, or choose "
                         "another OUTPUT")
    if not layer_holds_data(plan.output_path):
        return False  # an empty layer of the same geometry: (re)write its info and provenance
    markers = Markers(plan.output_path, STAGE)
    if markers.run_record() is None:
        raise InputError(f"{plan.output_path} holds data that `deepem3d infer` did not write: "
                         "pass --overwrite to replace it, or choose another OUTPUT")
    previous = markers.parameters()
    values = {k: previous.get(k) for k in plan.values()}
    if values != plan.values():
        changed = sorted(k for k in values if values[k] != plan.values()[k])
        raise InputError(f"{plan.output_path} holds a map made with other parameters "
                         f"({', '.join(changed)}): pass --overwrite to replace it")
    return True
