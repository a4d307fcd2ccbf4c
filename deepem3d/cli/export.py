"""`deepem3d export LAYER OUT`: a layer, or a box of it, to .npy, HDF5, TIFF or zarr."""

from __future__ import annotations

import click

from deepem3d.cli.options import Bounds


@click.command()
@click.argument("layer")
@click.argument("out")
@click.option("--bounds", type=Bounds(), default=None,
              help="The box to write, x0,y0,z0,x1,y1,z1 in voxels at --mip, end exclusive "
              "(default: the whole layer).")
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="The mip level to read.")
@click.option("--fill-missing", is_flag=True, help="Read missing chunks as zeros (default: "
              "a missing chunk is an error, and nothing is written).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT whole (an HDF5 "
              "file with all its datasets, not only DATASET).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar on stderr.")
def export(layer: str, out: str, bounds: tuple | None, mip: int, fill_missing: bool,
           overwrite: bool, progress: bool) -> None:
    """Write LAYER (an image, a map or a segmentation) to OUT for other tools: FILE.npy,
    FILE.h5[:/DATASET] (default /data; the file holds that one dataset, with CREMI's
    resolution and offset attributes), FILE.tif (one channel) or FOLDER.zarr (OME-Zarr). HDF5
    and zarr record the voxel size and the box's position in nm, which ingest takes back.
    Arrays are z,y,x (maps z,y,x,c; in zarr c,z,y,x), in the order `deepem3d ingest` reads.
    OUT is complete or absent."""
    from deepem3d.export import export as export_layer

    shape, dtype, axes = export_layer(layer, out, bounds=bounds, mip=mip, overwrite=overwrite,
                                      progress=progress, fill_missing=fill_missing)
    click.echo(f"exported {layer} -> {out}: {'x'.join(map(str, shape))} ({','.join(axes)}) "
               f"{dtype}")
