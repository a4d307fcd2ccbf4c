"""`deepem3d run PIPELINE`: the whole job from one file, on real layers, queues and workers.

A 128 x 128 x 10 crop of the embedded ISBI 2012 sample goes through the shipped affinity model
(small patches, so that inference is many tasks), the segmentation with the settings the model
records, and downsampling, on two local worker processes. The fault campaign in small (three
workers SIGKILLed in flight, then the runner, then the same command again, on the whole
pipeline to meshes and skeletons) must end with the content of an undisturbed run. A task left
on a queue by a run since replaced by one with other parameters must not write, for every kind
of stage. A bad pipeline file is a one-line error before anything is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox
from taskqueue.queueables import totask

from deepem3d.axes import xyz_from_zyx
from deepem3d.run.runner import execute_here, run_stages
from deepem3d.sample import load_sample
from deepem3d.stages.downsample import downsample_stage, plan_downsample
from deepem3d.stages.frame import Markers, payload_of
from deepem3d.stages.inference import inference_stage
from deepem3d.stages.inference_plan import plan_inference
from deepem3d.stages.segmentation import plan_segment, segment_stages
from deepem3d.storage.layers import create_layer, remove_levels
from tests.conftest import (
    ROOT,
    assert_one_line_error,
    assert_same_mips,
    check_objects,
    cli_here,
    file_digests,
    igneous_reference,
    run_cli,
    start_stage,
)

SHAPE = (128, 128, 10)  # x, y, z
PIPELINE = """\
version: 1
output: {output}
image: {image}
ground_truth: {gt}
products: [map, segmentation, downsample, meshes]
inference:
  model: isbi2012-small-affinity
  patch_size: 64
  patch_output: 32
  overlap: 8
  chunk_size: [32, 32, 2]
  task_shape: [64, 64, 2]
segmentation:
  task_shape: [64, 64, 4]
downsample:
  layers: [segmentation]
meshes:
  mip: 1
evaluate:
  bounds: [0, 0, 6, 128, 128, 10]
"""


@pytest.fixture(scope="module")
def crop_layers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("run")
    image, ids = load_sample()
    out = {}
    for name, array, kind, dtype in [("image", image, "image", "uint8"),
                                     ("gt", ids, "segmentation", "uint64")]:
        cut = array[: SHAPE[2], 100:100 + SHAPE[1], 200:200 + SHAPE[0]].astype(dtype)
        path = f"file://{root / name}"
        vol = create_layer(path, layer_type=kind, dtype=dtype, resolution=(4, 4, 50),
                           size=SHAPE, chunk_size=(64, 64, 10))
        vol[:, :, :] = xyz_from_zyx(cut)
        out[name] = path
    out["root"] = str(root)
    return out


def pipeline_file(folder: Path, layers: dict, output: Path, **replace) -> Path:
    text = PIPELINE.format(output=output, image=layers["image"], gt=layers["gt"])
    for old, new in replace.items():
        text = text.replace(old, new)
    path = folder / f"pipeline-{len(list(folder.glob('pipeline-*')))}.yaml"
    path.write_text(text)
    return path


def test_fault_campaign_of_three_kills_ends_with_the_content_of_an_undisturbed_run(tmp_path):
    """The campaign script, in small: an undisturbed run of the whole pipeline (inference to
    meshes and skeletons, two local workers), then one run in which workers are SIGKILLed in
    flight in three stages and then the runner itself, and the same command started again:
    it must finish with the decoded content of every object of the undisturbed run."""
    result = subprocess.run(
        [sys.executable, "scripts/fault_campaign.py", "--runs", "1", "--kills-per-run", "3",
         "--runner-every", "1", "--crop", "128,128,10", "--lease-seconds", "5",
         "--dir", str(tmp_path), "--keep"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "campaign.json").read_text())
    assert sum(summary["kills_per_stage"].values()) == 3, summary["rows"]
    assert sum(summary["runner_kills"].values()) == 1
    assert summary["failed_runs"] == 0 and summary["differences"] == 0
    assert summary["objects_compared"] == summary["objects_per_run"] > 200
    assert "differences found: 0" in result.stdout
    log = (tmp_path / "run-000" / "logs" / "workers.log").read_text()
    assert "attempt 2)" in log, "a killed worker's task was leased again and redone"

    reference = tmp_path / "reference"
    report = json.loads((reference / "report.json").read_text())
    assert {"stage_seconds", "layers", "adapted_rand_error", "voi_split",
            "voi_merge"} <= set(report)
    assert set(report["layers"]) == {"image", "ground_truth", "map", "segmentation"}
    assert {"inference", "supervoxels", "remap", "downsample segmentation", "mesh forge",
            "mesh merge", "skeleton forge", "skeleton merge"} <= set(report["stage_seconds"])
    assert 0 <= report["adapted_rand_error"] < 1
    out = (tmp_path / "reference.out").read_text()
    assert "stage remap:" in out and "largest task peak" in out
    # planned again after each stage: each plan printed once (not again as "resuming")
    assert out.count(" region-graph edges per voxel") == 1, out
    # meshes and skeletons are made at mip 2, where a thin end of a segment may be lost to the
    # downsampling (measured: up to 3.1 voxels of mip 2 on this crop); the crop is 0.5 micron
    # thick, so many segments are too short for a skeleton
    check_objects(f"file://{reference / 'segmentation'}", min_voxels=2000, slack=4.0,
                  skeleton_share=0.25)
    mips = {p.name for p in (reference / "segmentation").iterdir() if p.name[0].isdigit()}
    assert {"4_4_50", "8_8_50", "16_16_50"} <= mips


def test_stale_tasks_of_every_stage_kind_refuse_to_write(tmp_path, crop_layers):
    """A queued task of a run since replaced (--overwrite with other parameters) must not
    write into the new run's layer: inference, a segmentation stage, downsampling."""
    image = crop_layers["image"]

    # inference: the old run's task, then a run with another TTA takes the layer over
    output = f"file://{tmp_path / 'map'}"
    kwargs = dict(models=["isbi2012-small-affinity"], chunk_size=(32, 32, 2),
                  task_shape=(64, 64, 2))
    old = start_stage(inference_stage(plan_inference(image, output, **kwargs)))[0][1]
    new = inference_stage(plan_inference(image, output, tta=8, overwrite=True, **kwargs))
    new.prepare()
    new.start()
    totask(payload_of(old)).execute()
    assert new.markers.done_ids() == set()
    assert not list((tmp_path / "map").glob("4_4_50/*")), "the stale task wrote chunks"

    # a segmentation stage: supervoxels of sigma 0, then the same map with sigma 1
    seg = f"file://{tmp_path / 'seg'}"
    map_layer = f"file://{tmp_path / 'smoothable'}"
    vol = create_layer(map_layer, layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                       size=SHAPE, chunk_size=(32, 32, 5), num_channels=1)
    vol[:, :, :] = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    first = segment_stages(plan_segment(map_layer, seg, method="watershed", threshold=0.2,
                                        task_shape=(64, 64, 5)))
    for stage in first[:2]:
        start_stage(stage)
    stale = start_stage(first[2])[0][1]  # a supervoxel task, queued
    second = segment_stages(plan_segment(map_layer, seg, method="watershed", threshold=0.2,
                                         task_shape=(64, 64, 5), sigma=1.0, overwrite=True))
    second[0].prepare()
    for stage in second[:3]:
        stage.start()
    totask(payload_of(stale)).execute()
    assert second[2].markers.done_ids() == set()
    assert not list(CloudFiles(seg).list(prefix="segmentation/labels/")), "stale labels"

    # downsampling: a layer rewritten by another run makes its downsampling another run
    layer = f"file://{tmp_path / 'labels'}"
    vol = create_layer(layer, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 50),
                       size=SHAPE, chunk_size=(32, 32, 5))
    vol[:, :, :] = np.arange(np.prod(SHAPE), dtype=np.uint64).reshape(SHAPE)
    plan = plan_downsample(layer, num_mips=1)
    stale = start_stage(downsample_stage(plan, source_key="run 1"))[0][1]
    fresh = downsample_stage(plan, source_key="run 2")
    fresh.start()
    totask(payload_of(stale)).execute()
    assert fresh.markers.done_ids() == set()
    assert not list((tmp_path / "labels").glob("8_8_50/*")), "the stale task wrote mip 1"
    start_stage(fresh)  # the current run's tasks do write
    for task in fresh.tasks():
        totask(payload_of(task)).execute()
    assert fresh.is_complete() and list((tmp_path / "labels").glob("8_8_50/*"))


