"""Training targets from dense neuron ids (pure numpy, arrays z,y,x as files store them).

DeepEM3D's boundary label: a voxel is boundary where the ground truth is background (0), where
its in-plane 3 x 3 window holds another id, or where the section above or below holds another
id at the same place (a "vertical" boundary, which anisotropic data makes common).
"""

from __future__ import annotations

import numpy as np


def boundary_target(ids: np.ndarray) -> np.ndarray:
    """uint8 (z,y,x): 1 on boundaries (see the module docstring), 0 inside objects."""
    if ids.ndim != 3:
        raise ValueError(f"expected z,y,x ids, got shape {ids.shape}")
    boundary = ids == 0
    padded = np.pad(ids, ((0, 0), (1, 1), (1, 1)), mode="edge")
    _, height, width = ids.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            boundary |= padded[:, dy : dy + height, dx : dx + width] != ids
    vertical = ids[1:] != ids[:-1]
    boundary[1:] |= vertical
    boundary[:-1] |= vertical
    return boundary.astype(np.uint8)


def affinity_target(ids: np.ndarray) -> np.ndarray:
    """float32 (3, z,y,x) in CloudVolume channel order: channel c (0 = x, 1 = y, 2 = z) is 1
    where voxel v and its neighbour v - e_c share a non-zero id, else 0 (also at the volume's
    low faces, which have no neighbour)."""
    if ids.ndim != 3:
        raise ValueError(f"expected z,y,x ids, got shape {ids.shape}")
    target = np.zeros((3,) + ids.shape, dtype=np.float32)
    inside = ids != 0
    target[0][:, :, 1:] = (ids[:, :, 1:] == ids[:, :, :-1]) & inside[:, :, 1:]
    target[1][:, 1:, :] = (ids[:, 1:, :] == ids[:, :-1, :]) & inside[:, 1:, :]
    target[2][1:, :, :] = (ids[1:] == ids[:-1]) & inside[1:]
    return target
