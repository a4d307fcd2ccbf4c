"""Training augmentation (pure numpy; arrays z,y,x, image float32, ids integer).

The 16 variants DeepEM3D trains and tests with (8 in-plane rotations/flips x z reversal),
intensity jitter, and the defects of real serial-section EM: missing sections, misaligned
sections and smooth elastic warps. Geometric changes move image and ids together; targets are
computed from the augmented ids, so no target needs fixing afterwards.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates, zoom

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


def dihedral(volume, k: int):
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


def undo_dihedral(volume, k: int):
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


def misalign(image: np.ndarray, ids: np.ndarray, rng: np.random.Generator, max_shift: int = 6):
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


def elastic_warp(
    image: np.ndarray, ids: np.ndarray, rng: np.random.Generator,
    strength: float = 4.0, grid: int = 4,
):
    """A smooth in-plane displacement (a coarse random grid, upsampled), the same for every
    section: bilinear for the image, nearest for the ids."""
    _, height, width = image.shape
    coarse = rng.normal(0, strength, size=(2, grid, grid))
    field = np.stack([zoom(c, (height / grid, width / grid), order=3) for c in coarse])
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = [yy + field[0][:height, :width], xx + field[1][:height, :width]]
    warped_image = np.stack(
        [map_coordinates(s, coords, order=1, mode="reflect") for s in image]
    ).astype(np.float32)
    warped_ids = np.stack(
        [map_coordinates(s, coords, order=0, mode="reflect") for s in ids]
    ).astype(ids.dtype)
    return warped_image, warped_ids


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
