"""`deepem3d tune SEGMENTATION GT`: segmentation settings chosen on a labelled region."""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

import click
from cloudvolume.lib import Bbox
from tqdm import tqdm

from deepem3d.cli.options import Bounds, ByteSize, not_empty
from deepem3d.errors import InputError, warn
from deepem3d.storage.paths import write_whole
from deepem3d.units import INT64_MAX, format_bounds, format_number

if TYPE_CHECKING:
    from pathlib import Path

    from deepem3d.stages.tune import Row


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} {text!r}: expected numbers separated by commas") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} {text!r}: expected integers separated by commas") from None
    if any(abs(v) > INT64_MAX for v in values):
        raise InputError(f"{name} {text!r}: at most {INT64_MAX}")
    return values


@click.command()
@click.argument("segmentation")
@click.argument("gt")
@click.option("--bounds", type=Bounds(), default=None,
              help="x0,y0,z0,x1,y1,z1, end exclusive, the labelled region (default: all of GT).")
@click.option("--methods", default="mean,watershed", show_default=True,
              help="Agglomeration methods to try.")
@click.option("--thresholds", default=None, help="Thresholds to try, in [0, 1] (default: "
              "0.25..0.75 by 0.05 for mean, 0.05,0.1,0.15,0.19,0.25,0.3 for watershed).")
@click.option("--dust-sizes", default="0,100,200,400,800", show_default=True,
              help="Dust sizes to try (voxels; 0: none).")
@click.option("--write", "pipeline", default=None, type=click.Path(dir_okay=False),
              callback=not_empty,
              help="Write the best setting into this pipeline file's `segmentation:` keys "
              "(checked first; only those keys' lines change, its comments kept, unless the "
              "section cannot be edited so: then the file is rewritten whole, and it says so).")
@click.option("--fill-missing", is_flag=True, help="Read GT's missing chunks as zeros, as "
              "`evaluate --fill-missing` does (default: a missing chunk is an error).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--max-memory", type=ByteSize(), default=None,
              help="Refuse, before reading any graph, a run whose region graph would need more "
              "(with --sigmas: whose segmentations of the region would), e.g. 8GiB (default: "
              "the memory available now).")
@click.option("--sigmas", default=None,
              help="Also sweep the in-plane Gaussian (voxels, in [0, 16], e.g. 0,1,2,4): the "
              "map over the region the run segmented is segmented again in memory per sigma "
              "(the run's kept supervoxels are not used then).")
