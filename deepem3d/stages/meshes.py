"""segments -> meshes: igneous's MeshTask (forge) and its merge, as stages of the frame.

igneous does the work (zmesh marching cubes and simplification at a mip near isotropy); this
module plans it, checks the inputs, and keeps the segmentation's info honest: it names the
`mesh` directory only once the merged meshes are written (Neuroglancer asks for them as soon
as the info names the directory, and shows nothing where they are missing).

    mesh-forge    one MeshTask per block at `mip`: mesh fragments under LAYER/mesh/
    mesh-merge    the fragments of each segment -> one legacy manifest per segment (one task on
                  file://, prefix tasks elsewhere)

Unsharded meshes only, for now: sharded multi-resolution meshes for large volumes come later.
igneous is GPL-3.0 and calls itself a pipeline, not a library: deepem3d calls its task-creation
functions and runs its tasks, as it does for downsampling.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

from cloudfiles import CloudFiles

from deepem3d.errors import InputError
from deepem3d.stages.frame import Stage, digest, marked
from deepem3d.storage.layers import cloudpath, open_layer

MESH_DIR = "mesh"
#: the voxel size meshes are made at, when no mip is given: the first mip whose in-plane
#: resolution reaches this fraction of z (near isotropic; EM sections are thick)
ISOTROPY = 0.3
TASK_SHAPE = (448, 448, 448)  # igneous's default MeshTask block, in voxels at the mesh mip
#: seconds and peak bytes (above the worker's baseline) of one MeshTask per voxel it reads,
#: for --dry-run: measured on the demo's segmentation at mip 2 (128 x 128 x 30 voxels, about
#: 3,500 segments: 2.2 s and 58 MiB), this machine
SECONDS_PER_VOXEL = 4.5e-6
BYTES_PER_VOXEL = 125


@dataclass
class MeshPlan:
    layer_path: str
    mip: int
    task_shape: tuple[int, int, int]
    task_count: int
    resolution: tuple[float, float, float]

    def describe(self) -> str:
        shape = " x ".join(map(str, self.task_shape))
        res = "x".join(f"{r:g}" for r in self.resolution)
        return (f"{self.task_count} MeshTask(s) of {shape} voxels at mip {self.mip} ({res} nm),"
                f" then their merge into one mesh per segment under {self.layer_path}/"
                f"{MESH_DIR}")


def near_isotropic_mip(vol) -> int:
    """The first mip whose in-plane resolution reaches ISOTROPY of its z resolution."""
    for mip in vol.available_mips:
        x, y, z = (float(r) for r in vol.meta.resolution(mip))
        if min(x, y) >= ISOTROPY * z:
            return mip
    return max(vol.available_mips)


def plan_meshes(layer_path: str, *, mip: int | None = None,
                task_shape: tuple[int, int, int] | None = None) -> MeshPlan:
    """Check the layer and mip; work out the MeshTasks. Reads the info only."""
    layer_path = cloudpath(layer_path).rstrip("/")
    vol = open_layer(layer_path)
    if vol.layer_type != "segmentation":
        raise InputError(f"{layer_path} is an {vol.layer_type} layer: meshes are made of a "
                         "segmentation layer")
    if mip is None:
        mip = near_isotropic_mip(vol)
    if mip not in vol.available_mips:
        raise InputError(f"mesh mip {mip} does not exist in {layer_path} (its mips: "
                         f"{', '.join(map(str, vol.available_mips))}): downsample it first or "
                         "pick one of those")
    size = [int(s) for s in vol.meta.volume_size(mip)]
    shape = tuple(min(int(t), s) for t, s in zip(task_shape or TASK_SHAPE, size))
    count = math.prod(-(-s // t) for s, t in zip(size, shape))
    resolution = tuple(float(r) for r in vol.meta.resolution(mip))
    return MeshPlan(layer_path, mip, shape, count, resolution)


def _set_mesh_key(layer_path: str, present: bool) -> None:
    files = CloudFiles(layer_path)
    info = files.get_json("info")
    if present:
        info["mesh"] = MESH_DIR
    else:
        info.pop("mesh", None)
    files.put_json("info", info)


def mesh_stages(plan: MeshPlan, *, source_key: str = "",
                needs: tuple[str, ...] = ()) -> list[Stage]:
    """The forge and merge stages. `source_key` is the run key of the segmentation (its remap
    stage): meshes of another segmentation are another run."""
    parameters = {"task": "igneous MeshTask", "mip": plan.mip,
                  "task_shape": list(plan.task_shape), "mesh_dir": MESH_DIR,
                  "source_key": source_key}
    forged: list = []

    def forge_tasks():
        if not forged:
            from igneous.task_creation import create_meshing_tasks

            with contextlib.redirect_stdout(io.StringIO()):
                # no spatial index: only sharded merges need one, and the forge would then
                # need the info to name the mesh directory before any mesh exists
                tasks = create_meshing_tasks(plan.layer_path, plan.mip, shape=plan.task_shape,
                                             mesh_dir=MESH_DIR, spatial_index=False)
                forged.extend(marked(task) for task in tasks)
            _set_mesh_key(plan.layer_path, False)  # named once the meshes are merged
        return iter(forged)

    merged: list = []

    def merge_tasks():
        if not merged:
            from igneous.task_creation import create_mesh_manifest_tasks

            merged.extend(marked(task) for task in create_mesh_manifest_tasks(
                plan.layer_path, mesh_dir=MESH_DIR))
        return iter(merged)

    voxels = math.prod(plan.task_shape)
    forge = Stage(
        name=f"mesh-forge-mip{plan.mip}", layer=plan.layer_path, key=digest(parameters),
        parameters=parameters, make_tasks=forge_tasks, task_count=plan.task_count,
        memory_bytes=BYTES_PER_VOXEL * voxels, needs=needs, label="mesh forge",
        seconds_per_task=SECONDS_PER_VOXEL * voxels,
    )
    merge_count = 1 if plan.layer_path.startswith("file://") else 999
    merge = Stage(
        name="mesh-merge", layer=plan.layer_path, key=digest({**parameters, "merge": 1}),
        parameters=parameters, make_tasks=merge_tasks, task_count=merge_count,
        memory_bytes=64 * 2**20, needs=(forge.label,), label="mesh merge",
        finish=lambda: _set_mesh_key(plan.layer_path, True),
    )
    return [forge, merge]
