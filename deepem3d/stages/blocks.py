"""Task blocks: the checks and the grid that every chunk-aligned stage shares.

A stage's tasks each write whole chunks of its output layer, so the task shape is a multiple
of the chunk size and the region is grown to the chunk grid (anchored at the voxel offset).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError


def check_task_shape(task_shape: Sequence[int], chunk: Sequence[int]) -> tuple[int, int, int]:
    """The task shape as ints, or an InputError if it would split a chunk."""
    task_shape = tuple(int(t) for t in task_shape)
    if any(t % c for t, c in zip(task_shape, chunk)):
        raise InputError(
            f"--task-shape {','.join(map(str, task_shape))} is not a multiple of the output "
            f"chunk size {','.join(map(str, chunk))}: each task must write whole chunks"
        )
    return task_shape


def check_bounds(bounds: Bbox | None, offset: Sequence[int], size: Sequence[int], path: str,
                 mip: int) -> Bbox:
    """The bounds (default: the whole volume), or an InputError if they reach outside it."""
    volume = Bbox(offset, np.asarray(offset) + np.asarray(size))
    if bounds is None:
        return volume
    if not (np.all(np.asarray(bounds.minpt) >= volume.minpt)
            and np.all(np.asarray(bounds.maxpt) <= volume.maxpt)):
        raise InputError(
            f"--bounds {bounds.minpt.tolist()}..{bounds.maxpt.tolist()} reach outside "
            f"{path} at mip {mip}, which spans {volume.minpt.tolist()}.."
            f"{volume.maxpt.tolist()} (x,y,z, end exclusive)"
        )
    return bounds


def align_to_chunks(bounds: Bbox, offset: Sequence[int], size: Sequence[int],
                    chunk: Sequence[int]) -> Bbox:
    """Bounds grown to the chunk grid (anchored at the voxel offset), clipped to the volume."""
    offset, size, chunk = (np.asarray(v, dtype=int) for v in (offset, size, chunk))
    lo = offset + (np.asarray(bounds.minpt) - offset) // chunk * chunk
    hi = offset + -(-(np.asarray(bounds.maxpt) - offset) // chunk) * chunk
    return Bbox(lo, np.minimum(hi, offset + size))


class BlockGrid(Sequence):
    """The task blocks covering a region, x fastest, as a sequence computed on demand: a
    petavoxel plan has 10^7-10^8 blocks, which it counts and streams but never holds."""

    def __init__(self, lo, hi, start, shape) -> None:
        self.lo, self.hi = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
        self.start, self.shape = np.asarray(start, dtype=int), np.asarray(shape, dtype=int)
        # no block on an axis the region is empty on (an anchored grid starts below it)
        self.counts = [max(0, -(-int(b - a) // int(t))) if h > lo else 0
                       for a, b, t, lo, h in zip(self.start, self.hi, self.shape, self.lo,
                                                 self.hi)]

    def __len__(self) -> int:
        return self.counts[0] * self.counts[1] * self.counts[2]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"block {index} of {n}")
        index %= n
        x, rest = index % self.counts[0], index // self.counts[0]
        y, z = rest % self.counts[1], rest // self.counts[1]
        corner = self.start + np.array([x, y, z]) * self.shape
        return Bbox(np.maximum(corner, self.lo), np.minimum(corner + self.shape, self.hi))

    def __iter__(self) -> Iterator[Bbox]:
        return (self[i] for i in range(len(self)))


def block_grid(bounds: Bbox, task_shape: Sequence[int], anchor: Sequence[int] | None = None
               ) -> BlockGrid:
    """The task blocks covering `bounds`, x fastest. Without `anchor` the grid starts at the
    bounds and the last blocks are clipped to them; with one (a point, such as the layer's
    offset) the grid's cells are `task_shape` boxes from it, each clipped to the bounds, so a
    block never straddles two cells of that grid."""
    lo, hi = np.asarray(bounds.minpt, dtype=int), np.asarray(bounds.maxpt, dtype=int)
    shape = np.asarray(task_shape, dtype=int)
    start = lo if anchor is None else np.asarray(anchor, dtype=int) + (
        (lo - np.asarray(anchor, dtype=int)) // shape) * shape
    return BlockGrid(lo, hi, start, shape)


def block_id(bounds: Bbox) -> str:
    """A block's id and file name, as CloudVolume names chunks (x0-x1_y0-y1_z0-z1)."""
    return "_".join(f"{int(a)}-{int(b)}" for a, b in zip(bounds.minpt, bounds.maxpt))


#: one axis of a block id: "x0-x1", either end possibly negative ("-16-0", "-32--16")
ID_RANGE = re.compile(r"(-?\d+)-(-?\d+)")


def parse_block_id(task_id: str) -> Bbox:
    """The inverse of `block_id`."""
    ranges = []
    for part in task_id.split("_"):
        found = ID_RANGE.fullmatch(part)
        if found is None:
            raise ValueError(f"{task_id!r} is not a block id (x0-x1_y0-y1_z0-z1)")
        ranges.append((int(found[1]), int(found[2])))
    return Bbox([r[0] for r in ranges], [r[1] for r in ranges])


def bounds_list(bounds: Bbox) -> list[int]:
    """x0, y0, z0, x1, y1, z1 as plain ints (how tasks carry a block)."""
    return [int(v) for v in (*bounds.minpt, *bounds.maxpt)]


def node_name(node: Sequence[int]) -> str:
    """An octree node's id and file name: its grid coordinates at its level, x_y_z."""
    return "_".join(str(int(v)) for v in node)


def block_at(node: Sequence[int], region: list[int], task_shape: Sequence[int]) -> str:
    """The id of the block at grid coordinates `node` of the region's block grid (the region
    x0,y0,z0,x1,y1,z1; the last blocks clipped to it)."""
    lo = [r + int(n) * int(t) for r, n, t in zip(region[:3], node, task_shape)]
    hi = [min(a + int(t), r) for a, t, r in zip(lo, task_shape, region[3:])]
    return block_id(Bbox(lo, hi))
