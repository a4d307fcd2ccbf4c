"""Halo slabs: a block's box (its voxels plus the halo), assembled from its own voxels and the
slabs its neighbours publish, equals the map cut out there, for any grid, halo and block size
(blocks thinner than the halo included: the box then reaches two blocks away)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deepem3d.segmentation.chunks import SUPERVOXEL_HALO, assemble_halo_box, halo_slabs


@pytest.mark.parametrize("channels", [(), (3,)], ids=["boundary", "affinity"])
def test_box_from_slabs_equals_the_cutout(channels) -> None:
    rng = np.random.default_rng(3)
    for trial in range(60):
        shape = rng.integers(1, 11, 3)
        step = rng.integers(1, 6, 3)
        low, high = (SUPERVOXEL_HALO["affinity"] if trial % 3 else
                     tuple(int(v) for v in rng.integers(0, 3, 2)))
        volume = rng.integers(0, 256, tuple(shape) + channels).astype(np.uint8)
        blocks = {}
        for corner in itertools.product(*(range(0, s, t) for s, t in zip(shape, step))):
            lo = np.asarray(corner)
            hi = np.minimum(lo + step, shape)
            blocks[corner] = (lo, hi, halo_slabs(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                                                  low, high))
        asked = []

        def slab(lo, hi, name, blocks=blocks, asked=asked):
            asked.append(name)
            assert np.array_equal(blocks[lo][1], hi)
            return blocks[lo][2][name]

        for lo, hi, _ in blocks.values():
            box_lo, box_hi = np.maximum(lo - low, 0), np.minimum(hi + high, shape)
            own = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            box = assemble_halo_box(own, (lo, hi), (box_lo, box_hi), ((0, 0, 0), shape), step,
                                    slab)
            expected = volume[box_lo[0]:box_hi[0], box_lo[1]:box_hi[1], box_lo[2]:box_hi[2]]
            assert box.dtype == volume.dtype and np.array_equal(box, expected), (
                f"trial {trial}: volume {shape}, blocks {step}, halo {low, high}, block {lo}")
        if len(blocks) > 1 and low + high > 0:
            assert asked, "no slab was read"


def test_slabs_are_the_first_high_and_last_low_voxels_on_each_axis() -> None:
    block = np.arange(5 * 4 * 3).reshape(5, 4, 3)
    slabs = halo_slabs(block, 1, 2)
    assert np.array_equal(slabs["x_first"], block[:2]) and np.array_equal(slabs["x_last"],
                                                                           block[4:])
    assert np.array_equal(slabs["z_first"], block[:, :, :2])
    assert np.array_equal(slabs["z_last"], block[:, :, 2:])
    assert sum(s.size for s in slabs.values()) < block.size * 3
