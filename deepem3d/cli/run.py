"""`deepem3d run PIPELINE`: the whole job of a pipeline file as one resumable run."""

from __future__ import annotations

import shlex

import click

from deepem3d.cli.options import dry_run_option
from deepem3d.errors import warn
from deepem3d.run.queues import MIN_FILE_LEASE_SECONDS, SQS_MAX_VISIBILITY


@click.command()
@click.argument("pipeline")
@click.option("--output", default=None,
              help="Output root (replaces the file's `output:`); every layer goes under it.")
@click.option("--queue", default=None,
              help="The `default` queue (fq://DIR or sqs://NAME; replaces the file's).")
@click.option("--parallel", type=click.IntRange(min=0), default=None,
              help="Start N local workers per queue and drain the stages here. Without it, "
              "the run creates each stage's tasks and waits for workers elsewhere (`deepem3d "
              "worker QUEUE`); a file that names no `default` queue runs its default stages on 1 "
              "local worker.")
@click.option("--lease-seconds",
              type=click.IntRange(min=MIN_FILE_LEASE_SECONDS, max=SQS_MAX_VISIBILITY), default=60,
              show_default=True,
              help="Lease of the local workers' tasks (renewed while a task runs; at least 3 s, "
              "which a file queue needs): how soon the task of a worker that died goes to "
              "another.")
@dry_run_option
@click.option("--overwrite", is_flag=True,
              help="Replace what a run of other settings wrote under the output root (the "
              "map, the segmentation, their mip levels of another downsample factor, and "
              "what was made of them); what the same settings made is kept.")
def run(pipeline: str, output: str | None, queue: str | None, parallel: int | None,
        lease_seconds: int, dry_run: bool, overwrite: bool) -> None:
    """Run PIPELINE (a YAML file, or a shipped pipeline's name such as isbi2012-demo).

    The whole file is checked first (a one-line error names the key). Then the stages run in
    order, each finished (its completion markers) before the next: inference, the
    segmentation's stages, downsampling, meshes, skeletons. A per-stage summary is printed and
    OUTPUT/report.json written (stage seconds, layers, and the scores when the file names
    ground truth). Run the same command again after any interruption: it goes on where it
    stopped.
    """
    from deepem3d.run.pipeline import load_pipeline

    p = load_pipeline(pipeline, output=output, queue=queue)
    if dry_run:
        from deepem3d.run.pipeline import add_local_queue
        from deepem3d.run.plan import check_queues, describe_costs, plan_run

        add_local_queue(p)
        check_queues(p, warn_only=True)
        plan = plan_run(p, overwrite=overwrite, dry_run=True)
        for warning in plan.warnings:
            warn(warning)
        for line in plan.lines:
            click.echo(line)
        for row in describe_costs(plan):
            click.echo(row)
        return
    from deepem3d.run.plan import REPORT, describe_scores, run_pipeline

    report = run_pipeline(p, parallel=parallel, overwrite=overwrite, echo=click.echo,
                          lease_seconds=lease_seconds)
    click.echo(f"report: {p.output}/{REPORT}")
    if "adapted_rand_error" in report:
        click.echo(describe_scores(report))
    where = p.output[len("file://"):] if p.output.startswith("file://") else p.output
    click.echo(f"view the layers: deepem3d view {shlex.quote(where)}")  # a command to paste
