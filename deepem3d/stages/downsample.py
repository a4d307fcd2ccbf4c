"""Downsampling: igneous's DownsampleTask, one per aligned block, each writing its marker.

igneous does the work (averaging for images, mode for segmentation); deepem3d adds the
dry-run plan, the completion markers and the stage bookkeeping. Only mips above `mip` are
written: the full-resolution data is left as it was. A level is made only where the layer's
voxel offset is a multiple of the level's total factor: igneous averages blocks that start at
the offset, while the precomputed format places a level's voxel i at floor(offset / factor) + i,
so a layer at offset 3 would have its level-1 voxels drawn one full-resolution voxel off.
Each planned level must be new or the very scale already at its index (resolution, geometry,
encoding, sharding): igneous adds a level by its resolution, appending one the info lacks,
while its tasks write mips mip + 1, mip + 2, ..., so another factor wrote over the existing
levels. That is refused at planning, before the info is touched; the info is put back if
listing the tasks fails after igneous added the scales.
igneous's tasks are blocks of chunk x factor^levels from the region's start, clipped only to
the layer, and each writes all its levels: with `bounds` (grown to whole chunks, as igneous
grows them) the blocks are those the bounds hold whole on the levels' chunk grids (the bounds
start on the grid from the voxel offset and end on it or at the layer's end), with the levels
that allows (igneous is given the memory target that sizes its tasks so); bounds that hold
no task of one level, or fewer levels than asked for, are refused.
A sharded layer (`deepem3d segment --sharded`) gets sharded levels from igneous's
ImageShardDownsampleTask, one task per shard of the first new level, each shard holding about
a quarter of `memory_target` before compression (the task reads the shard's source box,
`factor` times as many voxels, and holds both). Its tasks write whole shards: `bounds` off
their grid are refused, and so is a plan that would drop existing levels above the new ones
(igneous cuts the info's scales to those it makes).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from cloudvolume.lib import Bbox, Vec

from deepem3d.errors import InputError
from deepem3d.stages.blocks import check_bounds
from deepem3d.stages.frame import Stage, digest, marked
from deepem3d.storage.layers import cloudpath, open_layer, put_info
from deepem3d.storage.sharding import on_task_grid
from deepem3d.units import format_bounds, format_triple

# igneous is imported where it is used: importing it costs a worker ~0.3 s at start-up, and
# every local stage starts its own workers (a DownsampleTask payload imports it when run).
MEMORY_TARGET = int(3.5e9)  # igneous.task_creation.image.MEMORY_TARGET, its default
# What igneous's memory model (the source box and its levels) leaves out, in source boxes:
# measured as the markers' peak_added_mib (`deepem3d downsample --parallel 1`, this machine),
# averaging (an image layer: uint8 and float32, 1 and 3 channels, boxes of 512^2 x 10 to
# 2048^2 x 8, factor 2,2,1 making 3-4 levels, 2,2,2 making 1) peaked at 1.47-2.03 source boxes
# where that model says 1.14-1.33 (a 2048^2 x 8 uint8 task: 62.1 MiB, planned 42.7); the mode
# (uint64 segmentation, 256^2 x 8 and 1024^2 x 8) at 1.37 (87.4 MiB, planned 85.3); and each
# task about 1 MiB more whatever its size (the demo's 512^2 x 10 uint8 tasks: 6.6 MiB, 3.3)
AVERAGING_EXTRA = 1.0
MODE_EXTRA = 0.125
TASK_BASE_BYTES = 2 * 2**20


@dataclass
class DownsamplePlan:
    """What a downsampling run will do, computed without writing anything."""

    layer_path: str
    mip: int
    factor: tuple[int, int, int]
    num_mips: int
    task_shape: tuple[int, int, int]
    task_count: int
    memory_bytes: int
    bounds: Bbox
    #: the first task's block, the largest: the task shape from the region's start, clipped to
    #: the layer (as igneous clips it)
    task_extent: tuple[int, int, int]
    #: igneous's memory target, which sizes its tasks: --memory, or less where --bounds hold
    #: only smaller tasks whole
    memory_target: int = MEMORY_TARGET
    itemsize: int = 1
    new_resolutions: list = field(default_factory=list)
    #: the source is sharded: igneous's ImageShardDownsampleTask makes sharded levels
    sharded: bool = False
    #: why there are fewer levels than memory allows (the voxel offset or --bounds limit
    #: them), or than asked for (memory or the layer's size limit them)
    offset_note: str = ""
    #: the keys of the existing levels above `mip` the stage removes first (a run replacing
    #: its own layer's levels, made by another factor: plan_downsample's `replace_levels`)
    replaced_levels: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        """Bytes of the new levels before compression (a quarter of the data per 2x2 level)."""
        total, voxels = 0, math.prod(int(s) for s in self.bounds.size3())
        for _ in range(self.num_mips):
            voxels //= math.prod(self.factor)
            total += voxels
        return total * self.itemsize

    def describe(self) -> str:
        shape = " x ".join(str(s) for s in self.task_extent)
        task = "ImageShardDownsampleTask" if self.sharded else "DownsampleTask"
        return (
            f"{self.task_count} {task}(s) of {shape} voxels at mip {self.mip}, "
            f"adding {len(self.new_resolutions)} mip level(s) by factor "
            f"{','.join(map(str, self.factor))}; about {self.memory_bytes / 2**20:.1f} MiB "
            "per task" + (f" ({self.offset_note})" if self.offset_note else "")
            + (f"; replacing the levels there, {', '.join(self.replaced_levels)}"
               if self.replaced_levels else "")
        )


def default_factor(resolution: Sequence[float]) -> tuple[int, int, int]:
    """(2,2,1) for anisotropic data (z coarser than 1.5x xy), else (2,2,2)."""
    x, y, z = (float(r) for r in resolution)
    return (2, 2, 1) if z > 1.5 * min(x, y) else (2, 2, 2)


def plan_downsample(
    layer_path: str,
    *,
    mip: int = 0,
    num_mips: int | None = None,
    factor: tuple[int, int, int] | None = None,
    bounds: Bbox | None = None,
    memory_target: int = MEMORY_TARGET,
    shown_as: str | None = None,
    grow: bool = False,
    replace_levels: bool = False,
) -> DownsamplePlan:
    """Mirror igneous's task geometry so `--dry-run` can report it without touching the info.
    `shown_as` names the layer in messages (a run plans layers it has yet to write on
    stand-ins of their geometry). With `grow`, `bounds` (the part of its own layer a run
    wrote) grow to the tasks' grid instead of limiting the levels: what lies beyond them in
    those tasks was never written and reads as zeros. With `replace_levels`, existing levels
    above `mip` that the plan would write over are not refused but planned away: the stage
    removes them all (chunks, then scales) before its tasks add the new ones."""
    vol = open_layer(cloudpath(layer_path), mip=mip)
    shown = cloudpath(shown_as or layer_path)
    options = dict(mip=mip, num_mips=num_mips, factor=factor, bounds=bounds,
                   memory_target=memory_target, grow=grow)
    try:
        return _plan(vol, shown, **options)
    except LevelsInTheWay:
        if not replace_levels:
            raise
    replaced = [scale["key"] for scale in vol.info["scales"][mip + 1:]]
    vol.info["scales"] = vol.info["scales"][:mip + 1]  # this copy of the info only
    plan = _plan(vol, shown, **options)
    plan.replaced_levels = replaced
    return plan


def _plan(vol, layer_path: str, *, mip: int, num_mips: int | None,
          factor: tuple[int, int, int] | None, bounds: Bbox | None, memory_target: int,
          grow: bool) -> DownsamplePlan:
    """plan_downsample's plan of the layer `vol` (opened at `mip`), named `layer_path`."""
    from igneous import downsample_scales
    from igneous.task_creation.common import get_bounds
    from igneous.task_creation.image import num_mips_from_memory_target

    factor = tuple(factor) if factor else default_factor(vol.meta.resolution(mip))
    if any(f < 1 for f in factor):
        raise InputError(f"--factor {factor} must be at least 1 on every axis")
    if math.prod(factor) == 1:
        raise InputError("--factor 1,1,1 would not downsample: use e.g. 2,2,1")
    if vol.layer_type == "segmentation":
        check_mode_factor(layer_path, factor)
    chunk = Vec(*vol.meta.chunk_size(mip))
    viable = num_mips_from_memory_target(
        memory_target, vol.dtype, chunk, vol.num_channels, factor
    )
    asked = num_mips
    offset = vol.meta.voxel_offset(mip)
    aligned = check_offset(layer_path, offset, factor, mip, asked)
    sharded = vol.meta.sharding(mip) is not None
    if bounds is not None:  # refused as infer and segment refuse them (igneous would clip)
        check_bounds(bounds, offset, vol.meta.volume_size(mip), layer_path, mip)
    with contextlib.redirect_stdout(io.StringIO()):  # igneous prints the bounds it chose
        region = get_bounds(vol, bounds, mip, bounds_mip=mip, chunk_size=chunk)
    volume = vol.meta.bounds(mip)
    if grow and bounds is not None:
        region = grown(region, volume, _levels_shape(chunk, factor, viable))
    # igneous's tasks are boxes of chunk x factor^levels from the region's start: with
    # --bounds, no larger than the region holds whole on the levels' chunk grids
    fits = viable if bounds is None or sharded else grid_levels(region, volume, chunk, factor,
                                                                viable)
    shape = _levels_shape(chunk, factor, viable)
    room = downsample_scales.compute_scales(vol, mip, shape, "z", factor, None)
    if not room:
        raise InputError(too_small(layer_path, mip, vol.meta.volume_size(mip), chunk, factor))
    if fits < viable:
        shape = _levels_shape(chunk, factor, fits)
        memory_target = _memory_target_for(fits, vol, chunk, factor)
    resolutions = downsample_scales.compute_scales(vol, mip, shape, "z", factor, None)
    want = min(asked or len(room), len(room))
    if len(resolutions) < want and (asked is not None or not resolutions):
        raise InputError(  # the bounds keep the levels asked for, or any, from being made
            f"{layer_path}: "
            + _bounds_grid(bounds, mip, offset, chunk, factor, len(resolutions), want) + ": "
            + (f"ask for --num-mips {len(resolutions)} or fewer, or " if resolutions else "")
            + "give bounds on the grid of such blocks (or ending at the layer's end, "
            + f"{format_triple(volume.maxpt)})")
    made = min(asked or aligned, aligned, len(resolutions))
    offset_note = ""
    if asked is None and aligned < len(resolutions):
        offset_note = f"{_offset_grid(offset, factor, mip, aligned)}: fewer levels"
    elif asked is None and len(resolutions) < len(room):
        offset_note = _bounds_grid(bounds, mip, offset, chunk, factor, len(resolutions),
                                   len(room)) + ": fewer levels"
    elif asked is not None and made < asked:
        offset_note = (f"{asked} level(s) asked for: " + (
            f"one task's --memory allows {viable}; downsample again from --mip {mip + made} "
            "for the rest" if made == viable else
            "the layer is no larger than a chunk at the last"))
    resolutions = resolutions[:made]
    if sharded:
        shape, resolutions, scales = _shard_geometry(vol, mip, factor, len(resolutions),
                                                     memory_target)
        if grow and bounds is not None:
            region = grown(region, volume, shape)
        if bounds is not None and not on_grid(region, volume, shape):
            raise InputError(
                f"{layer_path}: --bounds {format_bounds(bounds)} at mip {mip} are off the grid "
                f"of the sharded tasks, which write whole shards, blocks of "
                f"{format_triple(shape)} voxels from the voxel offset: give bounds on that grid "
                f"(or ending at the layer's end, {format_triple(volume.maxpt)}), or a smaller "
                "--memory, which makes smaller shards")
    else:
        scales = _new_scales(vol, mip, resolutions)
    check_levels(layer_path, vol.info["scales"], mip, factor, scales, resolutions, sharded)
    count = int(np.prod(np.ceil(np.asarray(region.size3()) / np.asarray(shape))))
    # igneous's own memory model: the source box and its levels (a sharded task also holds
    # the encoded shards: counted as a second copy of the first level), and what it leaves out
    stack = math.prod(factor) / (math.prod(factor) - 1) + (1 / math.prod(factor) if sharded
                                                              else 0)
    extent = tuple(min(int(s), int(end) - int(lo))
                   for s, end, lo in zip(shape, volume.maxpt, region.minpt))
    stack += MODE_EXTRA if vol.layer_type == "segmentation" else AVERAGING_EXTRA
    memory = int(math.prod(extent) * np.dtype(vol.dtype).itemsize * vol.num_channels * stack
                 + TASK_BASE_BYTES)
    return DownsamplePlan(
        layer_path=layer_path,
        mip=mip,
        factor=factor,
        num_mips=len(resolutions),
        task_shape=tuple(int(s) for s in shape),
        task_count=count,
        memory_target=memory_target,
        memory_bytes=memory,
        bounds=region,
        task_extent=extent,
        itemsize=int(np.dtype(vol.dtype).itemsize * vol.num_channels),
        new_resolutions=[list(r) for r in resolutions],
        sharded=sharded,
        offset_note=offset_note,
    )


