"""The `deepem3d` command group: every command, registered in the order `--help` lists them.
`deepem3d.cli.main` is the entry point around it."""

from __future__ import annotations

import click

import deepem3d
from deepem3d.cli.demo import demo
from deepem3d.cli.downsample import downsample
from deepem3d.cli.evaluate import evaluate
from deepem3d.cli.export import export
from deepem3d.cli.infer import infer
from deepem3d.cli.ingest import ingest
from deepem3d.cli.mesh import mesh, skeleton
from deepem3d.cli.queue import queue, worker
from deepem3d.cli.resample import resample
from deepem3d.cli.run import run
from deepem3d.cli.sample import sample
from deepem3d.cli.segment import segment
from deepem3d.cli.train import train
from deepem3d.cli.tune import tune
from deepem3d.cli.view import view


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(deepem3d.__version__, prog_name="deepem3d")
def cli() -> None:
    """DeepEM3D neuron segmentation of EM volumes, as queue tasks over precomputed layers."""


for command in (
    demo, run, sample, ingest, worker, queue, downsample, resample, infer, segment, mesh,
    skeleton, evaluate, tune, view, train, export,
):
    cli.add_command(command)
