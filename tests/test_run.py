"""`deepem3d run PIPELINE`: the whole job from one file, on real layers, queues and workers.

A 128 x 128 x 10 crop of the embedded ISBI 2012 sample goes through the shipped affinity model
(small patches, so that inference is many tasks), the segmentation with the settings the model
records, and downsampling, on two local worker processes. An interrupted run (a worker
SIGKILLed during inference, the runner SIGKILLed during the segmentation, then the same command
again) must end with the same bytes as an undisturbed one. A task left on a queue by a run
since replaced by one with other parameters must not write, for every kind of stage. A bad
pipeline file is a one-line error before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cloudfiles import CloudFiles
from cloudvolume.lib import Bbox
from taskqueue.queueables import totask

from deepem3d.axes import xyz_from_zyx
from deepem3d.sample import load_sample
from deepem3d.stages.downsample import downsample_stage, plan_downsample
from deepem3d.stages.frame import payload_of
from deepem3d.stages.inference import inference_stage, plan_inference
from deepem3d.stages.segmentation import plan_segment, segment_stages
from deepem3d.storage.layers import create_layer
from deepem3d.storage.npz import get_npz
from tests.conftest import ROOT, assert_one_line_error, run_cli, start_stage

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


def contents(output: Path) -> dict[str, str]:
    """Every file the run left, by path under the output root, as a digest; without what
    holds times (markers, run records, provenance, the report) or belongs to the run's
    machinery (its queue and log). The segment table also records its run's key, which names
    the map's path: its arrays are compared instead."""
    found = {}
    for path in output.rglob("*"):
        rel = path.relative_to(output).as_posix()
        if (not path.is_file() or "/tasks/" in f"/{rel}" or path.name == "provenance"
                or rel.split("/")[0] in ("queue", "logs") or rel == "report.json"):
            continue
        if path.name == "segments.npz.zstd":
            arrays = get_npz(CloudFiles(f"file://{path.parent}"), "segments.npz")
            data = arrays["ids"].tobytes() + arrays["segments"].tobytes()
        else:
            data = path.read_bytes()
        found[rel] = hashlib.sha256(data).hexdigest()
    return found


def check_meshes(path: str, min_voxels: int = 500, slack: float = 3.0) -> None:
    """Every segment of at least `min_voxels` has a mesh that loads through CloudVolume, with
    a bounding box within `slack` voxels of the mesh mip (2 at mip 0 per step) of its own."""
    from cloudvolume import CloudVolume

    vol = CloudVolume(path, progress=False)
    assert vol.info["mesh"] == "mesh", "the info names the meshes once they are written"
    labels = np.asarray(vol[:, :, :])[..., 0]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = ids[counts >= min_voxels]
    assert len(big) >= 5
    resolution = np.asarray(vol.resolution, dtype=float)
    for segment in big:
        mesh = vol.mesh.get(int(segment))
        mesh = mesh[int(segment)] if isinstance(mesh, dict) else mesh
        assert len(mesh.vertices) > 0, segment
        lo, hi = mesh.vertices.min(0) / resolution, mesh.vertices.max(0) / resolution
        where = np.argwhere(labels == segment)
        tolerance = np.array([2 * slack, 2 * slack, slack])  # mip 1 is 2 x 2 x 1 voxels
        assert np.all(np.abs(lo - where.min(0)) <= tolerance), (segment, lo, where.min(0))
        assert np.all(np.abs(hi - (where.max(0) + 1)) <= tolerance), (segment, hi)


