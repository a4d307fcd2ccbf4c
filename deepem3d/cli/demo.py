"""`deepem3d demo [DIR]`: the whole pipeline on the embedded sample, with its report and picture."""

from __future__ import annotations

import os
import shlex

import click


@click.command()
@click.argument("directory", default="demo", metavar="[DIR]")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True,
              help="Local worker processes.")
def demo(directory: str, parallel: int) -> None:
    """Run the shipped pipeline `isbi2012-demo` into DIR (default ./demo): the embedded ISBI 2012
    sample -> affinities (the shipped model) -> segmentation -> mip levels -> meshes and
    skeletons, on local workers, no GPU or network needed. Prints the adapted Rand error and VOI
    of sections 20..29 and each stage's seconds, writes DIR/report.json and DIR/demo.png, and
    prints the command that views the result. Run it again to resume an interrupted demo.
    """
    from deepem3d.errors import InputError
    from deepem3d.picture import draw_run
    from deepem3d.run.pipeline import load_pipeline
    from deepem3d.run.plan import REPORT, describe_scores, run_pipeline

    folder = os.path.abspath(directory)
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.exists(
            os.path.join(folder, "image", "info")):
        raise InputError(f"{folder} holds something else than a demo: give an empty or new "
                         "DIR (or an earlier demo's, to resume it)")
    p = load_pipeline("isbi2012-demo", output=folder)
    report = run_pipeline(p, parallel=parallel, echo=click.echo)
    picture = os.path.join(folder, "demo.png")
    section = draw_run(report["layers"], picture, section=25)
    click.echo("\n" + describe_scores(report))
    click.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items())
               + f"; this command {report['seconds']:.0f} s")
    click.echo(f"report: {folder}/{REPORT}; picture (section {section}): {picture}")
    click.echo(f"view it: deepem3d view {shlex.quote(folder)}")  # a command to paste