@pytest.mark.parametrize("case, replace, fragments", [
    ("unknown key", {"products:": "colour: red\nproducts:"}, ["colour", "unknown key"]),
    ("missing layer", {"image: file://": "image: file:///nowhere/"},
     ["image: no precomputed layer"]),
    ("no such model", {"model: isbi2012-small-affinity": "model: no-such-model"},
     ["inference.model", "no-such-model"]),
    ("threshold", {"segmentation:\n": "segmentation:\n  method: mean\n  threshold: 1.5\n"},
     ["segmentation.threshold", "outside [0, 1]"]),
    ("product needs another", {"products: [map, segmentation, downsample, meshes]":
                               "products: [segmentation, downsample, meshes]"},
     ["products", "segmentation needs a map"]),
    ("task shape off the grid", {"task_shape: [64, 64, 2]": "task_shape: [48, 64, 2]"},
     ["inference", "task_shape 48,64,2 is not a multiple"]),
    ("undefined queue", {"segmentation:\n": "segmentation:\n  queue: highmem\n"},
     ["segmentation.queue", "highmem"]),
    ("version", {"version: 1": "version: 7"}, ["version"]),
    ("edges per voxel", {"segmentation:\n": "segmentation:\n  edges_per_voxel: 5\n"},
     ["segmentation.edges_per_voxel", "(0, 3]"]),
    ("task memory", {"segmentation:\n": "segmentation:\n  max_task_memory: lots\n"},
     ["segmentation.max_task_memory", "24GiB"]),
    ("sharded", {"segmentation:\n": "segmentation:\n  sharded: yes please\n"},
     ["segmentation.sharded", "true or false"]),
    ("version true", {"version: 1": "version: true"}, ["version", "True"]),
    ("version 1.0", {"version: 1": "version: 1.0"}, ["version", "1.0"]),
    ("no model", {"model: isbi2012-small-affinity": "model: []"},
     ["inference.model", "an empty list"]),
    ("a product twice", {"products: [map, ": "products: [map, map, "},
     ["products", "map is listed twice"]),
    ("downsample options, no downsampling", {
        "products: [map, segmentation, downsample, meshes]": "products: [map, segmentation]",
        "  layers: [segmentation]\n": "  num_mips: 2\n", "meshes:\n  mip: 1\n": ""},
     ["downsample", "not among the products"]),
    ("dust past int64", {"segmentation:\n": f"segmentation:\n  dust_size: {2**64}\n"},
     ["segmentation.dust_size", "from 0 to"]),
    ("threads past a C int", {"model: isbi2012-small-affinity": "model: "
                              f"isbi2012-small-affinity\n  threads: {2**64}"},
     ["inference", "threads", "from 1 to 2147483647"]),
    ("a patch past any device", {"patch_size: 64": f"patch_size: {16 * 2**60}"},
     ["inference", "patch size", "at most 32768"]),
    ("skeleton dust past int64", {"meshes]": "meshes, skeletons]", "meshes:\n  mip: 1\n":
                                  f"meshes:\n  mip: 1\nskeletons:\n  dust_threshold: {2**64}\n"},
     ["skeletons.dust_threshold", "from 0 to"]),
    ("a flag not true or false", {"model: isbi2012-small-affinity": "model: "
                                  "isbi2012-small-affinity\n  fill_missing: 'no'"},
     ["inference.fill_missing", "true or false"]),
    ("downsample flag", {"  layers: [segmentation]\n": "  layers: [segmentation]\n  sparse: 1\n"},
     ["downsample.sparse", "true or false"]),
    ("not a number", {"task_shape: [64, 64, 2]": "task_shape: [.nan, 64, 2]"},
     ["inference.task_shape", "expected a list of 3 numbers"]),
    ("a fraction of a voxel", {"task_shape: [64, 64, 2]": "task_shape: [64.5, 64, 2]"},
     ["inference.task_shape", "whole numbers"]),
    ("past int32", {"task_shape: [64, 64, 2]": "task_shape: [64, 64, 2]\n  bounds: "
                    "[0, 0, 0, 3000000000, 64, 2]"}, ["inference.bounds", "at most"]),
    ("a negative mip", {"task_shape: [64, 64, 2]": "task_shape: [64, 64, 2]\n  mip: -1"},
     ["inference.mip", "0 or more"]),
    ("a queue that is a list", {"segmentation:\n": "segmentation:\n  queue: [a]\n"},
     ["segmentation.queue", "expected the name"]),
    ("an empty queue name", {"segmentation:\n": "segmentation:\n  queue: ''\n"},
     ["segmentation.queue", "expected the name"]),
    ("a layer that is a list", {"  layers: [segmentation]\n": "  layers: [[segmentation]]\n"},
     ["downsample.layers", "unknown layer"]),
    ("sharded blocks", {"chunk_size: [32, 32, 2]": "chunk_size: [32, 16, 2]\n  sharded: true"},
     ["inference", "sharded", "same power-of-two number of chunks"]),
    ("a key twice", {"segmentation:\n": "segmentation:\n  method: mean\nsegmentation:\n"},
     ["key 'segmentation' given twice"]),
    ("tta true", {"model: isbi2012-small-affinity": "model: isbi2012-small-affinity\n  tta: true"},
     ["inference.tta", "True"]),
    ("empty bounds", {"task_shape: [64, 64, 2]": "task_shape: [64, 64, 2]\n  bounds: "
                      "[0, 0, 2, 64, 64, 2]"}, ["inference.bounds", "must exceed"]),
    ("score outside the ground truth", {"[0, 0, 6, 128, 128, 10]": "[0, 0, 6, 128, 128, 12]"},
     ["evaluate.bounds", "reach outside the ground truth"]),
    ("score outside the segmentation", {"segmentation:\n": "segmentation:\n  bounds: "
                                        "[0, 0, 0, 64, 64, 10]\n"},
     ["evaluate.bounds", "reach outside segmentation.bounds"]),
    ("keys of two types", {"segmentation:\n": "1: 2\nsegmentation:\n"}, ["1: unknown key"]),
    ("the root as output", {"output: ": "output: /\n#"}, ["output", "names no folder"]),
    ("an empty ground truth", {"ground_truth: file://": "ground_truth: ''  # file://"},
     ["ground_truth", "expected a path"]),
    ("sigma true", {"segmentation:\n": "segmentation:\n  sigma: true\n"},
     ["segmentation.sigma", "True"]),
    ("a layer downsampled twice", {"  layers: [segmentation]\n":
                                   "  layers: [segmentation, segmentation]\n"},
     ["downsample.layers", "segmentation is listed twice"]),
    ("a negative queue size", {"evaluate:\n": "queues:\n  big: {url: sqs://big, min_memory: "
                               "-1}\nevaluate:\n"}, ["queues.big.min_memory", "give bytes"]),
    ("a section without its product", {"products: [map, segmentation, downsample, meshes]":
                                       "products: [map]"},
     ["segmentation: given, but `segmentation` is not among the products"]),
    ("a queue no stage goes to", {"evaluate:\n": "queues:\n  inferance: sqs://gpu\nevaluate:\n"},
     ["queues.inferance", "no stage goes to it"]),
    ("aliases of aliases", {"version: 1": "version: 1\na0: &a0 [1, 1, 1, 1, 1, 1, 1, 1]\n"
                            + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]\n"
                                      for i in range(1, 8)),
        "task_shape: [64, 64, 2]": "task_shape: *a7"}, ["aliases expand to more than"]),
    ("a number past a float", {"task_shape: [64, 64, 2]": f"task_shape: [{'9' * 400}, 64, 2]"},
     ["inference.task_shape", "expected a list of 3 numbers"]),
    ("a threshold past a float", {"segmentation:\n": "segmentation:\n  method: mean\n  "
                                  f"threshold: {'9' * 400}\n"}, ["segmentation.threshold"]),
    ("a threshold in quotes", {"segmentation:\n": "segmentation:\n  threshold: '0.5'\n"},
     ["segmentation.threshold", "'0.5' is not a number"]),  # was 'outside [0, 1]'
    ("an image that is a number", {"image: ": "image: 5\n#"},
     ["image", "5 is not a path"]),  # was 'missing'
    ("a size past a float", {"segmentation:\n": "segmentation:\n  max_task_memory: "
                             f"{'9' * 400}\n"}, ["segmentation.max_task_memory", "24GiB"]),
    ("a length past a float", {"meshes]": "meshes, skeletons]", "meshes:\n  mip: 1\n":
                               f"meshes:\n  mip: 1\nskeletons:\n  min_cable_nm: {'9' * 400}\n"},
     ["skeletons.min_cable_nm", "length in nm"]),
    ("nested too deeply", {"segmentation:\n": f"x: {'[' * 5000}{']' * 5000}\nsegmentation:\n"},
     ["not valid YAML", "nested too deeply"]),
    ("a NUL in a path", {"evaluate:\n": 'map: "a\\0b"\nevaluate:\n'},
     ["not valid YAML", "NUL character"]),
])
def test_a_bad_pipeline_file_is_one_line_before_anything_is_written(
        tmp_path, crop_layers, case, replace, fragments):
    output = tmp_path / "out"
    pipeline = pipeline_file(tmp_path, crop_layers, output, **replace)
    result = run_cli("run", pipeline, "--parallel", "1")
    assert_one_line_error(result, *fragments)
    assert not output.exists(), f"{case}: the run wrote something"


