"""`deepem3d evaluate SEG GT`: score a segmentation layer against a ground-truth layer, in
bounded memory (deepem3d.stages.scoring).
"""

from __future__ import annotations

import json

import click
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.cli.options import Bounds
from deepem3d.errors import warn
from deepem3d.segmentation.metrics import Contingency
from deepem3d.stages.scoring import MISSING_HINT, score_layers
from deepem3d.storage.labels import compare_at, open_labels, scored_region
from deepem3d.units import format_bounds, format_triple


@click.command()
@click.argument("seg")
@click.argument("gt")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1 in voxels of the resolution compared, end exclusive "
              "(default: all of GT).")
@click.option("--mip", type=click.IntRange(min=0), default=None,
              help="SEG's mip level to compare at; GT is read at its mip of the same "
              "resolution (default: SEG's finest mip whose resolution GT has).")
@click.option("--fill-missing", is_flag=True, help="Read missing chunks as zeros (default: a "
              "missing chunk is an error).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def evaluate(
    seg: str, gt: str, bounds: tuple[tuple[int, int, int], tuple[int, int, int]] | None,
    mip: int | None, fill_missing: bool, as_json: bool,
) -> None:
    """Score segmentation layer SEG against ground-truth layer GT.

    Prints the SNEMI3D adapted Rand error with its precision and recall, and the variation of
    information split H(seg|gt) and merge H(gt|seg) in bits. Voxels where GT is 0 are not
    scored; SEG's 0 counts as SNEMI3D's script counts it. The layers are compared at one
    resolution: SEG's at --mip, and GT's mip of that resolution (GT labelled at 8 nm scores
    SEG's 8 nm mip).
    """
    seg_vol = open_labels(seg, "SEG", mip or 0, fill_missing, warn=warn)
    gt_vol = open_labels(gt, "GT", 0, fill_missing, warn=warn)
    mip = compare_at(seg_vol, gt_vol, mip)
    bbox = scored_region(bounds, seg_vol, gt_vol)

    hint = MISSING_HINT if bounds else (f"{MISSING_HINT}, or score the region it covers with "
                                        "--bounds (a layer segmented with --bounds holds that "
                                        "region only)")
    table, result = score_layers(seg_vol, gt_vol, bbox, missing_hint=hint)

    if as_json:
        click.echo(json.dumps({
            "seg": seg_vol.cloudpath,
            "gt": gt_vol.cloudpath,
            "mip": mip,
            "gt_mip": gt_vol.mip,
            "resolution": [float(r) for r in seg_vol.resolution],
            "bounds": [int(v) for v in (*bbox.minpt, *bbox.maxpt)],
            "voxels": table.voxels,
            "labelled_voxels": table.labelled_voxels,
            "voi_units": "bits",
            **result,
        }))
        return
    click.echo(_describe(seg_vol, gt_vol, bbox, mip, table, result))


def _describe(
    seg_vol: CloudVolume, gt_vol: CloudVolume, bbox: Bbox, mip: int, table: Contingency,
    result: dict[str, float],
) -> str:
    return "\n".join([
        f"SEG     {seg_vol.cloudpath}",
        f"GT      {gt_vol.cloudpath}",
        f"bounds  {format_bounds(bbox)} at mip {mip} ({format_triple(gt_vol.resolution)} nm"
        f"{f'; GT mip {gt_vol.mip}' if gt_vol.mip != mip else ''}): "
        f"{table.voxels:,} voxels, {table.labelled_voxels:,} with GT != 0",
        "",
        f"adapted Rand error  {result['adapted_rand_error']:.6f}   SNEMI3D, 0 = perfect",
        f"  Rand precision    {result['rand_precision']:.6f}   false merges lower it",
        f"  Rand recall       {result['rand_recall']:.6f}   false splits lower it",
        f"VOI split           {result['voi_split']:.6f}   bits, H(SEG|GT)",
        f"VOI merge           {result['voi_merge']:.6f}   bits, H(GT|SEG)",
        f"VOI                 {result['voi']:.6f}   bits",
    ])


