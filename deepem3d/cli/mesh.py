"""`deepem3d mesh LAYER`: meshes of a segmentation layer with igneous, as queue tasks."""

from __future__ import annotations

import click

from deepem3d.cli.options import Triple, dry_run_option, parallel_option, queue_option
from deepem3d.run.queues import check_queue_url


@click.command()
@click.argument("layer")
@queue_option
@parallel_option
@dry_run_option
@click.option("--mip", type=click.IntRange(min=0), default=None,
              help="Mesh this mip (default: the first whose in-plane voxel reaches 0.3 of its "
              "z: near isotropic; downsample the layer first).")
@click.option("--task-shape", type=Triple(int, example="448,448,448"), default=None,
              help="Block per MeshTask at --mip, x,y,z (default 448,448,448).")
def mesh(layer: str, queue: str | None, parallel: int | None, dry_run: bool, mip: int | None,
         task_shape: tuple[int, int, int] | None) -> None:
    """Make a mesh per segment of the segmentation LAYER (unsharded, legacy format).

    Two stages: MeshTask per block, then the merge into one manifest per segment. The layer's
    info names its `mesh` directory once the merge is complete, so Neuroglancer never asks for
    meshes that are not there. Markers under LAYER/tasks/mesh-*/; a re-run skips finished tasks.
    """
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.meshes import mesh_stages, plan_meshes

    if queue is not None:
        check_queue_url(queue)
    plan = plan_meshes(layer, mip=mip, task_shape=task_shape)
    click.echo(plan.describe())
    if dry_run:
        return
    run_stages(mesh_stages(plan), queue=queue, parallel=parallel, echo=click.echo)
