"""`deepem3d export`: a layer, or a box of it, to a file a lab's other tools read.

The file kinds are the ones `deepem3d ingest` reads, in the same order (z, y, x; a layer of
several channels, such as an affinity map, as z, y, x, c, which ingest does not read back), so
that ingesting a one-channel export (an HDF5 one named with its dataset, FILE.h5:/data) gives
the layer back: its values, and from HDF5 and zarr, which record them, its voxel size and the
box's place (.npy and TIFF record neither: give ingest --resolution and --voxel-offset):

- `.npy`: NumPy's format;
- `FILE.h5:/DATASET` (or `.hdf5`, `.hdf`): an HDF5 dataset, gzip-compressed (default dataset
  `/data`), with CREMI's `resolution` and `offset` attributes (z, y, x, nm: the layer's voxel
  size and the box's position), which ingest takes back. The file is written whole: it holds
  that one dataset, and `overwrite` replaces an existing file, its other datasets included;
- `.tif` / `.tiff`: a multi-page TIFF, one page per section (one channel only; BigTIFF past
  2 GB);
- `.zarr`: an OME-Zarr 0.4 image of one level (zarr format 2, the layer's chunks, at most as
  deep as a slab, zarr's default compression) whose scale and translation are the layer's
  voxel size and the box's position in nm; a map's channels come first (c, z, y, x), as
  OME-Zarr orders its axes. Ingest takes both back: the layer it makes is where this one was.

The layer is read in slabs along z (at most about SLAB_BYTES each), never whole. The file is
written under a temporary name beside OUT and renamed when complete: it is complete or
absent, and an existing OUT is replaced only with `overwrite` (a zarr folder, which no rename
replaces, is moved aside, the new one takes its name, then the old one is removed).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from cloudvolume.lib import Bbox
from tqdm import tqdm

from deepem3d.axes import zyx_from_xyz
from deepem3d.errors import InputError, write_errors_reported
from deepem3d.ingest import SLAB_BYTES
from deepem3d.sources import TIFF_SUFFIXES, split_hdf5
from deepem3d.storage import layers
from deepem3d.units import format_bytes

#: the dataset an HDF5 export writes when OUT names none
DEFAULT_DATASET = "/data"


def export(
    layer_path: str,
    out: str,
    *,
    bounds: tuple[Sequence[int], Sequence[int]] | None = None,
    mip: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    slab_bytes: int = SLAB_BYTES,
    fill_missing: bool = False,
) -> tuple[tuple[int, ...], np.dtype, str]:
    """Write `bounds` (x,y,z voxels at `mip`, end exclusive; default the whole layer) of the
    layer to `out`; returns the array's shape, dtype and axes as written ("zyx", "zyxc" or, in
    zarr, "czyx"). A missing chunk is an InputError unless `fill_missing` (read as zeros)."""
    vol = layers.open_layer(layer_path, mip=mip, fill_missing=fill_missing)
    box = Bbox(*bounds) if bounds is not None else Bbox(vol.bounds.minpt, vol.bounds.maxpt)
    if not vol.bounds.contains_bbox(box):
        raise InputError(f"--bounds {box.minpt.tolist()}..{box.maxpt.tolist()} reach outside "
                         f"{vol.cloudpath} at mip {mip} ({vol.bounds.minpt.tolist()}.."
                         f"{vol.bounds.maxpt.tolist()})")
    kind, file, dataset = _target(out)
    channels = int(vol.num_channels)
    if kind == "tiff" and channels != 1:
        raise InputError(f"{vol.cloudpath} has {channels} channels: a TIFF export holds one; "
                         "write .npy or HDF5 (z, y, x, c), or zarr (c, z, y, x)")
    if os.path.isdir(file) and kind != "zarr":
        raise InputError(f"{file} is a folder: give a file name")
    if kind == "zarr" and os.path.lexists(file) and not os.path.isdir(file):
        raise InputError(f"{file} is a file: a zarr export is a folder")
    if os.path.lexists(file) and not overwrite:
        raise InputError(f"{file} exists: pass --overwrite to replace it")
    layers.check_output_apart(f"file://{os.path.abspath(file)}", {"exported": vol.cloudpath},
                              name="OUT")  # replacing a folder that holds LAYER deletes it
    x, y, z = (int(s) for s in box.size3())
    shape = (z, y, x) + ((channels,) if channels > 1 else ())
    axes = "zyx" + ("c" if channels > 1 else "")
    dtype = np.dtype(vol.dtype)
    rows = max(1, slab_bytes // max(1, x * y * channels * dtype.itemsize))
    nm = [float(r) for r in vol.resolution[::-1]]  # z, y, x: the voxel size and the box's
    place = {"scale": nm,  # position, which zarr's OME metadata and HDF5's attributes record
             "translation": [float(o) * r for o, r in zip(box.minpt.tolist()[::-1], nm)]}
    if kind == "zarr":
        chunk = [int(c) for c in vol.chunk_size[::-1]]  # z, y, x
        chunk[0] = min(chunk[0], rows)  # a slab is whole zarr chunks, and at most slab_bytes
        rows -= rows % chunk[0]
        place["chunks"] = chunk
        if channels > 1:
            shape, axes = (channels, z, y, x), "czyx"
    folder = os.path.dirname(os.path.abspath(file))
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder for {file}")
    need = math.prod(shape) * dtype.itemsize
    free = shutil.disk_usage(folder).free
    if kind in ("npy", "tiff") and need > free:  # HDF5 and zarr are compressed: sizes unknown
        raise InputError(f"{file} would take {format_bytes(need)} and {folder} has "
                         f"{format_bytes(free)} free: export a smaller --bounds, or to HDF5")
    # beside OUT, its name cut so that a name as long as the file system allows still fits
    partial = os.path.join(folder, f".{os.path.basename(file)[:128]}.partial-{os.getpid()}")
    try:
        with write_errors_reported(file):
            with _Writer(kind, partial, dataset, shape, dtype, place) as write, tqdm(
                total=z, unit="z", desc=f"export {os.path.basename(file)}", file=sys.stderr,
                disable=not progress,
            ) as bar:
                (x0, y0, z0), (x1, y1, _) = box.minpt.tolist(), box.maxpt.tolist()
                for start in range(0, z, rows):
                    stop = min(z, start + rows)
                    slab = zyx_from_xyz(layers.read_block(
                        vol, (x0, y0, z0 + start), (x1, y1, z0 + stop), "finish writing the "
                        "layer, or pass --fill-missing to read them as 0"))
                    write(start, stop, slab if channels > 1 else slab[..., 0])
                    bar.update(stop - start)
            if kind == "zarr" and os.path.lexists(file):  # --overwrite: a folder is not replaced
                old = f"{partial}-replaced"  # so: moved aside, the new one named, the old removed
                os.replace(file, old)
                os.replace(partial, file)
                _remove(old)
            else:
                os.replace(partial, file)
    finally:
        _remove(partial)
    return shape, dtype, axes


def _remove(path: str) -> None:
    """Remove a file, a link or a folder, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _target(out: str) -> tuple[str, str, str | None]:
    """(kind, file, HDF5 dataset) of OUT, or an InputError naming the kinds."""
    if "://" in out:  # (s3://B/x.npy was read as the local folder s3:/B, "no such folder")
        raise InputError(f"{out}: export writes a local file; give a local path (and copy it "
                         "to a bucket afterwards)")
    hdf5 = split_hdf5(out)
    if hdf5 is not None:
        dataset = hdf5[1] or DEFAULT_DATASET
        if dataset.endswith("/") or "//" in dataset:
            raise InputError(f"{out}: name the HDF5 dataset to write, such as "
                             f"{hdf5[0]}:{DEFAULT_DATASET}")
        return "hdf5", hdf5[0], dataset
    if out.lower().endswith(".npy"):
        return "npy", out, None
    if out.lower().endswith(TIFF_SUFFIXES):
        return "tiff", out, None
    if out.rstrip("/").lower().endswith(".zarr"):
        return "zarr", out.rstrip("/"), None
    raise InputError(f"cannot tell what to write from the name {out}: give FILE.npy, "
                     "FILE.h5[:/DATASET], FILE.tif or FOLDER.zarr")


