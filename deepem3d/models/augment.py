"""Training augmentation (pure numpy; arrays z,y,x, image float32, ids integer).

The 16 variants DeepEM3D trains and tests with (8 in-plane rotations/flips x z reversal),
intensity jitter, and the defects of real serial-section EM: missing sections, misaligned
sections and smooth elastic warps. Geometric changes move image and ids together; targets are
computed from the augmented ids, so no target needs fixing afterwards.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import zoom

if TYPE_CHECKING:
    import torch

N_DIHEDRAL = 16


def _rot90(volume, k: int):
    """rot90 in the (y, x) plane of a numpy array or a torch tensor (the same rotation)."""
    if isinstance(volume, np.ndarray):
        return np.rot90(volume, k, axes=(-2, -1))
    return volume.rot90(k, (-2, -1))


def _flip(volume, axis: int):
    if isinstance(volume, np.ndarray):
        return np.flip(volume, axis)
    return volume.flip(axis)


def dihedral(volume: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """Variant k in 0..15 of a (..., z, y, x) array or tensor: rot90 k%4 times in-plane, flip x
    if bit 2 is set, reverse z if bit 3 is set. numpy returns views, torch copies."""
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral variant must be in 0..15, not {k}")
    out = _rot90(volume, k % 4) if k % 4 else volume
    if (k // 4) % 2:
        out = _flip(out, -1)
    if k // 8:
        out = _flip(out, -3)
    return out


def undo_dihedral(volume: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """The inverse of `dihedral(., k)`."""
    out = volume
    if k // 8:
        out = _flip(out, -3)
    if (k // 4) % 2:
        out = _flip(out, -1)
    return _rot90(out, -(k % 4)) if k % 4 else out


def jitter_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-section contrast and brightness changes, as sections differ in real EM."""
    depth = image.shape[0]
    contrast = rng.uniform(0.8, 1.2, size=(depth, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-20, 20, size=(depth, 1, 1)).astype(np.float32)
    mean = image.mean(axis=(1, 2), keepdims=True)
    return np.clip((image - mean) * contrast + mean + brightness, 0, 255)


def drop_section(image: np.ndarray, rng: np.random.Generator, keep: int) -> np.ndarray:
    """Blank one section other than `keep` (the predicted one cannot be guessed from nothing)."""
    choices = [z for z in range(image.shape[0]) if z != keep]
    if not choices:
        return image
    image = image.copy()
    image[rng.choice(choices)] = 0
    return image


def misalign(image: np.ndarray, ids: np.ndarray, rng: np.random.Generator, max_shift: int = 6
             ) -> tuple[np.ndarray, np.ndarray]:
    """Shift every section above a random z by one random in-plane offset (image and ids),
    as a slip in section alignment does; the edge is filled by reflection."""
    depth = image.shape[0]
    if depth < 2:
        return image, ids
    z = int(rng.integers(1, depth))
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    image, ids = image.copy(), ids.copy()
    image[z:] = _shift(image[z:], dy, dx)
    ids[z:] = _shift(ids[z:], dy, dx)
    return image, ids


def _shift(stack: np.ndarray, dy: int, dx: int) -> np.ndarray:
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return stack
    padded = np.pad(stack, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = stack.shape[1:]
    return padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width]


@functools.lru_cache(maxsize=16)
def _spline_upsampling(length: int, grid: int) -> np.ndarray:
    """(length, grid): the linear map `zoom(., length / grid, order=3)` applies along one axis.
    A cubic-spline zoom is linear and separable, so a 2D zoom of `c` is M_y @ c @ M_x.T (equal
    to scipy's to 1e-13) at the cost of two small matrix products."""
    return zoom(np.eye(grid), (length / grid, 1), order=3)


def _reflect(index: np.ndarray, length: int) -> np.ndarray:
    """scipy.ndimage's 'reflect' extension (d c b a | a b c d | d c b a): the sample an index
    outside 0..length-1 reads."""
    index = np.mod(index, 2 * length)
    return np.where(index >= length, 2 * length - 1 - index, index)


def elastic_warp(
    image: np.ndarray, ids: np.ndarray, rng: np.random.Generator,
    strength: float = 4.0, grid: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth in-plane displacement (a coarse random grid, upsampled by cubic splines), the
    same for every section: bilinear for the image, nearest for the ids, the edge extended by
    reflection. The same values as scipy's `map_coordinates` (order 1 and 0, mode 'reflect'),
    with the indices and weights computed once for all sections (a batch of 16 affinity
    patches of 7 x 256^2: 252 -> 138 ms on this project's CPU, docs/gpu.md)."""
    _, height, width = image.shape
    coarse = rng.normal(0, strength, size=(2, grid, grid))
    rows, cols = _spline_upsampling(height, grid), _spline_upsampling(width, grid)
    y = np.arange(height)[:, None] + rows @ coarse[0] @ cols.T
    x = np.arange(width)[None, :] + rows @ coarse[1] @ cols.T
    image_flat = image.reshape(image.shape[0], -1)
    # bilinear: the four neighbours' flat indices and weights, in scipy's order of sums
    y0, x0 = np.floor(y), np.floor(x)
    wy, wx = y - y0, x - x0
    y0, x0 = y0.astype(np.intp), x0.astype(np.intp)
    top, bottom = _reflect(y0, height) * width, _reflect(y0 + 1, height) * width
    left, right = _reflect(x0, width), _reflect(x0 + 1, width)
    warped_image = ((1 - wy) * ((1 - wx) * image_flat[:, top + left]
                                + wx * image_flat[:, top + right])
                    + wy * ((1 - wx) * image_flat[:, bottom + left]
                            + wx * image_flat[:, bottom + right])).astype(np.float32)
    nearest = (_reflect(np.floor(y + 0.5).astype(np.intp), height) * width
               + _reflect(np.floor(x + 0.5).astype(np.intp), width))
    warped_ids = ids.reshape(ids.shape[0], -1)[:, nearest]
    return warped_image.reshape(image.shape), warped_ids.reshape(ids.shape)


def augment(
    image: np.ndarray, ids: np.ndarray, rng: np.random.Generator, defects: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One random draw of everything above. image float32 and ids (z,y,x) of one patch."""
    k = int(rng.integers(N_DIHEDRAL))
    image = np.ascontiguousarray(dihedral(image, k))
    ids = np.ascontiguousarray(dihedral(ids, k))
    if defects:
        if rng.random() < 0.3:
            image, ids = elastic_warp(image, ids, rng)
        if rng.random() < 0.15:
            image, ids = misalign(image, ids, rng)
        if rng.random() < 0.1:
            image = drop_section(image, rng, keep=image.shape[0] // 2)
    image = jitter_intensity(image, rng)
    return image.astype(np.float32), ids