def count(folder: Path) -> int:
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def wait_until(condition, timeout: float = 240, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_command(pipeline: Path) -> list[str]:
    return [sys.executable, "-m", "deepem3d", "run", str(pipeline), "--parallel", "2",
            "--lease-seconds", "5"]


def test_an_interrupted_run_ends_with_the_bytes_of_an_undisturbed_one(tmp_path, crop_layers):
    calm = tmp_path / "calm"
    result = run_cli(*run_command(pipeline_file(tmp_path, crop_layers, calm))[3:], check=True,
                     timeout=900)
    report = json.loads((calm / "report.json").read_text())
    assert {"stage_seconds", "layers", "adapted_rand_error", "voi_split",
            "voi_merge"} <= set(report)
    assert set(report["layers"]) == {"image", "ground_truth", "map", "segmentation"}
    assert {"inference", "supervoxels", "remap", "downsample segmentation"} <= set(
        report["stage_seconds"])
    assert 0 <= report["adapted_rand_error"] < 1
    assert "stage remap:" in result.stdout and "largest task peak" in result.stdout
    check_meshes(f"file://{calm / 'segmentation'}")
    expected = contents(calm)
    mips = {k.split("/")[1] for k in expected if k.startswith("segmentation/")}
    assert {"4_4_50", "8_8_50"} <= mips, "the segmentation and its downsampled level"
    assert any(k.startswith("map/4_4_50/") for k in expected)

    # the same run, interrupted twice: a worker killed during inference, then the runner
    # itself killed during the segmentation; the same command again finishes it
    rough = tmp_path / "rough"
    pipeline = pipeline_file(tmp_path, crop_layers, rough)
    runner = subprocess.Popen(run_command(pipeline), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        done = rough / "map" / "tasks" / "inference" / "done"
        wait_until(lambda: count(done) >= 2, what="inference markers")
        workers = psutil.Process(runner.pid).children()
        assert workers, "the runner's local workers"
        workers[0].send_signal(signal.SIGKILL)
        killed_at = count(done)
        segmentation = rough / "segmentation" / "tasks"
        wait_until(lambda: any(count(d / "done") for d in segmentation.glob("*")),
                   what="segmentation markers")
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=60)
        orphans = [w for w in psutil.Process(os.getpid()).children(recursive=True)
                   if "worker" in " ".join(w.cmdline())]
        psutil.wait_procs(orphans, timeout=60)  # they notice their runner is gone
    finally:
        if runner.poll() is None:
            runner.kill()
    assert killed_at < 20, "the worker was killed with inference tasks left"
    assert not (rough / "report.json").exists()
    again = run_cli(*run_command(pipeline)[3:], check=True, timeout=900)
    assert "(0 run now)" in again.stdout  # inference was finished before the restart
    assert contents(rough) == expected


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
    ("missing layer", {"image: file://": "image: file:///nowhere/"}, ["inference",
                                                                      "no precomputed layer"]),
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
])
def test_a_bad_pipeline_file_is_one_line_before_anything_is_written(
        tmp_path, crop_layers, case, replace, fragments):
    output = tmp_path / "out"
    pipeline = pipeline_file(tmp_path, crop_layers, output, **replace)
    result = run_cli("run", pipeline, "--parallel", "1")
    assert_one_line_error(result, *fragments)
    assert not output.exists(), f"{case}: the run wrote something"


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


@pytest.mark.parametrize("command", ["worker", "status"])
def test_a_file_queue_that_does_not_exist_is_an_error_not_a_wait(tmp_path, command):
    missing = tmp_path / "no" / "queue"
    result = run_cli(command, f"fq://{missing}", timeout=60)
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


def test_dry_run_plans_every_stage_routes_them_and_writes_nothing(tmp_path, crop_layers):
    output = tmp_path / "out"
    queues = (f"queues:\n  default: fq://{tmp_path}/cpu\n  inference: fq://{tmp_path}/gpu\n"
              f"  large: {{url: 'fq://{tmp_path}/big', min_memory: 64MiB}}\n")
    pipeline = pipeline_file(tmp_path, crop_layers, output,
                             **{"evaluate:": queues + "evaluate:"})
    dry = run_cli("run", pipeline, "--dry-run", check=True)
    rows = {line.split()[0]: line for line in dry.stdout.splitlines()
            if line.split() and line.split()[0] in ("inference", "supervoxels", "reduce")}
    assert rows["inference"].endswith(f"fq://{tmp_path}/gpu"), rows["inference"]
    assert rows["reduce"].endswith(f"fq://{tmp_path}/cpu"), rows["reduce"]  # a few MiB
    assert "core" in rows["supervoxels"] and "downsample segmentation" in dry.stdout
    assert not output.exists() and not (tmp_path / "cpu").exists()
    big = pipeline_file(tmp_path, crop_layers, output, **{
        "evaluate:": queues.replace("64MiB", "1KiB") + "evaluate:"})
    routed = run_cli("run", big, "--dry-run", check=True).stdout
    assert any(line.startswith("reduce") and line.endswith(f"fq://{tmp_path}/big")
               for line in routed.splitlines()), routed


def test_mesh_bad_input_is_one_line(crop_layers):
    assert_one_line_error(run_cli("mesh", crop_layers["image"]), "is an image layer",
                          "segmentation")
    assert_one_line_error(run_cli("mesh", crop_layers["gt"], "--mip", "5"),
                          "mesh mip 5 does not exist", "downsample it first")
    dry = run_cli("mesh", crop_layers["gt"], "--dry-run", check=True)
    assert "1 MeshTask(s) of 128 x 128 x 10 voxels at mip 0" in dry.stdout, dry.stdout
    assert "mesh" not in CloudFiles(crop_layers["gt"]).get_json("info")


def test_demo_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("demo", tmp_path), "holds something else than a demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
