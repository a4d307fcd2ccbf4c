"""Ingest a 3D volume from a file into a precomputed layer, slab by slab along z.

The files it reads are `deepem3d.sources`'s. `ingest` writes slabs whose z extent is a
multiple of the layer's chunk z, so every write covers whole chunks of the chunk grid. The
voxel size is the caller's, else the one the file records, else an error.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import numpy as np
from cloudvolume import CloudVolume
from tqdm import tqdm

from deepem3d.axes import LARGEST_COORDINATE
from deepem3d.errors import InputError, warn
from deepem3d.sources import VolumeSource, canonical_dtype, open_source, source_root
from deepem3d.storage import layers
from deepem3d.storage.paths import enclosing_layer

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


#: The smallest in-plane chunk the default halves down to (`default_chunk_size`).
SMALLEST_DEFAULT_CHUNK = 32


def default_chunk_size(layer_type: str, size: Sequence[int]) -> tuple[int, int, int]:
    """DEFAULT_CHUNK_SIZE for the layer type, its x and y halved (down to
    SMALLEST_DEFAULT_CHUNK) until the volume spans two chunks, then clamped to the volume's
    size (x,y,z). A mip level keeps the chunk size, so an axis shorter than two chunks gets no
    2x2 level (the `downsample image` stage of a run, Neuroglancer's zoomed-out view)."""
    chunk = [int(c) for c in DEFAULT_CHUNK_SIZE[layer_type]]
    for axis in (0, 1):
        while chunk[axis] > SMALLEST_DEFAULT_CHUNK and int(size[axis]) < 2 * chunk[axis]:
            chunk[axis] //= 2
    return tuple(min(c, int(s)) for c, s in zip(chunk, size))


def slab_ranges(depth: int, chunk_z: int, chunks_per_slab: int = 1) -> list[tuple[int, int]]:
    """[z0, z1) slabs of `chunks_per_slab` chunk rows; the last one ends at `depth`."""
    step = chunk_z * max(1, int(chunks_per_slab))
    return [(z0, min(z0 + step, depth)) for z0 in range(0, depth, step)]


def output_dtype(source_dtype: np.dtype, layer_type: str, dtype: str | None = None) -> np.dtype:
    """The dtype the layer stores, or an InputError saying what is refused and why."""
    src = canonical_dtype(source_dtype)
    if layer_type == "image":
        if src.name not in layers.IMAGE_DTYPES:
            hint = (
                " (if it holds labels, use --layer-type segmentation)"
                if src.kind in "iub"
                else ""
            )
            raise InputError(
                f"an image layer holds {', '.join(layers.IMAGE_DTYPES)}; the source is "
                f"{src.name}: convert it first"
                f"{' or store it as uint8 with --to-uint8' if src.kind in 'iuf' else ''}{hint}"
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
    resolution: Sequence[float] | None = None,
    layer_type: str = "image",
    chunk_size: Sequence[int] | None = None,
    encoding: str | None = None,
    axes: str | None = None,
    voxel_offset: Sequence[int] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    slab_bytes: int = SLAB_BYTES,
    to_uint8: bool = False,
) -> CloudVolume:
    """Write the 3D volume `src` to a new precomputed layer at `dest` and return it.

    src: any file `deepem3d.sources.open_source` reads, z,y,x unless `axes="xyz"` (HDF5, .npy,
    zarr) or an OME-Zarr says otherwise. resolution, chunk_size, voxel_offset: x,y,z;
    resolution None takes the voxel size the file records (`recorded_resolution`), voxel_offset
    None the position it records (`recorded_offset`: an OME-Zarr's translation, a CREMI HDF5's
    `offset`, N5's), else 0,0,0.
    Images keep the source dtype (uint8, uint16, uint32 or float32); segmentations take any
    non-negative integers (or bool) and are stored as `dtype` (uint64 by default, or
    uint32). The source is read slab by slab, each slab a whole number of chunk rows of
    z (at most about `slab_bytes`), so every write is aligned to the chunk grid, and, where
    that fits, of the sections the file stores together (`z_step`: zarr chunks, N5 blocks,
    HDF5 chunks), so each stored block is decompressed once.
    Refuses a destination that already holds data unless `overwrite`. `to_uint8` stores an
    image of any number type as uint8 (what the network reads): `uint8_window`'s intensity
    window mapped linearly onto 0..255, clipped, rounded.
    """
    if layer_type not in layers.DEFAULT_ENCODING:
        raise InputError(f"layer type must be image or segmentation, not {layer_type!r}")
    if resolution is not None:
        resolution = _triple(resolution, "resolution", float, positive=True)
    if voxel_offset is not None:
        voxel_offset = _triple(voxel_offset, "voxel offset", int, positive=False)
    if chunk_size is not None:
        chunk_size = _triple(chunk_size, "chunk size", int, positive=True)
    dest = layers.cloudpath(dest)
    above = enclosing_layer(dest, itself=False)
    if above is not None:
        raise InputError(f"{dest} lies inside the layer {above}: give the new layer a folder "
                         "of its own")
    if layers.same_place(dest, f"file://{source_root(src)}"):  # it would modify (or delete) SRC
        raise InputError(f"{dest} is, holds or lies inside the source {src}: give the new "
                         "layer a folder of its own")

    with open_source(src, axes=axes) as source:
        if resolution is None:
            resolution = source.recorded_resolution()
        if voxel_offset is None:
            voxel_offset = source.recorded_offset(resolution)
            if source.placement_note:
                warn(source.placement_note)
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
        rows = slab_bytes // (plane * chunk[2])  # chunk rows a slab holds
        whole = math.lcm(chunk[2], source.z_step) // chunk[2]  # rows that end on both grids
        slabs = slab_ranges(source.shape[2], chunk[2], rows // whole * whole or rows)

        ends = [o + s for o, s in zip(voxel_offset, source.shape)]
        if any(abs(v) > LARGEST_COORDINATE for v in (*voxel_offset, *ends, *chunk)):
            raise InputError(f"voxel offset {','.join(map(str, voxel_offset))} and size "
                             f"{','.join(map(str, source.shape))}: a layer's coordinates are "
                             f"at most {LARGEST_COORDINATE:,}")
        layers.check_empty(dest, overwrite)  # before the scans below, which can be long
        if layer_type == "segmentation" and _needs_label_check(source.dtype, out):
            _check_labels(source, out, slabs, progress)
        window = uint8_window(source, slabs, progress) if to_uint8 else None
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
        except BaseException:  # the layer is this call's (--overwrite has emptied the old
            layers.remove_layer(dest)  # one): removed whole, not left part-written
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
    if high <= low:  # one value everywhere: it has no contrast to keep
        warn(f"--to-uint8: the source holds one value, {low:g}, everywhere: it is written as 0")
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
