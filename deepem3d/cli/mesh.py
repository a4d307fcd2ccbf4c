"""`deepem3d mesh LAYER` and `deepem3d skeleton LAYER`: meshes and skeletons of a segmentation
layer with igneous, as queue tasks (forge per block, then merge per segment)."""

from __future__ import annotations

from collections.abc import Callable

import click

from deepem3d.cli.options import Number, Triple, dry_run_option, parallel_option, queue_option
from deepem3d.run.queues import check_queue_url
from deepem3d.stages import meshes, skeletons
from deepem3d.units import INT64_MAX, format_number


def object_options(default_task_shape: tuple[int, int, int]) -> Callable:
    """The options meshes and skeletons share: where, at which mip, in which blocks, sharded."""
    default_shape = ",".join(map(str, default_task_shape))

    def decorate(command: Callable) -> Callable:
        for option in reversed([
            click.argument("layer"),
            queue_option,
            parallel_option,
            dry_run_option,
            click.option("--mip", type=click.IntRange(min=0), default=None,
                         help="Work at this mip (default: the first whose in-plane voxel "
                         "reaches 0.3 of its z: near isotropic, else the coarsest the layer "
                         "has; downsample the layer first)."),
            click.option("--task-shape", type=Triple(int, example=default_shape), default=None,
                         help=f"Block per forge task at --mip, x,y,z (default {default_shape})."),
            click.option("--sharded", is_flag=True,
                         help="Merge into shard files (large volumes: a few files instead of "
                         "one per segment)."),
            click.option("--spatial-index/--no-spatial-index", default=None,
                         help="Write a spatial index at forge time (default: only when "
                         "--sharded, whose merge needs it)."),
        ]):
            command = option(command)
        return command

    return decorate


def _run(plan, stages, queue: str | None, parallel: int | None, dry_run: bool) -> None:
    from deepem3d.run.runner import run_stages

    plan.check_products()  # before anything is written, --dry-run too
    click.echo(plan.describe())
    if not dry_run:
        run_stages(stages(plan), queue=queue, parallel=parallel, echo=click.echo)


@click.command()
@object_options(meshes.TASK_SHAPE)
@click.option("--fill-missing", is_flag=True,
              help="Read missing chunks as zeros (default: a missing chunk stops the run, in "
              "one line).")
def mesh(layer: str, queue: str | None, parallel: int | None, dry_run: bool, mip: int | None,
         task_shape: tuple[int, int, int] | None, sharded: bool,
         spatial_index: bool | None, fill_missing: bool) -> None:
    """Make a mesh per segment of the segmentation LAYER.

    Two stages: MeshTask per block, then the merge: one legacy mesh per segment, or with
    --sharded multi-resolution Draco meshes in shard files. The layer's info names its `mesh`
    directory once the merge is complete, so Neuroglancer never asks for meshes that are not
    there. Markers under LAYER/tasks/mesh-*/; a re-run skips finished tasks.
    """
    from deepem3d.stages.meshes import mesh_stages, plan_meshes

    if queue is not None:
        check_queue_url(queue)
    plan = plan_meshes(layer, mip=mip, task_shape=task_shape, sharded=sharded,
                       spatial_index=spatial_index, fill_missing=fill_missing)
    _run(plan, mesh_stages, queue, parallel, dry_run)


@click.command()
@object_options(skeletons.TASK_SHAPE)
@click.option("--dust-threshold", type=click.IntRange(min=0, max=INT64_MAX), default=None,
              help="Skip segments smaller than this many voxels within a task "
              f"(default {skeletons.DUST_THRESHOLD}).")
@click.option("--min-cable-nm", type=Number(min=0), default=None,
              help="At the merge, drop skeletons with less cable than this, in nm "
              f"(default {format_number(skeletons.MIN_CABLE_NM)}).")
@click.option("--tick-threshold", type=Number(min=0), default=None,
              help="At the merge, prune branches shorter than this, in nm "
              f"(default {format_number(skeletons.TICK_THRESHOLD)}).")
def skeleton(layer: str, queue: str | None, parallel: int | None, dry_run: bool,
             mip: int | None, task_shape: tuple[int, int, int] | None, sharded: bool,
             spatial_index: bool | None, dust_threshold: int | None,
             min_cable_nm: float | None, tick_threshold: float | None) -> None:
    """Make a skeleton per segment of the segmentation LAYER (kimimaro's TEASAR via igneous).

    Two stages: SkeletonTask per block, then the merge: one skeleton file per segment, or with
    --sharded shard files. The layer's info names its `skeletons` directory once the merge is
    complete. Markers under LAYER/tasks/skeleton-*/; a re-run skips finished tasks.
    """
    from deepem3d.stages.skeletons import plan_skeletons, skeleton_stages

    if queue is not None:
        check_queue_url(queue)
    given = {k: v for k, v in (("dust_threshold", dust_threshold),
                               ("min_cable_nm", min_cable_nm),
                               ("tick_threshold", tick_threshold)) if v is not None}
    plan = plan_skeletons(layer, mip=mip, task_shape=task_shape, sharded=sharded,
                          spatial_index=spatial_index, **given)
    _run(plan, skeleton_stages, queue, parallel, dry_run)
