"""`deepem3d ingest SRC DEST`: a 3D volume from a file into a new precomputed layer."""

from __future__ import annotations

import click

from deepem3d.cli.options import Triple
from deepem3d.ingest import ENCODINGS
from deepem3d.ingest import ingest as ingest_volume
from deepem3d.sources import AXES
from deepem3d.storage.layers import cloudpath


@click.command()
@click.argument("src")
@click.argument("dest")
@click.option("--resolution", type=Triple(float, example="4,4,40"), default=None,
              help="Voxel size in nm, x,y,z (e.g. 4,4,40). Default: the one the file records "
              "(OME-Zarr scale, MRC header, N5 attributes, an HDF5 dataset's resolution "
              "attribute).")
@click.option("--layer-type", type=click.Choice(["image", "segmentation"]), default="image",
              show_default=True, help="Image (grayscale) or segmentation (integer labels).")
@click.option("--chunk-size", type=Triple(int), default=None,
              help="Storage chunk, x,y,z (default 128,128,16; x and y halved down to 32 "
              "until the volume spans two chunks, so it gets mip levels).")
@click.option("--encoding", type=click.Choice(list(ENCODINGS)), default=None,
              help="Chunk encoding (default: raw for images, compressed_segmentation for "
              "segmentations).")
@click.option("--axes", type=click.Choice(list(AXES)), default=None,
              help="Axis order of an HDF5, .npy or zarr array (default zyx, or what an "
              "OME-Zarr's axes or a zarr array's dimension names say; TIFF pages and MRC "
              "sections are always z).")
@click.option("--voxel-offset", type=Triple(int, positive=False, example="0,0,100"),
              default=None,
              help="Position of the first voxel, x,y,z in voxels (default: where the file "
              "places it, an OME-Zarr's translation, a CREMI HDF5's or N5's offset, an MRC "
              "header's nxstart, nystart, nzstart; else 0,0,0).")
@click.option("--dtype", type=click.Choice(["uint32", "uint64"]), default=None,
              help="Stored dtype of a segmentation (default uint64); images keep theirs.")
@click.option("--to-uint8", is_flag=True,
              help="Store an image of 16-bit, 32-bit or float values as uint8, what the "
              "network reads: its 0.1 and 99.9 percentiles map linearly to 0 and 255 (a "
              "uint8 image's too: a contrast stretch).")
@click.option("--overwrite", is_flag=True, help="Replace a layer that already holds data.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar on stderr.")
def ingest(
    src: str, dest: str, resolution: tuple[float, float, float] | None, layer_type: str,
    chunk_size: tuple[int, int, int] | None, encoding: str | None, axes: str | None,
    voxel_offset: tuple[int, int, int] | None, dtype: str | None, to_uint8: bool, overwrite: bool,
    progress: bool,
) -> None:
    """Write the 3D volume SRC to a new precomputed layer at DEST.

    SRC is a multi-page TIFF (pages are z), a directory of single-page TIFFs (sorted by name,
    numbers in natural order), FILE.h5:/DATASET (FILE.h5 alone when it holds one dataset), a .npy
    file, a zarr array (v2 or v3; DIR.zarr/ARRAY in a group of several), an OME-Zarr image (its
    full-resolution level; DIR.zarr/1 names level 1, read at its own voxel size), an N5 dataset (or
    a multiscale's s0), or an MRC file (.mrc, .rec, .st, .ali, .map, .mrcs). HDF5, .npy and zarr are
    z,y,x unless --axes xyz (or the zarr names its axes). DEST is any CloudVolume path (file://,
    gs://, s3://) or a local directory. SRC is only read; it is streamed slab by slab along z.
    """
    vol = ingest_volume(
        src,
        cloudpath(dest),
        resolution=resolution,
        layer_type=layer_type,
        chunk_size=chunk_size,
        encoding=encoding,
        axes=axes,
        voxel_offset=voxel_offset,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
        to_uint8=to_uint8,
    )
    size = ",".join(str(int(s)) for s in vol.volume_size)
    nm = ",".join(f"{float(r):g}" for r in vol.resolution)
    told = "" if resolution else ", as the file records it"
    offset = tuple(int(o) for o in vol.voxel_offset)
    placed = "" if voxel_offset or not any(offset) else (
        f", first voxel at {','.join(map(str, offset))} as the file places it")
    chunks = ",".join(str(int(c)) for c in vol.chunk_size)
    window = vol.provenance.processing[-1]["method"].get("uint8_window") if to_uint8 else None
    rescaled = "" if window is None else (
        f" (the source's {window[0]:g}..{window[1]:g} mapped onto 0..255)")
    click.echo(
        f"ingested {src} -> {vol.cloudpath}: {layer_type} {size} (x,y,z) {vol.dtype}"
        f"{rescaled} at {nm} nm{told}{placed}, chunks {chunks}, {vol.encoding}"
    )