def check_mode_factor(layer_path: str, factor: Sequence[int]) -> None:
    """Refuse a factor igneous's mode downsampling of a segmentation fails on in every task:
    tinybrain takes a factor with an axis of 1 and a power-of-two product for a square in a
    plane, and a factor that downsamples one axis only, or two by different amounts, raises
    there ("Factors less than one", measured for 2,1,1, 1,1,2, 4,1,1 and 4,2,1). A
    power-of-two factor above 1 on every axis is halved on each (countless3d, on a task of
    even shape: all but the layer's last ones) until an axis is 1, and what is left must pass
    the same rule: 2,2,4 leaves 1,1,2 and fails; 4,4,2 leaves 2,2,1."""
    f = [int(v) for v in factor]
    rest = list(f)
    while min(rest) > 1 and _power_of_two(math.prod(rest)):
        rest = [v // 2 for v in rest]
    downsampled = [v for v in rest if v > 1]
    if (1 in rest and _power_of_two(math.prod(rest))
            and not (len(downsampled) == 2 and downsampled[0] == downsampled[1])):
        halved = "" if rest == f else (
            f"; a factor above 1 on every axis is first halved on each, which leaves "
            f"{format_triple(rest)} here")
        raise InputError(
            f"{layer_path}: igneous downsamples a segmentation by the mode of each block and "
            f"fails on --factor {format_triple(f)}: with a factor of 1 on an axis, the other "
            f"two must be equal (such as 2,2,1){halved}; give such a factor, or one above 1 on "
            "every axis that halving brings to such a factor or to 1,1,1 (such as 2,2,2 or "
            "4,4,2)")


def _power_of_two(value: int) -> bool:
    return value > 1 and value & (value - 1) == 0


def _levels_shape(chunk: Sequence[int], factor: Sequence[int], levels: int) -> Vec:
    """igneous's task shape for `levels` levels at once: chunk x factor^levels."""
    return Vec(*(int(c) * int(f) ** levels for c, f in zip(chunk, factor)))


def on_grid(region: Bbox, volume: Bbox, step: Sequence[int]) -> bool:
    """Whether boxes of `step` from the region's start, clipped to the volume, tile the
    region on the grid of `step` from the volume's start (its voxel offset): the region
    starts on that grid and ends on it or at the volume's end."""
    return all(on_task_grid(at, start, end, s)
               for face in (region.minpt, region.maxpt)
               for at, start, end, s in zip(face, volume.minpt, volume.maxpt, step))


def grown(region: Bbox, volume: Bbox, step: Sequence[int]) -> Bbox:
    """The region grown to the grid of `step` from the volume's start, clipped to the volume:
    the least region that holds whole the blocks of `step` it touches."""
    lo, hi, start, end, step = (np.asarray(v, dtype=int) for v in (
        region.minpt, region.maxpt, volume.minpt, volume.maxpt, step))
    return Bbox(start + (lo - start) // step * step,
                np.minimum(start - (start - hi) // step * step, end))


def grid_levels(region: Bbox, volume: Bbox, chunk: Sequence[int], factor: Sequence[int],
                most: int) -> int:
    """How many levels' tasks (chunk x factor^levels) the region holds whole, on the chunk
    grids of those levels: the largest such k, at most `most`."""
    levels = 0
    while levels < most and on_grid(region, volume, _levels_shape(chunk, factor, levels + 1)):
        levels += 1
    return levels


def _memory_target_for(levels: int, vol, chunk: Sequence[int], factor: Sequence[int]) -> int:
    """The least memory target for which igneous's tasks span `levels` levels
    (num_mips_from_memory_target: the factor's volume^levels chunks, times its stack)."""
    from igneous.task_creation.image import num_mips_from_memory_target

    total = math.prod(factor)
    unit = np.dtype(vol.dtype).itemsize * vol.num_channels * math.prod(int(c) for c in chunk)
    count = math.ceil(total ** (levels + 1) / (total - 1))
    while num_mips_from_memory_target(count * unit, vol.dtype, chunk, vol.num_channels,
                                      factor) < levels:
        count += 1
    return int(count * unit)


def _bounds_grid(bounds: Bbox, mip: int, offset: Sequence[int], chunk: Sequence[int],
                 factor: Sequence[int], levels: int, want: int) -> str:
    """Why --bounds allow `levels` levels where `want` were possible."""
    if not levels:
        return (f"--bounds {format_bounds(bounds)} at mip {mip} hold no whole task of factor "
                f"{','.join(map(str, factor))}: one level's tasks are blocks of "
                f"{format_triple(_levels_shape(chunk, factor, 1))} voxels from the voxel offset "
                f"{format_triple(offset)}" + (f" ({want} levels': "
                f"{format_triple(_levels_shape(chunk, factor, want))})" if want > 1 else ""))
    return (f"--bounds {format_bounds(bounds)} at mip {mip} hold whole tasks of only {levels} "
            f"level(s) of factor {','.join(map(str, factor))} (blocks of "
            f"{format_triple(_levels_shape(chunk, factor, levels))} voxels from the voxel "
            f"offset {format_triple(offset)}; {want} level(s) need blocks of "
            f"{format_triple(_levels_shape(chunk, factor, want))})")


def too_small(layer_path: str, mip: int, size: Sequence[int], chunk: Sequence[int],
              factor: Sequence[int]) -> str:
    """Why igneous makes no level: its levels keep the chunk size, so an axis it downsamples
    must span `factor` chunks (`downsample_scales.compute_factors`). Names the axis and the
    chunk size that would do."""
    short = [a for a in range(3)
             if factor[a] > 1 and int(size[a]) < int(factor[a]) * int(chunk[a])]
    if not short:  # igneous counted the chunks of a level the layer already has
        return (f"{layer_path} at mip {mip} is too small to downsample by "
                f"{','.join(map(str, factor))}: no new mip level would be made")
    spans = ", ".join(f"{'xyz'[a]} spans {int(size[a]) / int(chunk[a]):.3g} of {int(chunk[a])} "
                      f"({int(size[a])} voxels)" for a in short)
    fits = ",".join(str(max(1, int(size[a]) // int(factor[a])) if a in short else int(chunk[a]))
                    for a in range(3))
    return (f"{layer_path} at mip {mip} is too small to downsample by "
            f"{','.join(map(str, factor))}: new levels keep the chunk size, so an axis "
            f"downsampled by f must span f chunks, and {spans}; write the layer with chunks "
            f"of at most {fits} (--chunk-size, a pipeline's chunk_size), or give a factor of 1 on "
            f"{'that axis' if len(short) == 1 else 'those axes'}")


def check_offset(layer_path: str, offset: Sequence[int], factor: Sequence[int], mip: int,
                 asked: int | None) -> int:
    """How many levels of `factor` the voxel offset at `mip` lies on the grid of; a one-line
    error when that is none, or fewer than the `asked` number (a level off its grid is drawn
    shifted)."""
    aligned = aligned_levels(offset, factor)
    limited = aligned < ALIGNED_LEVELS_LIMIT  # else the offset is 0: no limit
    if aligned == 0 or (asked is not None and asked > aligned and limited):
        raise InputError(f"{layer_path}: {_offset_grid(offset, factor, mip, aligned)}, and a "
                         "level off its grid is drawn shifted: "
                         + (f"ask for --num-mips {aligned} or fewer, or " if aligned else "")
                         + "ingest the data at an offset that is a multiple of the "
                         "factor's powers (--voxel-offset)")
    return aligned


def _offset_grid(offset, factor, mip: int, aligned: int) -> str:
    return (f"voxel offset {','.join(str(int(v)) for v in offset)} at mip {mip} lies on the "
            f"grid of only {aligned} level(s) of factor {','.join(map(str, factor))}")


#: aligned_levels stops counting here (a zero offset lies on every level's grid)
ALIGNED_LEVELS_LIMIT = 64


def aligned_levels(offset: Sequence[int], factor: Sequence[int],
                   most: int = ALIGNED_LEVELS_LIMIT) -> int:
    """How many levels of `factor` keep `offset` on each level's grid: the largest k with
    offset a multiple of factor**k on every axis (at most `most`)."""
    levels = 0
    while levels < most and all(
        int(o) % (int(f) ** (levels + 1)) == 0 for o, f in zip(offset, factor)
    ):
        levels += 1
    return levels


#: the fields of a scale whose change makes its chunks another level's or unreadable
SCALE_FIELDS = ("key", "resolution", "voxel_offset", "size", "chunk_sizes", "encoding",
                "compressed_segmentation_block_size", "sharding")


class LevelsInTheWay(InputError):
    """Existing levels above `mip` that a plan would write over (`check_levels`): `problem`
    says which, `fix` what the plan could ask instead; the message adds `deepem3d downsample`'s
    other way out, levels above the existing ones. A run replaces its own layers' levels."""

    def __init__(self, problem: str, fix: str, above: str = "") -> None:
        super().__init__(f"{problem}: {fix}" + (f", {above}" if above else ""))
        self.problem, self.fix = problem, fix


def check_levels(layer_path: str, existing: list[dict], mip: int, factor: Sequence[int],
                 scales: list[dict], resolutions: list, sharded: bool) -> None:
    """Refuse a plan whose levels are neither new nor the very scales already at their index:
    igneous adds a level by its resolution (appending one the info lacks) while its tasks
    write mips mip + 1, mip + 2, ..., so another factor wrote over the existing levels.
    `scales` are the info's scales as igneous will leave them; checked before it writes."""
    top = len(existing) - 1
    above = f"or add levels above the existing ones (--mip {top})"
    factor = ",".join(map(str, factor))
    for index, resolution in enumerate(resolutions, mip + 1):
        here = existing[index] if index <= top else None
        if here is not None and _numbers(here["resolution"]) != _numbers(resolution):
            if index > mip + 1:  # the levels below it agree: stop short of it
                fix = f"ask for --num-mips {index - mip - 1}"
            else:
                made_with = _ratio(here["resolution"], existing[index - 1]["resolution"])
                fix = "downsample by the factor that made it" + (
                    f" (--factor {format_triple(made_with)})" if made_with else "")
            raise LevelsInTheWay(
                f"{layer_path}: mip {index} exists at {format_triple(here['resolution'])} nm, "
                f"where downsampling mip {mip} by {factor} makes {format_triple(resolution)} "
                f"nm, and its tasks would write over mip {index}", fix, above)
        made = scales[index] if index < len(scales) else None
        if made is None or _numbers(made["resolution"]) != _numbers(resolution):
            raise LevelsInTheWay(  # igneous would replace the scale of that resolution
                f"{layer_path}: downsampling mip {mip} by {factor} makes "
                f"{format_triple(resolution)} nm as mip {index}, a resolution another mip of "
                "the layer has already", "downsample by another --factor",
                "or from another --mip")
        changed = [f for f in SCALE_FIELDS
                   if here is not None and _plain(here.get(f)) != _plain(made.get(f))]
        if changed:
            name, was, then = changed[0], here.get(changed[0]), made.get(changed[0])
            if name != "sharding":
                values = f" ({_plain(was)} here, {_plain(then)} made)"
            else:
                values = "" if was and then else (f" ({'un' * (not was)}sharded here, "
                                                  f"{'un' * (not then)}sharded made)")
            raise LevelsInTheWay(
                f"{layer_path}: mip {index} ({here['key']}) exists with another {name} than "
                f"downsampling mip {mip} gives it{values}: its info would be replaced and its "
                f"chunks written over", "leave it as it is", above)
    first = mip + len(resolutions) + 1
    if sharded and top >= first:
        raise LevelsInTheWay(
            f"{layer_path}: mip{f's {first} to' if top > first else ''} {top} exist"
            f"{'' if top > first else 's'} above the {len(resolutions)} level(s) planned, and "
            "igneous's sharded downsampling drops the levels above those it makes from the "
            "info", f"ask for --num-mips {top - mip}", above)


def _numbers(values) -> list[float]:
    return [float(v) for v in values]


def _plain(value):
    """A scale's field as JSON reads it back (tuples as lists, numpy numbers as numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist()))


def _ratio(a, b) -> list[int] | None:
    """a / b axis by axis when whole numbers (a factor between resolutions), else None."""
    ratio = [float(x) / float(y) for x, y in zip(a, b)]
    return [round(r) for r in ratio] if all(r >= 1 and r == round(r) for r in ratio) else None


def _new_scales(vol, mip: int, resolutions: list) -> list[dict]:
    """The info's scales as igneous's create_downsample_scales leaves them, on a copy: each
    level added by its resolution (replacing a scale of that resolution, else appended), then
    mips mip + 1 .. mip + n given the chunk size of `mip`."""
    meta = copy.deepcopy(vol.meta)
    for resolution in resolutions:
        with contextlib.redirect_stdout(io.StringIO()):  # CloudVolume prints a warning for
            meta.add_resolution(resolution)  # a factor not a power of two: not --dry-run's
    scales = meta.info["scales"]
    for index in range(mip + 1, min(mip + len(resolutions) + 1, len(scales))):
        scales[index]["chunk_sizes"] = scales[mip]["chunk_sizes"]
    return scales


def _shard_geometry(vol, mip: int, factor, num_mips: int, memory_target: int):
    """(task shape at `mip`, the new levels' resolutions, the info's scales as igneous leaves
    them) of igneous's sharded downsampling, worked out as create_image_shard_downsample_tasks
    does, on a copy of the info: the scales above `mip` dropped; each new level's shards hold
    `memory_target` / (4 x the factor's volume) bytes before compression; a task spans a shard
    of every new level; fewer levels when the shards of the first do not hold whole chunks of
    the last."""
    from igneous.shards import image_shard_shape_from_spec
    from igneous.task_creation.image import create_sharded_image_info

    meta = copy.deepcopy(vol.meta)
    meta.info["scales"] = meta.info["scales"][:mip + 1]
    shapes, resolutions = [], []
    for i in range(1, num_mips + 1):
        resolution = [r * f for r, f in zip(meta.resolution(mip + i - 1), factor)]
        with contextlib.redirect_stdout(io.StringIO()):  # as in _new_scales
            meta.add_resolution(resolution, chunk_size=meta.chunk_size(mip))
        spec = create_sharded_image_info(
            dataset_size=meta.volume_size(mip + i), chunk_size=meta.chunk_size(mip + i),
            encoding=meta.encoding(mip), dtype=vol.dtype,
            uncompressed_shard_bytesize=shard_bytes(memory_target, factor))
        meta.info["scales"][mip + i]["sharding"] = spec
        shapes.append(image_shard_shape_from_spec(spec, meta.volume_size(mip + i),
                                                  meta.chunk_size(mip + i)))
        resolutions.append(resolution)
    shape = [max(int(s[a]) * int(factor[a]) ** (i + 1) for i, s in enumerate(shapes))
             for a in range(3)]
    levels = num_mips
    for a in range(3):  # igneous keeps the levels whose chunks the task's box holds whole
        if factor[a] > 1:
            chunks = shape[a] / meta.chunk_size(mip + num_mips)[a]
            levels = min(levels, int(round(math.log2(chunks) / math.log2(factor[a]))))
    levels = max(levels, 1)
    return Vec(*shape), resolutions[:levels], meta.info["scales"][:mip + levels + 1]


def shard_bytes(memory_target: int, factor: Sequence[int]) -> int:
    """Uncompressed bytes of a new level's shard: a task holds the source box (the factor's
    volume times a shard) and the levels it makes, within about `memory_target`."""
    return max(1, int(memory_target) // (4 * math.prod(factor)))


#: seconds of one DownsampleTask per voxel it reads, for --dry-run's core-hours (measured on
#: the demo's run, this machine: 20 ns for the uint8 image, 150 for the uint64 segmentation;
#: the larger is used)
SECONDS_PER_VOXEL = 150e-9


@contextlib.contextmanager
def _info_restored_on_error(layer_path: str, info: dict) -> Iterator[None]:
    """The info put back as it was when listing the tasks fails after igneous added the new
    scales to it: no level is left in the info that no task will write."""
    try:
        yield
    except BaseException:
        put_info(layer_path, info)
        raise


def downsample_stage(
    plan: DownsamplePlan, *, source_key: str = "", fill_missing: bool = False,
    sparse: bool = False, needs: tuple[str, ...] = (), label: str = "",
) -> Stage:
    """The stage that adds the plan's mip levels. `source_key` is the run key of the stage
    that wrote the layer (empty for an input layer): a layer rewritten by another run makes
    the downsampling another run too, whose queued tasks from before refuse to write."""
    parameters = {
        "task": "igneous " + ("ImageShardDownsampleTask" if plan.sharded else "DownsampleTask"),
        "mip": plan.mip, "num_mips": plan.num_mips,
        "factor": list(plan.factor), "task_shape": list(plan.task_shape),
        "fill_missing": fill_missing, "sparse": sparse, "source_key": source_key,
        "bounds": [int(v) for v in (*plan.bounds.minpt, *plan.bounds.maxpt)],
    }
    made: list[tuple[str, partial]] = []

    def make_tasks() -> Iterator[tuple[str, partial]]:
        # igneous adds the scales to the info when asked for the tasks, and appends its
        # provenance when they have all been listed: list them once
        if not made:
            from cloudfiles import CloudFiles
            from igneous.task_creation.image import (
                create_downsampling_tasks,
                create_image_shard_downsample_tasks,
            )

            info = CloudFiles(plan.layer_path).get_json("info")
            with contextlib.redirect_stdout(io.StringIO()), _info_restored_on_error(
                    plan.layer_path, info):
                if plan.sharded:
                    # truncate_scales=False: igneous would commit the info cut to `mip`
                    # before it opens the layer, which then fails where meshes or skeletons
                    # are made at a mip above (a downsample run again); the plan refuses the
                    # levels above the new ones that the cut would drop, so it drops none
                    tasks = create_image_shard_downsample_tasks(
                        plan.layer_path, mip=plan.mip, num_mips=plan.num_mips,
                        factor=plan.factor, fill_missing=fill_missing, sparse=sparse,
                        bounds=plan.bounds, bounds_mip=plan.mip, truncate_scales=False,
                        memory_target=shard_bytes(plan.memory_target, plan.factor))
                else:
                    tasks = create_downsampling_tasks(
                        plan.layer_path, mip=plan.mip, num_mips=plan.num_mips,
                        factor=plan.factor, fill_missing=fill_missing, sparse=sparse,
                        bounds=plan.bounds, bounds_mip=plan.mip,
                        memory_target=plan.memory_target,
                    )
                made.extend(marked(task) for task in tasks)
        return iter(made)

    def replace_levels() -> None:
        """The levels the plan replaces removed (a run's own map or segmentation, under
        --overwrite). First the meshes and skeletons made of them are marked outdated, and
        the markers of the stages that made them go: kept by a stop during the removal, those
        would find the levels made (a run started again with the factor that made them ran no
        task over their deleted chunks), and these would keep objects of the old levels."""
        from deepem3d.stages.objects import outdate_objects
        from deepem3d.storage.layers import delete_prefixes, remove_levels

        outdate_objects(plan.layer_path, plan.mip)
        delete_prefixes(plan.layer_path, ["tasks/downsample-"])
        remove_levels(plan.layer_path, plan.mip)

    return Stage(
        name=f"downsample-mip{plan.mip}", layer=plan.layer_path, key=digest(parameters),
        parameters=parameters, make_tasks=make_tasks, task_count=plan.task_count,
        memory_bytes=plan.memory_bytes, needs=needs, label=label,
        seconds_per_task=SECONDS_PER_VOXEL * math.prod(plan.task_extent),
        output_bytes=plan.output_bytes,
        prepare=replace_levels if plan.replaced_levels else None,
    )