def test_a_run_over_the_sample_leaves_another_layer_at_its_place_alone(tmp_path):
    """A run over `sample:isbi2012` writes the sample at OUTPUT/image and OUTPUT/ground_truth:
    a layer there that the sample did not write was replaced without --overwrite (and used as
    the image when both were there)."""
    output = tmp_path / "out"
    mine = create_layer(f"file://{output / 'image'}", layer_type="image", dtype="uint8",
                        resolution=(4, 4, 40), size=(64, 64, 8), chunk_size=(64, 64, 8))
    mine[:, :, :] = np.full((64, 64, 8), 7, dtype=np.uint8)
    info = (output / "image" / "info").read_text()
    pipeline = tmp_path / "sample.yaml"
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: sample:isbi2012\n"
                        "products: [map]\ninference: {bounds: [0, 0, 0, 128, 128, 10]}\n")
    for extra in (("--dry-run",), ("--parallel", "1")):
        assert_one_line_error(run_cli("run", pipeline, *extra), f"{output / 'image'}",
                              "did not write", "--overwrite")
    assert (output / "image" / "info").read_text() == info
    assert not (output / "ground_truth").exists()
    # both places taken by other layers: --overwrite writes the sample there (it ran inference
    # on the other image, then refused again)
    shutil.copytree(output / "image", output / "ground_truth")
    run_cli("run", pipeline, "--parallel", "1", "--overwrite", check=True)
    info = json.loads((output / "image" / "info").read_text())
    assert info["scales"][0]["size"] == [512, 512, 30]


def test_a_run_over_the_sample_runs_again_and_names_the_layers_it_writes(tmp_path):
    """A second run over `sample:isbi2012` (the demo's resume) was refused: the check before
    the run compared the map's recorded image with the sample's temporary copy; a planning
    error named that deleted copy instead of the run's image."""
    output = tmp_path / "out"
    pipeline = tmp_path / "sample.yaml"
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: sample:isbi2012\n"
                        "products: [map]\ninference: {bounds: [0, 0, 0, 128, 128, 2]}\n")
    run_cli("run", pipeline, "--parallel", "1", check=True)
    first = json.loads((output / "report.json").read_text())["stage_seconds"]["inference"]
    (output / "report.json").unlink()  # as a run stopped after its stages, before its report
    assert "(0 run now)" in run_cli("run", pipeline, "--parallel", "1", check=True).stdout
    # the stage keeps the time its tasks took then (it was this invocation's ~0 s)
    again = json.loads((output / "report.json").read_text())["stage_seconds"]["inference"]
    assert 0.2 < again <= first, (again, first)
    run_cli("run", pipeline, "--dry-run", check=True)
    fresh = tmp_path / "mip.yaml"
    fresh.write_text(f"version: 1\noutput: {tmp_path / 'o'}\nimage: sample:isbi2012\n"
                     "products: [map]\ninference: {mip: 5}\n")
    for extra in (("--dry-run",), ("--parallel", "1")):
        result = run_cli("run", fresh, *extra)
        assert_one_line_error(result, f"{tmp_path / 'o'}/image", "mip 5")
        assert "dry-run" not in result.stderr, result.stderr


def test_a_sample_cut_short_is_written_again_and_layers_at_its_place_are_not_inputs(
        tmp_path, crop_layers):
    """A run stopped while it wrote the sample left a layer with some of its chunks, which
    every later run took as written; a layer at the sample's place given as an input is
    refused (with --overwrite the sample replaced it); a ground truth at another voxel size
    than the segmentation's is refused before the run."""
    from deepem3d.run.pipeline import load_pipeline
    from deepem3d.run.plan import sample_layers

    output = tmp_path / "out"
    run_cli("sample", output, check=True)
    chunk = next((output / "ground_truth" / "4_4_50").iterdir())
    chunk.unlink()
    pipeline = tmp_path / "sample.yaml"
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: sample:isbi2012\n"
                        "products: [map]\n")
    assert sample_layers(load_pipeline(str(pipeline)), write=False)[1] is False
    sample_layers(load_pipeline(str(pipeline)), write=True)
    assert chunk.exists()
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: sample:isbi2012\n"
                        f"ground_truth: {output / 'ground_truth'}\n"
                        "products: [map, segmentation]\n")
    for extra in (("--dry-run",), ("--overwrite", "--parallel", "1")):
        assert_one_line_error(run_cli("run", pipeline, *extra), "ground_truth",
                              "which this run writes")
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: sample:isbi2012\n"
                        f"products: [map]\nqueues:\n  default: fq://{output}/map/queue\n")
    assert_one_line_error(run_cli("run", pipeline, "--dry-run"), "queues.default",
                          f"lies in file://{output}/map, which this run writes")
    coarse = f"file://{tmp_path / 'coarse_gt'}"
    create_layer(coarse, layer_type="segmentation", dtype="uint64", resolution=(8, 8, 50),
                 size=SHAPE, chunk_size=(64, 64, 10))[:, :, :] = np.ones(SHAPE, np.uint64)
    other = pipeline_file(tmp_path, crop_layers, tmp_path / "o",
                          **{f"ground_truth: {crop_layers['gt']}": f"ground_truth: {coarse}"})
    assert_one_line_error(run_cli("run", other, "--dry-run"), "ground_truth",
                          "8,8,50 nm and the segmentation's will be 4,4,50 nm")
    assert not (tmp_path / "o").exists()


