"""segments -> meshes: igneous's MeshTask (forge) and its merge, as stages of the frame.

igneous does the work (zmesh marching cubes and simplification at a mip near isotropy); this
module plans it and checks the inputs. The segmentation's info names the `mesh` directory
only once the merged meshes are written (stages/objects.py says how).

    mesh-forge    one MeshTask per block at `mip`: mesh fragments under LAYER/mesh/
    mesh-merge    unsharded (default): one legacy manifest per segment (one task on file://,
                  one per id prefix elsewhere); sharded: multi-resolution Draco meshes in
                  shard files, one task per shard, found through the forge's spatial index

Sharded meshes are for large volumes (millions of segments: a few files instead of one per
segment). The sharded merge drops a segment whose mesh crosses no voxel boundary along an
axis (a single voxel, or a segment one section thick on the volume's last section: igneous's
`process_mesh`); the README says more. igneous is GPL-3.0 and calls itself a
pipeline, not a library: deepem3d calls its task-creation functions and runs its tasks, as it
does for downsampling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from deepem3d.stages.frame import Stage
from deepem3d.stages.objects import ObjectPlan, ObjectStages, plan_objects, prefix_digits

MESH_DIR = "mesh"
TASK_SHAPE = (448, 448, 448)  # igneous's default MeshTask block, in voxels at the mesh mip
#: seconds and peak bytes (above the worker's baseline) of one MeshTask per voxel it reads,
#: for --dry-run: measured on the demo's segmentation at mip 2 (128 x 128 x 30 voxels, about
#: 3,500 segments: 2.2 s and 58 MiB), this machine
SECONDS_PER_VOXEL = 4.5e-6
BYTES_PER_VOXEL = 125
#: levels of detail of sharded multi-resolution meshes (igneous's `mesh merge-sharded` default)
SHARDED_LODS = 1


@dataclass
class MeshPlan(ObjectPlan):
    TASK = "MeshTask"
    MERGED = ("one mesh per segment", "sharded multi-resolution meshes")
    DIRECTORY = MESH_DIR
    KIND = "mesh"
    INFO_KEY = "mesh"
    PRODUCT = "meshes"


def plan_meshes(layer_path: str, *, mip: int | None = None,
                task_shape: tuple[int, int, int] | None = None, sharded: bool = False,
                spatial_index: bool | None = None, fill_missing: bool = False) -> MeshPlan:
    """Check the layer, mip and sharding; work out the MeshTasks. Reads the info only."""
    return plan_objects(MeshPlan, layer_path, mip, task_shape, TASK_SHAPE, sharded,
                        spatial_index, "meshes", "mesh", fill_missing)


def mesh_stages(plan: MeshPlan, *, source_key: str = "",
                needs: tuple[str, ...] = ()) -> list[Stage]:
    """The forge and merge stages. `source_key` is the run key of the segmentation (its remap
    stage): meshes of another segmentation are another run."""
    digits = prefix_digits(plan.voxels)
    parameters = {"task": "igneous MeshTask", "mip": plan.mip,
                  "task_shape": list(plan.task_shape), "mesh_dir": MESH_DIR,
                  "sharded": plan.sharded, "spatial_index": plan.spatial_index,
                  "source_key": source_key, "merge_prefix_digits": digits}
    if plan.fill_missing:  # only when set: meshes forged before the option keep their key
        parameters["fill_missing"] = True

    def forge() -> Iterable:
        from igneous.task_creation import create_meshing_tasks

        return create_meshing_tasks(plan.layer_path, plan.mip, shape=plan.task_shape,
                                    mesh_dir=MESH_DIR, spatial_index=plan.spatial_index,
                                    sharded=plan.sharded, fill_missing=plan.fill_missing)

    def merge() -> Iterable:
        from igneous.task_creation import (
            create_mesh_manifest_tasks,
            create_sharded_multires_mesh_tasks,
        )

        if plan.sharded:
            return create_sharded_multires_mesh_tasks(
                plan.layer_path, num_lod=SHARDED_LODS, mesh_dir=MESH_DIR, progress=False)
        return create_mesh_manifest_tasks(plan.layer_path, magnitude=digits,
                                          mesh_dir=MESH_DIR)

    voxels = math.prod(plan.task_shape)
    return ObjectStages(
        kind=plan.KIND, info_key=plan.INFO_KEY, directory=MESH_DIR, product=plan.PRODUCT,
        layer_path=plan.layer_path, parameters=parameters, forge=forge, merge=merge,
        forge_count=plan.task_count,
        # planned (the real count is in the merge's manifest): a shard per few thousand
        # segments; one filesystem task on file://, a task per id prefix elsewhere
        merge_count=(1 if plan.sharded or plan.layer_path.startswith("file://")
                     else 10**digits - 1),
        forge_memory=BYTES_PER_VOXEL * voxels, merge_memory=64 * 2**20,
        forge_seconds=SECONDS_PER_VOXEL * voxels,
    ).stages(needs)
