"""Chunk geometry and map checks shared by the segmentation stages.

All arrays here are in CloudVolume order, x, y, z (and channel last for affinities). A chunk is
named by its global offset and shape inside a dataset of shape (X, Y, Z); the global voxel index
of (x, y, z) is ``x + X * (y + Y * z)``, the tie-breaker of every decision (docs/design.md).

Each stage reads its chunk plus a halo, clipped at the dataset's bounds:

- supervoxels, boundary map: 1 voxel on every side (a voxel's 6 neighbours);
- supervoxels, affinity map: 1 low, 2 high (a neighbour's own strongest edge, read at v + e_c);
- region graph: 1 voxel on the low side only (each edge (v - e_c, v) belongs to v's chunk).

A halo of 1-2 voxels in a neighbour's map chunks costs decompressing those whole chunks (a
128^3 block of 64^3 chunks: 64 chunks for the 8 it owns). `halo_slabs` and `assemble_halo_box`
let each block publish, once, the few voxels its neighbours need, so that a block's task
decompresses only its own chunks and reads the rest from small slabs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deepem3d.segmentation.maps import quantize

__all__ = [
    "GRAPH_HALO",
    "SUPERVOXEL_HALO",
    "Chunk",
    "MapKind",
    "as_map",
    "assemble_halo_box",
    "chunk_grid",
    "chunks_below",
    "global_index",
    "halo_slabs",
]

MapKind = Literal["boundary", "affinity"]

Shape3 = tuple[int, int, int]

#: (low, high) halo in voxels of the supervoxel stage, by map kind
SUPERVOXEL_HALO: dict[str, tuple[int, int]] = {"boundary": (1, 1), "affinity": (1, 2)}
#: (low, high) halo of the region-graph stage (supervoxel ids and map)
GRAPH_HALO: tuple[int, int] = (1, 0)


def _shape3(value: Sequence[int], name: str) -> Shape3:
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 entries (x, y, z), not {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Chunk:
    """One block of the dataset: global `offset` and `shape` (x, y, z), and the dataset's shape.

    The dataset's shape is part of the chunk because the global voxel index, and which
    neighbours exist at all, depend on it.
    """

    offset: Shape3
    shape: Shape3
    dataset_shape: Shape3

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _shape3(self.offset, "offset"))
        object.__setattr__(self, "shape", _shape3(self.shape, "shape"))
        object.__setattr__(self, "dataset_shape", _shape3(self.dataset_shape, "dataset_shape"))
        for o, s, d in zip(self.offset, self.shape, self.dataset_shape):
            if s < 1 or o < 0 or o + s > d:
                raise ValueError(
                    f"chunk offset {self.offset} shape {self.shape} does not lie inside "
                    f"the dataset of shape {self.dataset_shape}"
                )

    @property
    def stop(self) -> Shape3:
        """One past the chunk's last voxel, global coordinates."""
        return tuple(o + s for o, s in zip(self.offset, self.shape))  # type: ignore[return-value]

    def bounds(self, low: int = 0, high: int = 0) -> tuple[Shape3, Shape3]:
        """(start, stop) of the chunk grown by a halo, clipped to the dataset."""
        start = tuple(max(0, o - low) for o in self.offset)
        stop = tuple(min(d, e + high) for e, d in zip(self.stop, self.dataset_shape))
        return start, stop  # type: ignore[return-value]

    def slices(self, low: int = 0, high: int = 0) -> tuple[slice, slice, slice]:
        """`bounds` as slices, to cut the box from a whole array (the in-memory driver)."""
        start, stop = self.bounds(low, high)
        return tuple(slice(a, b) for a, b in zip(start, stop))  # type: ignore[return-value]


def chunk_grid(dataset_shape: Sequence[int], chunk_shape: Sequence[int]) -> list[Chunk]:
    """The chunks of a regular grid anchored at the origin; the last ones may be smaller."""
    dataset_shape = _shape3(dataset_shape, "dataset_shape")
    chunk_shape = _shape3(chunk_shape, "chunk_shape")
    if min(chunk_shape) < 1 or min(dataset_shape) < 1:
        raise ValueError(
            f"chunk shape {chunk_shape} and dataset shape {dataset_shape} must be >= 1"
        )
    out = []
    for z in range(0, dataset_shape[2], chunk_shape[2]):
        for y in range(0, dataset_shape[1], chunk_shape[1]):
            for x in range(0, dataset_shape[0], chunk_shape[0]):
                offset = (x, y, z)
                shape = tuple(min(c, d - o) for c, d, o in zip(chunk_shape, dataset_shape, offset))
                out.append(Chunk(offset, shape, dataset_shape))  # type: ignore[arg-type]
    return out


def chunks_below(chunks: Sequence[Chunk], chunk_shape: Sequence[int]) -> list[list[int | None]]:
    """Per chunk of a `chunk_grid`, per axis (x, y, z), the index of the chunk under it (None at
    the dataset's low face): the neighbour whose high face closes its low-face pairs."""
    step = _shape3(chunk_shape, "chunk_shape")
    where = {chunk.offset: k for k, chunk in enumerate(chunks)}
    return [[where.get(tuple(o - step[c] if d == c else o for d, o in enumerate(chunk.offset)))
             if chunk.offset[c] > 0 else None for c in range(3)] for chunk in chunks]


