"""Downsampling: igneous's DownsampleTask, one per aligned block, each writing its marker.

igneous does the work (averaging for images, mode for segmentation); deepem3d adds the
dry-run plan, the completion markers and the stage bookkeeping. Only mips above `mip` are
written: the full-resolution data is left as it was.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import numpy as np
from cloudvolume.lib import Bbox, Vec

from deepem3d.errors import InputError
from deepem3d.layers import cloudpath, open_layer
from deepem3d.tasks.markers import Stage, marked

# igneous is imported where it is used: importing it costs a worker ~0.3 s at start-up, and
# every local stage starts its own workers (a DownsampleTask payload imports it when run).
MEMORY_TARGET = int(3.5e9)  # igneous.task_creation.image.MEMORY_TARGET, its default


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
    memory_target: int = MEMORY_TARGET
    new_resolutions: list = field(default_factory=list)

    def describe(self) -> str:
        shape = " x ".join(str(s) for s in self.task_shape)
        return (
            f"{self.task_count} DownsampleTask(s) of {shape} voxels at mip {self.mip}, "
            f"adding {len(self.new_resolutions)} mip level(s) by factor "
            f"{','.join(map(str, self.factor))}; about {self.memory_bytes / 2**20:.1f} MiB "
            "per task"
        )


def default_factor(resolution) -> tuple[int, int, int]:
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
) -> DownsamplePlan:
    """Mirror igneous's task geometry so `--dry-run` can report it without touching the info."""
    from igneous import downsample_scales
    from igneous.task_creation.common import get_bounds
    from igneous.task_creation.image import num_mips_from_memory_target

    layer_path = cloudpath(layer_path)
    vol = open_layer(layer_path, mip=mip)
    factor = tuple(factor) if factor else default_factor(vol.meta.resolution(mip))
    if any(f < 1 for f in factor):
        raise InputError(f"--factor {factor} must be at least 1 on every axis")
    if math.prod(factor) == 1:
        raise InputError("--factor 1,1,1 would not downsample: use e.g. 2,2,1")
    chunk = Vec(*vol.meta.chunk_size(mip))
    viable = num_mips_from_memory_target(
        memory_target, vol.dtype, chunk, vol.num_channels, factor
    )
    num_mips = viable if num_mips is None else min(num_mips, viable)
    shape = Vec(*(int(c) * int(f) ** viable for c, f in zip(chunk, factor)))
    resolutions = downsample_scales.compute_scales(vol, mip, shape, "z", factor, None)
    resolutions = resolutions[:num_mips]
    if not resolutions:
        raise InputError(
            f"{layer_path} at mip {mip} is too small to downsample by {factor}: "
            "no new mip level would be made"
        )
    with contextlib.redirect_stdout(sys.stderr):
        region = get_bounds(vol, bounds, mip, chunk_size=chunk)
    count = int(np.prod(np.ceil(np.asarray(region.size3()) / np.asarray(shape))))
    stack = math.prod(factor) / (math.prod(factor) - 1)  # igneous's own memory model
    voxels = math.prod(min(int(s), int(r)) for s, r in zip(shape, region.size3()))
    memory = int(voxels * np.dtype(vol.dtype).itemsize * vol.num_channels * stack)
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
        new_resolutions=[list(r) for r in resolutions],
    )


def downsample_stage(layer_path: str, mip: int = 0) -> Stage:
    return Stage(layer_path, f"downsample-mip{mip}")


def create_downsample_tasks(
    plan: DownsamplePlan,
    *,
    fill_missing: bool = False,
    sparse: bool = False,
) -> tuple[Stage, list[tuple[str, object]]]:
    """Add the new scales to the layer's info and return (stage, [(task_id, task), ...]).

    Tasks whose marker already exists are left out, so a re-run does only what is missing.
    """
    from igneous.task_creation.image import create_downsampling_tasks

    stage = downsample_stage(plan.layer_path, plan.mip)
    with contextlib.redirect_stdout(sys.stderr):
        tasks = create_downsampling_tasks(
            plan.layer_path,
            mip=plan.mip,
            num_mips=plan.num_mips,
            factor=plan.factor,
            fill_missing=fill_missing,
            sparse=sparse,
            bounds=plan.bounds if plan.bounds is not None else None,
            bounds_mip=plan.mip,
            memory_target=plan.memory_target,
        )
        wrapped = [marked(plan.layer_path, stage.name, task) for task in tasks]
    stage.write_manifest(
        [task_id for task_id, _ in wrapped],
        {
            "task": "igneous DownsampleTask",
            "mip": plan.mip,
            "num_mips": plan.num_mips,
            "factor": list(plan.factor),
            "task_shape": list(plan.task_shape),
            "fill_missing": fill_missing,
            "sparse": sparse,
        },
    )
    done = stage.done_ids()
    return stage, [(task_id, task) for task_id, task in wrapped if task_id not in done]
