"""Training data: volumes read from layers or files, and random patches drawn from them.

Arrays here are z,y,x (files' order); the one transposition from CloudVolume's x,y,z is
deepem3d.axes. A training or validation volume is a section range on its own: context beyond
its ends is made by reflection at the split, never read from the sections on the other side.
"""

from __future__ import annotations

import os

import numpy as np

from deepem3d.axes import zyx_from_xyz
from deepem3d.errors import InputError
from deepem3d.models.augment import augment
from deepem3d.models.targets import affinity_target, boundary_target
from deepem3d.sources import FILE_SUFFIXES, open_source
from deepem3d.units import format_triple


def is_file_source(source: str) -> bool:
    if "://" in source:  # a CloudVolume path: files are read from local disk only
        return False
    if os.path.isdir(source):  # a layer has its info; a TIFF directory or zarr does not
        return not os.path.exists(os.path.join(source, "info"))
    return source.split(":/")[0].lower().endswith(FILE_SUFFIXES)


def absolute_source(source: str) -> str:
    """`source` as a checkpoint records it, one spelling per place (a resume compares them): a
    local path made absolute (a relative one names nothing once the checkpoint is read
    elsewhere), a layer as `cloudpath` spells it (local ones file://, plain or not), a cloud
    path as given."""
    if not is_file_source(source):
        from deepem3d.storage.paths import cloudpath

        return cloudpath(source)
    path, colon, dataset = source.partition(":/")  # FILE.h5:/DATASET
    return os.path.abspath(os.path.expanduser(path)) + (f":/{dataset}" if colon else "")


def parse_sections(text: str, name: str) -> tuple[int, int]:
    """'0:15' -> (0, 15), end exclusive."""
    try:
        start, end = (int(p) for p in text.split(":"))
    except ValueError:
        raise InputError(f"malformed {name} {text!r}: expected START:END such as 0:15") from None
    if not 0 <= start < end:
        raise InputError(f"{name} {text!r} is empty or negative")
    return start, end


def volume_depth(source: str) -> int:
    if is_file_source(source):
        with open_source(source) as src:
            return src.shape[2]
    from deepem3d.storage.layers import open_layer

    return int(open_layer(source).volume_size[2])


def read_sections(source: str, sections: tuple[int, int], name: str) -> np.ndarray:
    """Sections [start, end) of a layer (any CloudVolume path) or a file `open_source` reads
    (HDF5 `file.h5:/path`, .npy, TIFF, zarr, MRC) as a z,y,x array."""
    depth = volume_depth(source)
    start, end = sections
    if end > depth:
        raise InputError(f"{name} {start}:{end} is outside {source}, which has {depth} sections "
                         f"(counted from its first, 0..{depth - 1}, whatever a layer's z offset)")
    if is_file_source(source):
        with open_source(source) as src:
            return np.ascontiguousarray(zyx_from_xyz(src.read(start, end)))
    from deepem3d.storage.layers import open_layer

    vol = open_layer(source)
    if vol.num_channels != 1:
        raise InputError(f"{source} has {vol.num_channels} channels: expected 1")
    lo = vol.voxel_offset
    cutout = vol[:, :, lo[2] + start : lo[2] + end][..., 0]
    return np.ascontiguousarray(zyx_from_xyz(np.asarray(cutout)))


def real_source(source: str) -> str:
    """`source` with links resolved, however spelled (relative, file://, a symbolic link)."""
    path = absolute_source(source)
    scheme, sep, rest = path.partition("://")
    if scheme == "file" and sep:
        return f"file://{os.path.realpath(rest)}"
    if sep:
        return path
    file, colon, dataset = path.partition(":/")
    return ("file://" if os.path.isdir(file) else "") + os.path.realpath(file) + (
        f":/{dataset}" if colon else "")


def _placement(source: str) -> tuple[str, tuple | None, tuple | None]:
    """("file" or "layer", voxel size in nm or None, first voxel's position or None): a
    file's as it records them (position in nm), a layer's (position in voxels)."""
    if is_file_source(source):
        with open_source(source) as src:
            return "file", src.resolution, src.position
    from deepem3d.storage.layers import open_layer

    vol = open_layer(source)
    return ("layer", tuple(float(r) for r in vol.resolution),
            tuple(int(o) for o in vol.voxel_offset))