def test_overwrite_redoes_what_changed_and_the_products_made_of_it(tmp_path, crop_layers):
    """--overwrite makes a segmentation of other settings again, with its levels', meshes' and
    skeletons' markers deleted (the dry run counted those stages' old markers as done), and
    keeps one of the same settings (it made the whole octree again); a segmentation kept
    whose levels another factor replaces has its meshes of those levels made again."""
    output = tmp_path / "out"
    labels = ("inference", "remap", "downsample segmentation", "mesh forge", "mesh merge")

    def rows(dry: str) -> dict[str, list[str]]:  # label -> [tasks, to run]
        return {line[:24].strip(): line[24:].split()[:2] for line in dry.splitlines()
                if line[:24].strip() in labels}

    run_cli("run", pipeline_file(tmp_path, crop_layers, output), "--parallel", "1", check=True)
    again = run_cli("run", pipeline_file(tmp_path, crop_layers, output), "--parallel", "1",
                    "--overwrite", check=True).stdout
    for label in labels:  # the same settings: nothing made again
        assert f"stage {label}: " in again and f"stage {label}: 0 " not in again, again
        assert "(0 run now)" in again.split(f"stage {label}: ")[1].splitlines()[0], again
    # meshes no run of deepem3d made, under a segmentation --overwrite keeps: refused when
    # the run is planned (the forge's prepare refused them, after the stages before it ran)
    tasks, aside = output / "segmentation" / "tasks", tmp_path / "aside"
    for name in ("mesh-forge", "mesh-merge"):
        shutil.move(tasks / name, aside / name)
    assert_one_line_error(
        run_cli("run", pipeline_file(tmp_path, crop_layers, output), "--dry-run",
                "--overwrite"), "meshes: ", "holds files that no mesh run of deepem3d made")
    for name in ("mesh-forge", "mesh-merge"):
        shutil.move(aside / name, tasks / name)
    # meshes of one task shape at either factor's mip 1: their forge's key stays the same
    tuned = {"segmentation:\n": "segmentation:\n  method: mean\n  threshold: 0.3\n",
             "  mip: 1\n": "  mip: 1\n  task_shape: [32, 32, 4]\n"}
    retuned = pipeline_file(tmp_path, crop_layers, output, **tuned)
    counted = rows(run_cli("run", retuned, "--dry-run", "--overwrite", check=True).stdout)
    assert counted["inference"][1] == "0", counted
    for label in labels[1:]:
        assert counted[label][0] == counted[label][1] != "0", (label, counted)
    redo = run_cli("run", retuned, "--parallel", "1", "--overwrite", check=True).stdout
    for label in labels[2:]:
        tasks = counted[label][0]
        assert f"stage {label}: {tasks} task(s) ({tasks} run now)" in redo, (label, redo)
    meshes = file_digests(output / "segmentation" / "mesh")
    factor = pipeline_file(tmp_path, crop_layers, output, **tuned, **{
        "  layers: [segmentation]\n": "  layers: [segmentation]\n  factor: [2, 1, 2]\n"})
    dry = run_cli("run", factor, "--dry-run", "--overwrite", check=True).stdout
    counted = rows(dry)
    assert counted["remap"][1] == "0" and "replacing the levels there, 8_8_50" in dry, dry
    for label in labels[2:]:
        assert counted[label][0] == counted[label][1] != "0", (label, counted)
    replaced = time.time()
    redo = run_cli("run", factor, "--parallel", "1", "--overwrite", check=True).stdout
    assert "(0 run now)" in redo.split("stage remap: ")[1].splitlines()[0], redo
    # the old level's mesh fragments are gone, not taken into the new merge
    old = [p for p in (output / "segmentation" / "mesh").rglob("*")
           if p.is_file() and p.stat().st_mtime < replaced]
    assert not old, old
    for label in labels[2:]:
        tasks = counted[label][0]
        assert f"stage {label}: {tasks} task(s) ({tasks} run now)" in redo, (label, redo)
    assert sorted(p.name for p in (output / "segmentation").iterdir()
                  if p.name[0].isdigit()) == ["16_4_200", "4_4_50", "8_4_100"]
    assert file_digests(output / "segmentation" / "mesh") != meshes  # of the 8,4,100 nm level
    vol = CloudVolume(f"file://{output / 'segmentation'}", progress=False)
    assert vol.info["mesh"] == "mesh" and vol.mesh.meta.mip == 1
    assert list(vol.meta.resolution(1)) == [8, 4, 100]
    assert len(vol.mesh.get(int(np.unique(vol[:, :, :])[-1]))) > 0
    # a chunk deleted from a segmentation --overwrite keeps: the hint's way out writes it again
    # (it said to run with --overwrite, which kept the segmentation and stopped on it again)
    chunks = output / "segmentation" / "4_4_50"
    written = file_digests(chunks)
    (chunks / "96-128_96-128_8-10.gz").unlink()
    stopped = run_cli("run", factor, "--parallel", "1", "--overwrite")
    remap = f"file://{output / 'segmentation'}/tasks/remap/"
    assert_one_line_error(stopped, "has missing chunks", f"delete {remap} and run the same "
                          "command again")
    shutil.rmtree(remap.removeprefix("file://"))
    run_cli("run", factor, "--parallel", "1", check=True)
    assert file_digests(chunks) == written


def test_levels_of_another_factor_are_replaced_by_overwrite_for_the_runs_own_layers(
        tmp_path, crop_layers):
    """A pipeline's downsample.factor changed after a run was refused with a way out the file
    lacks (`--mip`), and --overwrite refused it too when the map was kept: the run's own
    layers' levels are now replaced, chunks and scales (no folder of the old level left);
    an input's never are."""
    shutil.copytree(crop_layers["image"].removeprefix("file://"), tmp_path / "image")
    output, image = tmp_path / "out", f"file://{tmp_path / 'image'}"

    def pipeline(layers: str, factor: str) -> Path:
        path = tmp_path / f"p-{len(list(tmp_path.glob('p-*')))}.yaml"
        path.write_text(f"version: 1\noutput: {output}\nimage: {image}\n"
                        "products: [map, downsample]\ninference:\n"
                        "  model: isbi2012-small-affinity\n  patch_size: 64\n"
                        "  patch_output: 32\n  overlap: 8\n  chunk_size: [32, 32, 2]\n"
                        f"downsample:\n  layers: [{layers}]\n  factor: {factor}\n"
                        "  num_mips: 1\n")
        return path

    run_cli("run", pipeline("image, map", "[2, 2, 1]"), "--parallel", "1", check=True)
    mip0 = {p: p.stat().st_mtime_ns for p in (output / "map" / "4_4_50").iterdir()}
    image_files = file_digests(tmp_path / "image" / "8_8_50")
    for extra in ((), ("--overwrite",)):
        assert_one_line_error(
            run_cli("run", pipeline("image, map", "[2, 1, 1]"), "--parallel", "1", *extra),
            f"{image}: mip 1 exists at 8,8,50 nm", "by the factor that made it (factor "
            "2,2,1), or leave image out of downsample.layers")
    changed = pipeline("map", "[2, 2, 2]")
    assert_one_line_error(run_cli("run", changed, "--parallel", "1"),
                          "downsample: file://", "/out/map: mip 1 exists at 8,8,50 nm",
                          "(factor 2,2,1), or pass --overwrite to make the map's levels again")
    dry = run_cli("run", changed, "--dry-run", "--overwrite", check=True).stdout
    assert "replacing the levels there, 8_8_50" in dry, dry
    assert sorted(p.name for p in (output / "map").iterdir()) == [
        "4_4_50", "8_8_50", "info", "provenance", "tasks"]
    run_cli("run", changed, "--parallel", "1", "--overwrite", check=True)
    assert sorted(p.name for p in (output / "map").iterdir()) == [
        "4_4_50", "8_8_100", "info", "provenance", "tasks"]
    assert {p: p.stat().st_mtime_ns for p in mip0} == mip0  # the map itself was kept
    assert file_digests(tmp_path / "image" / "8_8_50") == image_files
    reference = tmp_path / "mip0"
    shutil.copytree(output / "map", reference)
    assert remove_levels(f"file://{reference}", 0) == ["8_8_100"]
    assert not (reference / "8_8_100").exists()
    assert_same_mips(f"file://{output / 'map'}",
                     igneous_reference(reference, tmp_path / "ref", 1, (2, 2, 2)), range(2))


