"""One quantiser: round(255 * p) in float64, the same through inference's writer and as_map."""

from __future__ import annotations

import numpy as np

from deepem3d.models import sliding
from deepem3d.segmentation import synthetic
from deepem3d.segmentation.chunks import as_map
from deepem3d.segmentation.maps import quantize


def _edge_values() -> np.ndarray:
    """float32 probabilities on the rounding edges: k/255 and (k + 1/2)/255, each with its
    float32 neighbours a few ulps either side."""
    k = np.arange(256, dtype=np.float64)
    centres = np.concatenate([k / 255, (k[:-1] + 0.5) / 255]).astype(np.float32)
    values = [centres]
    for direction in (0.0, 1.0):
        step = centres
        for _ in range(3):
            step = np.nextafter(step, np.float32(direction))
            values.append(step)
    p = np.clip(np.concatenate(values), 0, 1).astype(np.float32)
    assert p.dtype == np.float32
    return p


def _old_float32_quantize(p: np.ndarray) -> np.ndarray:
    """What inference's writer computed before: float32 arithmetic."""
    return np.rint(np.clip(p, 0, 1) * np.float32(255)).astype(np.uint8)


def test_float32_edges_quantise_alike_in_the_writer_and_as_map() -> None:
    p = _edge_values()
    volume = np.zeros((p.size, 1, 1), dtype=np.float32)
    volume[:, 0, 0] = p
    written = sliding.quantize(volume)  # what `deepem3d infer` writes to a uint8 layer
    segmented, kind = as_map(volume)  # what `segment` makes of the float32 layer
    assert kind == "boundary"
    assert written.dtype == segmented.dtype == np.uint8
    np.testing.assert_array_equal(written, segmented)
    np.testing.assert_array_equal(synthetic._quantise(volume), segmented)
    # the contract: round(255 p) computed exactly (float64 holds 255 * p of a float32 exactly)
    np.testing.assert_array_equal(written[:, 0, 0], np.rint(p.astype(np.float64) * 255))
    # and the float32 formula it replaces disagreed somewhere on these edges
    assert (_old_float32_quantize(volume) != written).any()


def test_quantize_clips_and_rounds_half_to_even() -> None:
    p = np.array([-1.0, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1.0, 2.0])
    np.testing.assert_array_equal(quantize(p), [0, 0, 0, 2, 2, 255, 255])
    assert quantize(p).dtype == np.uint8
    assert quantize(np.zeros((2, 3, 4), order="F")).flags.f_contiguous
    assert sliding.quantize is quantize
