"""Scoring a segmentation layer against a ground-truth layer, in bounded memory.

The layers are read block by block (z slabs on the ground truth's chunk grid, cut further in y
and x when a slab is large) and only the contingency table of (gt, seg) id pairs is kept, so a
volume of any size is scored in bounded memory. The scores are those of
`deepem3d.segmentation.metrics`: SNEMI3D adapted Rand error, and VOI split/merge in bits.
`deepem3d evaluate` and `deepem3d run`'s report both score through `score_layers`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox
from tqdm import tqdm

from deepem3d.errors import InputError
from deepem3d.segmentation.metrics import Contingency, accumulate, contingency, scores
from deepem3d.storage.labels import check_ids
from deepem3d.storage.layers import read_block
from deepem3d.units import format_bounds

# Voxels read per block: 2**24 uint64 voxels are 128 MiB per layer, and counting the pairs
# takes about five times that again, so one block peaks near 1 GiB.
MAX_BLOCK_VOXELS = 2**24


#: what a missing chunk's error tells `deepem3d evaluate`'s user to do
MISSING_HINT = "finish writing the layer, or pass --fill-missing to read them as 0"


def score_layers(seg_vol: CloudVolume, gt_vol: CloudVolume, bbox: Bbox,
                 progress: bool = True, missing_hint: str = MISSING_HINT
                 ) -> tuple[Contingency, dict[str, float]]:
    """The contingency table over `bbox` and its scores (metrics.scores); an InputError when
    GT is 0 everywhere there, or a chunk is missing in a layer opened without fill_missing
    (ending with `missing_hint`)."""
    blocks = plan_blocks(bbox, gt_vol.chunk_size, gt_vol.voxel_offset, MAX_BLOCK_VOXELS)
    table = read_table(seg_vol, gt_vol, blocks, progress, missing_hint)
    if table.labelled_voxels == 0:
        raise InputError(
            f"GT is 0 everywhere in {format_bounds(bbox)}: nothing to score; pick --bounds "
            "that hold labelled voxels"
        )
    return table, scores(table)


def plan_blocks(
    bbox: Bbox, chunk_size: Sequence[int], voxel_offset: Sequence[int],
    max_voxels: int = MAX_BLOCK_VOXELS,
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


def read_table(seg_vol: CloudVolume, gt_vol: CloudVolume, blocks: list[Bbox],
               progress: bool = True, missing_hint: str = MISSING_HINT) -> Contingency:
    """Accumulate the contingency table block by block, merging in batches (amortised sort)."""
    table = Contingency.empty()
    pending: list[Contingency] = []
    pending_size = 0
    # disable=None: a bar on a terminal, none in logs and pipes
    # (updated by hand: iterating the bar would close it, leave=True, as an error unwinds)
    bar = tqdm(total=len(blocks), desc="evaluate", unit="block", file=sys.stderr,
               disable=None if progress else True)
    try:
        for block in blocks:
            seg_block = _download(seg_vol, "SEG", block, missing_hint)
            gt_block = _download(gt_vol, "GT", block, missing_hint)
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


def _download(vol: CloudVolume, name: str, block: Bbox, missing_hint: str) -> np.ndarray:
    ids = read_block(vol, block.minpt, block.maxpt, missing_hint, what=name)[..., 0]
    return check_ids(ids, name, vol, block)
