"""Maps for tests and benchmarks: from ground-truth labels, and synthetic cells. numpy only.

All arrays are x, y, z (CloudVolume order), maps uint8 with value = round(255 * p). These make
inputs with known answers; they are not a model of EM images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepem3d.segmentation.maps import quantize

__all__ = ["affinity_map", "boundary_map", "bowl_map", "voronoi_cells", "voronoi_planes",
           "voronoi_seeds"]


def _quantise(p: np.ndarray) -> np.ndarray:
    return np.asfortranarray(quantize(p))


def boundary_map(
    labels: np.ndarray,
    noise: float = 0.1,
    seed: int = 0,
    low: float = 0.1,
    high: float = 0.9,
) -> np.ndarray:
    """A boundary map from labels: `high` where a voxel is 0 or differs from a 6-neighbour.

    Everything else is `low`; seeded Gaussian noise of standard deviation `noise` is added,
    then the map is clipped to [0, 1] and quantised to uint8.
    """
    labels = np.asarray(labels)
    edge = labels == 0
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis] = slice(1, None)
        lo[axis] = slice(0, -1)
        edge[tuple(hi)] |= differs
        edge[tuple(lo)] |= differs
    p = np.where(edge, high, low)
    if noise > 0:
        p = p + np.random.default_rng(seed).normal(0.0, noise, labels.shape)
    return _quantise(p)


def affinity_map(boundary: np.ndarray) -> np.ndarray:
    """Affinities (x, y, z, 3) from a boundary map: channel c is 255 - max(b_v, b_{v - e_c}).

    That is the map contract's edge value, so both maps describe the same graph; where v - e_c
    is outside the volume the channel is 0 (no edge).
    """
    b = np.asarray(boundary).astype(np.int16)
    out = np.zeros(b.shape + (3,), dtype=np.uint8, order="F")
    out[1:, :, :, 0] = 255 - np.maximum(b[1:], b[:-1])
    out[:, 1:, :, 1] = 255 - np.maximum(b[:, 1:], b[:, :-1])
    out[:, :, 1:, 2] = 255 - np.maximum(b[:, :, 1:], b[:, :, :-1])
    return out


def voronoi_seeds(shape: Sequence[int], spacing: int | Sequence[int],
                  seed: int = 0) -> np.ndarray:
    """The cells' seeds (x, y, z), one per cell of a grid of `spacing`, jittered."""
    shape = tuple(int(s) for s in shape)
    step = np.broadcast_to(np.asarray(spacing, dtype=np.int64), (3,))
    rng = np.random.default_rng(seed)
    grid = tuple(int(-(-s // p)) for s, p in zip(shape, step))
    centre = (np.indices(grid).reshape(3, -1).T * step + step // 2).astype(np.float64)
    jitter = rng.uniform(-0.25, 0.25, centre.shape) * step
    return np.minimum(np.rint(centre + jitter), np.array(shape) - 1).astype(np.int64)


def voronoi_planes(shape: Sequence[int], spacing: int | Sequence[int], seeds: np.ndarray,
                   z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Sections z0..z1 of `voronoi_cells`' labels and distances, from its `seeds`: any slab of
    the volume, the same voxels as the whole (for volumes that do not fit in memory)."""
    shape = tuple(int(s) for s in shape)
    step = np.broadcast_to(np.asarray(spacing, dtype=np.int64), (3,))
    grid = tuple(int(-(-s // p)) for s, p in zip(shape, step))
    seed_of = np.arange(seeds.shape[0]).reshape(grid)
    labels = np.zeros((shape[0], shape[1], z1 - z0), dtype=np.uint32, order="F")
    dist = np.zeros(labels.shape, dtype=np.float32, order="F")
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    gx, gy = xs // step[0], ys // step[1]
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    for z in range(z0, z1):
        gz = z // step[2]
        best = np.full(xs.shape, np.inf)
        who = np.zeros(xs.shape, dtype=np.int64)
        for a, b, c in offsets:
            cx, cy, cz = gx + a, gy + b, gz + c
            ok = (cx >= 0) & (cx < grid[0]) & (cy >= 0) & (cy < grid[1]) & (0 <= cz < grid[2])
            if not ok.any():
                continue
            k = seed_of[
                np.clip(cx, 0, grid[0] - 1),
                np.clip(cy, 0, grid[1] - 1),
                min(max(cz, 0), grid[2] - 1),
            ]
            s = seeds[k]
            d = (xs - s[..., 0]) ** 2 + (ys - s[..., 1]) ** 2 + (z - s[..., 2]) ** 2
            d = np.where(ok, d, np.inf)
            closer = d < best
            best = np.where(closer, d, best)
            who = np.where(closer, k, who)
        labels[:, :, z - z0] = who + 1
        dist[:, :, z - z0] = np.sqrt(best)
    return labels, dist


def voronoi_cells(
    shape: Sequence[int], spacing: int | Sequence[int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of about `spacing` voxels across: labels (uint32, 1..n), distance to the seed, seeds.

    Seeds sit on a jittered grid; each voxel goes to the nearest seed among the 27 grid cells
    around it, so the work is linear in the volume (a slab at a time: `voronoi_planes`).
    """
    seeds = voronoi_seeds(shape, spacing, seed)
    labels, dist = voronoi_planes(shape, spacing, seeds, 0, int(shape[2]))
    return labels, dist, seeds


def bowl_map(
    shape: Sequence[int], spacing: int, seed: int = 0, slope: float = 8.0, noise: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A map of one bowl per cell, without ties between minima: map (uint8) and cell labels.

    Bowl k is floor_k + slope * distance to its seed, floors distinct (2 apart), plus integer
    noise of +-`noise` away from the seeds (which adds shallow local minima, never a second
    minimum equal to a floor). Watershed lines are the ridges between bowls.
    """
    labels, dist, seeds = voronoi_cells(shape, spacing, seed)
    rng = np.random.default_rng(seed + 1)
    floors = rng.permutation(seeds.shape[0]).astype(np.float64) * 2.0
    jitter = rng.integers(-noise, noise + 1, labels.shape) * (dist > 1.5)
    value = floors[labels.astype(np.int64) - 1] + slope * dist + jitter
    return np.asfortranarray(np.clip(np.rint(value), 0, 255).astype(np.uint8)), labels
