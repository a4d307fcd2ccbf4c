"""Chunk geometry and map checks shared by the segmentation stages.

All arrays here are in CloudVolume order, x, y, z (and channel last for affinities). A chunk is
named by its global offset and shape inside a dataset of shape (X, Y, Z); the global voxel index
of (x, y, z) is ``x + X * (y + Y * z)``, the tie-breaker of every decision (DESIGN.md).

Each stage reads its chunk plus a halo, clipped at the dataset's bounds:

- supervoxels, boundary map: 1 voxel on every side (a voxel's 6 neighbours);
- supervoxels, affinity map: 1 low, 2 high (a neighbour's own strongest edge, read at v + e_c);
- region graph: 1 voxel on the low side only (each edge (v - e_c, v) belongs to v's chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "GRAPH_HALO",
    "SUPERVOXEL_HALO",
    "Chunk",
    "MapKind",
    "as_map",
    "chunk_grid",
    "chunks_below",
    "global_index",
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
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"a map must be uint8 or float in [0, 1], not {array.dtype}")
    return np.asfortranarray(array), kind