class _Writer:
    """A context whose value writes sections [start, stop) of the array into the file."""

    def __init__(self, kind: str, path: str, dataset: str | None, shape, dtype, place: dict):
        self.kind, self.path, self.dataset, self.shape, self.dtype = (
            kind, path, dataset, shape, dtype)
        self.place = place  # scale and translation (nm), zarr's chunks; z,y,x

    def __enter__(self):
        if self.kind == "npy":
            self.handle = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                                    shape=self.shape)

            def write(start: int, stop: int, slab: np.ndarray) -> None:
                self.handle[start:stop] = slab
        elif self.kind == "hdf5":
            import h5py

            self.handle = h5py.File(self.path, "w")
            data = self.handle.create_dataset(self.dataset, shape=self.shape, dtype=self.dtype,
                                              chunks=True, compression="gzip")
            # CREMI's attributes, as `deepem3d.sources` reads them back (the array's order)
            data.attrs["resolution"] = np.asarray(self.place["scale"], np.float64)
            data.attrs["offset"] = np.asarray(self.place["translation"], np.float64)

            def write(start: int, stop: int, slab: np.ndarray) -> None:
                data[start:stop] = slab
        elif self.kind == "zarr":
            write = self._open_zarr()
        else:
            import tifffile

            big = int(np.prod(self.shape)) * self.dtype.itemsize > 2**31
            self.handle = tifffile.TiffWriter(self.path, bigtiff=big)

            def write(start: int, stop: int, slab: np.ndarray) -> None:
                for page in slab:
                    self.handle.write(page, contiguous=True)
        return write

    def _open_zarr(self):
        import zarr

        channel = len(self.shape) == 4  # c, z, y, x: one channel per chunk, unscaled

        def axes(channel_value, zyx: list) -> list:
            return ([channel_value] if channel else []) + zyx

        chunks = axes(1, self.place["chunks"])
        group = zarr.open_group(self.path, mode="w-", zarr_format=2)
        data = group.create_array("0", shape=self.shape, dtype=self.dtype,
                                  chunks=[min(c, n) for c, n in zip(chunks, self.shape)],
                                  fill_value=0)
        names = "czyx" if channel else "zyx"
        group.attrs["multiscales"] = [{
            "version": "0.4",
            "axes": [{"name": "c", "type": "channel"} if a == "c" else
                     {"name": a, "type": "space", "unit": "nanometer"} for a in names],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": axes(1.0, self.place["scale"])},
                {"type": "translation", "translation": axes(0.0, self.place["translation"])}]}],
        }]
        self.handle = None

        def write(start: int, stop: int, slab: np.ndarray) -> None:
            if slab.ndim == 4:  # z, y, x, c -> c, z, y, x
                data[:, start:stop] = np.moveaxis(slab, -1, 0)
            else:
                data[start:stop] = slab
        return write

    def __exit__(self, *exc) -> None:
        if self.handle is None:  # zarr: every write is already on disk
            return
        if self.kind == "npy":
            self.handle.flush()
            del self.handle
        else:
            self.handle.close()
