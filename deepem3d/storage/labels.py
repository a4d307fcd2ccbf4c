"""Label layers opened for scoring (`deepem3d evaluate`, `deepem3d tune`, a pipeline's
`ground_truth`): the checks they make, each a one-line InputError, in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.storage.layers import check_layer_role, open_layer
from deepem3d.units import format_bounds, format_triple

Region = tuple[tuple[int, int, int], tuple[int, int, int]]


def open_labels(path: str, name: str, mip: int = 0, fill_missing: bool = False,
                warn: Callable[[str], None] | None = None) -> CloudVolume:
    """Open a layer of integer ids with one channel at `mip` (`name`: SEG or GT, for the
    messages). An image without provenance is only `warn`ed about."""
    vol = open_layer(path, fill_missing=fill_missing)
    mips = list(vol.available_mips)
    if mip not in mips:
        raise InputError(
            f"{name} {vol.cloudpath} has no mip {mip} (it has {', '.join(map(str, mips))}): "
            "pass one of those with --mip, or downsample the layer with `deepem3d downsample`"
        )
    vol.mip = mip
    if vol.num_channels != 1:
        raise InputError(
            f"{name} {vol.cloudpath} has {vol.num_channels} channels: a score compares "
            "single-channel label layers; pass a segmentation layer"
        )
    if not np.issubdtype(np.dtype(vol.dtype), np.integer):
        raise InputError(
            f"{name} {vol.cloudpath} holds {vol.dtype}, not integer ids: pass a segmentation "
            "layer (a boundary or affinity map must be segmented first)"
        )
    # refuses an EM image or a map that deepem3d wrote; warns on an image without provenance
    warning = check_layer_role(path, "labels", vol, name=name)
    if warning and warn is not None:
        warn(warning)
    return vol


def check_ids(ids: np.ndarray, name: str, vol: CloudVolume, box: Bbox) -> np.ndarray:
    """`ids` as read from `vol` over `box`, refused in one line when a signed layer's hold a
    negative id (as uint64, -1 would be scored as an object): evaluate's blocks and tune's
    ground truth are checked here alike."""
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        raise InputError(f"{name} {vol.cloudpath} holds negative ids (min {ids.min()} in "
                         f"{box.minpt.tolist()}..{box.maxpt.tolist()}): ids are >= 0")
    return ids


def compare_at(seg_vol: CloudVolume, gt_vol: CloudVolume, mip: int | None = None,
               fix: str | None = None) -> int:
    """The one rule for the voxels a score compares (evaluate's and tune's): SEG at `mip`
    (None: SEG's finest mip whose resolution GT has too), GT at its mip of that same
    resolution, so that GT labelled at one of SEG's downsampled resolutions is scored there.
    Sets both layers' mip and returns SEG's. An InputError when there is no such pair, ending
    in `fix` (default: evaluate's, which names the --mip values that would do)."""
    seg_res = {m: _resolution(seg_vol, m) for m in sorted(seg_vol.available_mips)}
    for m in [mip] if mip is not None else list(seg_res):
        gt_mip = mip_at(gt_vol, seg_res[m])
        if gt_mip is not None:
            seg_vol.mip, gt_vol.mip = m, gt_mip
            return m
    shared = [m for m, r in seg_res.items() if mip_at(gt_vol, r) is not None]
    if fix is None:
        fix = (f"pass --mip {shared[0]} (SEG's {format_triple(seg_res[shared[0]])} nm)"
               if shared else "give the layers a resolution in common (`deepem3d downsample` "
               "adds mips to the finer one)")
    gt_has = resolutions_held(gt_vol)
    what = (f"SEG's mip {mip} ({format_triple(seg_res[mip])} nm)" if mip is not None else
            f"any of SEG's resolutions ({', '.join(format_triple(r) for r in seg_res.values())}"
            " nm)")
    raise InputError(f"GT has no mip at {what}: GT's voxels are {gt_has} nm; {fix}")


def mip_at(vol: CloudVolume, resolution: Sequence[float]) -> int | None:
    """VOL's finest mip whose voxels are `resolution` (nm, to float rounding), or None."""
    for m in sorted(vol.available_mips):
        if np.allclose(_resolution(vol, m), resolution, rtol=1e-6, atol=0):
            return m
    return None


def resolutions_held(vol: CloudVolume) -> str:
    """VOL's voxel sizes, finest first, each once: `4,4,40, 8,8,40` (for a message)."""
    return ", ".join(dict.fromkeys(format_triple(_resolution(vol, m))
                                   for m in sorted(vol.available_mips)))


def _resolution(vol: CloudVolume, mip: int) -> tuple[float, ...]:
    return tuple(float(r) for r in vol.meta.resolution(mip))


def scored_region(region: Region | None, seg_vol: CloudVolume, gt_vol: CloudVolume) -> Bbox:
    """The region to score, in voxels of the resolution `compare_at` chose: `region`
    (--bounds), or all of GT; it must lie inside both."""
    at = f"at {format_triple(seg_vol.resolution)} nm"
    if region is None:
        bbox = gt_vol.bounds.clone()
        if not seg_vol.bounds.contains_bbox(bbox):
            raise InputError(
                f"GT's bounds {format_bounds(bbox)} are not inside SEG's bounds "
                f"{format_bounds(seg_vol.bounds)} {at}: pass --bounds "
                "x0,y0,z0,x1,y1,z1 inside both"
            )
        return bbox
    bbox = Bbox(*region)
    for name, vol in (("SEG", seg_vol), ("GT", gt_vol)):
        if not vol.bounds.contains_bbox(bbox):
            raise InputError(
                f"--bounds {format_bounds(bbox)} reach outside {name}'s bounds "
                f"{format_bounds(vol.bounds)} {at}: pass bounds inside both layers"
            )
    return bbox
