"""Volumes in files, read slab by slab along z, never whole (`open_source`):

- a multi-page TIFF file, one page per z (`stack.tif`);
- a directory of single-page TIFF files, one per z, in natural name order (`slices/`);
- an HDF5 dataset (`volume.h5:/path/to/dataset`);
- a NumPy file (`volume.npy`, memory-mapped);
- a zarr array, v2 or v3 (`volume.zarr`, `volume.zarr/raw`), or an OME-Zarr image, whose first
  (full-resolution) level is read, or the level its path names (`image.zarr/1`, with that
  level's scale and translation), and whose size-1 time and channel axes are dropped;
- an N5 dataset (`volume.n5/raw`), or the one a container or group holds (a multiscale's
  full-resolution `s0`), read by `deepem3d.n5`;
- an MRC file (`volume.mrc`, `.rec`, `.st`, `.ali`, `.map`, `.mrcs`; memory-mapped).

Files on disk are z,y,x; HDF5, .npy and zarr may say `axes="xyz"` when already x,y,z, and an OME-
Zarr says which by its axes (a plain zarr array by zarr 3's `dimension_names` or xarray's
`_ARRAY_DIMENSIONS`, where they are z,y,x or x,y,z). Every source hands out x,y,z slabs (CloudVolume
order); the one transposition is `deepem3d.axes`. Where the file records its voxel size (OME-Zarr's
scale, the MRC header, an HDF5 dataset's `resolution` attribute as CREMI writes it, in the array's
own axis order, N5's attributes as `deepem3d.n5` reads them), the source keeps it as `resolution`
(nm, x,y,z), and the position of its first voxel (OME-Zarr's translation, CREMI's `offset`, N5's) as
`position`, or its index where the file counts it in voxels (an MRC header's start) as `start`.
Sources are opened read-only and never modified.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shlex
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from numpy.typing import DTypeLike

from deepem3d import n5
from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
NPY_SUFFIXES = (".npy",)
ZARR_SUFFIXES = (".zarr",)
N5_SUFFIXES = (".n5",)
MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".ali", ".map")
#: A directory holding one of these is a zarr array or group (v3; v2 array; v2 group).
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
#: Every file name `open_source` reads by its suffix (a TIFF directory, zarr and N5 also by
#: content).
FILE_SUFFIXES = (TIFF_SUFFIXES + HDF5_SUFFIXES + NPY_SUFFIXES + ZARR_SUFFIXES + N5_SUFFIXES
                 + MRC_SUFFIXES)
AXES = ("zyx", "xyz")
#: significant digits a recorded voxel size keeps (float32 headers hold about 7)
RESOLUTION_DIGITS = 6
#: how far from a whole number of voxels (in voxels) a recorded position may lie: a float32
#: header's 4,000,004 nm is off by about 0.25 nm, 0.06 of a 4 nm voxel
POSITION_TOLERANCE = 0.1
SUPPORTED = (
    "a multi-page .tif/.tiff file, a directory of .tif/.tiff files, "
    "FILE.h5:/DATASET, a .npy file, a zarr array or OME-Zarr image, an N5 dataset, or an MRC "
    "file"
)


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


def canonical_dtype(dtype: DTypeLike) -> np.dtype:
    """numpy's own dtype of that name, in native byte order: tifffile's uint64 is type code
    'Q' where numpy's is 'L' (int64 'q', and uint32 'I' vs 'L' on other platforms); they
    compare equal, and astype keeps them, but CloudVolume's np.issubdtype refuses the other
    one ("Volume: uint64 Image: uint64"). Numbers only: a string or record dtype's name is no
    dtype."""
    found = np.dtype(dtype)
    return np.dtype(found.name) if found.kind in "biufc" else found.newbyteorder("=")


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """tifffile's own log lines on a damaged file ("invalid page offset"), silenced while a
    TIFF is read: they would precede the one-line error that names the damage."""
    import logging

    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class VolumeSource(ABC):
    """A 3D volume on disk, read slab by slab along z. Shapes and slabs are x,y,z."""

    #: short name of the reader, recorded in provenance
    kind: str = ""
    #: voxel size in nm, x,y,z, where the file records one, and where it was found (or, with
    #: no resolution, why what the file holds is not taken)
    resolution: tuple[float, float, float] | None = None
    resolution_from: str = ""
    #: position of the first voxel's corner in nm, x,y,z, where the file records one
    position: tuple[float, float, float] | None = None
    position_from: str = ""
    #: or the first voxel's index, x,y,z, where the file records it in voxels (an MRC's
    #: nxstart, nystart, nzstart)
    start: tuple[int, int, int] | None = None
    #: what the file records about its place that the reader does not apply, and why
    #: (ingest says so when it takes the file's placement)
    placement_note: str = ""
    #: sections the file stores (and decompresses) together: a slab that starts and ends on
    #: a multiple of it decodes each stored block once
    z_step: int = 1

    def __init__(self, name: str, stored_shape: Sequence[int], dtype: np.dtype, axes: str):
        self.name = name  # the source as the user named it (absolute path), for messages
        if stored_shape is None:  # an HDF5 dataset with a null dataspace
            raise InputError(f"{name} holds no array (its dataspace is empty)")
        self.stored_shape = tuple(int(s) for s in stored_shape)  # in the file's own order
        self.axes = axes
        _check_3d(self.stored_shape, name)
        self.shape = (
            tuple(reversed(self.stored_shape)) if axes == "zyx" else self.stored_shape
        )  # x,y,z
        try:
            self.dtype = canonical_dtype(dtype)
        except (TypeError, ValueError):  # zarr 3's variable-length strings
            raise InputError(f"{name} holds {dtype}, not numbers") from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Voxels [z0, z1) of the whole x,y extent as an x,y,z array in native byte order."""
        if not 0 <= z0 < z1 <= self.shape[2]:
            raise IndexError(f"slab [{z0}, {z1}) outside 0..{self.shape[2]}")
        slab = np.asarray(self._read(z0, z1), dtype=self.dtype)
        expected = (self.shape[0], self.shape[1], z1 - z0)
        if slab.shape != expected:  # a reader bug, not a user mistake
            raise RuntimeError(f"{self.kind} reader returned {slab.shape}, expected {expected}")
        return slab

    @abstractmethod
    def _read(self, z0: int, z1: int) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the file handles."""

    def describe(self) -> dict:
        """What provenance records about the source."""
        return {
            "source": self.name,
            "format": self.kind,
            "axes": self.axes,
            "shape": list(self.stored_shape),
            "dtype": self.dtype.name,
            **({"recorded_resolution": list(self.resolution),
                "recorded_resolution_from": self.resolution_from} if self.resolution else {}),
            **({"recorded_position": list(self.position),
                "recorded_position_from": self.position_from} if self.position else {}),
            **({"recorded_start": list(self.start)} if self.start else {}),
        }

    def record_resolution(self, stored: Sequence[float] | None, where: str) -> None:
        """Keep a voxel size the file records in its own axis order (nm), if it is one, to
        RESOLUTION_DIGITS significant digits (a header's float32 13.7 A is 1.3700000047 nm)."""
        values = _positive_triple(stored)
        if values is not None:
            self.resolution = self._xyz(float(f"{v:.{RESOLUTION_DIGITS}g}") for v in values)
            self.resolution_from = where

    def record_position(self, stored: Sequence[float] | None, where: str) -> None:
        """Keep the position (nm) of the first voxel the file records in its own axis order,
        if it is one (not rounded: a position is a multiple of the voxel size, which can be
        past RESOLUTION_DIGITS digits)."""
        values = _finite_triple(stored)
        if values is not None:
            self.position = self._xyz(values)
            self.position_from = where

    def _xyz(self, stored: Iterable[float]) -> tuple[float, float, float]:
        """Three values the file gives in its own axis order, x,y,z."""
        values = tuple(stored)
        return values if self.axes == "xyz" else values[::-1]

    def recorded_offset(self, resolution: Sequence[float]) -> tuple[int, int, int]:
        """The voxel offset, x,y,z, at which the file places its first voxel: its position
        over the voxel size the file records (where the user gives another, the file's own
        voxels are still what its position counts), else over `resolution` (nm); 0,0,0 where
        it records no position; a one-line InputError where the position is not a whole
        number of voxels. A start recorded in voxels is the offset itself."""
        if self.start is not None:
            return self.start
        if self.position is None:
            return (0, 0, 0)
        resolution = self.resolution or resolution
        offset = tuple(round(p / r) for p, r in zip(self.position, resolution))
        if not _whole(self.position, resolution):
            nm = ",".join(f"{p:g}" for p in self.position)
            at = ",".join(f"{r:g}" for r in resolution)
            raise InputError(f"{self.name} places its first voxel at {nm} nm ({self.position_from}"
                             f"), not a whole number of {at} nm voxels: give --voxel-offset "
                             "X,Y,Z (voxels)")
        return offset

    def recorded_resolution(self) -> tuple[float, float, float]:
        """The voxel size the file records (nm, x,y,z), or a one-line InputError saying why
        there is none to take."""
        if self.resolution is None:
            why = f" ({self.resolution_from})" if self.resolution_from else ""
            raise InputError(f"{self.name} does not record its voxel size{why}: give it with "
                             "--resolution X,Y,Z (nm)")
        return self.resolution

    def __enter__(self) -> VolumeSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(VolumeSource):
    """Any array that slices lazily: an h5py dataset, a memory-mapped .npy or MRC, a zarr
    array. `fixed` indexes leading axes of size 1 that are not space (OME-Zarr's t and c)."""

    def __init__(self, name: str, data, axes: str, kind: str, handle=None,
                 fixed: tuple[int, ...] = (), check: Callable[[int, int], None] | None = None):
        self._data = data
        self._check = check  # of the stored chunks sections z0..z1 - 1 read, before reading
        self._handle = handle
        self._fixed = fixed
        self.kind = kind
        try:
            super().__init__(name, data.shape[len(fixed):], data.dtype, axes)
        except BaseException:
            self.close()
            raise
        chunks = getattr(data, "chunks", None)  # zarr, N5, a chunked HDF5 dataset
        if isinstance(chunks, tuple) and len(chunks) == data.ndim:
            self.z_step = int(chunks[len(fixed)] if axes == "zyx" else chunks[-1])

    def _read(self, z0: int, z1: int) -> np.ndarray:
        try:
            if self._check is not None:
                self._check(z0, z1)
            if self.axes == "xyz":
                return np.asarray(self._data[(*self._fixed, slice(None), slice(None),
                                              slice(z0, z1))])
            return xyz_from_zyx(np.asarray(self._data[(*self._fixed, slice(z0, z1))]))
        except InputError:
            raise
        except (OSError, RuntimeError, ValueError) as err:  # a damaged chunk, an HDF5 filter
            # plugin that is not installed, a missing external file: the library's words
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"cannot read sections {z0}..{z1 - 1} of {self.name}: "
                             f"{first}") from None

    def close(self) -> None:
        self._data = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TiffStackSource(VolumeSource):
    """A multi-page TIFF file: page i is z = i. Reads page ranges (or a read-only memmap)."""

    kind = "tiff"

    def __init__(self, path: str):
        import tifffile

        with quiet_tifffile():
            try:
                self._tif = tifffile.TiffFile(path)
            except (tifffile.TiffFileError, OSError, ValueError) as err:
                raise InputError(f"cannot read {path} as TIFF: {err}") from None
            try:
                self._open(path)
            except BaseException:
                self.close()
                raise

    def _open(self, path: str) -> None:
        tif = self._tif
        series = tif.series
        if not series:
            raise InputError(f"{path} holds no images")
        if len(series) > 1:
            # tifffile splits pages of another shape or data type into series of their own
            kinds = ", ".join(f"{'x'.join(map(str, s.shape))} {s.dtype}" for s in series[:4])
            raise InputError(
                f"{path} holds {len(series)} image series of different shapes or data types "
                f"({kinds}{', ...' if len(series) > 4 else ''}): deepem3d reads a stack of "
                "equal-size 2D grayscale pages of one data type"
            )
        s = series[0]
        axes, shape = s.axes, tuple(s.shape)
        if len(shape) == 2:
            raise InputError(
                f"{path} holds a single 2D image ({shape[1]}x{shape[0]}): deepem3d takes a 3D "
                "stack, a multi-page TIFF or a directory of TIFF files"
            )
        if any(ax in "CS" and n > 1 for ax, n in zip(axes, shape)):
            # tifffile.imwrite stores 3 or 4 sections of y, x as one RGB(A) page unless told
            # photometric="minisblack"
            rgb = (" (a stack of 3 or 4 sections saved with tifffile.imwrite is stored so "
                   "unless photometric='minisblack': save it with that)"
                   if axes == "SYX" and shape[0] in (3, 4) else "")
            raise InputError(
                f"{path} has channels or samples per pixel (axes {axes}, shape {shape}): "
                "deepem3d reads one grayscale channel; save one channel as its own stack "
                f"first{rgb}"
            )
        _check_3d(shape, path)
        depth, height, width = shape
        self._memmap = None
        if s.dataoffset is not None and s.keyframe.is_memmappable:
            # uncompressed and contiguous (also ImageJ stacks over 4 GB, which have one IFD)
            try:
                self._memmap = tif.filehandle.memmap_array(
                    tif.byteorder + s.dtype.char, shape, s.dataoffset
                )
            except ValueError:  # numpy's "mmap length is greater than file size"
                raise InputError(f"{path} is truncated: its {depth} pages of {width}x{height} "
                                 "run past the end of the file") from None
        elif len(s) != depth or tuple(s.keyframe.shape) != (height, width):
            raise InputError(
                f"{path}: pages of shape {tuple(s.keyframe.shape)} do not stack into "
                f"{shape}: deepem3d reads a stack of 2D grayscale pages"
            )
        self._series = s
        super().__init__(path, shape, s.dtype, "zyx")

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self._memmap is not None:
            return xyz_from_zyx(np.asarray(self._memmap[z0:z1]))
        import tifffile

        try:
            with quiet_tifffile():
                pages = self._tif.asarray(key=slice(z0, z1), series=0)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise InputError(f"cannot read pages {z0}..{z1 - 1} of {self.name} as TIFF: "
                             f"{err}") from None
        return xyz_from_zyx(pages.reshape(z1 - z0, *self.stored_shape[1:]))

    def close(self) -> None:
        self._memmap = None
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


