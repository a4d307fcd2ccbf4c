"""DeepEM3D's in-plane Gaussian on the map, computed whole or per chunk with the same bytes.

DeepEM3D smoothed its boundary map in x and y (never across sections, whose spacing is ~10x
the in-plane one) before the watershed: it removes single-voxel gaps and speckle that would
otherwise seed spurious basins. Here it is the optional first stage of the segmentation.

Chunk invariance: `scipy.ndimage.gaussian_filter` is a separable 1D correlation per axis, the
same weights summed in the same order at every position of a line, with mode "reflect" only
at the line's ends. A chunk read with `smoothing_halo(sigma)` voxels more on each side in x and
y (clipped at the dataset's bounds, where the whole-array run reflects too) therefore sees,
for each of its own voxels, exactly the inputs of the whole-array run, and gives the same
float64 and the same uint8 after rounding (tested in tests/test_seg_smoothing.py).

Arrays are x, y, z (CloudVolume order); an affinity map is (x, y, z, 3), each channel smoothed
on its own. Maps are uint8 with value = round(255 p); floats are quantised first (`as_map`),
so a float and a uint8 layer smooth the same.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from deepem3d.segmentation.chunks import Chunk, Shape3, as_map

__all__ = ["TRUNCATE", "smooth_chunk", "smooth_map", "smoothing_bounds", "smoothing_halo"]

#: scipy's default truncation: the kernel reaches int(TRUNCATE * sigma + 0.5) voxels each way
TRUNCATE = 4.0


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, not {sigma}")
    return sigma


def smoothing_halo(sigma: float) -> int:
    """The kernel's radius in voxels (x and y): what a chunk must read beyond its bounds."""
    sigma = _check_sigma(sigma)
    return int(TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def smooth_map(map_box: np.ndarray, sigma: float) -> np.ndarray:
    """The in-plane (x, y) Gaussian of a map, as uint8 round(255 p), same shape, x fastest.

    `map_box` is a boundary map (x, y, z) or affinity map (x, y, z, 3), uint8 or float in
    [0, 1]. The filter runs on float64 of the uint8 values, mode "reflect" at the array's ends
    (the dataset's bounds when the array is the whole dataset); sigma 0 is the identity.
    """
    values, _ = as_map(map_box)
    sigma = _check_sigma(sigma)
    if sigma == 0:
        return values
    sigmas = (sigma, sigma) + (0.0,) * (values.ndim - 2)  # nothing across z or channels
    smoothed = gaussian_filter(values.astype(np.float64), sigmas, mode="reflect",
                               truncate=TRUNCATE)
    return np.asfortranarray(np.clip(np.rint(smoothed), 0, 255).astype(np.uint8))


def smoothing_bounds(chunk: Chunk, sigma: float) -> tuple[Shape3, Shape3]:
    """(start, stop) of what a chunk reads to smooth itself: its own z, x and y grown by the
    halo, clipped to the dataset."""
    halo = smoothing_halo(sigma)
    start, stop = chunk.bounds(halo, halo)
    return ((start[0], start[1], chunk.offset[2]),  # type: ignore[return-value]
            (stop[0], stop[1], chunk.stop[2]))


def smooth_chunk(
    map_box: np.ndarray, box_offset: tuple[int, int, int], chunk: Chunk, sigma: float
) -> np.ndarray:
    """The smoothed map on the chunk's own voxels, equal to that part of
    `smooth_map(whole, sigma)` bit for bit.

    `map_box` starts at global `box_offset` (x, y, z) and must cover `smoothing_bounds(chunk,
    sigma)`; anything beyond it is ignored, so the result never depends on how much was read.
    """
    start, stop = smoothing_bounds(chunk, sigma)
    box = np.asarray(map_box)
    lo = [a - o for a, o in zip(start, box_offset)]
    hi = [b - o for b, o in zip(stop, box_offset)]
    if min(lo) < 0 or any(h > s for h, s in zip(hi, box.shape[:3])):
        raise ValueError(
            f"the box at {tuple(box_offset)} of shape {box.shape[:3]} does not cover "
            f"{start}..{stop}, the chunk {chunk.offset}+{chunk.shape} with its smoothing halo"
        )
    smoothed = smooth_map(box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], sigma)
    inner = tuple(slice(o - a, o - a + s) for o, a, s in zip(chunk.offset, start, chunk.shape))
    return np.asfortranarray(smoothed[inner])
