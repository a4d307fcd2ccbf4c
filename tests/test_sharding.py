"""Sharded layers whose shards are the blocks of a task grid (deepem3d.storage.sharding).

The spec is checked against igneous's own reading of a spec (`image_shard_shape_from_spec`)
over random grids, and a block written through CloudVolume becomes exactly one shard file.
"""

from __future__ import annotations

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from igneous.shards import image_shard_shape_from_spec

from deepem3d.errors import InputError
from deepem3d.storage.layers import create_layer, write_block
from deepem3d.storage.sharding import (
    block_sharding,
    check_on_shards,
    default_chunk,
    shard_shape,
)


def test_shards_are_the_blocks_on_random_grids():
    """For 400 random layers, chunks and blocks of 2^k chunks, every shard (as igneous reads
    the spec) spans the block on each axis the blocks split, and the whole axis elsewhere."""
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 400:
        chunk = [int(rng.choice([4, 8, 16, 64])) for _ in range(3)]
        k = int(rng.integers(0, 5))
        task = [c << k for c in chunk]
        if rng.random() < 0.3:  # an axis one block covers may take any number of chunks
            axis = int(rng.integers(3))
            task[axis] = chunk[axis] * int(rng.integers(1, 40))
        size = [int(rng.integers(1, 4000)) for _ in range(3)]
        try:
            spec = block_sharding(size, chunk, task)
        except InputError:
            assert any(t < s for t, s in zip(task, size))  # only a split axis can refuse
            continue
        checked += 1
        ours = shard_shape(spec, size, chunk)
        assert ours == tuple(int(v) for v in image_shard_shape_from_spec(spec, size, chunk))
        for axis in range(3):
            if task[axis] < size[axis]:
                assert ours[axis] == task[axis], (size, chunk, task, ours)
            else:
                assert ours[axis] >= size[axis], (size, chunk, task, ours)
        assert spec["shard_bits"] >= 0 and spec["preshift_bits"] >= 0


@pytest.mark.parametrize("task, expected", [((512, 512, 64), (128, 128, 16)),
                                            ((256, 256, 256), (64, 64, 64)),
                                            ((96, 80, 4), (96, 80, 4))])
def test_default_chunk_splits_the_block_in_powers_of_two(task, expected):
    assert default_chunk(task) == expected


def test_blocks_that_cannot_be_shards_are_refused_in_one_line():
    with pytest.raises(InputError, match="same power-of-two number of chunks"):
        block_sharding((1000, 1000, 100), (64, 64, 16), (256, 128, 64))
    with pytest.raises(InputError, match="same power-of-two"):
        block_sharding((1000, 1000, 100), (64, 64, 16), (192, 192, 48))
    with pytest.raises(InputError, match="off the shard grid"):
        check_on_shards((64, 0, 0), (0, 0, 0), (1000, 1000, 100), (128, 128, 32))
    check_on_shards((128, 0, 0), (0, 0, 0), (1000, 1000, 100), (128, 128, 32))


def test_a_block_is_one_shard_file_and_reads_back(tmp_path):
    """Blocks of 2 x 2 x 2 chunks written one by one, the last ones cut by the layer's end:
    one file each, every voxel read back through CloudVolume."""
    size, chunk, task = (40, 24, 10), (8, 8, 4), (16, 16, 8)
    labels = np.arange(np.prod(size), dtype=np.uint64).reshape(size) % 1000 + 1
    vol = create_layer(f"file://{tmp_path / 'seg'}", layer_type="segmentation", dtype="uint64",
                       resolution=(4, 4, 40), size=size, chunk_size=chunk,
                       sharding=block_sharding(size, chunk, task))
    blocks = 0
    for x in range(0, size[0], task[0]):
        for y in range(0, size[1], task[1]):
            for z in range(0, size[2], task[2]):
                part = labels[x:x + task[0], y:y + task[1], z:z + task[2]]
                write_block(vol, (x, y, z), part)
                blocks += 1
    files = list(CloudFiles(vol.cloudpath).list(prefix="4_4_40/"))
    assert len(files) == blocks == 3 * 2 * 2 and all(f.endswith(".shard") for f in files)
    back = np.asarray(CloudVolume(vol.cloudpath, progress=False)[:, :, :])[..., 0]
    np.testing.assert_array_equal(back, labels)


def test_block_grids_count_and_index_without_listing():
    """BlockGrid (what plans hold instead of lists): clipped cells, negative indexes, and no
    block for a region empty on an axis, anchored or not."""
    from cloudvolume.lib import Bbox

    from deepem3d.stages.blocks import block_grid

    grid = block_grid(Bbox((5, 0, 0), (70, 30, 10)), (32, 32, 8), anchor=(0, 0, 0))
    assert len(grid) == 3 * 1 * 2
    assert grid[0] == Bbox((5, 0, 0), (32, 30, 8)) and grid[-1] == Bbox((64, 0, 8), (70, 30, 10))
    assert list(grid)[1:3] == grid[1:3]
    with pytest.raises(IndexError):
        grid[6]
    for anchor in (None, (0, 0, 0)):
        assert len(block_grid(Bbox((64, 0, 0), (64, 10, 10)), (128, 128, 128), anchor)) == 0
