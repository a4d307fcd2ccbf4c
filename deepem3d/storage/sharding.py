"""Sharded precomputed scales whose shards are the blocks of a task grid.

A sharded scale keeps many chunks in one file, so a teravoxel layer is thousands of files, not
millions. Neuroglancer's sharding (`neuroglancer_uint64_sharded_v1`) orders a scale's chunks by
their compressed Morton code (the bits of the chunk's grid x, y and z interleaved, round by
round, an axis dropping out once its grid coordinate has no bits left) and, with the identity
hash, puts the chunks that share the code's bits above `preshift_bits + minishard_bits` in one
shard. With that sum equal to the bits of the first k rounds, a shard is the box of 2^k chunks
per axis anchored at the layer's voxel offset (the whole axis where the grid is shorter).

So a grid of blocks of 2^k chunks per axis (or the whole axis) anchored on the shards is a
grid of shards: the task that writes a block writes exactly one shard, in one put, complete or
absent, and no two tasks write the same file. `block_sharding` works out that spec or says, in
one line, why the blocks cannot be shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from deepem3d.errors import InputError

#: at most this many chunks per minishard index (igneous's recommendation is up to ~4,000
#: labels per minishard; each row is 24 bytes, so an index stays under 100 KB)
MAX_CHUNKS_PER_MINISHARD = 4096
#: the default chunk of a sharded layer holds at least this many voxels (64^3, or 128 x 128
#: x 16: what Neuroglancer fetches at a time stays about the size of an unsharded layer's)
MIN_CHUNK_VOXELS = 2**18


def grid_bits(size: Sequence[int], chunk: Sequence[int]) -> list[int]:
    """Per axis, the bits of a chunk's grid coordinate in the compressed Morton code."""
    return [max(0, math.ceil(math.log2(-(-int(s) // int(c))))) for s, c in zip(size, chunk)]


def _rounds(size, chunk, task_shape) -> int:
    """k such that the shards of the first k Morton rounds are the blocks of `task_shape`."""
    bits = grid_bits(size, chunk)
    per_block = [int(t) // int(c) for t, c in zip(task_shape, chunk)]
    counts = sorted({n for n, s, c in zip(per_block, size, chunk) if n * c < s})
    if not counts:  # one block: one shard holds the whole layer
        return max(bits)
    n = counts[0]
    if len(counts) > 1 or n & (n - 1):
        raise InputError(
            "--sharded: a block must be the same power-of-two number of chunks on every axis "
            f"it splits (--task-shape {','.join(map(str, task_shape))} is "
            f"{','.join(map(str, per_block))} chunks of {','.join(map(str, chunk))}; e.g. "
            f"--chunk-size {','.join(map(str, default_chunk(task_shape)))})")
    k = n.bit_length() - 1
    # an axis one block covers must also be covered by one shard: its bits run out by round k
    if any(b > k for b, n_a, s, c in zip(bits, per_block, size, chunk) if n_a * c >= s):
        raise InputError(
            "--sharded: a block covers a whole axis that a shard of its size would split: "
            "give a --task-shape with the same number of chunks on every axis")
    return k


def block_sharding(size: Sequence[int], chunk: Sequence[int],
                   task_shape: Sequence[int]) -> dict:
    """The sharding spec of a scale of `size` and `chunk` whose shards are the blocks of
    `task_shape` (anchored at the voxel offset); an InputError when no spec can be."""
    bits = grid_bits(size, chunk)
    k = _rounds(size, chunk, task_shape)
    in_shard = sum(min(k, b) for b in bits)
    minishard = max(0, in_shard - int(math.log2(MAX_CHUNKS_PER_MINISHARD)))
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "preshift_bits": in_shard - minishard,
        "hash": "identity",
        "minishard_bits": minishard,
        "shard_bits": sum(bits) - in_shard,
        "minishard_index_encoding": "gzip",
        "data_encoding": "gzip",
    }


def shard_shape(spec: dict, size: Sequence[int], chunk: Sequence[int]) -> tuple[int, int, int]:
    """The voxels a shard of `spec` spans per axis: whole Morton rounds of chunks."""
    bits = grid_bits(size, chunk)
    left = int(spec["preshift_bits"]) + int(spec["minishard_bits"])
    per_axis = [0, 0, 0]
    while left > 0 and any(p < b for p, b in zip(per_axis, bits)):
        for axis in range(3):
            if left > 0 and per_axis[axis] < bits[axis]:
                per_axis[axis] += 1
                left -= 1
    return tuple(int(c) << p for c, p in zip(chunk, per_axis))


def default_chunk(task_shape: Sequence[int]) -> tuple[int, int, int]:
    """A sharded layer's chunk when none is given: the block split in 2^k per axis, k as large
    as keeps `MIN_CHUNK_VOXELS` per chunk (512 x 512 x 64 -> 128 x 128 x 16)."""
    k = 0
    while (all(t % (2 ** (k + 1)) == 0 for t in task_shape)
           and math.prod(task_shape) // 8 ** (k + 1) >= MIN_CHUNK_VOXELS):
        k += 1
    return tuple(int(t) >> k for t in task_shape)


def on_task_grid(at: int, origin: int, end: int, step: int) -> bool:
    """Whether a region's face at `at` (on one axis) lies on the grid of blocks of `step` from
    `origin` (a layer's voxel offset), or at the layer's `end`: where blocks of `step` from
    the region's start, clipped to the layer, tile the region (a step past the layer's size
    leaves only the offset and the end)."""
    return (int(at) - int(origin)) % int(step) == 0 or int(at) == int(end)


def check_on_shards(region_lo: Sequence[int], offset: Sequence[int], size: Sequence[int],
                    task_shape: Sequence[int], region_hi: Sequence[int] | None = None) -> None:
    """The blocks start on the shard grid: where the region starts on an axis its blocks split,
    a multiple of the block from the voxel offset; elsewhere at the offset. With `region_hi`
    (a layer that later runs with other bounds fill in), they end on it too, or at the
    layer's end: a task writes its shard whole, so a shard cut by the bounds would replace
    the part another run wrote."""
    ends = [("starts", region_lo)] + ([("ends", region_hi)] if region_hi is not None else [])
    for word, region in ends:
        for axis, (at, o, s, t) in enumerate(zip(region, offset, size, task_shape)):
            if not on_task_grid(at, o, int(o) + int(s), t):
                raise InputError(
                    f"--sharded: --bounds {word} at {int(at)} on {'xyz'[axis]}, off the shard "
                    f"grid (multiples of {int(t)} from the voxel offset {int(o)}): move "
                    "--bounds onto it, or write the layer unsharded")
