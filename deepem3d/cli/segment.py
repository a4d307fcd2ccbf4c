"""`deepem3d segment MAP OUTPUT`: the chunk-invariant segmentation of a boundary/affinity map."""

from __future__ import annotations

import click
from cloudvolume.lib import Bbox

from deepem3d.cli.options import (
    Bounds,
    ByteSize,
    Number,
    Triple,
    dry_run_option,
    parallel_option,
    queue_option,
)
from deepem3d.errors import warn
from deepem3d.run.queues import check_queue_url
from deepem3d.stages.segment_costs import DEFAULT_EDGES_PER_VOXEL
from deepem3d.units import INT64_MAX


@click.command()
@click.argument("map_layer", metavar="MAP")
@click.argument("output")
@queue_option
@parallel_option
@dry_run_option
@click.option("--method", type=click.Choice(["mean", "watershed"]), default=None,
              help="mean: greedy mean-affinity merging (waterz's OneMinus<MeanAffinity>); "
              "watershed: DeepEM3D's h-minima watershed. Without --method and --threshold, "
              "the settings the map's model records (shipped models do) are used.")
@click.option("--threshold", type=float, default=None,
              help="In [0, 1]. mean: merge while 1 - mean affinity is below it; watershed: "
              "h, the minimum depth of a basin (DeepEM3D used 0.19).")
@click.option("--dust-size", type=click.IntRange(min=0, max=INT64_MAX), default=None,
              help="Merge segments of fewer voxels (whole-volume sizes) into their neighbour "
              "of largest contact; 0: off. Default: the map's model's setting without --method and "
              "--threshold, else 0.")
@click.option("--dust-mode", type=click.Choice(["merge", "zero"]), default="merge",
              show_default=True, help="What happens to dust: merged, or set to 0 (background).")
@click.option("--sigma", type=float, default=None,
              help="In-plane Gaussian (x, y) on the map first, standard deviation in voxels; "
              "0: off. Default: the map's model's setting without --method and --threshold, "
              "else 0. DeepEM3D smoothed the boundary map in-plane with a "
              "Gaussian before its watershed; the smoothed map is kept at "
              "OUTPUT/segmentation/smoothed.")
@click.option("--task-shape", type=Triple(int, example="512,512,64"), default=None,
              help="Block per task, x,y,z, a multiple of the chunk size (default: about "
              "512 x 512 x 64). The result does not depend on it.")
@click.option("--chunk-size", type=Triple(int), default=None,
              help="Chunk size of OUTPUT, x,y,z (default: the map's at --mip).")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1 at --mip, absolute voxels (default: the whole map); "
              "expanded to whole chunks. The region is segmented as if it were the volume.")
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Read the map at this mip; OUTPUT has its resolution.")
@click.option("--overwrite", is_flag=True,
              help="Replace an OUTPUT that holds a segmentation. With the same map, --sigma, "
              "--bounds and --task-shape, its supervoxels and region graphs are kept and "
              "reused.")
@click.option("--edges-per-voxel", type=Number(min=0, min_open=True, max=3),
              default=DEFAULT_EDGES_PER_VOXEL, show_default=True,
              help="Region-graph edges per voxel to size the octree's tasks with (unknown "
              "before the supervoxels exist: the shipped model's maps measured 0.14-0.29, a "
              "smooth synthetic map 0.02; the plan prints both).")
@click.option("--max-task-memory", type=ByteSize(), default=None,
              help="Refuse, before any work, a plan whose largest task would need more, e.g. "
              "24GiB (the plan prints each stage's largest task).")
@click.option("--sharded", is_flag=True,
              help="Write OUTPUT (and the smoothed map) in the sharded precomputed format: a "
              "file per block instead of per chunk; the blocks lie on the shard grid, and "
              "without --chunk-size the chunks are the block split in 2^k per axis.")
def segment(
    map_layer: str, output: str, queue: str | None, parallel: int | None, dry_run: bool,
    method: str | None, threshold: float | None, dust_size: int | None, dust_mode: str,
    sigma: float | None,
    task_shape: str | None, chunk_size: str | None, bounds: str | None, mip: int,
    overwrite: bool, edges_per_voxel: float, max_task_memory: int | None, sharded: bool,
) -> None:
    """Segment the boundary (1 channel) or affinity (3 channels) map MAP into OUTPUT.

    Stages of queue tasks, each finished (its completion markers) before the next: smooth
    (with --sigma > 0), halo (without it, for more than one block), supervoxels, reduce,
    region-graph, the octree's levels (agglomerate-L0 up to the root, segments-L* down; with
    dust merging dust-L* and dust-segments-L*), remap: no task holds the whole region graph.
    OUTPUT is a uint64 compressed_segmentation layer, the same bytes whatever --task-shape.
    The work (the smoothed map, the supervoxels' labels and tables, the blocks' region graphs)
    stays under OUTPUT/segmentation/, so another --method, --threshold or --dust-size with
    --overwrite redoes only the octree's stages and remap. With --queue and no --parallel, the
    command waits for workers elsewhere (`deepem3d worker QUEUE`); Ctrl-C stops waiting, and
    the same command goes on later.
    """
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.segmentation import plan_segment, segment_stages, settings_for_map
    from deepem3d.storage.layers import cloudpath

    if queue is not None:
        check_queue_url(queue)
    settings, chosen = settings_for_map(cloudpath(map_layer), {
        "method": method, "threshold": threshold, "sigma": sigma, "dust_size": dust_size})
    if chosen:
        click.echo(chosen)
    plan = plan_segment(
        map_layer, output, method=settings["method"], threshold=settings["threshold"],
        dust_size=settings["dust_size"], dust_mode=dust_mode,
        task_shape=task_shape,
        chunk_size=chunk_size,
        bounds=Bbox(*bounds) if bounds else None, mip=mip, overwrite=overwrite,
        sigma=settings["sigma"], edges_per_voxel=edges_per_voxel,
        max_task_memory=max_task_memory, sharded=sharded,
    )
    for warning in plan.warnings:
        warn(warning)
    click.echo(plan.describe())
    if dry_run:
        return
    run_stages(segment_stages(plan), queue=queue, parallel=parallel, echo=click.echo)
    click.echo(f"segmentation written to {plan.output_path}")
