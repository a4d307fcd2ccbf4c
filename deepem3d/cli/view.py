"""`deepem3d view LAYER...`: look at layers in Neuroglancer, offline, until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

import click

from deepem3d.viewer import LAYOUTS, serve


def _address(value: str) -> str:
    if not value.strip():
        raise click.BadParameter("give an address (0.0.0.0 listens on every interface)")
    return value


@click.command()
@click.argument("layers", nargs=-1, required=True, metavar="LAYER|RUN [LAYER...]")
@click.option("--bind-address", default="127.0.0.1", show_default=True,
              callback=lambda ctx, param, value: _address(value),
              help="Address both servers listen on (0.0.0.0: reachable from other machines).")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port of the Neuroglancer viewer, the URL to open (default: a free one).")
@click.option("--data-port", type=click.IntRange(0, 65535), default=0,
              help="Port of the file server of local layers (default: a free one).")
@click.option("--layout", type=click.Choice(LAYOUTS),
              default=None, help="Neuroglancer panel layout (default: 4panel).")
@click.option("-v", "--verbose", is_flag=True,
              help="Log every request to the local layers' file server on stderr.")
def view(
    layers: tuple[str, ...], bind_address: str, port: int, data_port: int,
    layout: str | None, verbose: bool,
) -> None:
    """Open LAYERs (local paths, file://, gs://, s3://, http(s)://) in Neuroglancer.

    RUN, the output folder of `deepem3d run` (it holds report.json; local or in a bucket,
    where it was written or moved since), stands for its layers: image, map (hidden: tick it
    to see it), segmentation (its largest segments' meshes and skeletons in the 3D panel) and
    ground truth.

    Prints the viewer's URL and serves until Ctrl-C or SIGTERM. Local layers are served
    read-only by a small file server; remote ones are fetched by the browser itself.
    Image layers show as grey (three channels as RGB), segmentation layers in colour.
    """
    def log(line: str) -> None:
        sys.stderr.write(line + "\n")  # one write: lines from several threads stay whole
        sys.stderr.flush()

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        session = serve(
            layers, bind_address=bind_address, port=port, data_port=data_port, layout=layout,
            log=log if verbose else None,
        )
        try:
            for layer in session.layers:
                click.echo(f"{layer.kind:<12} {layer.name}: {layer.path}", err=True)
                if layer.note:
                    click.echo(f"  note: {layer.note}", err=True)
            click.echo(f"Neuroglancer: {session.url}")
            sys.stdout.flush()
            click.echo("serving until Ctrl-C", err=True)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            session.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("viewer stopped", err=True)
