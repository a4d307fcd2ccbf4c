"""`deepem3d train`: train the DeepEM3D network from layers or files."""

from __future__ import annotations

import os

import click

from deepem3d.cli.options import Number, Triple, not_empty
from deepem3d.errors import InputError
from deepem3d.models.presets import PRESETS
from deepem3d.models.sliding import MAX_BATCH, MAX_PATCH_SIZE
from deepem3d.units import INT64_MAX, MAX_THREADS

#: --workers' bound: processes that each hold batches ahead of the step; far past any machine's
#: cores (a count of millions hung forking)
MAX_WORKERS = 256


@click.command()
@click.option("--image", required=True,
              help="EM image: a layer path, `file.h5:/dataset`, a .npy, a TIFF stack, a zarr "
              "array, an N5 dataset or an MRC file.")
@click.option("--labels", required=True, help="Dense neuron ids (0 = boundary), same geometry.")
@click.option("--train-sections", required=True,
              help="START:END (end exclusive), e.g. 0:15, counted from the volume's first "
              "section (0), whatever a layer's z offset.")
@click.option("--val-sections", default=None, callback=not_empty,
              help="START:END for validation, e.g. 15:20, counted the same way.")
@click.option("--out", "out_dir", required=True,
              help="Directory for checkpoints and plots: one that holds none of them, or this "
              "run's own with --resume.")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="Network size (README: parameters and multiply-adds of each). Default: "
              "--init's, else tiny.")
@click.option("--head", type=click.Choice(["boundary", "affinity"]), default=None,
              help="Output: a boundary map or affinities. Default: --init's, else boundary.")
@click.option("--in-sections", type=click.Choice(["1", "3", "5"]), default=None,
              help="Input sections per prediction. Default: --init's, else 5.")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH), default=4,
              show_default=True)
@click.option("--patch-size", type=click.IntRange(min=16, max=MAX_PATCH_SIZE), default=128,
              show_default=True,
              help="Network input per training patch, in-plane (multiple of 16).")
@click.option("--lr", type=Number(min=0, min_open=True), default=0.01, show_default=True,
              help="Base learning rate (poly schedule, power 0.8).")
@click.option("--seed", type=click.IntRange(min=0, max=INT64_MAX), default=0, show_default=True)
@click.option("--val-every", type=click.IntRange(min=1), default=200, show_default=True,
              help="Validate, checkpoint and plot every N iterations.")
@click.option("--resolution", type=Triple(float), default=None,
              help="Voxel size x,y,z in nm (default: the image layer's, which it may not "
              "contradict, or the one a file records: OME-Zarr, MRC, N5 attributes, an HDF5 "
              "resolution attribute).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to train (auto: CUDA when this machine has it).")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              help="CPU threads (default: torch's, one per core). A run resumes exactly on the "
              "same device and thread count.")
@click.option("--workers", type=click.IntRange(min=0, max=MAX_WORKERS), default=None,
              help="Processes preparing batches ahead of the step (default: on a GPU, one per "
              "core but one, at most 8; on the CPU none, the step uses the cores). Batches do "
              "not depend on it, so a run may resume with another count.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt "
              "(with none there it starts: one command for a job restarted after preemption).")
@click.option("--init", default=None, callback=not_empty,
              help="Start from this checkpoint's weights (a shipped name, file or cloud path) "
                   "with a fresh optimizer and schedule: fine-tuning. Its --preset, --head and "
                   "--in-sections unless given.")
