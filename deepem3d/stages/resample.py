"""A layer at another resolution, as queue tasks, one per block: an image by linear
interpolation, a segmentation by nearest neighbour.

For a user whose EM image is not at a model's training resolution by a factor no mip level
gives (a 4.6 nm image for a 4 nm model), and for the way back: the segmentation made at the
model's resolution onto the user's own grid (`like`: another layer's resolution, offset and
size). Per axis, with the source's resolution r_s, voxel offset o_s and size n_s, and the
target resolution r_t:

    target offset  o_t = floor(o_s r_s / r_t)   (or the `like` layer's)
    target size    n_t = ceil((o_s + n_s) r_s / r_t) - o_t   (or the `like` layer's)
    target voxel a (absolute) samples the source at j = (a + 0.5) r_t / r_s - 0.5 - o_s
                   (voxel centres line up in nm)

that is, the smallest target grid that covers the source's extent in nm: every target voxel
that overlaps the source, so every source voxel's centre lies in one, and the way back (`like`
the source) finds an id for every voxel (a grid that rounded the far end down lost the partial
last voxel, and the way back left a strip of 0 there).

An image's value is the linear interpolation between the two source voxels around j (j
clamped to [0, n_s - 1]), axis by axis (x, then y, then z) in float64, rounded to uint8. A
segmentation's is the id of the source voxel holding the target voxel's centre, k =
floor(j + 1/2), in exact integer arithmetic on the resolutions as written, and where that
centre lies outside the source in a target voxel that still overlaps it (an edge voxel), the
nearest source voxel's (k clamped to [0, n_s - 1]); 0 (background) in a target voxel that
does not overlap the source. Each output voxel is computed from its own absolute
coordinate and the source voxels around it, the same operations in the same order whatever
block holds it, so the layer is the same bytes whatever the task shape (tested), and equal to
`resample_block` over the whole volume. Interpolation suits factors near 1; for integer
downsampling `deepem3d downsample` averages (no aliasing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.stages.blocks import (
    BlockGrid,
    block_grid,
    block_id,
    bounds_list,
    check_task_shape,
)
from deepem3d.stages.frame import Markers, Stage, digest, stage_task
from deepem3d.storage.layers import (
    check_output_apart,
    cloudpath,
    create_layer,
    layer_geometry,
    layer_holds_data,
    open_layer,
    read_block,
    write_block,
)
from deepem3d.units import format_triple

STAGE = "resample"
DEFAULT_TASK_SHAPE = (512, 512, 64)  # rounded up to whole output chunks
#: a task's peak over the bytes of the arrays `task_memory_bytes` counts: resampling the ISBI
#: 2012 sample from 4 to 3.5 nm in x and y in 512 x 512 x 16 blocks on this project's 2-core
#: machine, the largest task peaked 161 MiB above its worker (38 bytes per output voxel), 1.04
#: times those arrays (with the copy a Fortran-ordered source then cost np.take)
MEMORY_MARGIN = 1.1
#: seconds of a task per output voxel and per source voxel it reads, for --dry-run's
#: core-hours: least squares over the fastest of four runs of each of six targets of the ISBI
#: 2012 sample (4 x 4 x 50 nm to 2..8 nm in x and y, 25..100 nm in z; one worker on this
#: project's 2-core machine): 80 and 30 ns. A coarser target reads many source voxels per
#: voxel it writes (`task_memory_bytes`): per output voxel alone, 4 to 14 nm was 3 to 12 times
#: over its estimate.
SECONDS_PER_VOXEL = 80e-9
SECONDS_PER_SOURCE_VOXEL = 30e-9


def target_geometry(resolution: Sequence[float], offset: Sequence[int], size: Sequence[int],
                    target: Sequence[float]) -> tuple[list[int], list[int]]:
    """(voxel offset, size) of the target grid, per axis: every target voxel that overlaps
    the source (see the module's formulas), in exact fractions of the resolutions as written
    (4.6 is 23/5: 100 x 4.6 / 4 is 115, not the 114.99999999999999 of floats)."""
    ratio = [Fraction(str(float(r))) / Fraction(str(float(t)))
             for r, t in zip(resolution, target)]
    lo = [math.floor(int(o) * q) for o, q in zip(offset, ratio)]
    hi = [math.ceil((int(o) + int(n)) * q) for o, n, q in zip(offset, size, ratio)]
    return lo, [max(1, h - o) for h, o in zip(hi, lo)]


def _ratio(r_t: float, r_s: float) -> tuple[int, int]:
    """r_t / r_s as integers (numerator, denominator), exact on the resolutions as written."""
    q = Fraction(str(float(r_t))) / Fraction(str(float(r_s)))
    return q.numerator, q.denominator


def _nearest(lo: int, hi: int, r_s: float, r_t: float, o_s: int) -> np.ndarray:
    """For target voxels lo..hi (absolute) along one axis: the source voxel (relative to the
    source's offset) holding each one's centre, floor((a + 1/2) r_t / r_s) - o_s, exactly
    (in Python's integers: a resolution written with 16 digits makes a 16-digit ratio)."""
    p, d = _ratio(r_t, r_s)
    return np.array([(2 * a + 1) * p // (2 * d) - o_s for a in range(lo, hi)], np.int64)


def _nearest_inside(target: Bbox, axis: int, resolution: Sequence[float],
                    offset: Sequence[int], size: Sequence[int], target_res: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis of a target block: its voxels (relative to the block) that overlap the
    source, and the source voxel (relative to the source's offset) each takes: the one
    holding its centre, or the nearest where an edge voxel's centre lies outside (so a
    coarser grid's edge voxel, which holds a source voxel's centre, is not left 0)."""
    lo, hi = int(target.minpt[axis]), int(target.maxpt[axis])
    k = _nearest(lo, hi, resolution[axis], target_res[axis], offset[axis])
    p, d = _ratio(target_res[axis], resolution[axis])  # exact: voxel a spans [a, a+1) p/d
    start, end = int(offset[axis]) * d, (int(offset[axis]) + int(size[axis])) * d
    ok = np.array([a * p < end and (a + 1) * p > start for a in range(lo, hi)], bool)
    return np.flatnonzero(ok), np.clip(k[ok], 0, int(size[axis]) - 1)


def _samples(lo: int, hi: int, r_s: float, r_t: float, o_s: int, n_s: int):
    """For target voxels lo..hi (absolute) along one axis: the lower source voxel (relative
    to the source's offset) and the weight of the upper one."""
    j = np.clip((np.arange(lo, hi, dtype=np.float64) + 0.5) * (r_t / r_s) - 0.5 - o_s,
                0.0, float(n_s - 1))
    below = np.minimum(np.floor(j).astype(np.int64), max(n_s - 2, 0))
    return below, j - below


def source_box(target: Bbox, resolution: Sequence[float], offset: Sequence[int],
               size: Sequence[int], target_res: Sequence[float],
               interpolation: str = "linear") -> Bbox | None:
    """The source voxels (absolute) a target block reads; None where it reads none (nearest
    neighbour, a block wholly outside the source)."""
    lo, hi = [], []
    for axis in range(3):
        if interpolation == "nearest":
            _, k = _nearest_inside(target, axis, resolution, offset, size, target_res)
            if not k.size:
                return None
            lo.append(offset[axis] + int(k.min()))
            hi.append(offset[axis] + int(k.max()) + 1)
            continue
        below, _ = _samples(int(target.minpt[axis]), int(target.maxpt[axis]), resolution[axis],
                            target_res[axis], offset[axis], size[axis])
        lo.append(offset[axis] + int(below.min()))
        hi.append(offset[axis] + min(int(below.max()) + 2, size[axis]))
    return Bbox(lo, hi)


def nearest_block(source: np.ndarray, source_lo: Sequence[int], target: Bbox,
                  resolution: Sequence[float], offset: Sequence[int], size: Sequence[int],
                  target_res: Sequence[float]) -> np.ndarray:
    """The target block (x, y, z, `source`'s dtype) from `source` (x, y, z, starting at the
    absolute source voxel `source_lo`; None where the block reads none): each voxel the id of
    the source voxel holding its centre, 0 outside the source, as the module says."""
    shape = tuple(int(s) for s in target.size3())
    if source is None:
        return np.zeros(shape, np.uint64)
    out = np.zeros(shape, source.dtype)
    inside, picks = [], []
    for axis in range(3):
        voxels, k = _nearest_inside(target, axis, resolution, offset, size, target_res)
        inside.append(voxels)
        picks.append(k - (int(source_lo[axis]) - int(offset[axis])))
    out[np.ix_(*inside)] = source[np.ix_(*picks)]
    return out


def _source_box_shape(task_shape: Sequence[int], resolution: Sequence[float],
                      source_size: Sequence[int], target_res: Sequence[float]) -> list[int]:
    """The most source voxels, per axis, a `task_shape` block reads (at most the source)."""
    return [min(math.ceil(int(v) * Fraction(str(float(r_t))) / Fraction(str(float(r_s)))) + 2,
                int(n))
            for v, r_s, r_t, n in zip(task_shape, resolution, target_res, source_size)]


def task_seconds(task_shape: Sequence[int], resolution: Sequence[float],
                 source_size: Sequence[int], target_res: Sequence[float]) -> float:
    """The planning estimate of one task's seconds: what it writes and what it reads."""
    return (SECONDS_PER_VOXEL * math.prod(int(v) for v in task_shape) + SECONDS_PER_SOURCE_VOXEL
            * math.prod(_source_box_shape(task_shape, resolution, source_size, target_res)))


def task_memory_bytes(task_shape: Sequence[int], resolution: Sequence[float],
                      source_size: Sequence[int], target_res: Sequence[float],
                      interpolation: str = "linear", itemsize: int = 1) -> int:
    """The peak bytes of a task that writes a `task_shape` block: the source box it reads
    (`itemsize` bytes a voxel, box at most `source_size`) and what `resample_block` holds,
    per pass the float64 input and three float64 arrays of its output (its two takes and
    their weighted sum; tracemalloc's peak to the byte), or `nearest_block`'s output and its
    gathered values. A block at a coarser target reads more source voxels than it writes
    (16 per voxel from 4 to 16 nm in x and y), so the output's size alone does not say."""
    t = [int(v) for v in task_shape]
    s = _source_box_shape(t, resolution, source_size, target_res)
    box, out = math.prod(s), math.prod(t)
    if interpolation == "nearest":
        arrays = box * itemsize + 3 * out * 8
    else:  # x, then y, then z: each pass's input and output
        stages = [box, t[0] * s[1] * s[2], t[0] * t[1] * s[2], out]
        arrays = box * itemsize + out + max(8 * a + 24 * b for a, b in zip(stages, stages[1:]))
    return int(MEMORY_MARGIN * arrays)


def resample_block(source: np.ndarray, source_lo: Sequence[int], target: Bbox,
                   resolution: Sequence[float], offset: Sequence[int], size: Sequence[int],
                   target_res: Sequence[float]) -> np.ndarray:
    """The target block (x, y, z uint8) from `source` (x, y, z, starting at the absolute
    source voxel `source_lo`): linear, axis by axis, as the module says."""
    values = np.ascontiguousarray(source, dtype=np.float64)  # np.take copies other orders
    for axis in range(3):
        below, weight = _samples(int(target.minpt[axis]), int(target.maxpt[axis]),
                                 resolution[axis], target_res[axis], offset[axis], size[axis])
        start = below - (int(source_lo[axis]) - int(offset[axis]))
        upper = np.minimum(start + 1, values.shape[axis] - 1)
        shape = [1, 1, 1]
        shape[axis] = weight.size
        weight = weight.reshape(shape)
        values = (np.take(values, start, axis=axis) * (1.0 - weight)
                  + np.take(values, upper, axis=axis) * weight)
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


@stage_task
def ResampleTask(  # noqa: N802  (taskqueue registers tasks by function name)
    image_path: str, output_path: str, bounds: list[int], mip: int, target: list[float],
    fill_missing: bool = False, interpolation: str = "linear",
) -> dict:
    """Write one block of the resampled layer (bounds: absolute target voxels)."""
    src = CloudVolume(image_path, mip=mip, fill_missing=fill_missing, progress=False)
    resolution = [float(r) for r in src.resolution]
    offset = [int(v) for v in src.voxel_offset]
    size = [int(v) for v in src.volume_size]
    block = Bbox(bounds[:3], bounds[3:])
    box = source_box(block, resolution, offset, size, target, interpolation)
    source = None if box is None else read_block(
        src, box.minpt, box.maxpt, "pass --fill-missing to read them as zeros")[..., 0]
    out = CloudVolume(output_path, mip=0, progress=False, non_aligned_writes=False)
    if interpolation == "nearest":
        data = nearest_block(source, None if box is None else box.minpt, block, resolution,
                             offset, size, target).astype(out.dtype, copy=False)
    else:
        data = resample_block(source, box.minpt, block, resolution, offset, size, target)
    write_block(out, bounds[:3], data)
    return {"voxels": int(data.size), "read_voxels": 0 if source is None else int(source.size)}


@dataclass
class ResamplePlan:
    """What `deepem3d resample` will do, computed without writing anything."""

    image_path: str
    output_path: str
    mip: int
    source_resolution: tuple[float, float, float]
    resolution: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    size: tuple[int, int, int]
    chunk_size: tuple[int, int, int]
    task_shape: tuple[int, int, int]
    blocks: BlockGrid
    fill_missing: bool = False
    resume: bool = False
    #: "linear" (an image) or "nearest" (a segmentation), and the layer's type and dtype
    interpolation: str = "linear"
    dtype: str = "uint8"
    like: str | None = None
    #: the peak bytes of the largest task (`task_memory_bytes`) and its seconds (`task_seconds`)
    memory_bytes: int = 0
    seconds_per_task: float = 0.0

    def parameters(self) -> dict:
        return {"task": "deepem3d resample", "image": self.image_path, "mip": self.mip,
                "source_resolution": list(self.source_resolution),
                "resolution": list(self.resolution), "interpolation": self.interpolation,
                "task_shape": list(self.task_shape), "chunk_size": list(self.chunk_size),
                "fill_missing": self.fill_missing, **({"like": self.like} if self.like else {})}

    @property
    def layer_type(self) -> str:
        return "segmentation" if self.interpolation == "nearest" else "image"

    def describe(self) -> str:
        def nm(values: Sequence[float]) -> str:
            return "x".join(f"{v:g}" for v in values)

        return (f"{len(self.blocks)} ResampleTask(s) of up to "
                f"{' x '.join(map(str, self.task_shape))} voxels: {self.image_path} at mip "
                f"{self.mip} ({nm(self.source_resolution)} nm, {self.interpolation}) into "
                f"{self.output_path} "
                f"({nm(self.resolution)} nm, {' x '.join(map(str, self.size))} voxels from "
                f"{','.join(map(str, self.voxel_offset))}); about "
                f"{self.memory_bytes / 2**20:.0f} MiB per task"
                + ("; resuming: finished tasks are skipped" if self.resume else ""))


#: the largest factor per axis, either way, that linear interpolation resamples
RESAMPLE_FACTOR = 4.0


def within_resample_range(source: Sequence[float], target: Sequence[float]) -> bool:
    """Whether `deepem3d resample` takes an image from `source` to `target` nm (x, y, z)."""
    return all(1 / RESAMPLE_FACTOR <= float(s) / float(t) <= RESAMPLE_FACTOR
               for s, t in zip(source, target))


def plan_resample(image_path: str, output_path: str, *,
                  resolution: Sequence[float] | None = None, like: str | None = None,
                  mip: int = 0, task_shape: Sequence[int] | None = None,
                  chunk_size: Sequence[int] | None = None, fill_missing: bool = False,
                  overwrite: bool = False) -> ResamplePlan:
    """Check the inputs and work out the target grid (at `resolution`, or `like` another
    layer's grid) and blocks; reads infos only. An image (one uint8 channel) is resampled
    linearly, a segmentation layer by nearest neighbour."""
    image_path, output_path = cloudpath(image_path), cloudpath(output_path)
    if (resolution is None) == (like is None):
        raise InputError("give the target grid: --resolution X,Y,Z or --like LAYER (one)")
    like = cloudpath(like) if like is not None else None
    check_output_apart(output_path, {"input": image_path, "--like": like})
    grid = None
    if like is not None:
        other = open_layer(like)
        resolution = tuple(float(r) for r in other.resolution)
        grid = ([int(v) for v in other.voxel_offset], [int(v) for v in other.volume_size],
                tuple(int(c) for c in other.chunk_size))
    target = tuple(float(r) for r in resolution)
    if len(target) != 3 or not all(math.isfinite(r) and r > 0 for r in target):
        raise InputError(f"--resolution {','.join(map(str, resolution))}: give three "
                         "positive numbers of nm, x,y,z")
    vol = open_layer(image_path, mip=mip)
    segmentation = vol.layer_type == "segmentation"
    if vol.num_channels != 1 or (vol.dtype != np.uint8 and not (
            segmentation and vol.dtype in (np.uint32, np.uint64))):
        raise InputError(f"{image_path} holds {vol.num_channels} channel(s) of {vol.dtype}: "
                         "resample reads one-channel uint8 EM images (`deepem3d ingest` makes "
                         "them) and segmentations of uint8, uint32 or uint64 ids")
    source = tuple(float(r) for r in vol.resolution)
    if not within_resample_range(source, target):
        asked = (f"--like {like}'s voxel size" if like else "--resolution")
        raise InputError(f"{asked} {','.join(f'{r:g}' for r in target)} is more than "
                         f"{RESAMPLE_FACTOR:g} "
                         f"times off {','.join(f'{r:g}' for r in source)} nm: resampling is "
                         "for small factors (`deepem3d downsample` reduces by whole factors)")
    if grid is None:
        offset, size = target_geometry(source, [int(v) for v in vol.voxel_offset],
                                       [int(v) for v in vol.volume_size], target)
        chunk = tuple(int(c) for c in (chunk_size or vol.meta.chunk_size(mip)))
    else:  # the other layer's grid and, unless told, its chunks: blocks align with its own
        offset, size, like_chunk = grid
        chunk = tuple(int(c) for c in (chunk_size or like_chunk))
    if task_shape is None:
        task_shape = tuple(-(-t // c) * c for t, c in zip(DEFAULT_TASK_SHAPE, chunk))
    task_shape = tuple(min(int(t), s) for t, s in zip(check_task_shape(task_shape, chunk),
                                                       size))
    plan = ResamplePlan(
        image_path=image_path, output_path=output_path, mip=mip, source_resolution=source,
        resolution=target, voxel_offset=tuple(offset), size=tuple(size), chunk_size=chunk,
        task_shape=task_shape, fill_missing=fill_missing, like=like,
        interpolation="nearest" if segmentation else "linear",
        # a segmentation layer holds uint32 or uint64: a uint8 one's ids widen to uint32
        dtype="uint32" if segmentation and vol.dtype == np.uint8 else str(vol.dtype),
        blocks=block_grid(Bbox(offset, [o + s for o, s in zip(offset, size)]), task_shape),
        memory_bytes=task_memory_bytes(task_shape, source, [int(v) for v in vol.volume_size],
                                       target, "nearest" if segmentation else "linear",
                                       np.dtype(vol.dtype).itemsize),
        seconds_per_task=task_seconds(task_shape, source, [int(v) for v in vol.volume_size],
                                      target))
    if layer_holds_data(output_path) and not overwrite:
        made = Markers(output_path, STAGE).current_key()
        if made != resample_key(plan):
            if made is None:
                raise InputError(f"{output_path} already holds data: pass --overwrite to "
                                 "replace it, or choose another OUTPUT")
            # another resample's: other settings, or the same under the former grid rule (its
            # far end rounded down)
            have = layer_geometry(output_path) or {}
            raise InputError(
                f"{output_path} already holds data, resampled with other settings or onto "
                f"another grid (at {format_triple(have.get('resolution', []))} nm, offset "
                f"{format_triple(have.get('voxel_offset', []))}, size "
                f"{format_triple(have.get('size', []))}; this plan: "
                f"{format_triple(plan.resolution)} nm, offset "
                f"{format_triple(plan.voxel_offset)}, size {format_triple(plan.size)}): pass "
                "--overwrite to replace it, or choose another OUTPUT")
        plan.resume = True
    return plan


def resample_key(plan: ResamplePlan) -> str:
    return digest({**plan.parameters(), "size": list(plan.size),
                   "offset": list(plan.voxel_offset)})


def resample_stage(plan: ResamplePlan, *, overwrite: bool = False) -> Stage:
    """The resample stage: one ResampleTask per output block."""
    common = dict(image_path=plan.image_path, output_path=plan.output_path, mip=plan.mip,
                  target=list(plan.resolution), fill_missing=plan.fill_missing,
                  interpolation=plan.interpolation)

    def make_tasks() -> Iterator[tuple[str, partial]]:
        return ((block_id(b), partial(ResampleTask, bounds=bounds_list(b), **common))
                for b in plan.blocks)

    def prepare() -> None:
        if not plan.resume:
            create_layer(plan.output_path, layer_type=plan.layer_type, dtype=plan.dtype,
                         resolution=plan.resolution, size=plan.size,
                         voxel_offset=plan.voxel_offset, chunk_size=plan.chunk_size,
                         overwrite=overwrite, provenance=plan.parameters())

    voxels = math.prod(plan.size)
    return Stage(
        name=STAGE, layer=plan.output_path, key=resample_key(plan),
        parameters=plan.parameters(), make_tasks=make_tasks, task_count=len(plan.blocks),
        memory_bytes=plan.memory_bytes,
        seconds_per_task=plan.seconds_per_task, output_bytes=voxels, prepare=prepare)