def load_pair(image: str, labels: str, sections: tuple[int, int], name: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, ids int64), both z,y,x, checked to agree: the same shape, voxel size and
    placement (where both record them), and some voxel that is not background."""
    if real_source(labels) == real_source(image):
        raise InputError(f"--labels is the image ({image}): give the ground-truth segmentation")
    img = read_sections(image, sections, name)
    ids = read_sections(labels, sections, name)
    if img.shape != ids.shape:
        raise InputError(
            f"image {image} and labels {labels} differ in shape: "
            f"{img.shape[::-1]} vs {ids.shape[::-1]} (x,y,z)"
        )
    (kind, size, at), (other, label_size, label_at) = _placement(image), _placement(labels)
    if kind == other and size is not None and label_size is not None and not np.allclose(
            size, label_size):
        raise InputError(f"image {image} and labels {labels} differ in voxel size: "
                         f"{format_triple(size)} vs {format_triple(label_size)} nm (x,y,z)")
    if kind == other and at is not None and label_at is not None and not np.allclose(
            at, label_at):
        where = "voxel offset" if kind == "layer" else "first voxel's position (nm)"
        raise InputError(f"image {image} and labels {labels} lie in other places: "
                         f"{where} {format_triple(at)} vs {format_triple(label_at)} (x,y,z)")
    if img.dtype != np.uint8:
        raise InputError(f"image {image} is {img.dtype}: deepem3d trains on uint8 EM images "
                         "(`deepem3d ingest FILE DEST --to-uint8` rescales it to uint8; give "
                         "DEST)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"labels {labels} are {ids.dtype}: expected integer ids")
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        raise InputError(f"labels {labels} hold negative ids (min {ids.min()}): a segmentation "
                         "needs ids >= 0 (0 is background)")
    if not ids.any():
        raise InputError(f"labels {labels} are all 0 (background) in {name} "
                         f"{sections[0]}:{sections[1]}: give sections that hold segments")
    return img, ids.astype(np.int64)


def reflect_sections(volume: np.ndarray, half: int) -> np.ndarray:
    """Pad z by `half` sections at both ends by reflection (the split's own bounds)."""
    if half == 0:
        return volume
    if volume.shape[0] <= half:
        raise InputError(
            f"a section range of {volume.shape[0]} is too short for a {2 * half + 1}-section "
            f"model: give at least {half + 1} sections"
        )
    return np.pad(volume, ((half, half), (0, 0), (0, 0)), mode="reflect")


class PatchSampler:
    """Random training patches: `in_sections` sections around a middle one, `patch` pixels
    square, and the target of the middle section."""

    def __init__(
        self, image: np.ndarray, ids: np.ndarray, *, in_sections: int, patch: int,
        head: str = "boundary", augment: bool = True, name: str = "the section range",
    ):
        """`name`: the sections as the user gave them (`--train-sections 0:15`), for errors."""
        self.half = in_sections // 2
        self.in_sections = in_sections
        self.patch = patch
        self.head = head
        self.augment = augment
        self.depth = image.shape[0]
        if min(image.shape[1:]) < patch:
            raise InputError(f"--patch-size {patch} is larger than the sections (y, x "
                             f"{image.shape[1]}, {image.shape[2]}): give a multiple of 16 of at "
                             f"most {min(image.shape[1:]) // 16 * 16}")
        # the affinity head's z affinity reads one more section each side than the model
        self.pad = self.half + (head == "affinity")
        if self.depth <= self.pad:  # reflection needs more sections than it pads
            extra = " and its affinity head's z neighbour" if head == "affinity" else ""
            raise InputError(f"{name} holds {self.depth} section{'s' * (self.depth > 1)}, "
                             f"too short for the "
                             f"{in_sections}-section model{extra}: give at least {self.pad + 1}")
        self.image = reflect_sections(image, self.pad)
        self.ids = reflect_sections(ids, self.pad)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        z = int(rng.integers(self.depth)) + self.pad  # the middle section, in padded indices
        y = int(rng.integers(self.image.shape[1] - self.patch + 1))
        x = int(rng.integers(self.image.shape[2] - self.patch + 1))
        # one extra section on each side for the affinity head (z affinity of the middle)
        extra = int(self.head == "affinity")
        zs = slice(z - self.half - extra, z + self.half + 1 + extra)
        box = (zs, slice(y, y + self.patch), slice(x, x + self.patch))
        image = self.image[box].astype(np.float32)
        ids = self.ids[box]
        if self.augment:
            image, ids = augment(image, ids, rng)
        middle = self.half + extra
        # the middle section's target reads its neighbours only: compute it from them alone
        if self.head == "boundary":
            low = max(middle - 1, 0)
            target = boundary_target(ids[low:middle + 2])[middle - low].astype(np.int64)
        else:
            target = affinity_target(ids[middle - 1:middle + 1])[:, 1]
        if extra:
            image = image[extra:-extra]
        return image, target

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, Z, P, P) float32 on the 0..255 scale, and the targets."""
        pairs = [self.sample(rng) for _ in range(size)]
        images = np.stack([p[0] for p in pairs])[:, None]
        targets = np.stack([p[1] for p in pairs])
        return np.ascontiguousarray(images), np.ascontiguousarray(targets)
