"""Label layers opened for scoring (`deepem3d evaluate`, `deepem3d tune`): the checks both make,
each a one-line InputError, in one place."""

from __future__ import annotations

from collections.abc import Callable

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


def check_same_resolution(seg_vol: CloudVolume, gt_vol: CloudVolume, mip: int) -> None:
    if not np.array_equal(np.asarray(seg_vol.resolution), np.asarray(gt_vol.resolution)):
        raise InputError(
            f"SEG and GT differ in resolution at mip {mip}: {format_triple(seg_vol.resolution)}"
            f" and {format_triple(gt_vol.resolution)} nm; compare them at a --mip where they "
            "agree"
        )


def scored_region(region: Region | None, seg_vol: CloudVolume, gt_vol: CloudVolume,
                  mip: int) -> Bbox:
    """The region to score: `region` (--bounds), or all of GT; it must lie inside both."""
    if region is None:
        bbox = gt_vol.bounds.clone()
        if not seg_vol.bounds.contains_bbox(bbox):
            raise InputError(
                f"GT's bounds {format_bounds(bbox)} are not inside SEG's bounds "
                f"{format_bounds(seg_vol.bounds)} at mip {mip}: pass --bounds "
                "x0,y0,z0,x1,y1,z1 inside both"
            )
        return bbox
    bbox = Bbox(*region)
    for name, vol in (("SEG", seg_vol), ("GT", gt_vol)):
        if not vol.bounds.contains_bbox(bbox):
            raise InputError(
                f"--bounds {format_bounds(bbox)} reach outside {name}'s bounds "
                f"{format_bounds(vol.bounds)} at mip {mip}: pass bounds inside both layers"
            )
    return bbox