def test_levels_whose_removal_was_stopped_are_made_again_by_the_factor_that_made_them(
        tmp_path, crop_layers, monkeypatch):
    """A run --overwrite of another downsample.factor stopped while it removed the map's
    levels (their chunks gone, the info not yet cut), then the factor put back and the run
    started again without --overwrite: the levels' downsample stage kept the markers of the
    levels it had made, so it ran nothing and the map's mip 1 lacked its chunks."""
    import deepem3d.storage.layers
    from deepem3d.run.pipeline import add_local_queue, load_pipeline
    from deepem3d.run.plan import plan_run

    output = tmp_path / "out"

    def pipeline(factor: str) -> Path:
        path = tmp_path / f"p-{len(list(tmp_path.glob('p-*')))}.yaml"
        path.write_text(f"version: 1\noutput: {output}\nimage: {crop_layers['image']}\n"
                        "products: [map, downsample]\ninference:\n"
                        "  model: isbi2012-small-affinity\n  patch_size: 64\n"
                        "  patch_output: 32\n  overlap: 8\n  chunk_size: [32, 32, 2]\n"
                        f"downsample:\n  layers: [map]\n  factor: {factor}\n  num_mips: 1\n")
        return path

    first = pipeline("[2, 2, 1]")
    run_cli("run", first, "--parallel", "1", check=True)
    p = load_pipeline(str(pipeline("[2, 2, 2]")))
    add_local_queue(p)
    stage = next(s for s in plan_run(p, overwrite=True).stages if s.label == "downsample map")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # a stop once the chunks are deleted, before the info is cut

    monkeypatch.setattr(deepem3d.storage.layers, "put_info", stopped)
    with pytest.raises(KeyboardInterrupt):
        stage.prepare()
    monkeypatch.undo()
    assert not (output / "map" / "8_8_50").exists()
    assert "8_8_50" in (output / "map" / "info").read_text()
    again = run_cli("run", first, "--parallel", "1", check=True).stdout
    assert "stage downsample map: 5 task(s) (5 run now)" in again, again
    reference = tmp_path / "mip0"
    shutil.copytree(output / "map", reference)
    remove_levels(f"file://{reference}", 0)
    assert_same_mips(f"file://{output / 'map'}",
                     igneous_reference(reference, tmp_path / "ref", 1, (2, 2, 1)), range(2))


def test_a_stage_done_again_keeps_its_own_seconds_not_an_earlier_reports(
        tmp_path, crop_layers):
    """A stage done again by a run --overwrite that stopped before its report, then run once
    more: the report left was of the run before, and its seconds were taken for the stage's."""
    output = tmp_path / "out"

    def pipeline(overlap: int) -> Path:
        path = tmp_path / f"p-{overlap}.yaml"
        path.write_text(f"version: 1\noutput: {output}\nimage: {crop_layers['image']}\n"
                        "products: [map]\ninference:\n  model: isbi2012-small-affinity\n"
                        f"  patch_size: 64\n  patch_output: 32\n  overlap: {overlap}\n"
                        "  chunk_size: [32, 32, 2]\n")
        return path

    run_cli("run", pipeline(8), "--parallel", "1", check=True)
    earlier = json.loads((output / "report.json").read_text())
    earlier["stage_seconds"]["inference"] = 999.0
    run_cli("run", pipeline(16), "--parallel", "1", "--overwrite", check=True)
    (output / "report.json").write_text(json.dumps(earlier))  # as if stopped before it
    assert "(0 run now)" in run_cli("run", pipeline(16), "--parallel", "1", check=True).stdout
    report = json.loads((output / "report.json").read_text())
    assert 0.2 < report["stage_seconds"]["inference"] < 999, report
    # and a report of this run of the stage is kept as it is
    report["stage_seconds"]["inference"] = 998.0
    (output / "report.json").write_text(json.dumps(report))
    run_cli("run", pipeline(16), "--parallel", "1", check=True)
    assert json.loads((output / "report.json").read_text())["stage_seconds"] == {
        "inference": 998.0}


def test_a_run_overwritten_with_other_segmentation_settings_keeps_its_map(
        tmp_path, crop_layers):
    """`tune --write`, then `run --overwrite`: --overwrite replaced every layer of the run, so
    the map was inferred again though its settings had not changed."""
    output = tmp_path / "out"
    replace = {"products: [map, segmentation, downsample, meshes]": "products: [map, "
               "segmentation]", "downsample:\n  layers: [segmentation]\nmeshes:\n  mip: 1\n": "",
               "task_shape: [64, 64, 2]": "task_shape: [64, 64, 2]\n  bounds: [0, 0, 0, 64, 64, 4]",
               "  bounds: [0, 0, 6, 128, 128, 10]\n": "", "segmentation:\n": "segmentation:\n"
               "  sigma: 1\n"}
    first = run_cli("run", pipeline_file(tmp_path, crop_layers, output, **replace),
                    "--parallel", "1", check=True)
    assert "stage inference: 2 task(s) (2 run now)" in first.stdout, first.stdout
    chunks = {p: p.stat().st_mtime_ns for p in (output / "map").rglob("*-*_*-*_*-*")}
    replace["segmentation:\n"] = "segmentation:\n  method: mean\n  threshold: 0.3\n  sigma: 1\n"
    # --dry-run counts the tasks the run will run: it planned the segmentation on a stand-in
    # of the kept map and counted every task of every stage
    dry = run_cli("run", pipeline_file(tmp_path, crop_layers, output, **replace),
                  "--dry-run", "--overwrite", check=True).stdout
    rows = {line.split()[0]: line.split()[1:3] for line in dry.splitlines()
            if line.split() and line.split()[0] in ("inference", "supervoxels", "remap")}
    assert rows["inference"] == ["2", "0"] and rows["supervoxels"] == ["1", "0"], dry
    assert rows["remap"][0] == rows["remap"][1] != "0", dry
    assert "reusing" in dry and "computing every stage" not in dry, dry
    second = run_cli("run", pipeline_file(tmp_path, crop_layers, output, **replace),
                     "--parallel", "1", "--overwrite", check=True)
    assert "stage inference: 2 task(s) (0 run now)" in second.stdout, second.stdout
    assert chunks and {p: p.stat().st_mtime_ns for p in chunks} == chunks
    report = json.loads((output / "report.json").read_text())
    assert 0 <= report["adapted_rand_error"] < 1


def test_a_layer_the_run_reads_where_it_writes_is_refused_first(tmp_path, crop_layers):
    """A ground truth at OUTPUT/segmentation passed --dry-run; the run inferred the map and
    only then refused to write the segmentation over it."""
    output = tmp_path / "out"
    gt = output / "segmentation"
    shutil.copytree(crop_layers["gt"].removeprefix("file://"), gt)
    pipeline = pipeline_file(tmp_path, crop_layers, output,
                             **{f"ground_truth: {crop_layers['gt']}": f"ground_truth: {gt}"})
    for extra in (("--dry-run",), ("--parallel", "1")):
        assert_one_line_error(run_cli("run", pipeline, *extra), "ground_truth",
                              "which this run writes")
    assert sorted(p.name for p in output.iterdir()) == ["segmentation"]


@pytest.mark.parametrize("offset,extra,fragments", [
    ("3, 0, 0", {}, ["voxel offset 3,0,0", "--voxel-offset"]),
    ("2, 0, 0", {"  layers: [segmentation]\n": "  layers: [segmentation]\n  num_mips: 2\n"},
     ["voxel offset 2,0,0", "num_mips 1 or fewer"]),
    ("0, 0, 0", {"  chunk_size: [32, 32, 2]\n": "  chunk_size: [64, 64, 2]\n"},
     ["out/segmentation at mip 0 is too small", "x spans 1 of 64", "chunks of at most 32,32,2"]),
], ids=["offset", "offset-num-mips", "chunks"])
def test_mip_levels_off_the_offsets_grid_are_refused_before_the_inference(
        tmp_path, crop_layers, offset, extra, fragments):
    """The map's and the segmentation's levels were planned, and refused, once those layers
    were written: after the inference and the segmentation had run. A layer too small for
    its levels is refused as early, by the name the run gives it (not its stand-in's)."""
    image = f"file://{tmp_path / 'image'}"
    vol = create_layer(image, layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                       size=(64, 64, 4), chunk_size=(64, 64, 4),
                       voxel_offset=tuple(int(v) for v in offset.split(",")))
    vol[:, :, :] = np.full((64, 64, 4), 128, dtype=np.uint8)
    output = tmp_path / "out"
    replace = {f"image: {crop_layers['image']}": f"image: {image}",
               "products: [map, segmentation, downsample, meshes]":
               "products: [map, segmentation, downsample]", "meshes:\n  mip: 1\n": "",
               f"ground_truth: {crop_layers['gt']}\n": "",
               "evaluate:\n  bounds: [0, 0, 6, 128, 128, 10]\n": "", **extra}
    pipeline = pipeline_file(tmp_path, crop_layers, output, **replace)
    assert_one_line_error(run_cli("run", pipeline, "--parallel", "1"), "downsample",
                          *fragments)
    assert not output.exists()


