"""`deepem3d tune`: choose segmentation settings on a labelled region of a finished run.

A segmentation keeps what its settings do not change (OUTPUT/segmentation/: each block's
supervoxels as local labels and a table to supervoxel ids, and each block's region graph over
supervoxel ids). Tuning reads them once, merges the block graphs into the volume's graph
(`merge_graphs`: integer sums, so the same graph as one whole-volume pass), and per setting
runs only the agglomeration, the dust removal and the remap, in memory, scoring the labelled
region against the ground truth. The agglomeration over the whole graph gives the segments the
segment tasks' octree gives (the octree is proven equal to it, docs/octree.md), so a row's
scores are those the segmentation would have with that setting; the row of the run's own
settings scores the layer as written.

Settings change only the agglomeration's method, threshold and dust size: smoothing (sigma)
changes the supervoxels, so a sigma sweep (`tune_sigmas`) segments the map over the whole
region the run segmented again, in memory, per sigma (`pipeline.segment_each`, the spec the
tasks equal), and scores the labelled region of it. Segmenting the labelled region alone
would be quicker but not what the run gives: no segment could merge through its faces, which
on gala_fib_small's train crop scored a setting 0.21 there and 0.52 in the whole run.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from cloudfiles import CloudFiles
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.memory import available_bytes
from deepem3d.segmentation.agglomeration import agglomerate, remap
from deepem3d.segmentation.metrics import evaluate
from deepem3d.segmentation.region_graph import RegionGraph, merge_graphs
from deepem3d.segmentation.supervoxels import relabel
from deepem3d.stages.blocks import parse_block_id
from deepem3d.stages.frame import Markers
from deepem3d.stages.scoring import MISSING_HINT
from deepem3d.stages.workdir import WORK, get_table, work_files
from deepem3d.storage.labels import check_ids, compare_at, open_labels, scored_region
from deepem3d.storage.layers import cloudpath, layer_processing, open_layer, read_block
from deepem3d.storage.npz import get_npz
from deepem3d.units import format_bounds, format_bytes, format_number, format_triple

#: thresholds tried by default: around the shipped models' settings (mean 0.55; watershed h
#: 0.1 and DeepEM3D's 0.19), wide enough that a fine-tuned model's best on its own data lay
#: inside (gala_fib_small: mean 0.4 with dust 400 was the edge of a 0.4..0.75, 0..400 grid)
DEFAULT_THRESHOLDS = {
    "mean": (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75),
    "watershed": (0.05, 0.1, 0.15, 0.19, 0.25, 0.3),
}
# What tuning holds: the segmentation's whole region graph (every block's, then merged, then
# agglomerated per setting) and the labelled region's supervoxels, ground truth and segments.
# Measured as peak RSS above the process before tuning (2 methods x 2 thresholds x 2 dust
# sizes) on the ISBI sample's ground truth as noisy affinities, segmented in 256 x 256 x 10
# blocks: 2.36-2.53 million block graph edges, 0.66-7.9 million voxels, 565-805 MiB; this model
# is 1.01-1.17 times that. Edges are counted as the region-graph tasks' markers record them.
TUNE_BASE_BYTES = 64 * 2**20
TUNE_BYTES_PER_EDGE = 240
TUNE_BYTES_PER_VOXEL = 32


@dataclass(frozen=True)
class Setting:
    method: str
    threshold: float
    dust_size: int
    #: None: the run's own supervoxels (its sigma)
    sigma: float | None = None

    def values(self, run: dict) -> dict:
        """The segmentation settings this row was scored with, whole: its sigma (None: the
        run's) and the run's dust mode, which `segment --method` would set to 0 and merge."""
        sigma = run.get("sigma") if self.sigma is None else self.sigma
        return {"method": self.method, "threshold": self.threshold, "dust_size": self.dust_size,
                "sigma": float(sigma or 0.0), "dust_mode": run.get("dust_mode", "merge")}

    def flags(self, run: dict) -> str:
        """`deepem3d segment`'s flags for `values(run)`."""
        v = self.values(run)
        return (f"--method {v['method']} --threshold {format_number(v['threshold'])} "
                f"--dust-size {v['dust_size']} --dust-mode {v['dust_mode']} "
                f"--sigma {format_number(v['sigma'])}")


@dataclass(frozen=True)
class Row:
    setting: Setting
    segments: int
    adapted_rand_error: float
    voi_split: float
    voi_merge: float

    @property
    def voi(self) -> float:
        return self.voi_split + self.voi_merge


@dataclass
class KeptRun:
    """What tuning reads of a finished segmentation."""

    path: str
    settings: dict  # the run's own: method, threshold, dust_size, dust_mode, sigma
    graph: RegionGraph
    supervoxels: np.ndarray  # x,y,z supervoxel ids over `bounds`
    bounds: Bbox


def segment_settings(seg_path: str) -> dict:
    """The settings `deepem3d segment` recorded in the layer's provenance (the last run)."""
    for entry in reversed(layer_processing(seg_path)):
        method = entry.get("method") or {}
        if method.get("task") == "deepem3d segment":
            return method
    raise InputError(f"{seg_path} was not written by `deepem3d segment`: tune needs a "
                     "segmentation layer with its kept work files")


def _blocks(files: CloudFiles, seg_path: str) -> list[str]:
    """The blocks of the run's region-graph stage, each with its kept graph: a stage left
    unfinished, or a graph gone, would make every score that of another segmentation."""
    names = sorted(k.rsplit("/", 1)[-1][: -len(".npz")]
                   for k in files.list(prefix="graphs/") if k.endswith(".npz"))
    if not names:
        raise InputError(f"{seg_path} has no kept region graphs ({WORK}/graphs/): segment it "
                         "again (without removing its work files) before tuning")
    markers = Markers(cloudpath(seg_path), "region-graph")
    blocks = markers.task_ids()
    unfinished = markers.remaining(blocks) if blocks else names
    missing = sorted(set(blocks) - set(names))
    if unfinished or missing:
        lacking = unfinished or missing
        raise InputError(f"{seg_path}: {len(lacking)} of {len(blocks) or len(names)} blocks "
                         f"have {'no finished' if unfinished else 'no kept'} region graph (such "
                         f"as {lacking[0]}): run the segmentation again to finish it before "
                         "tuning")
    return blocks


def tune_memory_bytes(seg_path: str, bounds: Bbox) -> tuple[int, int]:
    """(bytes tuning needs, the region graph's edges), from the region-graph markers: read
    before any graph is (as the run reads them: a marker a killed task left empty counts 0)."""
    edges = sum(int(r.get("edges", 0))
                for r in Markers(cloudpath(seg_path), "region-graph").records())
    voxels = math.prod(int(s) for s in bounds.size3())
    return TUNE_BASE_BYTES + TUNE_BYTES_PER_EDGE * edges + TUNE_BYTES_PER_VOXEL * voxels, edges


def check_tune_memory(seg_path: str, bounds: Bbox, limit: int | None) -> None:
    """An InputError when tuning would need more than `limit` bytes (default: what this
    machine has available now): it holds the segmentation's whole region graph."""
    what = "--max-memory"
    if limit is None:
        limit, what = available_bytes(), "the memory available here"
        if limit is None:
            return
    need, edges = tune_memory_bytes(seg_path, bounds)
    if need > limit:
        raise InputError(f"tuning holds {seg_path}'s whole region graph ({edges:,} edges) and "
                         f"the labelled region: about {format_bytes(need)}, above {what} "
                         f"({format_bytes(limit)}); tune a segmentation of a smaller region "
                         "(`deepem3d segment --bounds` around the labelled voxels)")


def segmented_region(seg_path: str, settings: dict, bounds: Bbox) -> Bbox:
    """The region the run segmented (absolute voxels), after checking that it holds `bounds`.
    Runs that recorded none segmented the whole layer."""
    if not settings.get("bounds"):
        from cloudvolume import CloudVolume

        return CloudVolume(cloudpath(seg_path), progress=False).bounds.clone()
    region = Bbox(settings["bounds"][:3], settings["bounds"][3:])
    if Bbox.intersection(bounds, region) != bounds:
        raise InputError(f"bounds {format_bounds(bounds)} reach outside the region the run "
                         f"segmented ({format_bounds(region)}): give --bounds inside it")
    return region


#: how a kept work file that is missing, cut short or not an npz fails to read
KEPT_READ_ERRORS = (FileNotFoundError, ValueError, OSError, zipfile.BadZipFile,
                    zstandard.ZstdError)


def load_kept(seg_path: str, bounds: Bbox) -> KeptRun:
    """The run's merged graph and its supervoxels over `bounds` (absolute voxels, mip 0)."""
    settings = segment_settings(seg_path)
    segmented_region(seg_path, settings, bounds)
    files = work_files(seg_path)
    names = _blocks(files, seg_path)
    graphs = []
    supervoxels = np.zeros(tuple(int(s) for s in bounds.size3()), dtype=np.uint64, order="F")
    for name in names:
        try:
            arrays = get_npz(files, f"graphs/{name}.npz")
        except KEPT_READ_ERRORS as err:
            raise InputError(f"{seg_path} has no readable kept region graph for block {name} "
                             f"({type(err).__name__}): segment it again") from None
        graphs.append(RegionGraph.from_arrays(arrays))
        block = parse_block_id(name)
        overlap = Bbox.intersection(block, bounds)
        if overlap.subvoxel():
            continue
        try:
            labels = get_npz(files, f"labels/{name}.npz")["labels"]
            table = get_table(files, name)
        except (KeyError, TypeError, *KEPT_READ_ERRORS):
            raise InputError(f"{seg_path} has no kept supervoxels for block {name} "
                             f"({WORK}/labels/, {WORK}/tables/): segment it again") from None
        ids = relabel(labels, table)
        src = tuple(slice(int(a - o), int(b - o))
                    for a, b, o in zip(overlap.minpt, overlap.maxpt, block.minpt))
        dst = tuple(slice(int(a - o), int(b - o))
                    for a, b, o in zip(overlap.minpt, overlap.maxpt, bounds.minpt))
        supervoxels[dst] = ids[src]
    return KeptRun(cloudpath(seg_path), settings, merge_graphs(graphs), supervoxels, bounds)


def settings_grid(methods: Sequence[str], thresholds: Sequence[float] | None,
                  dust_sizes: Sequence[int]) -> list[Setting]:
    """Every method x threshold x dust size, each once (a value given twice was scored and
    printed twice), thresholds checked to lie in [0, 1]."""
    if not methods or (thresholds is not None and not thresholds) or not dust_sizes:
        raise InputError("give at least one method, threshold and dust size to try")
    out = []
    for method in methods:
        if method not in DEFAULT_THRESHOLDS:
            raise InputError(f"method {method!r}: choose mean or watershed")
        for t in thresholds if thresholds is not None else DEFAULT_THRESHOLDS[method]:
            if not (0.0 <= float(t) <= 1.0) or math.isnan(float(t)):
                raise InputError(f"threshold {t} is outside [0, 1]")
            for d in dust_sizes:
                if int(d) < 0:
                    raise InputError(f"dust size {d} is negative")
                out.append(Setting(method, float(t), int(d)))
    return list(dict.fromkeys(out))


def tune(run: KeptRun, gt: np.ndarray, settings: Sequence[Setting]) -> Iterator[Row]:
    """Score each setting on the labelled voxels (gt > 0) of the run's bounds, in order.
    Settings sharing a method and dust size are agglomerated in one call."""
    dust_mode = run.settings.get("dust_mode", "merge")
    for (method, dust), thresholds in _groups(settings).items():
        tables = agglomerate(run.graph, method, thresholds, dust, dust_mode)
        for threshold, table in zip(thresholds, tables):
            seg = remap(run.supervoxels, run.graph.ids, table)
            yield _row(Setting(method, threshold, dust), seg, gt)


def _groups(settings: Sequence[Setting]) -> dict[tuple[str, int], list[float]]:
    groups: dict[tuple[str, int], list[float]] = {}
    for s in settings:
        groups.setdefault((s.method, s.dust_size), []).append(s.threshold)
    return groups


def tune_sigmas(seg_path: str, own: dict, box: Bbox, gt: np.ndarray,
                settings: Sequence[Setting], sigmas: Sequence[float]) -> Iterator[Row]:
    """Score each setting at each sigma on `box`: the map over the whole region the run
    (whose `segment_settings` are `own`) segmented is segmented in memory
    (`pipeline.segment_each`: supervoxels and graph once per sigma), so each row scores what
    the run would write with that setting and sigma. The map is read (and checked) here, before
    the first row is asked for."""
    region = segmented_region(seg_path, own, box)
    vol = open_layer(own["map"], mip=int(own.get("mip", 0)))  # the run's map, gone: one line
    if not vol.bounds.contains_bbox(region):  # made again, smaller, at the same path
        raise InputError(f"the run's map {vol.cloudpath} spans {format_bounds(vol.bounds)} at "
                         f"mip {vol.mip}, no longer the region the run segmented "
                         f"({format_bounds(region)}): segment the map again before tuning "
                         "--sigmas, or tune without --sigmas")
    values = np.asarray(vol[region.to_slices()])
    values = values[..., 0] if values.shape[3] == 1 else values
    labelled = tuple(slice(int(a - o), int(b - o))
                     for a, b, o in zip(box.minpt, box.maxpt, region.minpt))
    return _sweep(values, own, labelled, gt, settings, sigmas)


def _sweep(values: np.ndarray, own: dict, labelled: tuple[slice, ...], gt: np.ndarray,
           settings: Sequence[Setting], sigmas: Sequence[float]) -> Iterator[Row]:
    from deepem3d.segmentation.pipeline import segment_each

    groups = _groups(settings)
    for sigma in sigmas:
        results = segment_each(values, [(m, t, d) for (m, d), t in groups.items()],
                               dust_mode=own.get("dust_mode", "merge"), sigma=float(sigma))
        for ((method, dust), thresholds), segs in zip(groups.items(), results):
            rows = [_row(Setting(method, threshold, dust, float(sigma)), seg[labelled], gt)
                    for threshold, seg in zip(thresholds, segs)]
            del segs  # one group's segmentations of the whole region at a time
            yield from rows


def _row(setting: Setting, seg: np.ndarray, gt: np.ndarray) -> Row:
    scores = evaluate(seg, gt)
    # segments: the ids over labelled voxels, not 0 (what --dust-mode zero leaves is none)
    return Row(setting, int(np.count_nonzero(np.unique(seg[gt > 0]))),
               scores["adapted_rand_error"],
               scores["voi_split"], scores["voi_merge"])


def check_sweep_memory(seg_path: str, own: dict, box: Bbox, settings: Sequence[Setting],
                       limit: int | None) -> None:
    """An InputError when segmenting the region of the run whose `segment_settings` are `own`
    (which holds `box`) in memory would need
    more than `limit` bytes (default: what is available now): a block task's bytes per voxel
    (`BYTES_PER_VOXEL`), a noisy map's region graph (`NOISY_EDGES_PER_VOXEL` x
    `NODE_BYTES_PER_EDGE`), and one group's segmentations (8 bytes per voxel per threshold of
    the largest method and dust size group)."""
    from deepem3d.stages.segment_costs import (
        BYTES_PER_VOXEL,
        NODE_BYTES_PER_EDGE,
        NOISY_EDGES_PER_VOXEL,
    )

    what = "--max-memory"
    if limit is None:
        limit, what = available_bytes(), "the memory available here"
        if limit is None:
            return
    region = segmented_region(seg_path, own, box)
    voxels = math.prod(int(s) for s in region.size3())
    group = max(len(t) for t in _groups(settings).values())
    need = int(voxels * (BYTES_PER_VOXEL + NOISY_EDGES_PER_VOXEL * NODE_BYTES_PER_EDGE["mean"]
                         + 8 * group))
    if need > limit:
        raise InputError(f"--sigmas segments the region {seg_path} segmented ({voxels:,} "
                         f"voxels) in memory: about {format_bytes(need)}, above {what} "
                         f"({format_bytes(limit)}); tune a segmentation of a smaller region "
                         "(`deepem3d segment --bounds` around the labelled voxels)")


def read_ground_truth(gt_path: str, seg_path: str, bounds: Bbox | None,
                      warn: Callable[[str], None] | None = None,
                      fill_missing: bool = False) -> tuple[np.ndarray, Bbox]:
    """GT over `bounds` (default: all of GT) as x,y,z uint64, with evaluate's checks (one
    channel of integer ids, read at its mip of the segmentation's resolution, inside both
    layers, a missing chunk an error unless `fill_missing`) and holding labelled voxels.
    Tuning scores the run's own voxels (its mip 0: the kept supervoxels'), so unlike
    evaluate there is no --mip to name."""
    seg = open_labels(seg_path, "SEG", warn=warn)
    gt = open_labels(gt_path, "GT", fill_missing=fill_missing, warn=warn)
    res = format_triple(seg.resolution)
    compare_at(seg, gt, 0, fix=f"tune scores the segmentation's own {res} nm voxels: give GT "
               f"at {res} nm (`deepem3d downsample` adds that mip to a finer GT), or tune a "
               "segmentation made at GT's resolution")
    region = None if bounds is None else (tuple(bounds.minpt), tuple(bounds.maxpt))
    bounds = scored_region(region, seg, gt)
    ids = read_block(gt, bounds.minpt, bounds.maxpt, MISSING_HINT, what="GT")[..., 0]
    labels = check_ids(ids, "GT", gt, bounds).astype(np.uint64)
    if not labels.any():
        raise InputError(f"GT is 0 everywhere in {format_bounds(bounds)}: nothing to tune on; pick "
                         "--bounds that hold labelled voxels")
    return np.asfortranarray(labels), bounds


def best(rows: Sequence[Row]) -> Row:
    """The lowest adapted Rand error, then the lowest VOI."""
    return min(rows, key=lambda r: (r.adapted_rand_error, r.voi))