class TiffDirectorySource(VolumeSource):
    """A directory of single-page TIFF files, one per z, sorted by name (natural order)."""

    kind = "tiff-directory"

    def __init__(self, path: str):
        import tifffile

        self._tifffile = tifffile
        files = sorted(
            (
                entry.path
                for entry in os.scandir(path)
                if entry.is_file()
                and not entry.name.startswith(".")  # hidden files, macOS ._ resource forks
                and entry.name.lower().endswith(TIFF_SUFFIXES)
            ),
            key=lambda p: natural_key(os.path.basename(p)),
        )
        if not files:
            raise InputError(f"{path} holds no .tif/.tiff files: deepem3d reads {SUPPORTED}")
        shape = dtype = None
        for file in files:  # headers only: every file must be one 2D page of the same kind
            page_shape, page_dtype = self._header(file)
            if shape is None:
                shape, dtype = page_shape, page_dtype
            elif (page_shape, page_dtype) != (shape, dtype):
                raise InputError(
                    f"{file} is {_shape_text(page_shape)} {page_dtype.name} but "
                    f"{files[0]} is {_shape_text(shape)} {dtype.name}: every file of a "
                    "TIFF directory must have the same size and dtype"
                )
        self._files = files
        super().__init__(path, (len(files), *shape), dtype, "zyx")

    def _header(self, file: str) -> tuple[tuple[int, ...], np.dtype]:
        tifffile = self._tifffile
        try:
            with quiet_tifffile(), tifffile.TiffFile(file) as tif:
                npages = len(tif.pages)
                page = tif.pages.first
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise InputError(f"cannot read {file} as TIFF: {err}") from None
        if npages != 1 or len(shape) != 2:
            raise InputError(
                f"{file} holds {npages} page(s) of shape {shape}: a TIFF directory must hold "
                "one 2D grayscale image per file"
            )
        return shape, dtype

    def _read(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *self.stored_shape[1:]), dtype=self.dtype)
        for i, file in enumerate(self._files[z0:z1]):
            try:
                with quiet_tifffile(), self._tifffile.TiffFile(file) as tif:
                    out[i] = tif.pages.first.asarray()
            except (self._tifffile.TiffFileError, OSError, ValueError) as err:
                raise InputError(f"cannot read {file} as TIFF: {err}") from None
        return xyz_from_zyx(out)


