"""From a checked pipeline file to the run's stages, and from the finished run to its report.

`plan_run` turns a `Pipeline` into the planners' plans (each checks its inputs: layers, models,
shapes) and then into stages in order: inference (image -> map), the segmentation's stages,
downsampling, meshes, skeletons. `run_pipeline` runs them with the runner and writes
`OUTPUT/report.json`:

    {"stage_seconds": {stage: seconds}, "stage_began": {stage: its first task's start, by
     its markers' clock}, "seconds": this command's, "layers": {name: path},
     "pipeline": the file, "output": the output root,
     "adapted_rand_error": ..., "voi_split": ..., "voi_merge": ...,
     "evaluated_bounds": [x0, y0, z0, x1, y1, z1]                    (with ground truth)}
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError, warn
from deepem3d.run.pipeline import SAMPLE, Pipeline, add_local_queue
from deepem3d.stages.frame import Stage
from deepem3d.storage.paths import put_json_whole
from deepem3d.units import format_bounds, format_bytes, format_triple

if TYPE_CHECKING:
    from deepem3d.run.runner import StageSummary

REPORT = "report.json"
#: what --overwrite replaces: the map, the segmentation, and the levels of each (by the label
#: of its downsampling stage: the map's may be planned in another round than the segmentation's)
OVERWRITE = ("inference", "segmentation", "downsample map", "downsample segmentation")


@dataclass
class RunPlan:
    pipeline: Pipeline
    stages: list[Stage]
    routes: dict[str, str]  # stage label -> queue URL
    layers: dict[str, str]
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _in_key(source: str, section: str, err: InputError) -> InputError:
    """A planner's message with the options that are the section's keys spelled as keys
    (`pass --force`: `set force: true`); a command in backticks and the run's own options
    (`--overwrite`) are left as they are."""
    from deepem3d.run.pipeline import FLAG_KEYS, SECTION_KEYS

    keys = SECTION_KEYS.get(section, ())

    def as_key(match: re.Match) -> str:
        key = match.group(2).replace("-", "_")
        if key not in keys:
            return match.group(0)
        if match.group(1):
            return f"set {key}: true" if key in FLAG_KEYS else f"set {key}"
        return key

    parts = str(err).split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = re.sub(r"(pass )?--([a-z][a-z0-9-]*)", as_key, parts[i])
    # its kind kept: a service that did not answer stays ServiceUnavailable (exit 75)
    return type(err)(f"{source}: {section}: {'`'.join(parts)}")


def check_buckets(p: Pipeline) -> None:
    """Each bucket the file names, asked once before any plan, its error under its own key
    (a stage's plan named an output bucket that did not exist under `inference`)."""
    from deepem3d.sources import file_in_the_way
    from deepem3d.storage.cloud import check_bucket

    for key in ("output", "image", "ground_truth", "map"):
        path = getattr(p, key)
        if path and path != SAMPLE:
            try:
                check_bucket(path)
                local = path.removeprefix("file://")
                if "://" not in local and os.path.isfile(local):  # a volume file: ingest it
                    raise InputError(file_in_the_way(local))
            except InputError as err:
                raise _in_key(p.source, key, err) from None


def _bbox(values) -> Bbox | None:
    return None if values is None else Bbox(values[:3], values[3:])


def sample_layers(p: Pipeline, *, write: bool,
                  overwrite: bool = False) -> tuple[dict[str, str], bool]:
    """The embedded sample's layers under the output root (written once; kept after), and
    whether they are there whole. A layer there that `deepem3d sample` did not write is
    replaced only with `overwrite`."""
    from deepem3d.sample import write_sample
    from deepem3d.storage.layers import layer_holds_data, layer_processing, layer_writer

    paths = {"image": p.layer("image"), "ground_truth": p.layer("ground_truth")}
    held = [path for path in paths.values() if layer_holds_data(path)]
    foreign = [path for path in held
               if (layer_writer(layer_processing(path)) or (None, ""))[1] != "`deepem3d sample`"]
    if foreign and not overwrite:
        raise InputError(f"{foreign[0]} holds a layer that `deepem3d sample` did not write, "
                         "where this run puts the sample: pass --overwrite to replace it, or "
                         "give another output")
    # a run stopped while it wrote the sample left a layer with some of its chunks
    whole = not foreign and all(_every_chunk_written(path) for path in paths.values())
    if write and not whole:
        write_sample(p.output, overwrite=True, progress=False)
    return paths, whole or write


def _every_chunk_written(path: str) -> bool:
    """Whether a layer holds every chunk of its full-resolution scale."""
    import math

    from cloudfiles import CloudFiles

    from deepem3d.storage.layers import cloudpath

    files = CloudFiles(cloudpath(path))
    info = files.get_json("info")
    if not isinstance(info, dict) or not info.get("scales"):
        return False
    scale = info["scales"][0]
    expected = math.prod(-(-int(s) // int(c)) for s, c in zip(scale["size"],
                                                              scale["chunk_sizes"][0]))
    return sum(1 for _ in files.list(prefix=scale["key"].rstrip("/") + "/")) >= expected


def plan_run(p: Pipeline, *, overwrite: bool | set[str] = False,
             dry_run: bool = False) -> RunPlan:
    """Every plan of the run that can be made now, checked; writes nothing but the sample.

    Stages after a layer the run has yet to complete (the segmentation after inference, the
    downsampling after the segmentation) are planned once it is. With `dry_run` every stage
    is planned, the later ones on empty stand-in layers of the planned geometry, and nothing
    is written (the sample's geometry is read from a temporary copy). `overwrite` is a flag,
    or the parts of OVERWRITE whose outputs may be replaced."""
    if isinstance(overwrite, bool):
        overwrite = set(OVERWRITE) if overwrite else set()
    planner = _RunPlanner(p, overwrite, dry_run)
    try:
        check_buckets(p)
        planner.sample()
        if "map" in p.products:
            planner.inference()
        if p.ground_truth and "segmentation" in p.products:  # after the inference's checks
            planner.check_scoring()
        if "segmentation" in p.products:
            planner.segmentation()
        for name in p.downsample["layers"] if "downsample" in p.products else ():
            planner.downsample(name)
        for product in ("meshes", "skeletons"):
            if product in p.products:
                planner.objects(product)
    except InputError as err:
        raise planner.named(err) from None
    finally:
        planner.clean_up()
    return planner.plan


class _RunPlanner:
    """plan_run's sections in order, and what each leaves the next: the layers the run
    writes, the region of each it writes, and whether each is complete."""

    def __init__(self, p: Pipeline, overwrite: set[str], dry_run: bool) -> None:
        self.p, self.overwrite, self.dry_run = p, overwrite, dry_run
        self.plan = RunPlan(p, [], {}, {})
        self.image = p.image  # what the planners read: in a dry run, maybe the sample's copy
        #: the sample's temporary copy (a dry run before the sample is written whole)
        self.temporary: dict[str, str] = {}
        #: a dry run's stand-ins (and info-only copies) -> the layer each stands for
        self.stand_ins: dict[str, str] = {}
        self._scratch = None
        self.map_path = p.map
        self.map_ready = True
        self.iplan = None  # the inference's plan, when the run infers the map
        self.inference_key = ""
        self.written: dict[str, Bbox] = {}  # the region of each layer this run writes
        self.segmentation_ready = "segmentation" not in p.products
        self.segmentation_stand_in = ""
        #: the segmentation is made again: its levels, meshes and skeletons' markers go with it
        self.segmentation_redone = False
        self.segmentation_mips = None  # the segmentation's downsampling plan, when planned

    def scratch_dir(self) -> str:
        import tempfile

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="deepem3d-dry-run-")
        return self._scratch.name

    def clean_up(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def named(self, err: InputError) -> InputError:
        """The error with the sample's temporary copy named as the layers the run writes."""
        message = str(err)
        copies = {copy: self.plan.layers.get(name, self.p.layer(name))
                  for name, copy in self.temporary.items()} | self.stand_ins
        for copy in sorted(copies, key=len, reverse=True):  # a copy's name may start another's
            real = copies[copy]
            message = message.replace(copy, real).replace(copy.removeprefix("file://"),
                                                          real.removeprefix("file://"))
        return err if message == str(err) else InputError(message)

    def add(self, stage: Stage, section: str) -> None:
        queue = self.p.route(section, stage.memory_bytes)
        if queue.max_memory is not None and stage.memory_bytes > queue.max_memory:
            raise InputError(
                f"{self.p.source}: stage {stage.label}: its largest task needs about "
                f"{format_bytes(stage.memory_bytes)}, above queues.{queue.name}.max_memory "
                f"{format_bytes(queue.max_memory)}: route it to a queue of larger workers "
                "(min_memory), or make its tasks smaller")
        self.plan.stages.append(stage)
        self.plan.routes[stage.label] = queue.url

    def sample(self) -> None:
        """The layers the run reads: the sample's written (or, dry, copied to scratch)."""
        p, layers = self.p, self.plan.layers
        if SAMPLE in (p.image, p.ground_truth):
            written, whole = sample_layers(p, write=not self.dry_run,
                                           overwrite="inference" in self.overwrite)
            if not whole:  # a dry run reads a copy: the run will write the sample first
                from deepem3d.sample import write_sample

                self.temporary = write_sample(f"{self.scratch_dir()}/sample", progress=False)
            if p.image == SAMPLE:
                layers["image"] = written["image"]
                self.image = self.temporary.get("image", written["image"])
            if p.ground_truth == SAMPLE:
                layers["ground_truth"] = written["ground_truth"]
        else:
            layers["image"] = p.image
            if "map" in p.products:  # named by its key here, not by the inference's section
                from deepem3d.storage.layers import open_layer

                try:
                    open_layer(p.image)
                except InputError as err:
                    raise _in_key(p.source, "image", err) from None
        if p.ground_truth and p.ground_truth != SAMPLE:
            layers["ground_truth"] = p.ground_truth
        if p.map and "map" not in p.products:  # read, not made: the report and view name it
            from deepem3d.storage.layers import open_layer

            try:
                open_layer(p.map)
            except InputError as err:  # said here, where the key that names it is known
                raise _in_key(p.source, "map", err) from None
            layers["map"] = p.map

    def inference(self) -> None:
        from deepem3d.stages.inference import inference_stage
        from deepem3d.stages.inference_plan import plan_inference

        p, inf, plan = self.p, self.p.inference, self.plan
        patch = {k: v for k, v in (
            ("size", inf.get("patch_size")), ("output", inf.get("patch_output")),
            ("overlap", inf.get("overlap")), ("batch", inf.get("batch_size")),
            ("window", inf.get("window"))) if v is not None}
        try:
            iplan = plan_inference(
                self.image, p.layer("map"), models=inf.get("model"), mip=inf.get("mip"),
                task_shape=inf.get("task_shape"), chunk_size=inf.get("chunk_size"),
                tta=inf.get("tta", 1), bounds=_bbox(inf.get("bounds")), patch=patch,
                float32=inf.get("float32", False), fill_missing=inf.get("fill_missing", False),
                mask=inf.get("mask"), mask_mip=inf.get("mask_mip", 0),
                threads=inf.get("threads", 1), device=inf.get("device", "auto"),
                amp=inf.get("amp", True), force=inf.get("force", False),
                overwrite="inference" in self.overwrite, keep_unchanged=True,
                sharded=inf.get("sharded", False),
            )
        except InputError as err:
            raise _in_key(p.source, "inference", err) from None
        if self.temporary:  # the plan was read from the sample's temporary copy
            iplan.image_path = plan.layers["image"]
        plan.warnings += iplan.warnings
        plan.lines.append(iplan.describe())
        stage = inference_stage(iplan, overwrite="inference" in self.overwrite)
        self.add(stage, "inference")
        self.iplan, self.inference_key = iplan, stage.key
        self.written["map"] = iplan.bounds
        self.map_path = plan.layers["map"] = p.layer("map")
        # a map kept (its settings unchanged, even under --overwrite) that is complete
        self.map_ready = iplan.output_exists and stage.is_complete()
        if self.dry_run and not self.map_ready:
            self.map_path = _stand_in(self.scratch_dir(), "map", iplan)
            self.stand_ins[self.map_path] = plan.layers["map"]

    def check_scoring(self) -> None:
        from deepem3d.storage.layers import open_layer

        iplan = self.iplan
        if iplan is not None:
            map_bounds = Bbox(iplan.voxel_offset, np.add(iplan.voxel_offset, iplan.size))
            map_resolution = tuple(iplan.resolution)
        else:
            vol = open_layer(self.map_path)
            map_bounds, map_resolution = vol.bounds, tuple(float(r) for r in vol.resolution)
        ground_truth = self.plan.layers["ground_truth"]
        if self.p.ground_truth == SAMPLE:
            ground_truth = self.temporary.get("ground_truth", ground_truth)
        check_scoring(self.p, ground_truth, map_bounds, map_resolution)

    def segmentation(self) -> None:
        from deepem3d.stages.segment_costs import DEFAULT_EDGES_PER_VOXEL
        from deepem3d.stages.segmentation import (
            choose_settings,
            measured_edges_per_voxel,
            plan_segment,
            segment_stages,
            settings_for_map,
        )

        p, seg, plan = self.p, self.p.segmentation, self.plan
        given = {k: seg.get(k) for k in ("method", "threshold", "sigma", "dust_size")}
        plan.layers["segmentation"] = p.layer("segmentation")
        try:
            if self.iplan is not None:  # the settings the run's model records
                chosen, line = choose_settings(given, self.iplan.segmentation, "the model")
            else:
                chosen, line = settings_for_map(self.map_path, given)
            if line:
                plan.lines.append(line)
            if not (self.map_ready or self.dry_run):
                return  # planned once the map is complete
            output = p.layer("segmentation")
            if self.dry_run and not self.map_ready:
                output = f"file://{self.scratch_dir()}/segmentation"
                self.stand_ins[output] = p.layer("segmentation")
            splan = plan_segment(
                self.map_path, output, method=chosen["method"],
                threshold=chosen["threshold"], dust_size=chosen["dust_size"],
                dust_mode=seg.get("dust_mode", "merge"), task_shape=seg.get("task_shape"),
                chunk_size=seg.get("chunk_size"), bounds=_bbox(seg.get("bounds")),
                overwrite="segmentation" in self.overwrite, sigma=chosen["sigma"],
                edges_per_voxel=seg.get("edges_per_voxel", DEFAULT_EDGES_PER_VOXEL),
                max_task_memory=seg.get("max_task_memory"),
                sharded=seg.get("sharded", False), keep_unchanged=True,
            )
        except InputError as err:
            raise _in_key(p.source, "segmentation", err) from None
        if self.dry_run:  # planned on stand-ins: name the layers the run will write
            if not self.map_ready:
                splan.map_path = plan.layers["map"]
            splan.output_path = p.layer("segmentation")
        splan.density_source = ("segmentation.edges_per_voxel" if "edges_per_voxel" in seg
                                 else "the default: a real map's")
        needs = ("inference",) if self.inference_key else ()
        stages = segment_stages(splan, needs=needs)
        self.segmentation_ready = stages[-1].is_complete() and not splan.reset_tuning_stages
        if "edges_per_voxel" not in seg and not self.segmentation_ready:
            # the octree's nodes are sized at the density the region-graph tasks measure; where
            # a queue takes stages by their memory, its stages are planned (and routed) once
            # they have (a dry run plans them at the default, a real map's; a map with no edge
            # keeps the default)
            graph = next(s for s in stages if s.name == "region-graph")
            done = graph.is_complete()
            measured = measured_edges_per_voxel(graph) if done else None
            if measured is not None:
                splan.edges_per_voxel = measured
                splan.density_source = "measured by the region-graph tasks"
                if seg.get("max_task_memory") is not None:
                    try:
                        splan.check_task_memory(seg["max_task_memory"])
                    except InputError as err:
                        raise _in_key(p.source, "segmentation", err) from None
                stages = segment_stages(splan, needs=needs)
            elif not (done or self.dry_run) and any(q.min_memory is not None
                                                    for q in p.queues.values()):
                stages = stages[:stages.index(graph) + 1]
                plan.lines.append("the segmentation's octree stages: planned once the region "
                                  "graph exists, their tasks sized at the density it measures")
        plan.lines.append(splan.describe())
        plan.warnings += splan.warnings
        self.written["segmentation"] = splan.bounds
        self.segmentation_redone = splan.reset_tuning_stages
        for stage in stages:
            self.add(stage, "segmentation")
        if self.dry_run and not self.segmentation_ready:
            self.segmentation_stand_in = _stand_in(self.scratch_dir(), "segmentation", splan)
            self.stand_ins[self.segmentation_stand_in] = plan.layers["segmentation"]

    def downsample(self, name: str) -> None:
        """Mip levels of one layer; of a layer the run writes, over the region it writes."""
        from deepem3d.stages.downsample import (
            MEMORY_TARGET,
            LevelsInTheWay,
            downsample_stage,
            plan_downsample,
        )

        p, down, layers = self.p, self.p.downsample, self.plan.layers
        path = self.image if name == "image" else layers[name]
        ready = {"image": True, "map": self.map_ready,
                 "segmentation": self.segmentation_ready}[name]
        if not ready:
            if not self.dry_run:  # planned once the layer is complete (run_pipeline has
                return  # planned it on a stand-in before anything ran)
            path = self.map_path if name == "map" else self.segmentation_stand_in
        try:
            dplan = plan_downsample(
                path, num_mips=down.get("num_mips"), factor=down.get("factor"),
                memory_target=down.get("memory", MEMORY_TARGET), bounds=self.written.get(name),
                shown_as=layers[name], grow=True,
                replace_levels=name != "image" and f"downsample {name}" in self.overwrite)
        except LevelsInTheWay as err:  # a file has no --mip: its ways out are its own
            other = ("leave image out of downsample.layers (the run does not replace the "
                     "levels of an input)" if name == "image" else
                     f"pass --overwrite to make the {name}'s levels again")
            raise _in_key(p.source, "downsample", InputError(
                f"{err.problem}: {err.fix}, or {other}")) from None
        except InputError as err:
            raise _in_key(p.source, "downsample", err) from None
        self.plan.lines.append(f"downsample {name}: {dplan.describe()}")
        if name == "segmentation":
            self.segmentation_mips = dplan
        # the region the run wrote, grown to whole tasks: beyond it they meet chunks never
        # written, which are zeros
        partial = self._writes_part_of(name, path)
        dplan.layer_path = layers[name]
        source = next((s.key for s in self.plan.stages if s.layer == dplan.layer_path
                       and s.name in ("inference", "remap")), "")
        stage = downsample_stage(dplan, source_key=source, label=f"downsample {name}",
                                 fill_missing=down.get("fill_missing", False) or partial,
                                 sparse=down.get("sparse", False),
                                 needs=("remap",) if name == "segmentation" else ())
        stage.starts_over = name == "segmentation" and self.segmentation_redone
        self.add(stage, "downsample")

    def objects(self, product: str) -> None:
        """The mesh or skeleton stages, once the segmentation and the mips they read exist."""
        from deepem3d.stages.meshes import mesh_stages, plan_meshes
        from deepem3d.stages.skeletons import plan_skeletons, skeleton_stages

        p, plan = self.p, self.plan
        downsampled = next((s for s in plan.stages if s.label == "downsample segmentation"),
                           None)
        wants_mips = "segmentation" in (p.downsample.get("layers") or [])
        ready = self.segmentation_ready and (
            not wants_mips or (downsampled is not None and downsampled.is_complete()))
        path = plan.layers["segmentation"]
        if not ready:
            if not self.dry_run:  # planned once they exist (run_pipeline has planned it on
                return  # a stand-in with the planned mip levels before anything ran)
            path = self._segmentation_with_planned_mips(wants_mips)
        options = dict(getattr(p, product))
        options.pop("queue", None)
        planner, stages = ((plan_meshes, mesh_stages) if product == "meshes"
                           else (plan_skeletons, skeleton_stages))
        # igneous's tasks cover the whole layer: beyond a part the run segmented they meet
        # chunks never written, which a MeshTask reads as 0 when told; a SkeletonTask cannot
        # (CloudVolume 12.15's fill_missing fails in its renumbering), so that is refused
        if self._writes_part_of("segmentation", path):
            if product == "skeletons":
                raise InputError(
                    f"{p.source}: skeletons: the run segments "
                    f"{format_bounds(self.written['segmentation'])} of the "
                    "layer, and skeletons are made of the whole layer, whose other chunks it "
                    "never writes: segment the whole image (no bounds), or drop the "
                    "skeletons product")
            options["fill_missing"] = True
        try:
            oplan = planner(path, **options)
        except InputError as err:
            raise _in_key(p.source, product, err) from None
        oplan.layer_path = plan.layers["segmentation"]
        # a segmentation made again deletes its products too; one --overwrite keeps (of the
        # same settings and map) keeps them, and its products are checked as without it
        if "segmentation" not in self.overwrite or not self.segmentation_redone:
            try:
                oplan.check_products()
            except InputError as err:
                raise _in_key(p.source, product, err) from None
        plan.lines.append(f"{product}: {oplan.describe()}")
        source = next((s.key for s in plan.stages if s.name == "remap"), "")
        for stage in stages(oplan, source_key=source, needs=("remap",)):
            # made again: of a segmentation redone, or of its levels replaced (a dry run's count)
            stage.starts_over = self.segmentation_redone or bool(
                self.segmentation_mips is not None and self.segmentation_mips.replaced_levels
                and oplan.mip > self.segmentation_mips.mip)
            self.add(stage, product)

    def _writes_part_of(self, name: str, path: str) -> bool:
        """Whether the run writes only part of layer `name` (at `path`, or a copy of its
        geometry): igneous's tasks over the whole layer meet chunks it never writes."""
        from deepem3d.storage.layers import open_layer

        return name in self.written and self.written[name] != open_layer(path).bounds

    def _segmentation_with_planned_mips(self, wants_mips: bool) -> str:
        """An info-only copy of the segmentation (or its stand-in) with the mip levels its
        downsampling plan adds (dry run): meshes and skeletons are planned on it."""
        from deepem3d.storage.layers import open_layer

        path = f"file://{self.scratch_dir()}/segmentation-with-mips"
        source = open_layer(self.segmentation_stand_in or self.plan.layers["segmentation"])
        vol = open_layer(path, info=source.info)
        dplan = self.segmentation_mips if wants_mips else None
        if dplan and dplan.replaced_levels:  # the levels it makes, not those it removes
            vol.info["scales"] = vol.info["scales"][:dplan.mip + 1]
        base = [float(r) for r in source.resolution]
        for resolution in dplan.new_resolutions if dplan else ():
            factor = [round(float(r) / b) for r, b in zip(resolution, base)]
            if not any(s["resolution"] == list(resolution) for s in vol.info["scales"]):
                vol.add_scale(factor)
        vol.commit_info()
        self.stand_ins[path] = self.plan.layers["segmentation"]
        return path


def _stand_in(folder: str, name: str, plan) -> str:
    """An empty layer of the geometry a planned layer will have (for --dry-run's plans of the
    stages after it); only its info is written, in a temporary folder."""
    from deepem3d.storage.layers import create_layer

    path = f"file://{folder}/{name}"
    if name == "map":  # with the provenance the run records: the segmentation's checks read it
        from deepem3d.stages.inference import provenance

        create_layer(path, layer_type="image", dtype=plan.dtype, resolution=plan.resolution,
                     size=plan.size, voxel_offset=plan.voxel_offset,
                     chunk_size=plan.chunk_size, num_channels=plan.channels,
                     sharding=plan.sharding, provenance=provenance(plan))
    else:
        create_layer(path, layer_type="segmentation", dtype="uint64",
                     resolution=plan.resolution, size=plan.size,
                     voxel_offset=plan.voxel_offset, chunk_size=plan.chunk_size,
                     sharding=plan.sharding)
    return path


def describe_costs(plan: RunPlan) -> list[str]:
    """--dry-run's table: per stage, its tasks and those still to run (a resumed run's done
    ones left out), the largest task's memory, the hours of those to run and output bytes."""
    rows = [f"{'stage':<24}{'tasks':>8}{'to run':>8}{'largest task':>14}{'hours':>10}  "
            f"{'on':<5}{'output':>12}  queue"]
    for stage in plan.stages:
        to_run = stage.tasks_to_run()
        hours = to_run * stage.seconds_per_task / 3600
        unit = "GPU" if stage.hardware == "gpu" else "core"
        rows.append(f"{stage.label:<24}{stage.task_count:>8}{to_run:>8}"
                    f"{format_bytes(stage.memory_bytes):>14}{hours:>10.3g}  {unit:<5}"
                    f"{format_bytes(stage.output_bytes):>12}  {plan.routes[stage.label]}")
    return rows


def evaluated_region(p: Pipeline, gt_bounds: Bbox) -> Bbox:
    """Where the score is taken: `evaluate.bounds`, else the ground truth within the
    segmentation's bounds (all of the ground truth when the whole map is segmented)."""
    if p.evaluate.get("bounds"):
        return _bbox(p.evaluate["bounds"])
    segmented = _bbox(p.segmentation.get("bounds"))
    return Bbox.intersection(gt_bounds, segmented) if segmented is not None else gt_bounds


def check_scoring(p: Pipeline, ground_truth: str, map_bounds: Bbox,
                  map_resolution: Sequence[float]) -> None:
    """Before anything runs: the ground truth holds labels at the map's voxel size (at any of
    its mips: `deepem3d evaluate`'s rule), and the region scored lies inside it and the region
    segmented (a late OutOfBoundsError would come after hours)."""
    from deepem3d.storage.labels import mip_at, open_labels, resolutions_held

    try:
        gt = open_labels(ground_truth, "ground_truth")
    except InputError as err:
        raise _in_key(p.source, "ground_truth", err) from None
    gt_mip = mip_at(gt, map_resolution)
    if gt_mip is None:
        raise InputError(f"{p.source}: ground_truth: its voxels are {resolutions_held(gt)} nm "
                         f"and the segmentation's will be {format_triple(map_resolution)} nm: "
                         "score at one voxel size (a ground truth of the image's mip, or "
                         "inference.mip)")
    gt.mip = gt_mip
    region = evaluated_region(p, gt.bounds)
    key = "evaluate.bounds" if p.evaluate.get("bounds") else "ground_truth"
    if np.any(np.asarray(region.size3()) <= 0):
        raise InputError(f"{p.source}: {key}: the ground truth ({format_bounds(gt.bounds)}) "
                         "and the region segmented do not overlap: nothing to score")
    inside = [("the ground truth", gt.bounds), ("the map", map_bounds)]
    if p.segmentation.get("bounds"):
        inside.append(("segmentation.bounds", _bbox(p.segmentation["bounds"])))
    for name, box in inside:
        if not box.contains_bbox(region):
            raise InputError(
                f"{p.source}: {key}: {format_bounds(region)} reach outside {name} "
                f"({format_bounds(box)}): give evaluate.bounds inside it")


def score(p: Pipeline, layers: dict[str, str]) -> dict:
    """Adapted Rand error and VOI of the segmentation against the ground truth, over
    `evaluated_region` (checked before the run by check_scoring), as `deepem3d evaluate`
    scores them: block by block, a missing chunk an error."""
    from cloudvolume import CloudVolume

    from deepem3d.stages.scoring import score_layers
    from deepem3d.storage.labels import mip_at

    seg = CloudVolume(layers["segmentation"], progress=False)
    gt = CloudVolume(layers["ground_truth"], progress=False)
    gt.mip = mip_at(gt, seg.resolution)  # the mip check_scoring found
    region = evaluated_region(p, gt.bounds)
    x0, y0, z0, x1, y1, z1 = (int(v) for v in (*region.minpt, *region.maxpt))
    # (--overwrite keeps a segmentation of the same settings and map: its remap, run again,
    # writes every chunk again)
    _, result = score_layers(seg, gt, region, progress=False, missing_hint=(
        f"its tasks are marked done: was a chunk deleted? delete "
        f"{layers['segmentation']}/tasks/remap/ and run the same command again, whose remap "
        "writes it again"))
    return {"adapted_rand_error": result["adapted_rand_error"],
            "voi_split": result["voi_split"], "voi_merge": result["voi_merge"],
            "evaluated_bounds": [x0, y0, z0, x1, y1, z1]}


def run_pipeline(
    p: Pipeline, *, parallel: int | None, overwrite: bool = False,
    echo: Callable[[str], None] = print, progress: bool = True, lease_seconds: int = 60,
) -> dict:
    """Plan and run every stage (planning again where a layer had to exist first), then write
    and return the report."""
    from cloudfiles import CloudFiles

    from deepem3d.run.runner import Runner

    local_queues = None
    if add_local_queue(p):  # nobody else would drain a queue the file does not name; the
        if not parallel:  # queues it names have their workers elsewhere (a GPU pool)
            local_queues = {p.queues["default"].url}
        parallel = parallel or 1
    check_queues(p)  # before the sample or any layer is written
    # every stage planned now, the later ones on stand-ins of the layers they read: a problem
    # of the last stage (a layer too small for its mip levels) is refused before the first runs
    plan_run(p, overwrite=overwrite, dry_run=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    stage_began: dict[str, float | None] = {}
    routes: dict[str, str] = {}
    runner = Runner(lambda stage: routes[stage.label], parallel=parallel, echo=echo,
                    progress=progress, log_path=_log_path(p), lease_seconds=lease_seconds,
                    keep_workers=True,  # stopped below, once every stage has run
                    local_queues=local_queues)
    try:  # a report cut short by a stop while it was written is as good as none
        previous = CloudFiles(p.output).get_json(REPORT)
    except ValueError:
        previous = None
    previous = previous if isinstance(previous, dict) else {}
    began = previous.get("stage_began") if isinstance(previous.get("stage_began"), dict) else None
    previous = previous.get("stage_seconds") or {}
    done: set[str] = set()
    shown: set[tuple[str, str]] = set()
    replace = set(OVERWRITE) if overwrite else set()
    plan = None
    try:
        while True:
            plan = plan_run(p, overwrite=replace)
            todo = [s for s in plan.stages if s.label not in done]
            if not todo:
                break
            if not done:
                for warning in plan.warnings:
                    warn(warning)
            for line in plan.lines:
                if _shown_as(line) not in shown:
                    echo(line)
                    shown.add(_shown_as(line))
            routes.update(plan.routes)
            for summary in runner.run(todo):
                seconds[summary.label] = _stage_seconds(summary, previous, began)
                stage_began[summary.label] = summary.began
                done.add(summary.label)
            # what this run has planned is not replaced again when it plans the next stages
            replace -= {s.label if s.name.startswith("downsample") else
                        "inference" if s.name == "inference" else "segmentation" for s in todo}
    finally:
        runner.stop_workers()
    report = {"stage_seconds": seconds, "stage_began": stage_began,
              "seconds": round(time.perf_counter() - started, 3),
              "layers": plan.layers, "pipeline": p.source, "output": p.output}
    if p.ground_truth:
        report.update(score(p, plan.layers))
    put_json_whole(p.output, REPORT, report)
    return report


def _stage_seconds(summary: StageSummary, previous: dict, began: dict | None) -> float:
    """A stage's seconds for the report. A stage finished by an earlier invocation keeps the
    seconds it took then: the earlier report's, or its tasks' span where that invocation wrote
    none (stopped), or where the report timed another run of the stage (a run --overwrite
    stopped before its report: the report is of the run before). `began`: when each stage the
    earlier report timed began (None: an older report, which does not say)."""
    if summary.ran:
        return round(summary.seconds, 3)
    took = previous.get(summary.label)
    if (not isinstance(took, int | float) or isinstance(took, bool)
            or (began is not None and began.get(summary.label) != summary.began)):
        took = summary.span
    return round(took, 3)


def _shown_as(line: str) -> tuple[str, str]:
    """A plan's lines less the last clause of the first, which says what the plan does with
    what is there: planned again within one run, the segmentation's "computing every stage"
    became "resuming: finished tasks are skipped" and was printed a second time."""
    first, _, rest = line.partition("\n")
    return first.rsplit("; ", 1)[0], rest


def check_queues(p: Pipeline, *, warn_only: bool = False) -> None:
    """Each queue the file names exists and answers (an SQS lookup); a one-line InputError
    that names its key otherwise (with `warn_only`, as for a dry run that sizes the queues'
    pools before they are made, a warning)."""
    from deepem3d.run.queues import check_queue

    for name, queue in p.queues.items():
        try:
            check_queue(queue.url)
        except InputError as err:
            if not warn_only:
                raise InputError(f"{p.source}: queues.{name}: {err}") from None
            warn(f"{p.source}: queues.{name}: {err}")


def describe_scores(report: dict) -> str:
    """The report's scores in one line, as `deepem3d run` and `deepem3d demo` print them."""
    b = report["evaluated_bounds"]
    return (f"adapted Rand error {report['adapted_rand_error']:.4f}, VOI split "
            f"{report['voi_split']:.3f} / merge {report['voi_merge']:.3f} bits on sections "
            f"{b[2]}..{b[5] - 1}")


def _log_path(p: Pipeline) -> str | None:
    if p.output.startswith("file://"):
        return f"{p.output[len('file://'):]}/logs/workers.log"
    return None
