"""deepem3d.storage.cseg: the reference compressed_segmentation encoder's bytes, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from cloudvolume import chunks

from deepem3d.segmentation.synthetic import voronoi_cells
from deepem3d.storage import cseg


def _reference(array: np.ndarray, block_size) -> bytes:
    data = array if array.ndim == 4 else array[..., np.newaxis]
    return chunks.encode(data, "compressed_segmentation", block_size)


def _cells(shape, spacing=6) -> np.ndarray:
    labels, _, _ = voronoi_cells(shape, spacing, seed=3)
    return labels.astype(np.uint64) * np.uint64(2**33 + 7)  # ids above 32 bits


rng = np.random.default_rng(0)
CASES = {
    "cells": (_cells((64, 64, 64)), (8, 8, 8)),
    "cells, shape not a multiple of the blocks": (_cells((61, 50, 37)), (8, 8, 8)),
    "cells, uint32": (_cells((40, 40, 40)).astype(np.uint32), (8, 8, 8)),
    "cells, C order": (np.ascontiguousarray(_cells((40, 24, 16))), (8, 8, 8)),
    "cells, blocks 4 x 8 x 2": (_cells((30, 30, 30)), (4, 8, 2)),
    "one value": (np.full((32, 32, 16), 9, np.uint64), (8, 8, 8)),
    "three values, many tables reused": (rng.integers(0, 3, (33, 17, 9)).astype(np.uint64),
                                         (8, 8, 8)),
    "40 values a block (sorted, 8 bits)": (rng.integers(0, 40, (32, 32, 32)).astype(np.uint32),
                                           (8, 8, 8)),
    "noise (16 bits)": (rng.integers(0, 2**40, (32, 32, 32)).astype(np.uint64), (8, 8, 8)),
    "values near 2**64": (rng.integers(0, 4, (16, 16, 16)).astype(np.uint64) + np.uint64(2**63),
                          (8, 8, 8)),
    "channel axis of 1": (rng.integers(0, 5, (16, 16, 8, 1)).astype(np.uint32), (8, 8, 8)),
}


@pytest.mark.parametrize("name", CASES)
def test_encode_gives_the_reference_bytes(name):
    array, block_size = CASES[name]
    assert cseg.encode(array, block_size) == _reference(array, block_size)


def test_decodes_to_the_input():
    array = _cells((45, 33, 20))
    encoded = cseg.encode(array, (8, 8, 8))
    decoded = chunks.decode(encoded, "compressed_segmentation", (45, 33, 20, 1), np.uint64,
                            block_size=(8, 8, 8))
    np.testing.assert_array_equal(decoded[..., 0], array)


def test_other_dtypes_and_channels_are_refused():
    with pytest.raises(ValueError, match="uint32 or uint64"):
        cseg.encode(np.zeros((8, 8, 8), np.uint16), (8, 8, 8))
    with pytest.raises(ValueError, match="x, y, z"):
        cseg.encode(np.zeros((8, 8, 8, 2), np.uint32), (8, 8, 8))
    with pytest.raises(ValueError, match="at most 65536"):
        cseg.encode(np.zeros((64, 64, 32), np.uint64), (64, 64, 32))
