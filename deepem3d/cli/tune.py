"""`deepem3d tune SEGMENTATION GT`: segmentation settings chosen on a labelled region."""

from __future__ import annotations

import json

import click
from cloudvolume.lib import Bbox
from tqdm import tqdm

from deepem3d.cli.options import Bounds, ByteSize
from deepem3d.errors import InputError


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} {text!r}: expected numbers separated by commas") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} {text!r}: expected integers separated by commas") from None


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
              help="Write the best setting into this pipeline file's `segmentation:` keys.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--max-memory", type=ByteSize(), default=None,
              help="Refuse, before reading any graph, a run whose region graph would need more, "
              "e.g. 8GiB (default: the memory available now).")
def tune(segmentation: str, gt: str, bounds, methods: str, thresholds: str | None,
         dust_sizes: str, pipeline: str | None, as_json: bool, max_memory: int | None) -> None:
    """Choose method, threshold and dust size for SEGMENTATION's map on GT's labelled voxels.

    Reuses the run's kept supervoxels and region graphs: per setting only the agglomeration,
    the dust removal and the remap run, in memory. Prints adapted Rand error and VOI per
    setting and the best one's flags for `deepem3d segment`.
    """
    from deepem3d.stages.tune import (
        best,
        check_tune_memory,
        load_kept,
        read_ground_truth,
        settings_grid,
    )
    from deepem3d.stages.tune import tune as run_tune

    grid = settings_grid([m.strip() for m in methods.split(",") if m.strip()],
                         _floats(thresholds, "--thresholds"), _ints(dust_sizes, "--dust-sizes"))
    labels, box = read_ground_truth(gt, segmentation, Bbox(*bounds) if bounds else None,
                                    warn=lambda w: click.echo(f"deepem3d: warning: {w}", err=True))
    check_tune_memory(segmentation, box, max_memory)
    run = load_kept(segmentation, box)
    rows = list(tqdm(run_tune(run, labels, grid), total=len(grid), desc="settings",
                     disable=as_json, leave=False))
    top = best(rows)
    own = run.settings
    if as_json:
        click.echo(json.dumps({
            "segmentation": run.path, "bounds": [int(v) for v in (*box.minpt, *box.maxpt)],
            "rows": [{"method": r.setting.method, "threshold": r.setting.threshold,
                      "dust_size": r.setting.dust_size, "segments": r.segments,
                      "adapted_rand_error": r.adapted_rand_error, "voi_split": r.voi_split,
                      "voi_merge": r.voi_merge} for r in rows],
            "best": {"method": top.setting.method, "threshold": top.setting.threshold,
                     "dust_size": top.setting.dust_size},
        }))
    else:
        click.echo(f"{run.path} on {gt}, voxels {','.join(map(str, (*box.minpt, *box.maxpt)))}"
                   f" (the run's supervoxels: sigma {own.get('sigma', 0)}, dust mode "
                   f"{own.get('dust_mode', 'merge')})")
        click.echo(f"{'method':<10}{'threshold':>10}{'dust':>6}{'segments':>10}{'ARE':>8}"
                   f"{'VOI':>8}{'split':>8}{'merge':>8}")
        for r in rows:
            s = r.setting
            mark = " <- the run's" if (s.method, s.threshold, s.dust_size) == (
                own.get("method"), own.get("threshold"), own.get("dust_size")) else ""
            mark += " <- best" if r is top else ""
            click.echo(f"{s.method:<10}{s.threshold:>10g}{s.dust_size:>6}{r.segments:>10}"
                       f"{r.adapted_rand_error:>8.4f}{r.voi:>8.3f}{r.voi_split:>8.3f}"
                       f"{r.voi_merge:>8.3f}{mark}")
        click.echo(f"best: deepem3d segment ... {top.setting.flags()}")
    if pipeline:
        write_setting(pipeline, top, own)
        if not as_json:
            click.echo(f"wrote method, threshold, dust_size, sigma and dust_mode into {pipeline}")


def write_setting(pipeline: str, row, run_settings: dict) -> None:
    """Set the pipeline file's segmentation method, threshold and dust size, and the run's
    sigma and dust mode, which the scores were measured with (other keys and sections kept;
    comments are not)."""
    import yaml

    try:
        with open(pipeline) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InputError(f"pipeline file {pipeline} does not exist") from None
    except yaml.YAMLError as err:
        raise InputError(f"pipeline file {pipeline} is not YAML: {str(err).splitlines()[0]}"
                         ) from None
    if not isinstance(data, dict):
        raise InputError(f"pipeline file {pipeline} is not a mapping of sections")
    section = data.get("segmentation") or {}
    section.update(method=row.setting.method, threshold=row.setting.threshold,
                   dust_size=row.setting.dust_size,
                   sigma=float(run_settings.get("sigma", 0.0)),
                   dust_mode=run_settings.get("dust_mode", "merge"))
    data["segmentation"] = section
    with open(pipeline, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
