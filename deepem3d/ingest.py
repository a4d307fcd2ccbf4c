"""Ingest a 3D volume from a file into a precomputed layer, slab by slab along z.

Sources (`open_source`), each read a slab of z at a time, never whole:

- a multi-page TIFF file, one page per z (`stack.tif`);
- a directory of single-page TIFF files, one per z, in natural name order (`slices/`);
- an HDF5 dataset (`volume.h5:/path/to/dataset`);
- a NumPy file (`volume.npy`, memory-mapped).

Files on disk are z,y,x; HDF5 and .npy may say `axes="xyz"` when already x,y,z. Every source
hands out x,y,z slabs (CloudVolume order); the one transposition is `deepem3d.axes`.
Sources are opened read-only and never modified. `ingest` writes slabs whose z extent is a
multiple of the layer's chunk z, so every write covers whole chunks of the chunk grid.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
from cloudvolume import CloudVolume
from tqdm import tqdm

from deepem3d.axes import LARGEST_COORDINATE, xyz_from_zyx
from deepem3d.errors import InputError
from deepem3d.storage import layers
from deepem3d.storage.paths import enclosing_layer

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
NPY_SUFFIXES = (".npy",)
AXES = ("zyx", "xyz")
SUPPORTED = (
    "a multi-page .tif/.tiff file, a directory of .tif/.tiff files, "
    "FILE.h5:/DATASET, or a .npy file"
)

DEFAULT_CHUNK_SIZE = {"image": (128, 128, 16), "segmentation": (128, 128, 16)}
#: Which layer types and dtypes each encoding can hold (Neuroglancer reads all four).
ENCODINGS = {
    "raw": {
        "image": layers.IMAGE_DTYPES,
        "segmentation": layers.SEGMENTATION_DTYPES,
    },
    "jpeg": {"image": ("uint8",)},
    "png": {"image": ("uint8", "uint16")},
    "compressed_segmentation": {"segmentation": layers.SEGMENTATION_DTYPES},
}
#: Bytes of output one slab may hold (at least one chunk row of z is always written).
SLAB_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# sources


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

    def __init__(self, name: str, stored_shape: Sequence[int], dtype: np.dtype, axes: str):
        self.name = name  # the source as the user named it (absolute path), for messages
        self.stored_shape = tuple(int(s) for s in stored_shape)  # in the file's own order
        self.axes = axes
        _check_3d(self.stored_shape, name)
        self.shape = (
            tuple(reversed(self.stored_shape)) if axes == "zyx" else self.stored_shape
        )  # x,y,z
        self.dtype = np.dtype(dtype).newbyteorder("=")  # native byte order

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
        }

    def __enter__(self) -> VolumeSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(VolumeSource):
    """Any array that slices lazily: an h5py dataset or a memory-mapped .npy."""

    def __init__(self, name: str, data, axes: str, kind: str, handle=None):
        self._data = data
        self._handle = handle
        self.kind = kind
        try:
            super().__init__(name, data.shape, data.dtype, axes)
        except BaseException:
            self.close()
            raise

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self.axes == "xyz":
            return np.asarray(self._data[:, :, z0:z1])
        return xyz_from_zyx(np.asarray(self._data[z0:z1]))

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
            shapes = ", ".join("x".join(map(str, s.shape)) for s in series[:4])
            raise InputError(
                f"{path} holds {len(series)} image series of different shapes ({shapes}"
                f"{', ...' if len(series) > 4 else ''}): deepem3d reads a stack of equal-size "
                "2D grayscale pages"
            )
        s = series[0]
        axes, shape = s.axes, tuple(s.shape)
        if len(shape) == 2:
            raise InputError(
                f"{path} holds a single 2D image ({shape[1]}x{shape[0]}): deepem3d takes a 3D "
                "stack, a multi-page TIFF or a directory of TIFF files"
            )
        if any(ax in "CS" and n > 1 for ax, n in zip(axes, shape)):
            raise InputError(
                f"{path} has channels or samples per pixel (axes {axes}, shape {shape}): "
                "deepem3d reads one grayscale channel; save one channel as its own stack first"
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


def open_source(src: str, axes: str = "zyx") -> VolumeSource:
    """Open `src` read-only as a 3D volume: TIFF file or directory, FILE.h5:/DATASET (or
    FILE.h5 when it holds one dataset), .npy.

    `axes` is the order of the array in the file: "zyx" (the default) or "xyz" (HDF5 and
    .npy only; TIFF pages are always z). Use it as a context manager to close the file.
    """
    if axes not in AXES:
        raise InputError(f"axes must be zyx or xyz, not {axes!r}")
    hdf5 = split_hdf5(src)
    if hdf5 is not None:
        return _open_hdf5(*hdf5, axes=axes)
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise InputError(f"no such file or directory: {src}")
    lower = path.lower()
    if os.path.isdir(path):
        _tiff_axes(axes, src)
        return TiffDirectorySource(path)
    if lower.endswith(TIFF_SUFFIXES):
        _tiff_axes(axes, src)
        return TiffStackSource(path)
    if lower.endswith(NPY_SUFFIXES):
        return _open_npy(path, axes)
    raise InputError(f"cannot tell what {src} is from its name: deepem3d reads {SUPPORTED}")


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
        return ArraySource(f"{path}:{dataset}", obj, axes, kind="hdf5", handle=h5)
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


def _tiff_axes(axes: str, src: str) -> None:
    if axes != "zyx":
        raise InputError(
            f"{src}: TIFF pages are z, so a TIFF stack is always z,y,x: drop --axes {axes}"
        )


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


# ---------------------------------------------------------------------------------------------
# ingest


def default_chunk_size(layer_type: str, size: Sequence[int]) -> tuple[int, int, int]:
    """DEFAULT_CHUNK_SIZE for the layer type, clamped to the volume's size (x,y,z)."""
    return tuple(min(int(c), int(s)) for c, s in zip(DEFAULT_CHUNK_SIZE[layer_type], size))


