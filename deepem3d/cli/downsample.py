"""`deepem3d downsample LAYER`: add mip levels with igneous, as queue tasks."""

from __future__ import annotations

import click
from cloudvolume.lib import Bbox

from deepem3d.cli.options import (
    Bounds,
    ByteSize,
    Triple,
    dry_run_option,
    parallel_option,
    queue_option,
)
from deepem3d.run.queues import check_queue_url
from deepem3d.storage.layers import cloudpath


@click.command()
@click.argument("layer")
@queue_option
@parallel_option
@dry_run_option
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Read this mip; write the levels above it.")
@click.option("--num-mips", type=click.IntRange(min=1), default=None,
              help="Mip levels to add (default: as many as one task's memory and the voxel "
              "offset's grid allow).")
@click.option("--factor", type=Triple(int, example="2,2,1"), default=None,
              help="Downsampling factor per level, x,y,z (default 2,2,1 for anisotropic data, "
              "z coarser than 1.5 times the finer of x and y; else 2,2,2).")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1 at --mip (default: all). The tasks must lie inside, "
              "which may allow fewer levels.")
@click.option("--memory", type=ByteSize(), default="3.5e9", show_default=True,
              help="Memory target of one task in bytes, as igneous's --memory (3.5e9, 3500MB, "
              "3.5GB or 2GiB): larger tasks make more levels at once.")
@click.option("--fill-missing", is_flag=True, help="Read missing chunks as zeros (default: a "
              "missing chunk is an error).")
@click.option("--sparse", is_flag=True, help="Segmentation: ignore 0 when taking the mode.")
def downsample(
    layer: str, queue: str | None, parallel: int | None, dry_run: bool, mip: int,
    num_mips: int | None, factor: tuple[int, int, int] | None,
    bounds: tuple[tuple[int, int, int], tuple[int, int, int]] | None, fill_missing: bool,
    memory: int, sparse: bool,
) -> None:
    """Add downsampled mip levels to LAYER (image or segmentation) with igneous tasks.

    The data at --mip and below is left untouched. Each task writes a completion marker under
    LAYER/tasks/downsample-mipN/; a re-run skips finished tasks.
    """
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.downsample import downsample_stage, plan_downsample

    if queue is not None:
        check_queue_url(queue)
    plan = plan_downsample(
        cloudpath(layer),
        mip=mip,
        num_mips=num_mips,
        factor=factor,
        bounds=Bbox(*bounds) if bounds else None,
        memory_target=memory,
    )
    click.echo(plan.describe())
    if dry_run:
        return
    stage = downsample_stage(plan, fill_missing=fill_missing, sparse=sparse)
    run_stages([stage], queue=queue, parallel=parallel, echo=click.echo, wait=False)
