"""`deepem3d evaluate SEG GT`: score a segmentation layer against a ground-truth layer.

The layers are read block by block (z slabs on the ground truth's chunk grid, cut further in y
and x when a slab is large) and only the contingency table of (gt, seg) id pairs is kept, so a
volume of any size is scored in bounded memory. The scores are those of
`deepem3d.segmentation.metrics`: SNEMI3D adapted Rand error, and VOI split/merge in bits.
"""

from __future__ import annotations

import json
import sys

import click
import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.exceptions import EmptyVolumeException
from cloudvolume.lib import Bbox
from tqdm import tqdm

from deepem3d.cli.options import Bounds
from deepem3d.errors import InputError, warn
from deepem3d.segmentation.metrics import Contingency, accumulate, contingency, scores
from deepem3d.storage.labels import check_same_resolution, open_labels, scored_region
from deepem3d.units import format_bounds, format_triple

# Voxels read per block: 2**24 uint64 voxels are 128 MiB per layer, and counting the pairs
# takes about five times that again, so one block peaks near 1 GiB.
MAX_BLOCK_VOXELS = 2**24


@click.command()
@click.argument("seg")
@click.argument("gt")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1 at --mip, end exclusive (default: all of GT).")
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Compare the layers at this mip level.")
@click.option("--fill-missing", is_flag=True, help="Read missing chunks as zeros.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def evaluate(
    seg: str, gt: str, bounds: tuple[tuple[int, int, int], tuple[int, int, int]] | None,
    mip: int, fill_missing: bool, as_json: bool,
) -> None:
    """Score segmentation layer SEG against ground-truth layer GT.

    Prints the SNEMI3D adapted Rand error with its precision and recall, and the variation of
    information split H(seg|gt) and merge H(gt|seg) in bits. Voxels where GT is 0 are not
    scored; SEG's 0 counts as SNEMI3D's script counts it.
    """
    seg_vol = open_labels(seg, "SEG", mip, fill_missing, warn=warn)
    gt_vol = open_labels(gt, "GT", mip, fill_missing, warn=warn)
    check_same_resolution(seg_vol, gt_vol, mip)
    bbox = scored_region(bounds, seg_vol, gt_vol, mip)

    blocks = plan_blocks(bbox, gt_vol.chunk_size, gt_vol.voxel_offset, MAX_BLOCK_VOXELS)
    table = _read_table(seg_vol, gt_vol, blocks)
    if table.labelled_voxels == 0:
        raise InputError(
            f"GT is 0 everywhere in {format_bounds(bbox)}: nothing to score; pick --bounds "
            "that hold labelled voxels"
        )
    result = scores(table)

    if as_json:
        click.echo(json.dumps({
            "seg": seg_vol.cloudpath,
            "gt": gt_vol.cloudpath,
            "mip": mip,
            "bounds": [int(v) for v in (*bbox.minpt, *bbox.maxpt)],
            "voxels": table.voxels,
            "labelled_voxels": table.labelled_voxels,
            "voi_units": "bits",
            **result,
        }))
        return
    click.echo(_describe(seg_vol, gt_vol, bbox, mip, table, result))


def plan_blocks(
    bbox: Bbox, chunk_size, voxel_offset, max_voxels: int = MAX_BLOCK_VOXELS
) -> list[Bbox]:
    """Cut `bbox` into blocks on the chunk grid: one chunk thick in z, whole in y and x unless
    that exceeds `max_voxels`, then as many whole chunk rows (and columns) as fit."""
    (x0, y0, z0), (x1, y1, z1) = (tuple(int(v) for v in p) for p in (bbox.minpt, bbox.maxpt))
    cx, cy, cz = (int(c) for c in chunk_size)
    ox, oy, oz = (int(o) for o in voxel_offset)
    sx, sy = x1 - x0, y1 - y0
    step_y = step_x = None  # None: whole extent
    if sx * sy * cz > max_voxels:
        step_y = cy * max(1, max_voxels // (sx * cy * cz))
        if sx * cy * cz > max_voxels:
            step_y = cy
            step_x = cx * max(1, max_voxels // (cx * cy * cz))
    blocks = []
    for za, zb in _pairs(_cuts(z0, z1, oz, cz)):
        for ya, yb in _pairs(_cuts(y0, y1, oy, step_y)):
            for xa, xb in _pairs(_cuts(x0, x1, ox, step_x)):
                blocks.append(Bbox((xa, ya, za), (xb, yb, zb)))
    return blocks


def _cuts(lo: int, hi: int, origin: int, step: int | None) -> list[int]:
    """lo, the grid lines origin + k * step strictly inside (lo, hi), and hi."""
    if step is None:
        return [int(lo), int(hi)]
    first = origin + ((lo - origin) // step + 1) * step
    return [int(lo), *range(int(first), int(hi), step), int(hi)]


def _pairs(cuts: list[int]) -> list[tuple[int, int]]:
    return list(zip(cuts[:-1], cuts[1:]))


def _read_table(seg_vol: CloudVolume, gt_vol: CloudVolume, blocks: list[Bbox]) -> Contingency:
    """Accumulate the contingency table block by block, merging in batches (amortised sort)."""
    table = Contingency.empty()
    pending: list[Contingency] = []
    pending_size = 0
    # disable=None: a bar on a terminal, none in logs and pipes
    # (updated by hand: iterating the bar would close it, leave=True, as an error unwinds)
    bar = tqdm(total=len(blocks), desc="evaluate", unit="block", file=sys.stderr, disable=None)
    try:
        for block in blocks:
            seg_block = _download(seg_vol, "SEG", block)
            gt_block = _download(gt_vol, "GT", block)
            pending.append(contingency(seg_block, gt_block))
            pending_size += pending[-1].counts.size
            if pending_size >= max(table.counts.size, 2**20):
                table = accumulate([table, *pending])
                pending, pending_size = [], 0
            bar.update()
    except BaseException:
        bar.leave = False  # erase the bar, so an error message stands on its own line
        raise
    finally:
        bar.close()
    return accumulate([table, *pending])


def _download(vol: CloudVolume, name: str, block: Bbox) -> np.ndarray:
    try:
        return np.asarray(vol[block.to_slices()])[..., 0]
    except EmptyVolumeException:
        raise InputError(
            f"{name} {vol.cloudpath} has missing chunks in {format_bounds(block)}: finish "
            "writing the layer, or pass --fill-missing to read them as 0"
        ) from None


def _describe(
    seg_vol: CloudVolume, gt_vol: CloudVolume, bbox: Bbox, mip: int, table: Contingency,
    result: dict[str, float],
) -> str:
    return "\n".join([
        f"SEG     {seg_vol.cloudpath}",
        f"GT      {gt_vol.cloudpath}",
        f"bounds  {format_bounds(bbox)} at mip {mip} ({format_triple(gt_vol.resolution)} nm): "
        f"{table.voxels:,} voxels, {table.labelled_voxels:,} with GT != 0",
        "",
        f"adapted Rand error  {result['adapted_rand_error']:.6f}   SNEMI3D, 0 = perfect",
        f"  Rand precision    {result['rand_precision']:.6f}   false merges lower it",
        f"  Rand recall       {result['rand_recall']:.6f}   false splits lower it",
        f"VOI split           {result['voi_split']:.6f}   bits, H(SEG|GT)",
        f"VOI merge           {result['voi_merge']:.6f}   bits, H(GT|SEG)",
        f"VOI                 {result['voi']:.6f}   bits",
    ])