def tune(segmentation: str, gt: str,
         bounds: tuple[tuple[int, int, int], tuple[int, int, int]] | None, methods: str,
         thresholds: str | None, dust_sizes: str, pipeline: str | None, fill_missing: bool,
         as_json: bool, max_memory: int | None, sigmas: str | None) -> None:
    """Choose method, threshold and dust size for SEGMENTATION's map on GT's labelled voxels.

    Reuses the run's kept supervoxels and region graphs: per setting only the agglomeration,
    the dust removal and the remap run, in memory. With --sigmas, the map over the run's
    region is segmented again per sigma instead. Prints adapted Rand error and VOI per
    setting and the best one's flags for `deepem3d segment`.
    """
    from deepem3d.stages.segmentation import MAX_SIGMA
    from deepem3d.stages.tune import (
        best,
        check_sweep_memory,
        check_tune_memory,
        load_kept,
        read_ground_truth,
        segment_settings,
        settings_grid,
        tune_sigmas,
    )
    from deepem3d.stages.tune import tune as run_tune
    from deepem3d.storage.layers import cloudpath

    pipeline_data = read_pipeline(pipeline) if pipeline else None  # checked before the sweep
    grid = settings_grid([m.strip() for m in methods.split(",") if m.strip()],
                         _floats(thresholds, "--thresholds"), _ints(dust_sizes, "--dust-sizes"))
    swept = _floats(sigmas, "--sigmas")
    if swept is not None and (not swept or any(not 0 <= s <= MAX_SIGMA for s in swept)):
        raise InputError(f"--sigmas {sigmas!r}: give sigmas in [0, {MAX_SIGMA:g}] voxels, "
                         "separated by commas")
    labels, box = read_ground_truth(gt, segmentation, Bbox(*bounds) if bounds else None,
                                    warn=warn, fill_missing=fill_missing)
    if swept is None:
        check_tune_memory(segmentation, box, max_memory)
        run = load_kept(segmentation, box)
        path, own, rows = run.path, run.settings, run_tune(run, labels, grid)
        source = (f"the run's supervoxels: sigma {own.get('sigma', 0)}, dust mode "
                  f"{own.get('dust_mode', 'merge')}")
    else:
        own = segment_settings(segmentation)
        check_sweep_memory(segmentation, own, box, grid, max_memory)
        rows = tune_sigmas(segmentation, own, box, labels, grid, swept)
        path = cloudpath(segmentation)  # as load_kept spells it, with or without --sigmas
        source = (f"the run's region of the map segmented per sigma, dust mode "
                  f"{own.get('dust_mode', 'merge')}")
    count = len(grid) * (1 if swept is None else len(swept))
    rows = list(tqdm(rows, total=count, desc="settings", disable=as_json, leave=False))
    top = best(rows)
    if as_json:
        click.echo(json.dumps({
            "segmentation": path, "bounds": [int(v) for v in (*box.minpt, *box.maxpt)],
            "rows": [{"method": r.setting.method, "threshold": r.setting.threshold,
                      "dust_size": r.setting.dust_size, "sigma": r.setting.values(own)["sigma"],
                      "segments": r.segments,
                      "adapted_rand_error": r.adapted_rand_error, "voi_split": r.voi_split,
                      "voi_merge": r.voi_merge} for r in rows],
            "best": {"method": top.setting.method, "threshold": top.setting.threshold,
                     "dust_size": top.setting.dust_size, "sigma": top.setting.values(own)["sigma"]},
        }))
    else:
        click.echo(f"{path} on {cloudpath(gt)}, voxels {format_bounds(box)}"
                   f" ({source})")
        sigma_column = f"{'sigma':>7}" if swept is not None else ""
        click.echo(f"{'method':<10}{'threshold':>10}{'dust':>6}{sigma_column}{'segments':>10}"
                   f"{'ARE':>8}{'VOI':>8}{'split':>8}{'merge':>8}")
        for r in rows:
            s = r.setting
            mark = " <- the run's" if (s.method, s.threshold, s.dust_size) == (
                own.get("method"), own.get("threshold"), own.get("dust_size")) and (
                s.sigma is None or s.sigma == own.get("sigma", 0)) else ""
            mark += " <- best" if r is top else ""
            # exact numbers may be longer than a column: a space before each keeps them apart
            sigma = f" {format_number(s.sigma):>6}" if swept is not None else ""
            click.echo(f"{s.method:<10} {format_number(s.threshold):>9}{s.dust_size:>6}{sigma}"
                       f"{r.segments:>10}{r.adapted_rand_error:>8.4f}{r.voi:>8.3f}"
                       f"{r.voi_split:>8.3f}{r.voi_merge:>8.3f}{mark}")
        click.echo(f"best: deepem3d segment ... {top.setting.flags(own)}")
    if pipeline:
        kept = write_setting(pipeline, pipeline_data, top, own)
        whole = ("" if kept else " (rewritten whole: its segmentation section is not a block "
                 "this can edit in place, and its comments are lost)")
        if not as_json:
            click.echo(f"wrote method, threshold, dust_size, sigma and dust_mode into {pipeline}"
                       + whole)
        elif whole:  # stdout is the JSON object alone: the lost comments said on stderr
            warn(f"--write {pipeline}{whole}")


def read_pipeline(pipeline: str) -> dict:
    """The pipeline file --write will change, checked whole (every key, as `deepem3d run`
    checks it) before any setting is scored."""
    import yaml

    from deepem3d.run.pipeline import load_pipeline

    if not os.path.isfile(pipeline):
        raise InputError(f"--write {pipeline}: no such pipeline file")
    load_pipeline(pipeline)
    # the file is replaced by a rename from a file beside it: refused now, not after the sweep
    target = os.path.realpath(pipeline)
    if not os.stat(target).st_mode & 0o222 or not os.access(target, os.W_OK):
        raise InputError(f"--write {pipeline}: the file is read-only; make it writable "
                         "(chmod u+w) to write the best setting into it")
    folder = os.path.dirname(target)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--write {pipeline}: cannot write in its folder {folder}, where the "
                         "file is written anew and renamed over the old one")
    with open(pipeline) as f:
        return yaml.safe_load(f)


def write_setting(pipeline: str, data: dict, row: Row, run_settings: dict) -> bool:
    """Set the pipeline file's segmentation method, threshold and dust size, and the sigma
    (the row's, or the run's) and dust mode the scores were measured with, other lines and
    comments kept (deepem3d.run.pipeline_edit); a section that edit cannot change in place
    is written with the file whole, comments lost. True when the comments were kept. The
    file is replaced by a rename: never left half written."""
    import yaml

    from deepem3d.run.pipeline_edit import set_section_keys

    values = row.setting.values(run_settings)
    target = os.path.realpath(pipeline)  # a link keeps pointing at the file it named
    with open(target, newline="") as f:
        text = f.read()
    try:
        text, kept = set_section_keys(text, "segmentation", values), True
    except ValueError:
        data["segmentation"] = {**(data.get("segmentation") or {}), **values}
        text, kept = yaml.safe_dump(data, sort_keys=False), False
    def write(partial: Path) -> None:
        with open(partial, "w", newline="") as f:
            f.write(text)
        shutil.copymode(target, partial)

    write_whole(target, write)  # a user's NAME.partial is not touched; a failed write is one line
    return kept
