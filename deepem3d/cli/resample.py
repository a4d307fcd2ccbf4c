"""`deepem3d resample LAYER OUTPUT (--resolution X,Y,Z | --like LAYER)`: an image or a
segmentation at another resolution."""

from __future__ import annotations

import click

from deepem3d.cli.options import Triple, dry_run_option, parallel_option, queue_option
from deepem3d.run.queues import check_queue_url


@click.command()
@click.argument("layer")
@click.argument("output")
@queue_option
@parallel_option
@dry_run_option
@click.option("--resolution", type=Triple(float, example="4,4,50"), default=None,
              help="The target voxel size in nm, x,y,z (e.g. a model's training resolution).")
@click.option("--like", default=None, metavar="LAYER",
              help="Take the target grid (voxel size, offset, size, chunks) from this layer: "
              "a segmentation made at a model's resolution back onto the image it came from.")
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Read LAYER at this mip.")
@click.option("--task-shape", type=Triple(int, example="512,512,64"), default=None,
              help="Output block per task, x,y,z, a multiple of the chunk size (default: about "
              "512 x 512 x 64). The result does not depend on it.")
@click.option("--chunk-size", type=Triple(int), default=None,
              help="Chunk size of OUTPUT, x,y,z (default: LAYER's at --mip; with --like, that "
              "layer's).")
@click.option("--fill-missing", is_flag=True, help="Read missing chunks as zeros (default: a "
              "missing chunk is an error).")
@click.option("--overwrite", is_flag=True, help="Replace an OUTPUT that holds data.")
def resample(layer: str, output: str, queue: str | None, parallel: int | None, dry_run: bool,
             resolution: tuple[float, float, float] | None, like: str | None, mip: int,
             task_shape: tuple[int, int, int] | None, chunk_size: tuple[int, int, int] | None,
             fill_missing: bool, overwrite: bool) -> None:
    """Resample LAYER to --resolution (or onto --like's grid) into a new layer OUTPUT.

    A uint8 EM image by linear interpolation, axis by axis; a segmentation by nearest
    neighbour (0 outside LAYER). Voxel centres are aligned in nm; with --resolution, OUTPUT is
    the smallest grid that covers LAYER's extent, so every voxel of LAYER comes back with
    --like. Meant for factors near 1: a 4.6 nm image for a model trained at 4 nm, and its
    segmentation back with --like IMAGE.
    The layer is the same bytes whatever --task-shape. Each task writes a marker under
    OUTPUT/tasks/resample/; a re-run skips finished tasks.
    """
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.resample import plan_resample, resample_stage

    if queue is not None:
        check_queue_url(queue)
    plan = plan_resample(layer, output, resolution=resolution, like=like, mip=mip,
                         task_shape=task_shape, chunk_size=chunk_size,
                         fill_missing=fill_missing, overwrite=overwrite)
    click.echo(plan.describe())
    if dry_run:
        return
    run_stages([resample_stage(plan, overwrite=overwrite)], queue=queue, parallel=parallel,
               echo=click.echo)
    click.echo(f"resampled {plan.layer_type} written to {plan.output_path}")
