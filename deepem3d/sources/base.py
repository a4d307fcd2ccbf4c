"""What every reader of `deepem3d.sources` shares: the file kinds by suffix, the `VolumeSource`
interface (x,y,z slabs; the voxel size and position a file records), `ArraySource` for any
array that slices lazily, and the checks the readers make alike."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from numpy.typing import DTypeLike

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


def canonical_dtype(dtype: DTypeLike) -> np.dtype:
    """numpy's own dtype of that name, in native byte order: tifffile's uint64 is type code
    'Q' where numpy's is 'L' (int64 'q', and uint32 'I' vs 'L' on other platforms); they
    compare equal, and astype keeps them, but CloudVolume's np.issubdtype refuses the other
    one ("Volume: uint64 Image: uint64"). Numbers only: a string or record dtype's name is no
    dtype."""
    found = np.dtype(dtype)
    return np.dtype(found.name) if found.kind in "biufc" else found.newbyteorder("=")


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
        check_3d(self.stored_shape, name)
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
        values = positive_triple(stored)
        if values is not None:
            self.resolution = self._xyz(float(f"{v:.{RESOLUTION_DIGITS}g}") for v in values)
            self.resolution_from = where

    def record_position(self, stored: Sequence[float] | None, where: str) -> None:
        """Keep the position (nm) of the first voxel the file records in its own axis order,
        if it is one (not rounded: a position is a multiple of the voxel size, which can be
        past RESOLUTION_DIGITS digits)."""
        values = finite_triple(stored)
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
        if not whole(self.position, resolution):
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


def check_3d(shape: Sequence[int], name: str) -> None:
    if len(shape) != 3:
        hint = ""
        if len(shape) == 4:
            hint = ": take one channel first (deepem3d reads one-channel 3D volumes)"
        raise InputError(f"{name} is {len(shape)}D (shape {tuple(shape)}), not 3D{hint}")
    if 0 in shape:
        raise InputError(f"{name} is empty (shape {tuple(shape)})")


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def finite_triple(values) -> tuple[float, float, float] | None:
    """Three finite numbers as floats, or None (absent, unset or malformed)."""
    try:
        floats = tuple(float(v) + 0.0 for v in np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        return None
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        return None
    return floats


def positive_triple(values) -> tuple[float, float, float] | None:
    """Three positive finite numbers as floats, or None (absent, unset or malformed)."""
    floats = finite_triple(values)
    return floats if floats is not None and all(v > 0 for v in floats) else None


def whole(position: Sequence[float], scale: Sequence[float]) -> bool:
    """Whether a position in nm is a whole number of voxels (as `recorded_offset` takes it)."""
    return all(abs(p / s - round(p / s)) <= POSITION_TOLERANCE for p, s in zip(position, scale))


#: a blosc stream's header: version, format version, flags, type size (a byte each), then the
#: decompressed size, the block size and the compressed size (uint32, little-endian)
BLOSC_HEADER = 16


def check_blosc_size(header: bytes, length: int) -> None:
    """A ValueError where a blosc stream of `length` bytes, which begins with `header`, is
    shorter than that header says (a file cut short by an interrupted copy): c-blosc reads
    past its end, and may decode it to wrong values rather than refuse it (zarr's lz4 blosc
    cut by a few bytes did)."""
    if length < BLOSC_HEADER or len(header) < BLOSC_HEADER:
        raise ValueError(f"a blosc stream of {length} bytes, shorter than its header")
    stored = int(np.frombuffer(header, "<u4", count=1, offset=12)[0])
    if stored > length:
        raise ValueError(f"its blosc stream is cut short ({length} of its {stored} bytes)")
