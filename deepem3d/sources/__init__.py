"""Volumes in files, read slab by slab along z, never whole (`open_source`):

- a multi-page TIFF file, one page per z (`stack.tif`);
- a directory of single-page TIFF files, one per z, in natural name order (`slices/`);
- an HDF5 dataset (`volume.h5:/path/to/dataset`);
- a NumPy file (`volume.npy`, memory-mapped);
- a zarr array, v2 or v3 (`volume.zarr`, `volume.zarr/raw`), or an OME-Zarr image, whose first
  (full-resolution) level is read, or the level its path names (`image.zarr/1`, with that
  level's scale and translation), and whose size-1 time and channel axes are dropped;
- an N5 dataset (`volume.n5/raw`), or the one a container or group holds (a multiscale's
  full-resolution `s0`), read by `deepem3d.sources.n5`;
- an MRC file (`volume.mrc`, `.rec`, `.st`, `.ali`, `.map`, `.mrcs`; memory-mapped).

Files on disk are z,y,x; HDF5, .npy and zarr may say `axes="xyz"` when already x,y,z, and an OME-
Zarr says which by its axes (a plain zarr array by zarr 3's `dimension_names` or xarray's
`_ARRAY_DIMENSIONS`, where they are z,y,x or x,y,z). Every source hands out x,y,z slabs (CloudVolume
order); the one transposition is `deepem3d.axes`. Where the file records its voxel size (OME-Zarr's
scale, the MRC header, an HDF5 dataset's `resolution` attribute as CREMI writes it, in the array's
own axis order, N5's attributes as `deepem3d.sources.n5` reads them), the source keeps it as
`resolution` (nm, x,y,z), and the position of its first voxel (OME-Zarr's translation, CREMI's
`offset`, N5's) as `position`, or its index where the file counts it in voxels (an MRC header's
start) as `start`. Sources are opened read-only and never modified.

One module per format (`tiff`, `hdf5`, `zarr_arrays`, `n5`, `mrc`), what they share in `base`.
"""

from __future__ import annotations

import os
import shlex

import numpy as np

from deepem3d.errors import InputError
from deepem3d.sources import n5
from deepem3d.sources.base import (
    AXES,
    FILE_SUFFIXES,
    HDF5_SUFFIXES,
    MRC_SUFFIXES,
    N5_SUFFIXES,
    NPY_SUFFIXES,
    SUPPORTED,
    TIFF_SUFFIXES,
    ZARR_MARKERS,
    ZARR_SUFFIXES,
    ArraySource,
    VolumeSource,
    canonical_dtype,
)
from deepem3d.sources.hdf5 import open_hdf5, split_hdf5
from deepem3d.sources.mrc import open_mrc
from deepem3d.sources.tiff import TiffDirectorySource, TiffStackSource, natural_key
from deepem3d.sources.zarr_arrays import open_zarr

__all__ = [
    "AXES", "FILE_SUFFIXES", "HDF5_SUFFIXES", "TIFF_SUFFIXES", "ArraySource", "VolumeSource",
    "canonical_dtype", "file_in_the_way", "natural_key", "open_source", "source_root",
    "split_hdf5",
]


def file_in_the_way(filename: str) -> str:
    """What to say of a path that runs through a file where a folder goes: a volume file
    `ingest` reads (an EM image given where its layer goes, the first step a new user misses)
    is named with the command that makes a layer of it."""
    path = str(filename).removeprefix("file://")
    while path and not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.isfile(path) and path.lower().endswith(FILE_SUFFIXES):
        return (f"{path} is a file where a precomputed layer (a folder) goes: make a layer of "
                f"it with `deepem3d ingest {shlex.quote(path)} LAYER` and give LAYER")
    return (f"{filename}: a path runs through a file where a folder (a layer, a queue, an "
            "output) is needed")


def open_source(src: str, axes: str | None = None) -> VolumeSource:
    """Open `src` read-only as a 3D volume: TIFF file or directory, FILE.h5:/DATASET (or
    FILE.h5 when it holds one dataset), .npy, a zarr array or group (OME-Zarr: its first,
    full-resolution level, or a level named by its path), N5, MRC.

    `axes` is the order of the array in the file: "zyx" or "xyz" (HDF5, .npy and zarr; TIFF
    pages and MRC sections are always z). None: what an OME-Zarr's metadata says, else zyx.
    Use it as a context manager to close the file.
    """
    if axes is not None and axes not in AXES:
        raise InputError(f"axes must be zyx or xyz, not {axes!r}")
    hdf5 = split_hdf5(src)
    if hdf5 is not None:
        return open_hdf5(*hdf5, axes=axes or "zyx")
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise InputError(f"no such file or directory: {src}")
    lower = path.lower()
    if os.path.isdir(path):
        if lower.endswith(ZARR_SUFFIXES) or any(
                os.path.exists(os.path.join(path, m)) for m in ZARR_MARKERS):
            return open_zarr(path, axes)
        if lower.endswith(N5_SUFFIXES) or n5.attributes(path):
            _sections_axes(axes, src, "N5 orders its dimensions x,y,z, so an N5 dataset")
            return n5.open_n5(path)
        _sections_axes(axes, src, "TIFF pages are z, so a TIFF stack")
        return TiffDirectorySource(path)
    if lower.endswith(TIFF_SUFFIXES):
        _sections_axes(axes, src, "TIFF pages are z, so a TIFF stack")
        return TiffStackSource(path)
    if lower.endswith(NPY_SUFFIXES):
        return _open_npy(path, axes or "zyx")
    if lower.endswith(MRC_SUFFIXES):
        _sections_axes(axes, src, "MRC sections are z, so an MRC volume")
        return open_mrc(path)
    raise InputError(f"cannot tell what {src} is from its name: deepem3d reads {SUPPORTED}")


def source_root(src: str) -> str:
    """The absolute path of what reading `src` reads from: the HDF5 file, or the zarr or N5
    container an array lies in (its outermost folder that zarr or N5 metadata marks), or the
    file or folder itself. A layer written inside it would modify the user's input."""
    hdf5 = split_hdf5(src)
    path = os.path.abspath(os.path.expanduser(hdf5[0] if hdf5 else src))
    while True:
        parent = os.path.dirname(path)
        if parent == path or not any(os.path.exists(os.path.join(parent, m))
                                     for m in (*ZARR_MARKERS, "attributes.json")):
            return path
        path = parent


def _open_npy(path: str, axes: str) -> ArraySource:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read {path} as a .npy array: {err}") from None
    if not isinstance(data, np.ndarray):
        raise InputError(f"{path} is not a .npy array")
    return ArraySource(path, data, axes, kind="npy")


def _sections_axes(axes: str | None, src: str, why: str) -> None:
    if axes not in (None, "zyx"):
        raise InputError(f"{src}: {why} is always z,y,x: drop --axes {axes}")