def slab_ranges(depth: int, chunk_z: int, chunks_per_slab: int = 1) -> list[tuple[int, int]]:
    """[z0, z1) slabs of `chunks_per_slab` chunk rows; the last one ends at `depth`."""
    step = chunk_z * max(1, int(chunks_per_slab))
    return [(z0, min(z0 + step, depth)) for z0 in range(0, depth, step)]


def output_dtype(source_dtype: np.dtype, layer_type: str, dtype: str | None = None) -> np.dtype:
    """The dtype the layer stores, or an InputError saying what is refused and why."""
    src = np.dtype(source_dtype).newbyteorder("=")
    if layer_type == "image":
        if src.name not in layers.IMAGE_DTYPES:
            hint = (
                " (if it holds labels, use --layer-type segmentation)"
                if src.kind in "iub"
                else ""
            )
            raise InputError(
                f"an image layer holds {', '.join(layers.IMAGE_DTYPES)}; the source is "
                f"{src.name}: convert it first{hint}"
            )
        if dtype is not None and np.dtype(dtype) != src:
            raise InputError(
                f"an image is stored in its own dtype ({src.name}), not {dtype}: convert "
                "the source first"
            )
        return src
    if layer_type == "segmentation":
        if src.kind not in "iub":
            raise InputError(
                f"a segmentation holds integer labels; the source is {src.name}: "
                "ingest it as --layer-type image, or convert it to integers first"
            )
        out = np.dtype(dtype or "uint64")
        if out.name not in layers.SEGMENTATION_DTYPES:
            raise InputError(
                f"a segmentation layer is stored as {' or '.join(layers.SEGMENTATION_DTYPES)}, "
                f"not {out.name}"
            )
        return out
    raise InputError(f"layer type must be image or segmentation, not {layer_type!r}")


def check_encoding(encoding: str, layer_type: str, dtype: np.dtype) -> None:
    """Refuse an encoding the layer type or dtype cannot use."""
    if encoding not in ENCODINGS:
        raise InputError(
            f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}"
        )
    allowed = ENCODINGS[encoding].get(layer_type, ())
    if dtype.name not in allowed:
        fits = [e for e, kinds in ENCODINGS.items() if dtype.name in kinds.get(layer_type, ())]
        raise InputError(
            f"{encoding} encoding cannot hold a {dtype.name} {layer_type}: use "
            f"{' or '.join(fits)}"
        )


