"""N5, read-only: the array view of one dataset that `deepem3d.sources` slices.

zarr 3 dropped N5, which Janelia's tools (BigDataViewer, Paintera, BigStitcher, the COSEM /
OpenOrganelle volumes) still write, so deepem3d reads it itself. The format, as the N5
specification (saalfeldlab/n5) states it:

- a dataset is a folder whose `attributes.json` holds `dimensions` and `blockSize` (fastest
  axis first: x,y,z for a volume), `dataType` and `compression` (`{"type": ...}`; before N5
  2.0 a `compressionType` string);
- block (i, j, k) is the file `i/j/k` below it, absent where the block holds only zeros;
- a block file is a big-endian header (mode uint16, number of dimensions uint16, the block's
  size per dimension uint32; mode 1 adds the element count uint32) and the compressed
  elements, big-endian, fastest axis first. A block at the volume's far edge may be stored
  truncated or whole; either is read. A mode-1 block whose count is not its size's product
  holds something else than voxels (Paintera's label multisets): refused.

`N5Array` presents the dataset in C order (z,y,x: the dimensions reversed) and reads, for a
slice, only the blocks it touches. Where the file records them, `voxel_size` gives the voxel
size and position in nm (the COSEM `transform`, BigDataViewer's `pixelResolution`, or
`resolution` with `units`, nm where it names none as Paintera and funlib write it; `offset`
beside either), the dataset's own first, then its parent group's, times the dataset's
`downsamplingFactors` (a multiscale group records its `s0`'s).
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import zlib
from collections.abc import Sequence

import numpy as np

from deepem3d.errors import InputError
from deepem3d.sources.base import BLOSC_HEADER, ArraySource, check_blosc_size

ATTRIBUTES = "attributes.json"
#: `compression.type` values read here (N5's own codecs but lz4, whose Java block stream
#: nothing here decodes, plus the blosc and zstd plug-ins)
CODECS = ("raw", "gzip", "bzip2", "xz", "blosc", "zstd")
#: nanometres per unit of length, as N5 writers spell the units
UNITS_NM = {"pm": 1e-3, "picometer": 1e-3, "a": 0.1, "å": 0.1, "angstrom": 0.1, "nm": 1.0,
            "nanometer": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micrometer": 1e3,
            "micron": 1e3, "mm": 1e6, "millimeter": 1e6, "m": 1e9, "meter": 1e9}


def attributes(path: str) -> dict:
    """The folder's N5 attributes ({} where it has none or they do not parse)."""
    try:
        with open(os.path.join(path, ATTRIBUTES)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def is_dataset(attrs: dict) -> bool:
    return "dimensions" in attrs and "dataType" in attrs


def datasets(root: str, limit: int = 7) -> list[str]:
    """Paths (relative to `root`) of the N5 datasets below it, in name order, at most
    `limit`; a dataset's block folders are not walked."""
    found: list[str] = []
    for folder, subfolders, _ in os.walk(root):
        subfolders.sort()
        if folder != root and is_dataset(attributes(folder)):
            found.append(os.path.relpath(folder, root))
            subfolders.clear()
            if len(found) >= limit:
                break
    return found


class N5Array:
    """One N5 dataset as a read-only array in C order (shape, dtype, ndim, [slices])."""

    def __init__(self, path: str):
        attrs = attributes(path)
        self.path = path
        try:
            self._dims = [int(d) for d in attrs["dimensions"]]  # fastest first
            self._block = [int(b) for b in attrs["blockSize"]]
            dtype = np.dtype(str(attrs["dataType"])).newbyteorder(">")
            compression = attrs.get("compression") or {"type": attrs.get("compressionType",
                                                                          "raw")}
            self._codec = str(compression["type"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: malformed N5 dataset attributes ({err!r})") from None
        if attrs.get("isLabelMultiset"):
            raise InputError(f"{path} holds Paintera label multisets, not voxels: export it "
                             "as a plain N5, zarr or HDF5 label volume first")
        if dtype.kind not in "uif" or len(self._block) != len(self._dims) or min(
                self._block, default=0) < 1 or min(self._dims, default=0) < 0:
            raise InputError(f"{path}: N5 dataType {attrs['dataType']} with blocks "
                             f"{self._block} is not a volume deepem3d reads")
        if self._codec not in CODECS:
            raise InputError(f"{path}: N5 compression {self._codec!r} is not read here "
                             f"(deepem3d reads {', '.join(CODECS)})")
        self.dtype = dtype
        self.shape = tuple(reversed(self._dims))
        self.ndim = len(self.shape)
        self.chunks = tuple(reversed(self._block))  # as zarr and h5py name their blocks

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        starts, stops = [], []
        for k, size in zip(key, self.shape):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise TypeError("N5Array reads ranges only")
            start, stop, _ = k.indices(size)
            starts.append(start)
            stops.append(max(start, stop))
        out = np.zeros([b - a for a, b in zip(starts, stops)], self.dtype)
        if out.size == 0:
            return out
        block = self._block[::-1]  # C order, as the shape
        ranges = [range(a // b, (e - 1) // b + 1) for a, e, b in zip(starts, stops, block)]
        for index in np.ndindex(*(len(r) for r in ranges)):
            grid = [r[i] for r, i in zip(ranges, index)]
            data = self._read_block(grid)
            if data is None:
                continue  # absent: zeros
            lo = [g * b for g, b in zip(grid, block)]
            src, dst = [], []
            for a, e, low, n in zip(starts, stops, lo, data.shape):
                first, last = max(a, low), min(e, low + n)
                src.append(slice(first - low, last - low))
                dst.append(slice(first - a, last - a))
            out[tuple(dst)] = data[tuple(src)]
        return out

    def _read_block(self, grid: Sequence[int]) -> np.ndarray | None:
        """Block at C-order grid position `grid`, C order, as stored (maybe truncated)."""
        file = os.path.join(self.path, *(str(g) for g in reversed(grid)))
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            mode, ndim = (int(v) for v in np.frombuffer(raw, ">u2", count=2))
            sizes = [int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4)]
            start = 4 + 4 * ndim + (4 if mode == 1 else 0)
            count = int(np.prod(sizes))
            if mode not in (0, 1) or ndim != self.ndim:
                raise ValueError(f"block mode {mode} with {ndim} dimensions")
            if mode == 1 and int(np.frombuffer(raw, ">u4", count=1, offset=start - 4)[0]) \
                    != count:
                raise ValueError("a varlength block: its elements are not its voxels")
            data = np.frombuffer(_decompress(self._codec, raw[start:]), self.dtype, count=count)
        except (ValueError, OSError, RuntimeError, zlib.error, lzma.LZMAError) as err:
            raise InputError(f"cannot read the N5 block {file}: {err}") from None
        return data.reshape(sizes[::-1])


def _decompress(codec: str, payload: bytes) -> bytes:
    if codec == "raw":
        return payload
    if codec == "gzip":  # gzip or zlib framing (`useZlib`): the header says which
        return zlib.decompress(payload, 32 + zlib.MAX_WBITS)
    if codec == "bzip2":
        return bz2.decompress(payload)
    if codec == "xz":
        return lzma.decompress(payload)
    from numcodecs import Blosc, Zstd

    if codec == "blosc":  # c-blosc trusts its header's sizes: a cut stream decodes to garbage
        check_blosc_size(payload[:BLOSC_HEADER], len(payload))
    return bytes((Blosc() if codec == "blosc" else Zstd()).decode(payload))




def voxel_size(path: str) -> tuple[list[float] | None, list[float], str]:
    """(voxel size or None, position of the first voxel) in nm, C order (z,y,x), and where
    they were found (with no size: why what was found is not taken, or ""). Read from the
    dataset at `path`, else from the groups above it, up to the container's root."""
    folder = os.path.normpath(path)
    factors = attributes(folder).get("downsamplingFactors")
    while True:
        attrs = attributes(folder)
        found = _recorded(attrs)
        if found is not None:
            scale, position, where = found
            # a group's size is its s0's, and so is a `pixelResolution` (the N5 viewer's
            # reader multiplies a dataset's own by its own factors, as n5-spark writes them):
            # this level's is that times its factors
            full = folder != os.path.normpath(path) or "pixelResolution" in where
            if scale is not None and full and factors:
                try:
                    scale = [s * float(f) for s, f in zip(scale, list(factors)[::-1])]
                except (TypeError, ValueError):
                    return None, [0.0] * 3, "its N5 `downsamplingFactors` are not numbers"
                where += ", times the dataset's `downsamplingFactors`"
            return scale, position, where
        parent = os.path.dirname(folder)
        if not attrs or "n5" in attrs or parent == folder:
            return None, [0.0] * 3, ""
        folder = parent


def _recorded(attrs: dict) -> tuple[list[float] | None, list[float], str] | None:
    """What one attributes.json records of the voxel size, or None where it says nothing."""
    try:
        transform = attrs.get("transform")
        if isinstance(transform, dict) and "scale" in transform:  # COSEM, in its `axes` order
            axes = [str(a) for a in transform.get("axes", ["z", "y", "x"])]
            units = transform.get("units") or [None] * len(axes)
            order = [axes.index(a) for a in "zyx"]
            scale = [float(transform["scale"][i]) for i in order]
            translate = [float((transform.get("translate") or [0] * len(axes))[i])
                         for i in order]
            return _in_nm(scale, translate, [units[i] for i in order], "its N5 `transform`")
        pixel = attrs.get("pixelResolution")  # BigDataViewer: x,y,z and one unit
        if isinstance(pixel, dict) and "dimensions" in pixel:
            scale = [float(v) for v in pixel["dimensions"]][::-1]
            return _in_nm(scale, _offset(attrs), [pixel.get("unit")] * 3,
                          "its N5 `pixelResolution`")
        if "resolution" in attrs:  # Paintera, funlib: x,y,z, in nm unless `units` says
            scale = [float(v) for v in attrs["resolution"]][::-1]
            units = attrs.get("units")
            if units is None:
                return _in_nm(scale, _offset(attrs), ["nm"] * 3,
                              "its N5 `resolution` (no `units`: nm)")
            units = list(units)[::-1] if isinstance(units, list) else [units] * 3
            return _in_nm(scale, _offset(attrs), units, "its N5 `resolution`")
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None


def _offset(attrs: dict) -> list[float]:
    offset = attrs.get("offset")
    return [float(v) for v in offset][::-1] if isinstance(offset, list) else [0.0] * 3


def _in_nm(scale: list[float], position: list[float], units: list, where: str):
    per_nm = [UNITS_NM.get(str(u).strip().lower()) if u is not None else None for u in units]
    if len(scale) != 3 or len(position) != 3 or not all(per_nm):
        return None, [0.0] * 3, f"{where} names no unit of length"
    return ([s * u for s, u in zip(scale, per_nm)],
            [p * u for p, u in zip(position, per_nm)], f"{where} (the N5 attributes)")


#: datasets of an N5 group looked at to find its one multiscale (more: name the dataset)
N5_LISTED = 32


def open_n5(path: str) -> ArraySource:
    """An N5 dataset, or the one a container or group holds: its only dataset, or the
    full-resolution `s0` of its only multiscale group."""
    if not is_dataset(attributes(path)):
        found = datasets(path, limit=N5_LISTED + 1)
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
    source = ArraySource(path, N5Array(path), "zyx", kind="n5")
    scale, position, where = voxel_size(path)
    if scale is None:
        source.resolution_from = where
    else:  # in C order, the array's own
        source.record_resolution(scale, where)
        source.record_position(position, where)
    return source