def test_downsample_keys_reach_the_stage(tmp_path, crop_layers):
    """`downsample: {sparse, fill_missing}` are `deepem3d downsample`'s options; they were
    refused as unknown keys."""
    from deepem3d.run.pipeline import add_local_queue, load_pipeline
    from deepem3d.run.plan import plan_run

    pipeline = pipeline_file(tmp_path, crop_layers, tmp_path / "out", **{
        "  layers: [segmentation]\n": "  layers: [image, segmentation]\n  sparse: true\n"
                                      "  fill_missing: true\n"})
    p = load_pipeline(str(pipeline))
    add_local_queue(p)
    plan = plan_run(p, dry_run=True)
    downsampling = [s for s in plan.stages if s.name.startswith("downsample")]
    assert len(downsampling) == 2
    assert all(s.parameters["sparse"] and s.parameters["fill_missing"] for s in downsampling)


def test_a_bad_queue_or_a_binary_file_is_one_line_before_anything_is_written(
        tmp_path, crop_layers):
    output = tmp_path / "out"
    pipeline = pipeline_file(tmp_path, crop_layers, output)
    assert_one_line_error(run_cli("run", pipeline, "--queue", "bogus://x"), "--queue",
                          "unknown queue")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00version: 1")
    assert_one_line_error(run_cli("run", binary), "not a text file")
    assert not output.exists()


def test_a_run_that_infers_part_of_the_image_segments_and_scores_that_part(
        tmp_path, crop_layers):
    """Bounds given for inference alone are the segmentation's, the score's, the
    downsampling's and the meshes' too: without them the segmentation was refused after
    inference ran, a score covered unsegmented voxels, and the downsampling and the meshes
    read chunks never written (MeshTask's "missing chunk"). Skeletons, which cannot read
    missing chunks as 0, are refused before anything runs."""
    output = tmp_path / "out"
    replace = {"task_shape: [64, 64, 2]": "task_shape: [64, 64, 2]\n  bounds: [0, 0, 0, 64, 64, 4]",
               "  bounds: [0, 0, 6, 128, 128, 10]\n": ""}
    skeletons = pipeline_file(tmp_path, crop_layers, output, **{
        **replace, "downsample, meshes]": "downsample, meshes, skeletons]"})
    assert_one_line_error(cli_here("run", skeletons, "--dry-run"), "skeletons: the run segments "
                          "0,0,0,64,64,4 of the layer", "drop the skeletons product")
    run_cli("run", pipeline_file(tmp_path, crop_layers, output, **replace), "--parallel", "1",
            check=True)
    report = json.loads((output / "report.json").read_text())
    assert report["evaluated_bounds"] == [0, 0, 0, 64, 64, 4]
    assert 0 <= report["adapted_rand_error"] < 1
    assert Markers(f"file://{output / 'segmentation'}", "downsample-mip0").is_complete()
    seg = CloudVolume(f"file://{output / 'segmentation'}", mip=1)
    assert np.asarray(seg[0:32, 0:32, 0:4]).any()
    # the written part grown to whole tasks: the levels of the whole layer, not fewer
    whole = plan_downsample(f"file://{output / 'segmentation'}", memory_target=2**20)
    assert len(seg.available_mips) - 1 == whole.num_mips >= 2
    assert {"mesh forge", "mesh merge"} <= set(report["stage_seconds"])
    assert any((output / "segmentation" / "mesh").glob("*:0*"))  # a segment's manifest


def test_the_scored_region_is_the_ground_truth_within_the_segmentation(tmp_path, crop_layers):
    """Without evaluate.bounds the score covers the ground truth within segmentation.bounds
    (all of it when the whole map is segmented); YAML merge keys still load."""
    from deepem3d.run.pipeline import load_pipeline
    from deepem3d.run.plan import evaluated_region

    gt = Bbox((32, 32, 2), (96, 96, 7))
    without = {"  bounds: [0, 0, 6, 128, 128, 10]\n": ""}
    whole = load_pipeline(str(pipeline_file(tmp_path, crop_layers, tmp_path / "a", **without)))
    assert evaluated_region(whole, gt) == gt
    part = load_pipeline(str(pipeline_file(tmp_path, crop_layers, tmp_path / "b", **without, **{
        "segmentation:\n": "segmentation:\n  bounds: [0, 0, 0, 64, 64, 10]\n"})))
    assert evaluated_region(part, gt) == Bbox((32, 32, 2), (64, 64, 7))
    merged = load_pipeline(str(pipeline_file(tmp_path, crop_layers, tmp_path / "c", **{
        "meshes]": "meshes, skeletons]", "meshes:\n  mip: 1\n":
        "meshes: &objects\n  mip: 1\nskeletons:\n  <<: *objects\n  min_cable_nm: 900\n"})))
    assert merged.skeletons == {"mip": 1, "min_cable_nm": 900}


def test_a_ground_truth_with_a_mip_at_the_maps_voxel_size_is_scored_there(tmp_path,
                                                                            crop_layers):
    """`deepem3d evaluate`'s rule: a ground truth labelled at 2,2,50 nm whose mip 1 holds
    the map's 4,4,50 is scored at that mip, as its mip 1 alone would be (a run refused it
    before anything ran, since its mip 0 is finer)."""
    from deepem3d.run.pipeline import load_pipeline
    from deepem3d.run.plan import check_scoring, score

    gt = np.asarray(CloudVolume(crop_layers["gt"])[:, :, :])[..., 0]  # x, y, z
    fine = f"file://{tmp_path / 'fine_gt'}"
    vol = create_layer(fine, layer_type="segmentation", dtype="uint64", resolution=(2, 2, 50),
                       size=(256, 256, 10), chunk_size=(64, 64, 10))
    vol[:, :, :] = gt.repeat(2, axis=0).repeat(2, axis=1)
    vol.add_scale((2, 2, 1), chunk_size=(64, 64, 10))
    vol.commit_info()
    CloudVolume(fine, mip=1)[:, :, :] = gt
    seg = f"file://{tmp_path / 'seg'}"  # pairs of ground-truth segments merged
    create_layer(seg, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 50),
                 size=SHAPE, chunk_size=(64, 64, 10))[:, :, :] = gt // 2
    scores = []
    for ground_truth in (fine, crop_layers["gt"]):
        p = load_pipeline(str(pipeline_file(tmp_path, crop_layers, tmp_path / "o", **{
            f"ground_truth: {crop_layers['gt']}": f"ground_truth: {ground_truth}"})))
        check_scoring(p, ground_truth, Bbox((0, 0, 0), SHAPE), (4.0, 4.0, 50.0))
        scores.append(score(p, {"segmentation": seg, "ground_truth": ground_truth}))
    assert scores[0] == scores[1] and scores[0]["evaluated_bounds"] == [0, 0, 6, 128, 128, 10]
    assert 0 < scores[0]["adapted_rand_error"] < 1


def test_a_task_that_fails_on_bad_input_fails_once_and_stops_the_run(tmp_path):
    """A map with a chunk missing: the task that reads it fails once, visibly, and the command
    stops with its one-line message (no retries, no tracebacks)."""
    path = tmp_path / "map"
    vol = create_layer(f"file://{path}", layer_type="image", dtype="uint8",
                       resolution=(4, 4, 50), size=(64, 64, 4), chunk_size=(32, 32, 4))
    vol[:, :, :] = np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    next((path / "4_4_50").glob("32-64_32-64_0-4*")).unlink()
    output = tmp_path / "seg"
    result = run_cli("segment", f"file://{path}", output, "--method", "watershed",
                     "--threshold", "0.2", "--task-shape", "32,32,4", "--parallel", "1")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("deepem3d: warning:")  # the map records no provenance
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", lines[1]),
                          "task 32-64_32-64_0-4 failed", "missing chunks")
    failed = list((output / "tasks").glob("*/failed/*.json"))
    assert len(failed) == 1 and len(lines) == 2