def halo_slabs(values: np.ndarray, low: int, high: int) -> dict[str, np.ndarray]:
    """The voxels of one block (x, y, z[, c], the block's own) that other blocks read as halo:
    per axis c, its first `high` voxels ("x_first": the high halo of the block below it) and
    its last `low` ones ("x_last": the low halo of the block above), over the block's whole
    extent on the other axes. Keys x_first, x_last, y_first, ..."""
    out = {}
    for c, name in enumerate("xyz"):
        n = values.shape[c]
        for side, part in (("first", slice(0, min(high, n))), ("last", slice(max(n - low, 0), n))):
            cut = [slice(None)] * values.ndim
            cut[c] = part
            out[f"{name}_{side}"] = np.asfortranarray(values[tuple(cut)])  # slices, not take
    return out


def assemble_halo_box(
    own: np.ndarray,
    block: tuple[Sequence[int], Sequence[int]],
    box: tuple[Sequence[int], Sequence[int]],
    region: tuple[Sequence[int], Sequence[int]],
    task_shape: Sequence[int],
    slab: Callable[[tuple[int, ...], tuple[int, ...], str], np.ndarray],
) -> np.ndarray:
    """The map over `box` (lo, hi: a block with its halo, clipped to the region), from the
    block's own voxels `own` and the slabs of the blocks around it.

    Blocks tile `region` (lo, hi) from its low corner, `task_shape` apart. `slab(lo, hi, key)`
    returns the `halo_slabs` entry `key` of the block at lo..hi. Every voxel of the box
    outside the block lies in another block, on a side of it whose slab holds it: for a block
    beside this one on axis c (not in its column there), within `high` voxels of its low face
    (the box ends `high` past this block's high face) or within `low` of its high face. So
    the box holds exactly the map's values there, whatever the block and chunk sizes.
    """
    (b_lo, b_hi), (x_lo, x_hi), (r_lo, r_hi) = (
        (np.asarray(lo, int), np.asarray(hi, int)) for lo, hi in (block, box, region))
    step = np.asarray(task_shape, int)
    out = np.empty(tuple(x_hi - x_lo) + own.shape[3:], own.dtype, order="F")
    out[tuple(slice(a, b) for a, b in zip(b_lo - x_lo, b_hi - x_lo))] = own
    first = (x_lo - r_lo) // step
    last = (x_hi - 1 - r_lo) // step
    for k in itertools.product(*(range(int(a), int(b) + 1) for a, b in zip(first, last))):
        n_lo = r_lo + np.asarray(k) * step
        n_hi = np.minimum(n_lo + step, r_hi)
        if np.array_equal(n_lo, b_lo):
            continue  # the block itself
        c = int(np.flatnonzero(n_lo != b_lo)[0])  # an axis where it is beside this block
        above = n_lo[c] > b_lo[c]
        piece = slab(tuple(int(v) for v in n_lo), tuple(int(v) for v in n_hi),
                     f"{'xyz'[c]}_{'first' if above else 'last'}")
        p_lo = n_lo.copy()  # the slab's corner: the block's, or its high face less the slab
        if not above:
            p_lo[c] = n_hi[c] - piece.shape[c]
        lo, hi = np.maximum(x_lo, n_lo), np.minimum(x_hi, n_hi)
        out[tuple(slice(a, b) for a, b in zip(lo - x_lo, hi - x_lo))] = piece[
            tuple(slice(a, b) for a, b in zip(lo - p_lo, hi - p_lo))]
    return out


def global_index(coords: np.ndarray, dataset_shape: Sequence[int]) -> np.ndarray:
    """Global voxel index x + X * (y + Y * z) of (..., 3) x, y, z coordinates, uint64."""
    c = np.asarray(coords, dtype=np.uint64)
    big_x, big_y = np.uint64(dataset_shape[0]), np.uint64(dataset_shape[1])
    return c[..., 0] + big_x * (c[..., 1] + big_y * c[..., 2])


def as_map(array: np.ndarray) -> tuple[np.ndarray, MapKind]:
    """A map as uint8, Fortran-ordered (x fastest in memory), and its kind.

    Shapes: (x, y, z) or (x, y, z, 1) is a boundary map; (x, y, z, 3) an affinity map (channel c
    is the affinity between v and v - e_c, c = 0 for x). Floats in [0, 1] are quantised as
    round(255 * p), the layer contract, so that a float and a uint8 layer segment the same.
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        kind: MapKind = "boundary"
    elif array.ndim == 4 and array.shape[3] == 3:
        kind = "affinity"
    else:
        raise ValueError(
            f"a map must be x,y,z (boundary) or x,y,z,3 (affinity), not shape {array.shape}"
        )
    if min(array.shape[:3]) < 1:
        raise ValueError(f"the map is empty: shape {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError("a float map must hold probabilities in [0, 1]")
        array = quantize(array)
    else:
        raise ValueError(f"a map must be uint8 or float in [0, 1], not {array.dtype}")
    return np.asfortranarray(array), kind
