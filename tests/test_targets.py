"""Targets and augmentation of the training data, on hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest

from deepem3d.models.augment import (
    N_DIHEDRAL,
    augment,
    dihedral,
    drop_section,
    elastic_warp,
    misalign,
    undo_dihedral,
)
from deepem3d.models.data import PatchSampler, reflect_sections
from deepem3d.models.targets import affinity_target, boundary_target


def test_boundary_target_in_plane_and_vertical():
    ids = np.ones((3, 6, 6), dtype=np.int64)
    ids[:, :, 3:] = 2  # an in-plane border between x = 2 and x = 3
    ids[0, 0, 0] = 0  # background
    ids[2, 4, 1] = 7  # an object only in the top section: vertical boundary below it
    t = boundary_target(ids)
    # in-plane: the 3 x 3 window of x = 2 and x = 3 holds the other id
    assert t[1, :, 2].all() and t[1, :, 3].all()
    assert not t[1, 1:4, :2].any() and not t[1, :, 4:].any()
    assert t[1, 0, 0] == 1  # below the background voxel of section 0: vertical
    assert t[0, 0, 0] == 1  # background is boundary
    # id 7 at (z=2, y=4, x=1): its window neighbours in section 2 ...
    assert t[2, 3:6, 0:3].all()
    # ... and the voxel below it in section 1 (vertical), but not its in-plane neighbours there
    assert t[1, 4, 1] == 1 and t[1, 4, 0] == 0 and t[1, 3, 1] == 0
    assert t.dtype == np.uint8


def test_affinity_target_channels_follow_cloudvolume_order():
    ids = np.ones((2, 3, 4), dtype=np.int64)
    ids[:, :, 2:] = 5  # x border between 1 and 2
    ids[1, 0, :] = 9  # section 1, row 0 differs from section 0 and from row 1
    a = affinity_target(ids)
    assert a.shape == (3, 2, 3, 4)
    assert a[0, 0, 0, 2] == 0 and a[0, 0, 0, 1] == 1  # x: voxel vs its x - 1 neighbour
    assert a[1, 1, 1, 0] == 0 and a[1, 1, 2, 0] == 1  # y: row 1 vs row 0 (9)
    assert a[2, 1, 0, 0] == 0 and a[2, 1, 1, 0] == 1  # z: section 1 vs section 0
    assert not a[0, :, :, 0].any() and not a[2, 0].any()  # no neighbour at the low faces


@pytest.mark.parametrize("k", range(N_DIHEDRAL))
def test_dihedral_variants_are_undone(k):
    vol = np.arange(3 * 4 * 4).reshape(3, 4, 4)
    assert np.array_equal(undo_dihedral(dihedral(vol, k), k), vol)


def test_sixteen_distinct_variants():
    vol = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    assert len({dihedral(vol, k).tobytes() for k in range(N_DIHEDRAL)}) == 16


def test_defects_move_image_and_ids_together():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(1, 6)[:, None, None], 16, axis=1).repeat(16, axis=2)
    ids[:, :, 8:] += 10
    image = (ids * 10).astype(np.float32)
    shifted_image, shifted_ids = misalign(image, ids, rng)
    assert np.array_equal(shifted_image, (shifted_ids * 10).astype(np.float32))
    dropped = drop_section(image, rng, keep=2)
    assert (dropped == 0).all(axis=(1, 2)).sum() == 1 and dropped[2].any()
    aug_image, aug_ids = augment(image, ids, np.random.default_rng(2))
    assert aug_image.shape == image.shape and aug_ids.shape == ids.shape
    assert aug_image.dtype == np.float32


@pytest.mark.parametrize("shape", [(7, 64, 64), (3, 50, 37), (2, 9, 5)])
def test_elastic_warp_is_scipys_bilinear_and_nearest(shape):
    """The vectorised warp reads what scipy.ndimage's spline zoom and map_coordinates (order
    1 for the image, 0 for the ids, mode 'reflect') read, including coordinates that leave the
    patch and nearest-neighbour ties."""
    from scipy.ndimage import map_coordinates, zoom

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=shape).astype(np.float32)
    ids = rng.integers(1, 50, size=shape)
    warped_image, warped_ids = elastic_warp(image, ids, np.random.default_rng(7), strength=6.0)
    coarse = np.random.default_rng(7).normal(0, 6.0, size=(2, 4, 4))
    _, height, width = shape
    field = [zoom(c, (height / 4, width / 4), order=3) for c in coarse]
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = [yy + field[0], xx + field[1]]
    expected_image = np.stack([map_coordinates(s, coords, order=1, mode="reflect")
                               for s in image])
    expected_ids = np.stack([map_coordinates(s, coords, order=0, mode="reflect") for s in ids])
    # the field is scipy's to 1e-13 px, so a value may round to the next float32 (1 ulp)
    assert np.allclose(warped_image, expected_image, rtol=0, atol=1e-4)
    assert np.mean(warped_ids == expected_ids) > 0.999
    assert warped_image.dtype == np.float32 and warped_ids.dtype == ids.dtype


def test_middle_targets_equal_the_whole_stacks_middle():
    """The sampler computes the middle section's target from its neighbours alone."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(9, 48, 48), dtype=np.uint8)
    ids = rng.integers(0, 4, size=(9, 48, 48))
    for head in ("boundary", "affinity"):
        for in_sections in (1, 3, 5):
            sampler = PatchSampler(image, ids, in_sections=in_sections, patch=32, head=head,
                                   augment=False)
            draw = np.random.default_rng([1, in_sections])
            z = int(draw.integers(sampler.depth)) + sampler.pad
            y, x = int(draw.integers(17)), int(draw.integers(17))
            _, target = sampler.sample(np.random.default_rng([1, in_sections]))
            extra = int(head == "affinity")
            stack = sampler.ids[z - sampler.half - extra:z + sampler.half + 1 + extra,
                                y:y + 32, x:x + 32]
            middle = sampler.half + extra
            whole = (boundary_target(stack)[middle] if head == "boundary"
                     else affinity_target(stack)[:, middle])
            assert np.array_equal(target, whole)


def test_reflect_at_the_split():
    vol = np.arange(4)[:, None, None] * np.ones((1, 2, 2))
    assert list(reflect_sections(vol, 2)[:, 0, 0]) == [2, 1, 0, 1, 2, 3, 2, 1]


def test_patch_sampler_shapes_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 40, 40), dtype=np.uint8)
    ids = rng.integers(1, 4, size=(6, 40, 40))
    for head, target_shape in (("boundary", (2, 32, 32)), ("affinity", (2, 3, 32, 32))):
        sampler = PatchSampler(image, ids, in_sections=5, patch=32, head=head)
        x1, t1 = sampler.batch(np.random.default_rng([0, 5]), 2)
        x2, t2 = sampler.batch(np.random.default_rng([0, 5]), 2)
        assert x1.shape == (2, 1, 5, 32, 32) and t1.shape == target_shape
        assert np.array_equal(x1, x2) and np.array_equal(t1, t2)
