"""The one place where arrays change axis order.

CloudVolume arrays are x, y, z(, c); files on disk (HDF5, NumPy, TIFF stacks) are z, y, x;
PyTorch volumes are (N, C, z, y, x). Convert here, never ad hoc.
"""

from __future__ import annotations

import numpy as np

#: the largest voxel coordinate or extent a layer takes: CloudVolume's bounding boxes are int32
LARGEST_COORDINATE = 2**31 - 1


def xyz_from_zyx(array: np.ndarray) -> np.ndarray:
    """A z,y,x(,c) array as x,y,z(,c) (a view, no copy)."""
    if array.ndim == 3:
        return array.transpose(2, 1, 0)
    if array.ndim == 4:
        return array.transpose(2, 1, 0, 3)
    raise ValueError(f"expected a 3D or 4D array, got {array.ndim}D")


def zyx_from_xyz(array: np.ndarray) -> np.ndarray:
    """An x,y,z(,c) array as z,y,x(,c) (a view, no copy)."""
    return xyz_from_zyx(array)  # the permutation is its own inverse


def xyzc_from_czyx(array: np.ndarray) -> np.ndarray:
    """A channels-first c,z,y,x map (a network's output) as a layer's x,y,z,c (a view)."""
    if array.ndim != 4:
        raise ValueError(f"expected a c,z,y,x array, got {array.ndim}D")
    return array.transpose(3, 2, 1, 0)