def natural_key(name: str) -> tuple:
    """Sort key that puts 'z2.tif' before 'z10.tif'."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


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
        return _open_hdf5(*hdf5, axes=axes or "zyx")
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise InputError(f"no such file or directory: {src}")
    lower = path.lower()
    if os.path.isdir(path):
        if lower.endswith(ZARR_SUFFIXES) or any(
                os.path.exists(os.path.join(path, m)) for m in ZARR_MARKERS):
            return _open_zarr(path, axes)
        if lower.endswith(N5_SUFFIXES) or n5.attributes(path):
            _sections_axes(axes, src, "N5 orders its dimensions x,y,z, so an N5 dataset")
            return _open_n5(path)
        _sections_axes(axes, src, "TIFF pages are z, so a TIFF stack")
        return TiffDirectorySource(path)
    if lower.endswith(TIFF_SUFFIXES):
        _sections_axes(axes, src, "TIFF pages are z, so a TIFF stack")
        return TiffStackSource(path)
    if lower.endswith(NPY_SUFFIXES):
        return _open_npy(path, axes or "zyx")
    if lower.endswith(MRC_SUFFIXES):
        _sections_axes(axes, src, "MRC sections are z, so an MRC volume")
        return _open_mrc(path)
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


def split_hdf5(src: str) -> tuple[str, str | None] | None:
    """'a/v.h5:/raw' -> ('a/v.h5', '/raw'); 'v.h5' -> ('v.h5', None); not HDF5 -> None."""
    lower = src.lower()
    hits = [(lower.find(s + ":"), s) for s in HDF5_SUFFIXES if s + ":" in lower]
    if hits:
        i, suffix = min(hits)
        dataset = src[i + len(suffix) + 1 :].strip()
        if dataset and not dataset.startswith("/"):
            dataset = "/" + dataset
        return src[: i + len(suffix)], (dataset or None)
    if lower.endswith(HDF5_SUFFIXES):
        return src, None
    return None


def _open_hdf5(file: str, dataset: str | None, axes: str) -> ArraySource:
    import h5py

    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise InputError(f"no such file: {file}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"cannot read {file} as HDF5: {err}") from None
    try:
        if dataset is None:
            found = _hdf5_datasets(h5, limit=1)
            if len(found) != 1:  # none, or a choice to make
                raise InputError(
                    f"name the dataset to read: {file}:/DATASET ({_hdf5_contents(h5)})"
                )
            dataset = found[0].name
        try:
            obj = h5[dataset]
        except KeyError:
            raise InputError(
                f"{file} has no dataset {dataset} ({_hdf5_contents(h5)})"
            ) from None
        if not isinstance(obj, h5py.Dataset):
            raise InputError(
                f"{file}:{dataset} is a group, not a dataset ({_hdf5_contents(obj)})"
            )
        source = ArraySource(f"{path}:{dataset}", obj, axes, kind="hdf5", handle=h5)
        source.record_resolution(obj.attrs.get("resolution"),
                                 f"the dataset's `resolution` attribute, read as {axes}")
        source.record_position(obj.attrs.get("offset"),
                               f"the dataset's `offset` attribute (nm), read as {axes}")
        return source
    except BaseException:
        h5.close()
        raise


def _hdf5_datasets(group, limit: int) -> list:
    """The group's datasets (h5py objects) in visiting order, at most `limit` + 1 of them."""
    import h5py

    found: list = []

    def visit(name: str, obj: object) -> bool | None:
        if isinstance(obj, h5py.Dataset):
            found.append(obj)
            if len(found) > limit:
                return True  # stop walking
        return None

    group.visititems(visit)
    return found


