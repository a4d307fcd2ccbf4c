"""`deepem3d sample DEST`: write the embedded ISBI 2012 volume as precomputed layers."""

from __future__ import annotations

import click

from deepem3d.sample import CHUNK_SIZE, RESOLUTION, write_sample


@click.command()
@click.argument("dest")
@click.option("--overwrite", is_flag=True, help="Replace layers that already hold data.")
def sample(dest: str, overwrite: bool) -> None:
    """Write the embedded ISBI 2012 sample under DEST as layers `image` and `ground_truth`.

    30 sections of 512 x 512 at 4 x 4 x 50 nm (Cardona et al. 2010; see the README for terms).
    DEST is any CloudVolume path (a local directory, file://, gs://, s3://).
    """
    paths = write_sample(dest, overwrite=overwrite)
    res = "x".join(str(r) for r in RESOLUTION)
    chunks = ",".join(str(c) for c in CHUNK_SIZE)
    for name, path in paths.items():
        click.echo(f"{name}: {path} (512 x 512 x 30 voxels at {res} nm, chunks {chunks})")
