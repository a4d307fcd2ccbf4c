"""Chunk invariance: the chunked pipeline equals the whole-array pipeline bit for bit.

Real map: a crop of the embedded ISBI 2012 sample's ground truth turned into a noisy boundary
map (and its affinities).
Synthetic maps: a constant map, two-valued maps, few-valued noise, bowls: plateaus and ties.
Chunkings: one chunk, many tiny chunks, and shapes that do not divide the volume.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepem3d.segmentation.pipeline import segment, segment_chunked
from deepem3d.segmentation.synthetic import affinity_map, boundary_map
from tests.conftest import check_invariance, isbi_labels, synthetic_maps


@pytest.mark.parametrize("kind", ["boundary", "affinity"])
def test_isbi_map_chunked_equals_whole(kind: str) -> None:
    b = boundary_map(isbi_labels(), noise=0.1, seed=0)
    m = b if kind == "boundary" else affinity_map(b)
    check_invariance(m, [(64, 64, 10), (4, 4, 2), (13, 7, 3), (30, 50, 4), (30, 50, 1)])


def test_isbi_map_with_dust_chunked_equals_whole() -> None:
    b = boundary_map(isbi_labels(), noise=0.1, seed=1)
    check_invariance(b, [(4, 4, 2), (13, 7, 3)], dust_size=20)
    check_invariance(affinity_map(b), [(9, 11, 4)], dust_size=20, dust_mode="zero")


@pytest.mark.parametrize("name", list(synthetic_maps()))
def test_synthetic_map_chunked_equals_whole(name: str) -> None:
    m = synthetic_maps()[name]
    shapes = [m.shape[:3], (4, 4, 2), (2, 3, 1), (7, 5, 4)]
    check_invariance(m, shapes + ([(1, 1, 1)] if m.size <= 15 * 11 * 7 * 3 else []))


def test_constant_map_is_one_segment() -> None:
    for m in (np.full((6, 5, 4), 9, np.uint8), np.full((6, 5, 4, 3), 9, np.uint8)):
        for method in ("mean", "watershed"):
            assert np.all(segment_chunked(m, (2, 2, 2), method, 0.5) == 1)


def test_float_map_segments_like_its_quantised_layer() -> None:
    rng = np.random.default_rng(3)
    p = rng.random((10, 9, 4))
    q = np.rint(p * 255).astype(np.uint8)
    np.testing.assert_array_equal(segment(p, "mean", 0.5), segment_chunked(q, (3, 3, 3)))