def _hdf5_contents(group, limit: int = 6) -> str:
    """'it holds /raw 7x33x50 uint8, /labels ...' — shortened to `limit` datasets."""
    found = [f"{obj.name} {_shape_text(obj.shape)} {obj.dtype}"
             for obj in _hdf5_datasets(group, limit)]
    if not found:
        return "it holds no datasets"
    more = ", ..." if len(found) > limit else ""
    return "it holds " + ", ".join(found[:limit]) + more


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


def _check_3d(shape: Sequence[int], name: str) -> None:
    if len(shape) != 3:
        hint = ""
        if len(shape) == 4:
            hint = ": take one channel first (deepem3d reads one-channel 3D volumes)"
        raise InputError(f"{name} is {len(shape)}D (shape {tuple(shape)}), not 3D{hint}")
    if 0 in shape:
        raise InputError(f"{name} is empty (shape {tuple(shape)})")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _finite_triple(values) -> tuple[float, float, float] | None:
    """Three finite numbers as floats, or None (absent, unset or malformed)."""
    try:
        floats = tuple(float(v) + 0.0 for v in np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        return None
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        return None
    return floats


def _positive_triple(values) -> tuple[float, float, float] | None:
    """Three positive finite numbers as floats, or None (absent, unset or malformed)."""
    floats = _finite_triple(values)
    return floats if floats is not None and all(v > 0 for v in floats) else None


# zarr (v2 and v3, OME-Zarr) ------------------------------------------------------------------


def _open_zarr(path: str, axes: str | None) -> ArraySource:
    try:
        import zarr
        import zarr.errors
    except Exception as err:  # noqa: BLE001 - an environment fault, named in one line
        # numcodecs 0.16 (zarr's codecs) fails to import beside zfpy 1.0.1.post0, which
        # pyproject.toml excludes; another environment may still hold it
        raise InputError(f"reading {path} needs zarr, which fails to import here ({err!r}); "
                         "if zfpy 1.0.1.post0 is installed, pip install zfpy==1.0.1") from None
    try:
        node = zarr.open(store=path, mode="r")
    except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read {path} as zarr: {err}") from None
    scale, position, fixed, file_axes, no_unit = None, None, (), None, False
    multiscale = _ome_multiscale(node) if isinstance(node, zarr.Group) else None
    if isinstance(node, zarr.Group) and multiscale is None:
        try:
            members = list(node.members(max_depth=None))
        except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as err:
            raise InputError(f"cannot read {path} as zarr: {err}") from None
        images = [(name, g, m) for name, g in members if isinstance(g, zarr.Group)
                  and (m := _ome_multiscale(g)) is not None]
        if len(images) > 1:  # bioformats2raw writes a series per group: 0/, 1/, ...
            raise InputError(f"name the OME-Zarr image to read: {path}/IMAGE (its images: "
                             f"{', '.join(name for name, _, _ in images[:6])}"
                             f"{', ...' if len(images) > 6 else ''})")
        if images:
            name, node, multiscale = images[0]
            path = os.path.join(path, name)
        else:
            arrays = [(name, a) for name, a in members if isinstance(a, zarr.Array)]
            if len(arrays) != 1:
                listed = ", ".join(f"{name} {_shape_text(a.shape)} {a.dtype}"
                                   for name, a in arrays[:6]) or "none"
                raise InputError(f"name the array to read: {path}/ARRAY (its arrays: "
                                 f"{listed}{', ...' if len(arrays) > 6 else ''})")
            name, node = arrays[0]
            path = os.path.join(path, name)
    said = "OME-Zarr metadata"
    if multiscale is not None:
        node, scale, position, fixed, file_axes, no_unit = _ome_level(path, node, multiscale)
    elif (listed := _ome_level_named(path)) is not None:  # a level by its path: img.zarr/1
        node, scale, position, fixed, file_axes, no_unit = _ome_level(*listed)
    else:  # zarr 3's dimension_names, or xarray's _ARRAY_DIMENSIONS in zarr 2
        said, file_axes = "zarr metadata", _named_axes(node)
    if file_axes is not None and axes not in (None, file_axes):
        raise InputError(f"{path}: its {said} says its axes are "
                         f"{','.join(file_axes)}: drop --axes {axes}")
    source = ArraySource(path, node, file_axes or axes or "zyx", kind="zarr", fixed=fixed,
                         check=_blosc_chunk_check(path, node, fixed, file_axes or axes or "zyx"))
    if scale is not None:
        source.record_resolution(scale, "the OME-Zarr metadata")
        source.record_position(position, "the OME-Zarr metadata")
    elif no_unit:
        source.resolution_from = "its OME-Zarr scale names no unit of length"
    return source


def _blosc_chunk_check(path: str, array, fixed: tuple[int, ...],
                       axes: str) -> Callable[[int, int], None] | None:
    """Where the array's chunk files on this disk are blosc streams (zarr 2's compressor, or
    zarr 3's last codec, unsharded): a check of each stored chunk that sections z0..z1 - 1
    read against its stream's header (`n5.check_blosc_size`), or None."""
    meta = array.metadata
    codecs = [meta.compressor] if hasattr(meta, "compressor") else list(meta.codecs)
    last = type(codecs[-1]).__name__ if codecs and codecs[-1] is not None else ""
    if last not in ("Blosc", "BloscCodec") or not os.path.isdir(path):
        return None  # numcodecs' Blosc (zarr 2), zarr 3's BloscCodec; sharded ends otherwise
    chunks, shape = [int(c) for c in array.chunks], [int(n) for n in array.shape]
    z_axis = len(fixed) if axes == "zyx" else array.ndim - 1

    def check(z0: int, z1: int) -> None:
        ranges = [range(-(-n // c)) for n, c in zip(shape, chunks)]
        for axis, index in enumerate(fixed):
            ranges[axis] = range(index // chunks[axis], index // chunks[axis] + 1)
        ranges[z_axis] = range(z0 // chunks[z_axis], -(-z1 // chunks[z_axis]))
        for position in itertools.product(*ranges):
            file = os.path.join(path, *meta.encode_chunk_key(position).split("/"))
            try:
                with open(file, "rb") as f:
                    header, length = f.read(n5.BLOSC_HEADER), os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                continue  # not stored: the fill value
            try:
                n5.check_blosc_size(header, length)
            except ValueError as err:
                raise InputError(f"cannot read the zarr chunk {file}: {err}") from None
    return check


def _named_axes(array) -> str | None:
    """"zyx" or "xyz" where a plain zarr array names its dimensions so (zarr 3's
    `dimension_names`, xarray's `_ARRAY_DIMENSIONS` attribute); else None."""
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if not names:
        names = dict(array.attrs).get("_ARRAY_DIMENSIONS")
    if isinstance(names, (list, tuple)) and len(names) == 3 and all(
            isinstance(n, str) for n in names):
        order = "".join(n.lower() for n in names)
        return order if order in AXES else None
    return None


#: nanometres per unit of OME-Zarr's spatial axes (UDUNITS names, as the spec has them)
OME_UNITS_NM = {"picometer": 1e-3, "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3,
                "millimeter": 1e6, "centimeter": 1e7, "decimeter": 1e8, "meter": 1e9}


def _ome_multiscale(group) -> dict | None:
    """The first multiscale of an OME-Zarr group (version 0.4: in the attributes; 0.5: under
    their "ome" key), or None."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    found = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict)
                                         else None)
    return found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else None


def _ome_level_named(path: str) -> tuple | None:
    """(image path, image group, multiscale, level index) when the array at `path` is a level
    an OME-Zarr image above it lists (`img.zarr/1`, `img.zarr/scale/1`); else None."""
    import zarr
    import zarr.errors

    parts = os.path.normpath(path).split(os.sep)
    for up in (1, 2):  # the image group is the array's parent, or its grandparent
        image, below = os.sep.join(parts[:-up]), "/".join(parts[-up:])
        if not image or not any(os.path.exists(os.path.join(image, m)) for m in ZARR_MARKERS):
            continue
        try:
            group = zarr.open_group(store=image, mode="r")
        except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError, TypeError):
            continue
        multiscale = _ome_multiscale(group)
        datasets = multiscale.get("datasets") if multiscale else None
        paths = [d.get("path") if isinstance(d, dict) else None
                 for d in (datasets if isinstance(datasets, list) else [])]
        if below in paths:
            return image, group, multiscale, paths.index(below)
    return None


def _ome_level(path: str, group, multiscale: dict, index: int = 0) -> tuple:
    """(array, voxel size and first voxel's position in nm in the array's spatial order or
    None, indices of the leading size-1 axes, "zyx" or "xyz", whether a scale was dropped for
    want of a unit) of an OME-Zarr's level `index` (0: full resolution). Versions before 0.3
    name no axes: t,c,z,y,x."""
    import zarr

    try:
        level = multiscale["datasets"][index]
        array = group[level["path"]]
        axes = multiscale.get("axes") or list("tczyx")
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: malformed OME-Zarr multiscales metadata ({err!r})") from None
    if not isinstance(array, zarr.Array) or len(names) != array.ndim:
        raise InputError(f"{path}: its OME-Zarr metadata names {len(names)} axes "
                         f"({','.join(names)}) for its level {level['path']}")
    spatial = [i for i, n in enumerate(names) if n in ("x", "y", "z")]
    order = "".join(names[i] for i in spatial)
    lead = len(names) - 3
    if order not in AXES or spatial != list(range(lead, len(names))) or any(
            array.shape[i] != 1 for i in range(lead)):
        raise InputError(
            f"{path}: its axes are {','.join(names)} (shape {_shape_text(array.shape)}): "
            "deepem3d reads one-channel 3D volumes whose last axes are z,y,x (or x,y,z); "
            "save one channel and time point as its own array first")
    scale, position, no_unit = None, None, False
    try:
        factors, start, scaled = _ome_transform(level, multiscale, len(names))
        per_nm = [OME_UNITS_NM.get(units[i]) for i in spatial]
        if all(per_nm):
            scale = [float(factors[i]) * u for i, u in zip(spatial, per_nm)]
            position = [float(start[i]) * u for i, u in zip(spatial, per_nm)]
        no_unit = scaled and scale is None
        if index > 0 and scale is not None:
            full, _, _ = _ome_transform(multiscale["datasets"][0], multiscale, len(names))
            centred = [p - (s - float(full[i]) * u) / 2
                       for p, s, i, u in zip(position, scale, spatial, per_nm)]
            if not _whole(position, scale) and _whole(centred, scale):
                position = centred  # the level's translation names its first voxel's centre
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        scale = position = None  # no usable scale: the user gives --resolution
    return array, scale, position, (0,) * lead, order, no_unit


def _ome_transform(level: dict, multiscale: dict, ndim: int) -> tuple:
    """(scale, translation, whether a scale was given) of an OME-Zarr level: its transforms,
    then the multiscale's, applied to index 0 and to a step."""
    factors, start, scaled = np.ones(ndim), np.zeros(ndim), False
    for transforms in (level.get("coordinateTransformations") or [],
                       multiscale.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale":
                step = np.asarray(t["scale"], dtype=np.float64)
                factors, start, scaled = factors * step, start * step, True
            elif t.get("type") == "translation":
                start = start + np.asarray(t["translation"], dtype=np.float64)
    return factors, start, scaled


def _whole(position: Sequence[float], scale: Sequence[float]) -> bool:
    """Whether a position in nm is a whole number of voxels (as `recorded_offset` takes it)."""
    return all(abs(p / s - round(p / s)) <= POSITION_TOLERANCE for p, s in zip(position, scale))


#: datasets of an N5 group looked at to find its one multiscale (more: name the dataset)
N5_LISTED = 32


def _open_n5(path: str) -> ArraySource:
    """An N5 dataset, or the one a container or group holds: its only dataset, or the
    full-resolution `s0` of its only multiscale group."""
    if not n5.is_dataset(n5.attributes(path)):
        found = n5.datasets(path, limit=N5_LISTED + 1)
        if not found:
            raise InputError(f"{path} is an N5 container or group that holds no dataset")
        groups = {os.path.dirname(d) for d in found}
        full = os.path.join(*groups, "s0") if len(groups) == 1 else None
        if len(found) == 1:
            path = os.path.join(path, found[0])
        elif full in found and len(found) <= N5_LISTED:  # one multiscale: s0, s1, ...
            path = os.path.join(path, full)
        else:
            listed = ", ".join(found[:6])
            raise InputError(f"name the N5 dataset to read: {path}/DATASET (its datasets: "
                             f"{listed}{', ...' if len(found) > 6 else ''})")
    source = ArraySource(path, n5.N5Array(path), "zyx", kind="n5")
    scale, position, where = n5.voxel_size(path)
    if scale is None:
        source.resolution_from = where
    else:  # in C order, the array's own
        source.record_resolution(scale, where)
        source.record_position(position, where)
    return source


# MRC ------------------------------------------------------------------------------------------

#: IMOD's stamp in an MRC header (bytes 152..155, then its flags): with it, mode 0 bytes are
#: unsigned unless flag bit 0 is set
IMOD_STAMP = 1146047817
IMOD_STAMP_OFFSET = 152 - 112  # within mrcfile's `extra2` field, which starts at byte 112


def _imod_unsigned_bytes(header) -> bool:
    """Whether IMOD wrote this mode-0 file's bytes unsigned (mrcfile reads them as int8)."""
    order = header.dtype["nx"].str[0]  # the header's byte order
    extra = bytes(header.extra2.tobytes())
    stamp, flags = np.frombuffer(extra, dtype=order + "i4", count=2,
                                 offset=IMOD_STAMP_OFFSET)
    return int(stamp) == IMOD_STAMP and not int(flags) & 1


def _mrc_placement(source: ArraySource, header) -> None:
    """nxstart, nystart, nzstart: the first voxel's index, a number of voxels whatever the
    program. The origin (in A) is not applied: programs differ in its sign (IMOD's first
    voxel lies at minus the origin, UCSF Chimera's at plus it); the note says it was seen."""
    start = tuple(int(header[k]) for k in ("nxstart", "nystart", "nzstart"))
    if any(start):
        source.start = start
    origin = tuple(float(header.origin[a]) for a in "xyz")
    if any(origin) and all(math.isfinite(v) for v in origin):
        at = ",".join(f"{v:g}" for v in origin)
        source.placement_note = (
            f"{source.name}: its MRC header's origin {at} A is not applied (programs differ "
            "in its sign); the layer starts at voxel "
            f"{','.join(map(str, start))} (nxstart, nystart, nzstart): give --voxel-offset "
            "X,Y,Z to place it elsewhere")


def _open_mrc(path: str) -> ArraySource:
    import mrcfile

    try:  # permissive: older files lack the "MAP " ID; the shape, mode and axes are checked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read {path} as MRC: {err}") from None
    try:
        if mrc.data is None:
            raise InputError(f"cannot read {path} as MRC: its header gives no data mode "
                             f"and shape mrcfile reads (mode {int(mrc.header.mode)})")
        header = mrc.header
        mapping = (int(header.mapc), int(header.mapr), int(header.maps))
        if mapping != (1, 2, 3):
            raise InputError(f"{path}: its columns, rows and sections are axes {mapping}; "
                             "deepem3d reads MRC files stored x,y,z (1,2,3)")
        data = mrc.data
        if int(header.mode) == 0 and _imod_unsigned_bytes(header):
            data = data.view(np.uint8)
        source = ArraySource(path, data, "zyx", kind="mrc", handle=mrc)
        # the cell's size in Angstrom over its sampling, z,y,x; 0 where the file leaves it unset
        cell = [float(header.cella[a]) for a in "zyx"]
        samples = [int(header[m]) for m in ("mz", "my", "mx")]
        angstrom = [c / n if n > 0 else 0.0 for c, n in zip(cell, samples)]
        if angstrom == [1.0, 1.0, 1.0]:  # what IMOD, EMAN2 and others write when unknown
            source.resolution_from = ("its MRC header gives 1 A on every axis, what programs "
                                      "write when the voxel size is unknown")
        else:
            source.record_resolution([a / 10 for a in angstrom], "the MRC header")
        _mrc_placement(source, header)
        return source
    except BaseException:
        mrc.close()
        raise
