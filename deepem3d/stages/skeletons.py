"""segments -> skeletons: igneous's SkeletonTask (kimimaro's TEASAR, forge) and its merge, as
stages of the frame.

    skeleton-forge   one SkeletonTask per block at `mip` (blocks overlap by one voxel):
                     skeleton fragments under LAYER/skeletons/
    skeleton-merge   unsharded (default): the fragments of each segment joined, short
                     branches and short skeletons dropped, one file per segment (a task per
                     id prefix: 9 to 999, by the volume's size); sharded: the same into shard
                     files, one task per shard, found through the forge's spatial index

The segmentation's info names the `skeletons` directory only once the merge is complete
(stages/objects.py says how). igneous's own README passes `mip` into the unsharded merge's
`crop` (a margin in voxels): deepem3d passes crop 0, and turns the spatial index on at forge
time for sharded skeletons, which igneous's sharded merge needs and does not check. Every
SkeletonTask writes fragments, also where one task covers the layer: igneous's lone task
would upload final skeletons, which the merge passes over, unpruned (--min-cable-nm and
--tick-threshold not applied).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from deepem3d.stages.frame import Stage
from deepem3d.stages.objects import ObjectPlan, ObjectStages, plan_objects, prefix_digits

SKELETON_DIR = "skeletons"
TASK_SHAPE = (512, 512, 512)  # igneous's default SkeletonTask block, voxels at the mip
#: TEASAR invalidation: radius = scale x distance to the boundary + const nm (igneous's CLI
#: defaults, which suit EM neurites)
TEASAR_PARAMS = {"scale": 4, "const": 500}
#: segments smaller than this many voxels within one task are not skeletonized (igneous's
#: default)
DUST_THRESHOLD = 1000
#: at the merge: skeletons shorter than this (nm of cable) are dropped, and branches shorter
#: than TICK_THRESHOLD nm pruned. igneous's defaults (4,000 and 6,000 nm) are for volumes tens
#: of microns wide: they drop every neurite of the demo's 2 x 2 x 1.5 micron crop
MIN_CABLE_NM = 500.0
TICK_THRESHOLD = 500.0
#: seconds of one SkeletonTask per voxel it reads, for --dry-run: measured on the demo's
#: segmentation at mip 2 (129 x 129 x 31 voxels: 0.87 s with the other core busy), this machine
SECONDS_PER_VOXEL = 2.0e-6
#: its peak bytes per voxel: igneous documents 6 GB for its 512^3 default block (45 B/voxel);
#: the demo's task measured 13 MiB above its worker's baseline (26 B/voxel), with few segments
#: above the dust threshold, so igneous's figure is kept
BYTES_PER_VOXEL = 45


@dataclass
class SkeletonPlan(ObjectPlan):
    dust_threshold: int = DUST_THRESHOLD
    min_cable_nm: float = MIN_CABLE_NM
    tick_threshold: float = TICK_THRESHOLD

    TASK = "SkeletonTask"
    MERGED = ("one skeleton per segment", "shard files")
    DIRECTORY = SKELETON_DIR
    KIND = "skeleton"
    INFO_KEY = "skeletons"
    PRODUCT = "skeletons"


def plan_skeletons(layer_path: str, *, mip: int | None = None,
                   task_shape: tuple[int, int, int] | None = None, sharded: bool = False,
                   spatial_index: bool | None = None, dust_threshold: int = DUST_THRESHOLD,
                   min_cable_nm: float = MIN_CABLE_NM,
                   tick_threshold: float = TICK_THRESHOLD) -> SkeletonPlan:
    """Check the layer, mip and sharding; work out the SkeletonTasks. Reads the info only."""
    return plan_objects(SkeletonPlan, layer_path, mip, task_shape, TASK_SHAPE, sharded,
                        spatial_index, "skeletons", "skeleton",
                        dust_threshold=int(dust_threshold), min_cable_nm=float(min_cable_nm),
                        tick_threshold=float(tick_threshold))


def skeleton_stages(plan: SkeletonPlan, *, source_key: str = "",
                    needs: tuple[str, ...] = ()) -> list[Stage]:
    """The forge and merge stages. `source_key` is the run key of the segmentation."""
    digits = prefix_digits(plan.voxels)
    parameters = {"task": "igneous SkeletonTask", "mip": plan.mip,
                  "task_shape": list(plan.task_shape), "skeleton_dir": SKELETON_DIR,
                  "sharded": plan.sharded, "spatial_index": plan.spatial_index,
                  "teasar_params": TEASAR_PARAMS, "dust_threshold": plan.dust_threshold,
                  "min_cable_nm": plan.min_cable_nm, "tick_threshold": plan.tick_threshold,
                  "source_key": source_key, "merge_prefix_digits": digits}
    if plan.task_count == 1:  # igneous's lone task wrote final skeletons, unpruned: such a
        parameters["will_postprocess"] = True  # run is made again (several: unchanged)

    def forge() -> Iterator:
        """igneous's SkeletonTasks, each writing fragments for the merge: igneous sets
        `will_postprocess` only where the volume is larger than one task, and a lone task
        uploads its skeletons as final, which the merge passes over unpruned."""
        from igneous.task_creation import create_skeletonizing_tasks

        for task in create_skeletonizing_tasks(
                plan.layer_path, plan.mip, shape=plan.task_shape,
                teasar_params=dict(TEASAR_PARAMS), dust_threshold=plan.dust_threshold,
                sharded=plan.sharded, spatial_index=plan.spatial_index):
            task.will_postprocess = True  # its payload reads the attribute
            yield task

    def merge() -> Iterable:
        from igneous.task_creation import (
            create_sharded_skeleton_merge_tasks,
            create_unsharded_skeleton_merge_tasks,
        )

        if plan.sharded:
            return create_sharded_skeleton_merge_tasks(
                plan.layer_path, dust_threshold=plan.min_cable_nm,
                tick_threshold=plan.tick_threshold)
        return create_unsharded_skeleton_merge_tasks(
            plan.layer_path, crop=0, magnitude=digits,
            dust_threshold=plan.min_cable_nm, tick_threshold=plan.tick_threshold)

    voxels = math.prod(t + 1 for t in plan.task_shape)  # one voxel of overlap
    return ObjectStages(
        kind=plan.KIND, info_key=plan.INFO_KEY, directory=SKELETON_DIR,
        product=plan.PRODUCT, layer_path=plan.layer_path, parameters=parameters, forge=forge,
        merge=merge, forge_count=plan.task_count,
        # planned (the real count is in the merge's manifest): a shard per few thousand
        # segments; a task per id prefix
        merge_count=1 if plan.sharded else 10**digits - 1,
        forge_memory=BYTES_PER_VOXEL * voxels, merge_memory=256 * 2**20,
        forge_seconds=SECONDS_PER_VOXEL * voxels,
    ).stages(needs)