def test_segmenting_beyond_what_was_predicted_is_refused_at_planning(tmp_path, crop_layers):
    output = f"file://{tmp_path / 'map'}"
    plan = plan_inference(crop_layers["image"], output, models=["isbi2012-small-affinity"],
                          chunk_size=(32, 32, 2), task_shape=(64, 64, 2),
                          bounds=Bbox((0, 0, 0), (64, 64, 2)))
    start_stage(inference_stage(plan))  # created, not run: the map is incomplete
    result = run_cli("segment", output, tmp_path / "seg", "--bounds", "0,0,0,128,128,10")
    assert_one_line_error(result, "was predicted over 0,0,0,64,64,2 only", "--bounds")
    inside = run_cli("segment", output, tmp_path / "seg", "--bounds", "0,0,0,64,64,2")
    assert_one_line_error(inside, "is incomplete", "inference task(s) have not finished")
    # bounds inside, grown past the predicted region by OUTPUT's chunks: said so
    grown = run_cli("segment", output, tmp_path / "seg", "--bounds", "0,0,0,64,64,2",
                    "--chunk-size", "48,48,2")
    assert_one_line_error(grown, "region to segment is 0,0,0,96,96,2 (--bounds 0,0,0,64,64,2 "
                          "grown to OUTPUT's chunks of 48,48,2)", "--chunk-size")


@pytest.mark.parametrize("command", [["worker"], ["queue", "status"]])
def test_a_file_queue_that_does_not_exist_is_an_error_not_a_wait(tmp_path, command):
    missing = tmp_path / "no" / "queue"
    result = run_cli(*command, f"fq://{missing}", timeout=60)
    assert_one_line_error(result, "no such file queue")
    assert not missing.exists(), "the queue was created"


@pytest.mark.parametrize("tta, which", [(1, "no_tta"), (16, "tta")])
def test_settings_travel_with_the_model(tmp_path, crop_layers, tta, which):
    """A shipped model's recorded settings go into the map's provenance, and `segment` uses
    them when neither --method nor --threshold is given."""
    from deepem3d.models.shipped import DEFAULT_MODEL, SEGMENTATION_SETTINGS

    output = f"file://{tmp_path / 'map'}"
    plan = plan_inference(crop_layers["image"], output, tta=tta, chunk_size=(32, 32, 2))
    inference_stage(plan).prepare()  # the layer and its provenance, no task run
    recorded = SEGMENTATION_SETTINGS[DEFAULT_MODEL][which]
    provenance = CloudFiles(output).get_json("provenance")["processing"][-1]["method"]
    assert provenance["segmentation"] == recorded
    dry = run_cli("segment", output, tmp_path / "seg", "--dry-run", check=True)
    assert ("settings recorded by the map's model: method mean, threshold "
            f"{recorded['threshold']}, sigma {recorded['sigma']}, dust_size "
            f"{recorded['dust_size']}") in dry.stdout, dry.stdout
    mine = run_cli("segment", output, tmp_path / "seg", "--method", "watershed",
                   "--threshold", "0.3", "--dry-run", check=True)
    assert "settings recorded" not in mine.stdout and "watershed, threshold 0.3" in mine.stdout
    half = run_cli("segment", output, tmp_path / "seg", "--method", "mean")
    assert_one_line_error(half, "give --threshold too")
    smoothed = run_cli("segment", output, tmp_path / "seg", "--sigma", "1", "--dry-run",
                       check=True)  # the user's own setting is not called the model's
    assert (f"threshold {recorded['threshold']}, dust_size {recorded['dust_size']}; given: "
            "sigma 1.0") in smoothed.stdout, smoothed.stdout


def test_dry_run_plans_every_stage_routes_them_and_writes_nothing(tmp_path, crop_layers):
    output = tmp_path / "out"
    queues = (f"queues:\n  default: fq://{tmp_path}/cpu\n  inference: fq://{tmp_path}/gpu\n"
              f"  large: {{url: 'fq://{tmp_path}/big', min_memory: 64MiB}}\n")
    pipeline = pipeline_file(tmp_path, crop_layers, output,
                             **{"evaluate:": queues + "evaluate:"})
    dry = run_cli("run", pipeline, "--dry-run", check=True)
    rows = {line.split()[0]: line for line in dry.stdout.splitlines()
            if line.split() and line.split()[0] in ("inference", "supervoxels", "reduce-L0")}
    assert rows["inference"].endswith(f"fq://{tmp_path}/gpu"), rows["inference"]
    assert rows["reduce-L0"].endswith(f"fq://{tmp_path}/cpu"), rows["reduce-L0"]  # a few MiB
    assert "core" in rows["supervoxels"] and "downsample segmentation" in dry.stdout
    assert not output.exists() and not (tmp_path / "cpu").exists()
    big = pipeline_file(tmp_path, crop_layers, output, **{
        "evaluate:": queues.replace("64MiB", "1KiB") + "evaluate:"})
    routed = run_cli("run", big, "--dry-run", check=True).stdout
    assert any(line.startswith("reduce-L0") and line.endswith(f"fq://{tmp_path}/big")
               for line in routed.splitlines()), routed


def test_a_plan_over_the_task_memory_limit_is_refused_by_name(tmp_path, crop_layers):
    """`max_task_memory` in the file is `segment --max-task-memory`: a dry run whose largest
    segmentation task needs more is one line naming the stage."""
    pipeline = pipeline_file(tmp_path, crop_layers, tmp_path / "out", **{
        "segmentation:\n": "segmentation:\n  max_task_memory: 1MiB\n"})
    assert_one_line_error(run_cli("run", pipeline, "--dry-run"), "segmentation",
                          "above max_task_memory 1 MiB")


def test_a_task_above_its_queue_max_memory_is_refused_by_name(tmp_path, crop_layers):
    """A queue's `max_memory` is what its pool's workers can give a task: a stage routed there
    with a larger task is refused before anything runs, naming the stage and the key."""
    queues = (f"queues:\n  default: {{url: 'fq://{tmp_path}/cpu', max_memory: 1MiB}}\n"
              f"  inference: fq://{tmp_path}/gpu\n")
    pipeline = pipeline_file(tmp_path, crop_layers, tmp_path / "out",
                             **{"evaluate:": queues + "evaluate:"})
    assert_one_line_error(cli_here("run", pipeline, "--dry-run"), "stage ",
                          "above queues.default.max_memory 1 MiB", "min_memory")
    large = queues + f"  large: {{url: 'fq://{tmp_path}/big', min_memory: 1MiB}}\n"
    routed = pipeline_file(tmp_path, crop_layers, tmp_path / "out",
                           **{"evaluate:": large + "evaluate:"})
    done = cli_here("run", routed, "--dry-run")  # every CPU stage goes to `large` instead
    assert done.returncode == 0, done.stderr
    below = pipeline_file(tmp_path, crop_layers, tmp_path / "out", **{
        "evaluate:": large.replace("min_memory: 1MiB", "min_memory: 1MiB, max_memory: 1KiB")
        + "evaluate:"})
    assert_one_line_error(cli_here("run", below, "--dry-run"),
                          "queues.large.max_memory: is below its min_memory")
    assert not (tmp_path / "out").exists()


def test_mesh_bad_input_is_one_line(crop_layers):
    assert_one_line_error(run_cli("mesh", crop_layers["image"]), "is an image layer",
                          "segmentation")
    assert_one_line_error(run_cli("mesh", crop_layers["gt"], "--mip", "5"),
                          "mesh mip 5 does not exist", "downsample it first")
    dry = run_cli("mesh", crop_layers["gt"], "--dry-run", check=True)
    assert "1 MeshTask(s) of 128 x 128 x 10 voxels at mip 0" in dry.stdout, dry.stdout
    assert "mesh" not in CloudFiles(crop_layers["gt"]).get_json("info")


