"""The one quantiser of probability maps: the layer contract uint8 value = round(255 * p).

numpy only, at the bottom of the imports: inference's writer (deepem3d.models.sliding), the
segmentation stages' map check (deepem3d.segmentation.chunks.as_map) and the synthetic maps
all call `quantize`, so a float32 map and the uint8 layer written from it segment the same.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize"]


def quantize(p: np.ndarray) -> np.ndarray:
    """round(255 * p) as uint8, same shape and memory order as `p`.

    p is clipped to [0, 1] and scaled in float64 (exact for every float32 p, so the result
    does not depend on the input's float width), then rounded half to even (np.rint).
    """
    p = np.asarray(p)
    scaled = np.clip(p.astype(np.float64, order="K"), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8, order="K")
