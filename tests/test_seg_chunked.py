"""Chunk invariance: the chunked pipeline equals the whole-array pipeline bit for bit.

Real map: an ISBI 2012 ground-truth crop turned into a noisy boundary map (and its affinities).
Synthetic maps: a constant map, two-valued maps, few-valued noise, bowls: plateaus and ties.
Chunkings: one chunk, many tiny chunks, and shapes that do not divide the volume.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepem3d.segmentation.pipeline import segment, segment_chunked
from deepem3d.segmentation.synthetic import affinity_map, boundary_map, bowl_map
from tests.conftest import SHARED_DATA

ISBI = SHARED_DATA / "isbi2012" / "isbi2012_neuron3d.h5"
THRESHOLDS = {"mean": [0.25, 0.55, 0.83], "watershed": [0.05, 0.19]}


def isbi_labels(x: int = 64, y: int = 64, z: int = 10) -> np.ndarray:
    """Ground-truth neuron ids of the ISBI 2012 volume's corner, x, y, z (0 = membrane)."""
    if not ISBI.is_file():
        pytest.skip(f"{ISBI} is absent: the ISBI 2012 volume is not on this machine")
    import h5py

    with h5py.File(ISBI, "r") as f:
        return np.asarray(f["/labels/neuron_ids"][:z, :y, :x]).transpose(2, 1, 0)


def check_invariance(
    m: np.ndarray, chunk_shapes: list[tuple[int, int, int]], **kwargs: object
) -> None:
    for method, thresholds in THRESHOLDS.items():
        whole = segment(m, method, thresholds, **kwargs)
        for seg in whole:
            assert seg.dtype == np.uint64 and seg.shape == m.shape[:3]
            if kwargs.get("dust_mode") != "zero":
                assert seg.min() > 0  # 0 is background only, and nothing here is background
        for shape in chunk_shapes:
            chunked = segment_chunked(m, shape, method, thresholds, **kwargs)
            for t, a, b in zip(thresholds, whole, chunked):
                assert b.dtype == np.uint64
                assert np.array_equal(a, b), f"{method} {t} differs with chunks {shape}"


@pytest.mark.parametrize("kind", ["boundary", "affinity"])
def test_isbi_map_chunked_equals_whole(kind: str) -> None:
    b = boundary_map(isbi_labels(), noise=0.1, seed=0)
    m = b if kind == "boundary" else affinity_map(b)
    check_invariance(m, [(64, 64, 10), (4, 4, 2), (13, 7, 3), (30, 50, 4), (64, 64, 1)])


def test_isbi_map_with_dust_chunked_equals_whole() -> None:
    b = boundary_map(isbi_labels(), noise=0.1, seed=1)
    check_invariance(b, [(4, 4, 2), (13, 7, 3)], dust_size=20)
    check_invariance(affinity_map(b), [(9, 11, 4)], dust_size=20, dust_mode="zero")


def synthetic_maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (15, 11, 7)
    two = np.where(rng.random(shape) < 0.5, 40, 200).astype(np.uint8)
    stripes = np.zeros(shape, np.uint8)
    stripes[::3] = 255  # flat walls between flat slabs
    bowls, _ = bowl_map((24, 20, 9), 8, seed=1)
    return {
        "constant": np.full(shape, 128, np.uint8),
        "two-valued": two,
        "stripes": stripes,
        "few-valued": rng.integers(0, 3, shape).astype(np.uint8) * 100,
        "bowls": bowls,
        "affinity-constant": np.full(shape + (3,), 255, np.uint8),
        "affinity-two-valued": np.where(rng.random(shape + (3,)) < 0.7, 250, 10).astype(np.uint8),
        "affinity-of-stripes": affinity_map(stripes),
        "affinity-of-two-valued": affinity_map(two),
    }


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