def ingest(
    src: str,
    dest: str,
    *,
    resolution: Sequence[float],
    layer_type: str = "image",
    chunk_size: Sequence[int] | None = None,
    encoding: str | None = None,
    axes: str = "zyx",
    voxel_offset: Sequence[int] = (0, 0, 0),
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    slab_bytes: int = SLAB_BYTES,
    to_uint8: bool = False,
) -> CloudVolume:
    """Write the 3D volume `src` to a new precomputed layer at `dest` and return it.

    src: a multi-page TIFF, a directory of TIFFs, FILE.h5:/DATASET or a .npy file, z,y,x
    unless `axes="xyz"` (HDF5/.npy). resolution, chunk_size, voxel_offset: x,y,z.
    Images keep the source dtype (uint8, uint16, uint32 or float32); segmentations take any
    non-negative integers (or bool) and are stored as `dtype` (uint64 by default, or
    uint32). The source is read slab by slab, each slab a whole number of chunk rows of
    z (at most about `slab_bytes`), so every write is aligned to the chunk grid.
    Refuses a destination that already holds data unless `overwrite`. `to_uint8` stores an
    image of any number type as uint8 (what the network reads): `uint8_window`'s intensity
    window mapped linearly onto 0..255, clipped, rounded.
    """
    if layer_type not in layers.DEFAULT_ENCODING:
        raise InputError(f"layer type must be image or segmentation, not {layer_type!r}")
    resolution = _triple(resolution, "resolution", float, positive=True)
    voxel_offset = _triple(voxel_offset, "voxel offset", int, positive=False)
    if chunk_size is not None:
        chunk_size = _triple(chunk_size, "chunk size", int, positive=True)
    dest = layers.cloudpath(dest)
    above = enclosing_layer(dest, itself=False)
    if above is not None:
        raise InputError(f"{dest} lies inside the layer {above}: give the new layer a folder "
                         "of its own")

    with open_source(src, axes=axes) as source:
        if to_uint8:
            if layer_type != "image" or dtype is not None:
                raise InputError("--to-uint8 rescales an image: not with --layer-type "
                                 "segmentation or --dtype")
            if source.dtype.kind not in "iuf":
                raise InputError(f"--to-uint8 rescales numbers; the source is "
                                 f"{source.dtype.name}")
            out = np.dtype(np.uint8)
        else:
            out = output_dtype(source.dtype, layer_type, dtype)
        encoding = encoding or layers.DEFAULT_ENCODING[layer_type]
        check_encoding(encoding, layer_type, out)
        chunk = chunk_size or default_chunk_size(layer_type, source.shape)
        plane = source.shape[0] * source.shape[1] * max(out.itemsize, source.dtype.itemsize)
        slabs = slab_ranges(source.shape[2], chunk[2], slab_bytes // (plane * chunk[2]))

        ends = [o + s for o, s in zip(voxel_offset, source.shape)]
        if any(abs(v) > LARGEST_COORDINATE for v in (*voxel_offset, *ends, *chunk)):
            raise InputError(f"voxel offset {','.join(map(str, voxel_offset))} and size "
                             f"{','.join(map(str, source.shape))}: a layer's coordinates are "
                             f"at most {LARGEST_COORDINATE:,}")
        layers.check_empty(dest, overwrite)  # before the scans below, which can be long
        if layer_type == "segmentation" and _needs_label_check(source.dtype, out):
            _check_labels(source, out, slabs, progress)
        window = uint8_window(source, slabs, progress) if to_uint8 else None
        fresh = not layers.info_exists(dest)
        vol = layers.create_layer(
            dest,
            layer_type=layer_type,
            dtype=out.name,
            resolution=resolution,
            size=source.shape,
            voxel_offset=voxel_offset,
            chunk_size=chunk,
            encoding=encoding,
            overwrite=overwrite,
            provenance={
                "task": "ingest",
                **source.describe(),
                "layer_type": layer_type,
                "stored_dtype": out.name,
                "encoding": encoding,
                "resolution": list(resolution),
                "voxel_offset": list(voxel_offset),
                "chunk_size": list(chunk),
                **({"uint8_window": list(window)} if window else {}),
            },
        )
        try:
            _write_slabs(source, vol, out, voxel_offset, slabs, progress, window)
        except BaseException:
            if fresh:  # a layer this call made is removed whole, not left part-written
                layers.remove_layer(dest)
            raise
    return vol


def _write_slabs(source: VolumeSource, vol, out: np.dtype, voxel_offset, slabs,
                 progress: bool, window: tuple[float, float] | None = None) -> None:
    ox, oy, oz = voxel_offset
    sx, sy, sz = source.shape
    with tqdm(
        total=sz,
        unit="z",
        desc=f"ingest {os.path.basename(source.name)}",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for z0, z1 in slabs:
            slab = source.read(z0, z1)
            slab = to_uint8(slab, window) if window else slab.astype(out, copy=False)
            vol[ox : ox + sx, oy : oy + sy, oz + z0 : oz + z1] = slab
            bar.update(z1 - z0)


#: --to-uint8's window: these percentiles of the source's values (0.1% of voxels saturate at
#: each end, as EM viewers' auto-contrast does), from at most WINDOW_SAMPLE of them
WINDOW_PERCENTILES = (0.1, 99.9)
WINDOW_SAMPLE = 2**24


def uint8_window(source: VolumeSource, slabs: Sequence[tuple[int, int]], progress: bool
                 ) -> tuple[float, float]:
    """(low, high): WINDOW_PERCENTILES of the values on a grid of every section and every
    `step`-th row and column (one streaming pass; the same sample whatever the slabs and
    chunks), low < high."""
    total = math.prod(source.shape)
    step = max(1, math.ceil(math.sqrt(total / WINDOW_SAMPLE)))
    sample = []
    with tqdm(total=source.shape[2], unit="z", desc="intensity window", file=sys.stderr,
              disable=not progress) as bar:
        for z0, z1 in slabs:
            grid = source.read(z0, z1)[::step, ::step, :]  # x, y, z
            sample.append(np.asarray(grid, dtype=np.float64).reshape(-1))
            bar.update(z1 - z0)
    values = np.concatenate(sample)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("--to-uint8: the source holds no finite values")
    low, high = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
    if high <= low:  # (nearly) constant: keep what varies
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1
    return low, high


def to_uint8(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Values mapped linearly from `window` onto 0..255, clipped, rounded half to even."""
    low, high = window
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255)).astype(np.uint8)


def _needs_label_check(src: np.dtype, out: np.dtype) -> bool:
    """Signed sources may hold negatives; wider sources may not fit `out`."""
    if src.kind == "b":
        return False
    return src.kind == "i" or np.iinfo(src).max > np.iinfo(out).max


def _check_labels(source: VolumeSource, out: np.dtype, slabs, progress: bool) -> None:
    """One streaming pass: every label must be >= 0 and fit `out`."""
    top = np.iinfo(out).max
    with tqdm(
        total=source.shape[2], unit="z", desc="checking labels", file=sys.stderr,
        disable=not progress,
    ) as bar:
        for z0, z1 in slabs:
            slab = source.read(z0, z1)
            low, high = slab.min(), slab.max()
            if low < 0:
                raise InputError(
                    f"{source.name} holds negative labels (min {low} in z {z0}..{z1 - 1}): "
                    "a segmentation needs labels >= 0 (0 is background)"
                )
            if int(high) > top:
                raise InputError(
                    f"{source.name} holds labels up to {high} (z {z0}..{z1 - 1}), more than "
                    f"{out.name} holds: store it as uint64"
                )
            bar.update(z1 - z0)


def _triple(values: Sequence, name: str, kind: type, positive: bool) -> tuple:
    try:
        values = tuple(values)
        ok = len(values) == 3 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v) and (kind is float or float(v).is_integer())
            for v in values
        )
    except TypeError:
        ok = False
    if not ok:
        raise InputError(f"{name} must be three {kind.__name__}s x,y,z, not {values!r}")
    values = tuple(kind(v) for v in values)
    if positive and any(v <= 0 for v in values):
        raise InputError(f"{name} {values} must be positive on every axis")
    return values