def train(image: str, labels: str, train_sections: str, val_sections: str | None, out_dir: str,
          preset: str | None, head: str | None, in_sections: str | None, iterations: int,
          batch_size: int, patch_size: int, lr: float, seed: int, val_every: int,
          resolution: tuple[float, float, float] | None, device: str, threads: int | None,
          workers: int | None, resume: bool, init: str | None) -> None:
    """Train a DeepEM3D network; writes OUT/last.pt, OUT/best.pt, history.json and
    learning_curve.png."""
    from deepem3d.models.data import is_file_source, parse_sections
    from deepem3d.models.train import BEST, LAST, TrainConfig, Trainer, default_workers

    if "://" in out_dir and not out_dir.startswith("file://"):
        raise InputError(f"--out {out_dir}: checkpoints are written to a local folder (copy "
                         "them to a bucket afterwards)")
    out_dir = out_dir.removeprefix("file://")
    network = {"preset": preset, "head": head,
               "in_sections": int(in_sections) if in_sections else None}
    last = os.path.join(out_dir, "last.pt")
    # resuming: the network the run's own checkpoint holds (its --init may be gone since);
    # fine-tuning: the one --init holds
    held_by = last if resume and os.path.exists(last) else init
    if held_by and None in network.values():
        from deepem3d.models.checkpoint import load_checkpoint

        held = load_checkpoint(held_by)["meta"]["model"]
        # a key it lacks is left to the default (and --init then refuses it in one line)
        network = {k: held.get(k) if v is None else v for k, v in network.items()}
        _check_held(held_by, network)
    preset, head, in_sections = (network[k] if network[k] is not None else fallback
                                 for k, fallback in (("preset", "tiny"), ("head", "boundary"),
                                                     ("in_sections", 5)))
    if patch_size % 16:
        raise InputError(f"--patch-size {patch_size} must be a multiple of 16")
    if batch_size * (patch_size // 16) ** 2 < 2:  # the deepest level's BatchNorm needs two
        raise InputError(f"--patch-size {patch_size} with --batch-size {batch_size} leaves one "
                         "value per channel at the network's deepest level: use --patch-size "
                         "32 or more, or --batch-size 2 or more")
    train_range = parse_sections(train_sections, "--train-sections")
    val_range = parse_sections(val_sections, "--val-sections") if val_sections else None
    if val_range and max(train_range[0], val_range[0]) < min(train_range[1], val_range[1]):
        raise InputError("--train-sections and --val-sections overlap: keep them apart")
    from deepem3d.sources import source_root
    from deepem3d.storage.layers import check_output_apart

    check_output_apart(out_dir, {what: f"file://{source_root(path)}" if is_file_source(path)
                                 else path for what, path in (("image", image),
                                                              ("labels", labels))},
                       name="--out")
    if is_file_source(image):  # --resolution gives (or corrects) what a file records
        from deepem3d.sources import open_source

        res = resolution
        if not res:
            with open_source(image) as source:
                res = source.recorded_resolution()
    else:
        from deepem3d.stages.inference_plan import RESOLUTION_TOLERANCE
        from deepem3d.storage.layers import open_layer
        from deepem3d.units import format_triple

        own = tuple(float(r) for r in open_layer(image).resolution)
        # a layer's own voxel size is the one infer checks a model against: a model recording
        # another would refuse the very layer it was trained on
        if resolution and any(abs(a - b) > RESOLUTION_TOLERANCE * b
                              for a, b in zip(resolution, own)):
            raise InputError(f"--resolution {format_triple(resolution)} nm contradicts the "
                             f"image layer {image}, which is {format_triple(own)} nm: leave "
                             "--resolution out, or resample the layer (`deepem3d resample`)")
        res = resolution or own
    cfg = TrainConfig(
        image=image, labels=labels, train_sections=train_range, val_sections=val_range,
        out_dir=out_dir, preset=preset, head=head, in_sections=int(in_sections),
        iterations=iterations, batch_size=batch_size, patch=patch_size, lr=lr, seed=seed,
        val_every=val_every, resolution=res, threads=threads, init=init,
        workers=workers if workers is not None else default_workers(device),
    )
    try:
        trainer = Trainer(cfg, resume=resume, device=device)
    except ValueError as err:  # build_model's unknown preset / section count
        if isinstance(err, InputError):
            raise
        raise InputError(str(err)) from None
    final = trainer.run()
    made = [name for name in (LAST, BEST) if (trainer.out / name).exists()]
    click.echo(f"checkpoints in {out_dir}: {', '.join(made)}; final {final}")


def _check_held(held_by: str, network: dict) -> None:
    """A one-line error for network settings a checkpoint records that no deepem3d network has
    (a damaged or hand-edited file): they would fail later, as a traceback."""
    from deepem3d.models.network import HEADS, SECTIONS

    allowed = {"preset": PRESETS, "head": HEADS, "in_sections": SECTIONS}
    for key, value in network.items():
        if value is not None and (isinstance(value, bool) or value not in allowed[key]):
            raise InputError(f"{held_by} records the network's {key} as {value!r}, which no "
                             f"deepem3d network has (one of {', '.join(map(str, allowed[key]))})"
                             f": give --{key.replace('_', '-')}, or another checkpoint")