def test_sharded_objects_without_a_spatial_index_are_refused(tmp_path, crop_layers):
    output = tmp_path / "out"
    for product in ("meshes", "skeletons"):
        pipeline = pipeline_file(tmp_path, crop_layers, output, **{
            "products: [map, segmentation, downsample, meshes]":
                f"products: [map, segmentation, downsample, {product}]",
            "meshes:\n  mip: 1": f"{product}:\n  sharded: true\n  spatial_index: false"})
        assert_one_line_error(run_cli("run", pipeline), f"{product}.spatial_index",
                              f"sharded {product} need the spatial index")
    assert not output.exists()


def test_demo_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("demo", tmp_path), "holds something else than a demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_later_stages_error_names_the_layer_not_the_dry_runs_stand_in(tmp_path, crop_layers):
    """A mesh mip the downsampling will not make was refused naming the dry run's temporary
    stand-in (file:///tmp/deepem3d-dry-run-.../segmentation-with-mips), gone once it exits."""
    output = tmp_path / "out"
    pipeline = pipeline_file(tmp_path, crop_layers, output, **{"  mip: 1": "  mip: 9"})
    for args in (("--dry-run",), ("--parallel", "1")):
        result = cli_here("run", pipeline, *args)
        assert_one_line_error(result, "meshes: mesh mip 9 does not exist in "
                              f"file://{output}/segmentation (its mips")
        assert "deepem3d-dry-run" not in result.stderr
    assert not output.exists()


def test_a_missing_image_layer_is_named_by_its_key(tmp_path, crop_layers):
    """An `image:` with no layer there was reported under `inference:`, as the map's was
    under `segmentation:`."""
    output = tmp_path / "out"
    pipeline = pipeline_file(tmp_path, crop_layers, output,
                             **{crop_layers["image"]: str(tmp_path / "nowhere")})
    assert_one_line_error(cli_here("run", pipeline, "--dry-run"), f"{pipeline.name}: image: no "
                          f"precomputed layer at file://{tmp_path / 'nowhere'}")
    assert not output.exists()


def test_a_planners_message_names_the_files_keys_but_keeps_commands_and_run_options():
    """Every `--option` was turned into a key: a suggested command lost its dashes
    (`deepem3d resample IMAGE OUTPUT resolution 4,4,50`) and so did `--overwrite`."""
    from deepem3d.errors import InputError
    from deepem3d.run.plan import _in_key

    err = InputError("off; resample it (`deepem3d resample IMAGE OUTPUT --resolution 4,4,50`) "
                     "or pass --force; --task-shape 48,64,2 is off the grid; pass --overwrite")
    assert str(_in_key("f.yaml", "inference", err)) == (
        "f.yaml: inference: off; resample it (`deepem3d resample IMAGE OUTPUT --resolution "
        "4,4,50`) or set force: true; task_shape 48,64,2 is off the grid; pass --overwrite")


def test_a_map_the_run_reads_is_among_its_layers(tmp_path, maps):
    """A pipeline that segments an existing `map:` left the map out of the run's layers, so
    the report and `deepem3d view RUN` showed no map."""
    from deepem3d.run.pipeline import add_local_queue, load_pipeline
    from deepem3d.run.plan import plan_run

    pipeline = tmp_path / "segment.yaml"
    pipeline.write_text(f"version: 1\noutput: {tmp_path / 'out'}\nimage: {maps['affinity'][0]}"
                        f"\nmap: {maps['affinity'][0]}\nproducts: [segmentation]\n"
                        "segmentation:\n  method: mean\n  threshold: 0.5\n")
    p = load_pipeline(str(pipeline))
    add_local_queue(p)
    plan = plan_run(p, dry_run=True)
    assert plan.layers["map"] == maps["affinity"][0]


def test_a_missing_map_layer_is_named_by_its_key(tmp_path, maps):
    """A `map:` with no layer there was reported under `segmentation:`, a key the file may
    not even have."""
    pipeline = tmp_path / "segment.yaml"
    pipeline.write_text(f"version: 1\noutput: {tmp_path / 'out'}\nimage: {maps['affinity'][0]}"
                        f"\nmap: {tmp_path / 'nowhere'}\nproducts: [segmentation]\n")
    assert_one_line_error(cli_here("run", pipeline, "--dry-run"), "segment.yaml: map: no "
                          f"precomputed layer at file://{tmp_path / 'nowhere'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blank", [False, True], ids=["map", "blank-map"])
def test_octree_stages_are_sized_at_the_density_the_region_graph_measures(tmp_path, maps,
                                                                          blank):
    """The upper octree nodes were sized (and routed to a queue) at a guessed edge density;
    where a queue takes stages by their memory, a run plans them once the region-graph tasks
    have counted the map's edges. A map with no edge keeps the default; a finished run plans
    every stage again (it had lost its octree and remap, which later stages need)."""
    from deepem3d.run.pipeline import load_pipeline
    from deepem3d.run.plan import plan_run
    from deepem3d.stages.segmentation import plan_segment

    source = maps["affinity"][0]
    if blank:
        source = f"file://{tmp_path / 'blank'}"
        create_layer(source, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                     size=(96, 80, 10), chunk_size=(8, 8, 2), num_channels=3)[:, :, :] = \
            np.zeros((96, 80, 10, 3), np.uint8)
    pipeline = tmp_path / "segment.yaml"
    pipeline.write_text(f"version: 1\noutput: {tmp_path / 'out'}\nimage: {source}\n"
                        f"map: {source}\nproducts: [segmentation, downsample]\n"
                        "segmentation:\n  method: mean\n  threshold: 0.5\n"
                        f"  task_shape: [32, 32, 4]\nqueues:\n  default: fq://{tmp_path / 'q'}\n"
                        f"  large: {{url: 'fq://{tmp_path / 'big'}', min_memory: 1GiB}}\n")
    p = load_pipeline(str(pipeline))
    first = plan_run(p)
    assert [s.name for s in first.stages][-1] == "region-graph"
    assert any("planned once the region graph exists" in line for line in first.lines)
    run_stages(first.stages, execute=execute_here, progress=False)
    records = next(s for s in first.stages if s.name == "region-graph").markers.records()
    edges = sum(r["edges"] for r in records)
    measured = edges / sum(r["voxels"] for r in records)
    second = plan_run(p)
    assert second.stages[-1].name == "remap"
    top = [s for s in second.stages if s.name.startswith("agglomerate-L")][-1]
    expected = plan_segment(source, p.layer("segmentation"), method="mean", threshold=0.5,
                            task_shape=(32, 32, 4), edges_per_voxel=measured or 0.3)
    assert top.memory_bytes == expected.stage_memory_bytes(top.name)
    if blank:
        assert edges == 0
    else:
        assert any(f"sized at {measured:.3g} region-graph edges per voxel (measured by the "
                   "region-graph tasks)" in line for line in second.lines), second.lines
        guessed = plan_segment(source, p.layer("segmentation"), method="mean", threshold=0.5,
                               task_shape=(32, 32, 4))
        assert top.memory_bytes != guessed.stage_memory_bytes(top.name)
    run_stages(second.stages, execute=execute_here, progress=False)
    run_stages(plan_run(p).stages, execute=execute_here, progress=False)  # + the mip levels
    finished = plan_run(p)
    assert {"remap", "downsample-mip0"} <= {s.name for s in finished.stages}
    assert all(s.is_complete() for s in finished.stages)


def test_the_report_is_replaced_whole(tmp_path):
    """report.json was written in place: a run stopped while writing it left a file cut short.
    A write that fails half-way (here: a value JSON cannot hold, met after many bytes were
    written) leaves the previous report as it was, and nothing beside it."""
    from deepem3d.storage.paths import put_json_whole

    put_json_whole(str(tmp_path / "run"), "report.json", {"seconds": 1.0})
    with pytest.raises(TypeError):
        put_json_whole(str(tmp_path / "run"), "report.json",
                       {"layers": "x" * 2**20, "scores": object()})
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"seconds": 1.0}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.json"]
    put_json_whole(f"file://{tmp_path / 'run'}", "report.json", {"seconds": 2.0})
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"seconds": 2.0}
