"""`deepem3d infer IMAGE OUTPUT`: the boundary (or affinity) map of an image layer, as tasks."""

from __future__ import annotations

import click
from cloudvolume.lib import Bbox

from deepem3d.cli.options import (
    Bounds,
    Triple,
    dry_run_option,
    not_empty,
    parallel_option,
    queue_option,
)
from deepem3d.errors import warn
from deepem3d.models.sliding import MAX_BATCH, MAX_PATCH_SIZE, TTA_CHOICES, WINDOWS, PatchGeometry
from deepem3d.run.queues import check_queue_url
from deepem3d.units import MAX_THREADS


@click.command()
@click.argument("image")
@click.argument("output")
@click.option("--model", "models", multiple=True, metavar="CKPT|NAME", callback=not_empty,
              help="Checkpoint file, cloud path or shipped model name (default: the shipped "
              "model; isbi2012-small-affinity-x3 names three, best with --tta 16). Repeat to "
              "combine models: boundary maps by voxel-wise maximum, affinities by their mean.")
@queue_option
@parallel_option
@dry_run_option
@click.option("--mip", type=click.IntRange(min=0), default=None,
              help="Read the image at this mip; the output layer has its resolution (default: "
              "0, or without --bounds the first mip at the model's training resolution when "
              "mip 0 is not at it).")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1 at --mip, absolute voxels (default: the whole volume); "
              "expanded to whole output chunks.")
@click.option("--task-shape", type=Triple(int, example="1024,1024,16"), default=None,
              help="Block per task, x,y,z, a multiple of the chunk size (default: one tile, "
              "up to 2048 x 2048, x one chunk; 1024 x 1024 x one chunk with --patch-size). "
              "A task deeper than a chunk predicts chunk-deep slabs, reading the next "
              "slab's input and writing the last one's map meanwhile.")
@click.option("--chunk-size", type=Triple(int), default=None,
              help="Output chunk size x,y,z (default: the image's at --mip).")
@click.option("--tta", type=click.Choice([str(t) for t in TTA_CHOICES]), default="1",
              show_default=True, help="Test-time augmentation: 1, 8 (in-plane rotations and "
              "flips) or 16 (x z-reversal) variants, undone and averaged.")
@click.option("--patch-size", type=click.IntRange(min=16, max=MAX_PATCH_SIZE), default=None,
              help="Network input per patch, in-plane (multiple of 16). Default: abutting "
              "tiles of up to 2048 px, each read with the models' receptive field around it "
              "(about 1.5 evaluations per output voxel on a large volume); giving --patch-size, "
              f"--patch-output or --overlap selects overlapping blended patches (defaults "
              f"{PatchGeometry.size}, {PatchGeometry.output}, {PatchGeometry.overlap}).")
@click.option("--patch-output", type=click.IntRange(min=1, max=MAX_PATCH_SIZE), default=None,
              help="Output window in the middle of each patch; the rest is context.")
@click.option("--overlap", type=click.IntRange(min=0, max=MAX_PATCH_SIZE), default=None,
              help="Pixels shared by neighbouring output windows (0: abutting, unblended; "
              "with the default 512 / 384 patches that reads only 64 px of context around "
              "each tile, less than the models' receptive field: leave the patch options out "
              "for abutting tiles with the whole field).")
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH), default=None,
              help="Patches per forward pass (default: 1 for the tiles, "
              f"{PatchGeometry.batch} for overlapping patches).")
@click.option("--window", type=click.Choice(WINDOWS), default=PatchGeometry.window,
              show_default=True, help="Blending window (overlapping patches).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where workers run the model (auto: CUDA when this "
              "machine has it; plan GPU runs from a laptop with cuda).")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=1,
              show_default=True,
              help="CPU threads per task. Fixed on purpose: identical bytes across tasks need "
              "one thread setting; run one worker per core instead.")
@click.option("--no-amp", is_flag=True, help="On CUDA, run in float32 instead of float16 "
              "autocast (slower, closer to CPU results).")
@click.option("--mask", default=None, callback=not_empty,
              help="Layer whose non-zero voxels are tissue: blocks without any are written "
              "as background without running the model.")
@click.option("--mask-mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Mip of --mask to read.")
@click.option("--fill-missing", is_flag=True, help="Read missing image chunks as zeros "
              "(default: a task with a missing chunk fails).")
@click.option("--float32", is_flag=True, help="Write float32 probabilities instead of uint8 "
              "round(255 p).")
@click.option("--overwrite", is_flag=True, help="Replace an OUTPUT that holds data.")
@click.option("--force", is_flag=True, help="Run a model trained at another resolution "
              "(warn instead of failing).")
@click.option("--sharded", is_flag=True,
              help="Write OUTPUT in the sharded precomputed format: a file per task instead "
              "of per chunk (without --chunk-size, chunks of the task split in 2^k per axis).")
def infer(
    image: str, output: str, models: tuple[str, ...], queue: str | None,
    parallel: int | None, dry_run: bool, mip: int | None, bounds: str | None,
    task_shape: str | None, chunk_size: str | None, tta: str, patch_size: int | None,
    patch_output: int | None, overlap: int | None, batch_size: int | None, window: str,
    device: str,
    threads: int, no_amp: bool, mask: str | None, mask_mip: int, fill_missing: bool,
    float32: bool, overwrite: bool, force: bool, sharded: bool,
) -> None:
    """Predict the boundary (or affinity) map of IMAGE into a new layer OUTPUT.

    One InferenceTask per output block. Patches lie on one grid anchored to the dataset's
    origin, so the map is the same bytes whatever --task-shape (on one device class and
    thread setting). Each task writes a marker under OUTPUT/tasks/inference/; a re-run skips
    finished tasks.
    """
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.inference import inference_stage
    from deepem3d.stages.inference_plan import plan_inference

    if queue is not None:
        check_queue_url(queue)
    plan = plan_inference(
        image, output,
        models=list(models) or None,
        mip=mip,
        task_shape=task_shape,
        chunk_size=chunk_size,
        tta=int(tta),
        bounds=Bbox(*bounds) if bounds else None,
        patch={k: v for k, v in (("size", patch_size), ("output", patch_output),
                                 ("overlap", overlap), ("batch", batch_size),
                                 ("window", window)) if v is not None},
        float32=float32, fill_missing=fill_missing, mask=mask, mask_mip=mask_mip,
        threads=threads, device=device, amp=not no_amp, force=force, overwrite=overwrite,
        sharded=sharded,
    )
    for warning in plan.warnings:
        warn(warning)
    click.echo(plan.describe())
    if dry_run:
        return
    run_stages([inference_stage(plan, overwrite=overwrite)], queue=queue, parallel=parallel,
               echo=click.echo, wait=False)
