"""`deepem3d segment` as queue tasks on real file:// layers: the segmentation layer is the same
bytes whatever the task shape, and equal to `pipeline.segment` on the whole array.

The map is a 96 x 80 x 10 (x,y,z) crop of the embedded ISBI 2012 sample: ground truth turned
into a noisy boundary map, and its affinities (tests/conftest.py's `maps` fixture). Most runs
execute the tasks in this process (each through its JSON payload, as a worker would); one goes
through `--parallel 2` worker processes, one through a worker that drains a --queue the command
waits on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tinybrain
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.errors import InputError
from deepem3d.run import runner as runner_module
from deepem3d.run.queues import insert_tasks
from deepem3d.run.runner import Runner, execute_here, run_stages
from deepem3d.run.worker import Worker
from deepem3d.segmentation import octree as octree_module
from deepem3d.segmentation.pipeline import segment
from deepem3d.stages.frame import Stage
from deepem3d.stages.segmentation import CHUNK_STAGES, plan_segment, segment_stages
from deepem3d.stages.supervoxels import volume_ids
from deepem3d.storage.layers import create_layer
from tests.conftest import (
    CHUNK,
    SHAPE,
    InProcess,
    assert_one_line_error,
    assert_same_mips,
    chunk_files,
    cli_here,
    read,
    run,
    run_cli,
)


@pytest.mark.parametrize(
    "name, method, threshold, dust",
    [("boundary", "mean", 0.5, 0), ("affinity", "watershed", 0.19, 20), ("float32", "mean", 0.3,
                                                                          5)],
)
def test_layer_is_the_same_bytes_for_every_task_shape(tmp_path, maps, name, method, threshold,
                                                      dust, monkeypatch):
    path, array = maps[name]
    if name == "affinity":  # its tasks on a tree of two children per node (docs/octree.md)
        monkeypatch.setattr(octree_module, "BINARY_ABOVE", 0)
    expected = segment(array, method, threshold, dust_size=dust)
    # one task, 90 tiny ones, shapes that do not divide the volume (40 x 24 x 6: 3 x 4 x 2)
    shapes = {"boundary": [SHAPE, (40, 24, 6)], "affinity": [(16, 16, 4), (40, 24, 6)],
              "float32": [(40, 24, 6)]}[name]
    reference = None
    for k, shape in enumerate(shapes):
        output = f"file://{tmp_path / f'seg{k}'}"
        runner = run(path, output, method, threshold, shape, dust_size=dust)
        blocks = np.prod([-(-s // t) for s, t in zip(SHAPE, shape)])
        assert runner.ran["supervoxels"] == runner.ran["remap"] == blocks
        assert runner.ran["reduce-L0"] == blocks
        # the octree: a task per node and level, one root; no task holds the whole graph
        levels = sorted(int(s.rsplit("L", 1)[1]) for s in runner.ran
                        if s.startswith("agglomerate-L"))
        assert levels == list(range(len(levels))) and runner.ran["agglomerate-L0"] == blocks
        assert runner.ran[f"agglomerate-L{levels[-1]}"] == 1
        assert ("dust-L0" in runner.ran) == (dust > 0)
        np.testing.assert_array_equal(read(output), expected, err_msg=f"task shape {shape}")
        done = CloudFiles(output)
        final = sum(done.get_json(k)["final"] for k in done.list(prefix="tasks/agglomerate-L")
                    if "/done/" in k)
        if not dust:
            assert final == np.unique(expected[expected != 0]).size
        files = chunk_files(output)
        assert len(files) == np.prod([-(-s // c) for s, c in zip(SHAPE, CHUNK)])
        reference = reference or files
        assert files == reference, f"task shape {shape}: other chunk bytes"
        # what a retune needs stays (the supervoxels: local labels and tables, one per block;
        # the blocks' graphs), and the octree's files; the rest of the work directory is gone
        work = {k.split("/")[1] for k in CloudFiles(output).list(prefix="segmentation/")}
        assert work == {"labels", "tables", "graphs", "octree"}, work
        stored = CloudFiles(output).list(prefix="segmentation/labels/")
        assert len(list(stored)) == blocks
    info = CloudFiles(output).get_json("info")
    assert info["type"] == "segmentation" and info["data_type"] == "uint64"
    assert "mesh" not in info and "skeletons" not in info  # none written yet
    prov = CloudFiles(output).get_json("provenance")["processing"][-1]["method"]
    assert prov["method"] == method and prov["threshold"] == threshold
    assert prov["dust_size"] == dust and prov["map"] == path
    assert prov["task_shape"] == list(shapes[-1])


def test_another_threshold_redoes_only_agglomerate_and_remap(tmp_path, maps):
    path, array = maps["affinity"]
    output = f"file://{tmp_path / 'seg'}"
    first = run(path, output, "mean", 0.5, (40, 24, 6))
    stages = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(40, 24, 6),
                          chunk_size=CHUNK).stages
    assert set(first.ran) == set(stages) - {"smooth"}  # no --sigma: no smooth tasks
    markers = Path(output[len("file://"):]) / "tasks"
    kept = {p: p.stat().st_mtime_ns for s in CHUNK_STAGES for p in (markers / s).rglob("*")
            if p.is_file()}
    assert len(kept) > 5 * len(CHUNK_STAGES)

    same = run(path, output, "mean", 0.5, (40, 24, 6))  # a resumed run: nothing left to do
    assert same.ran == {}
    with pytest.raises(InputError, match="--overwrite"):
        run(path, output, "mean", 0.3, (40, 24, 6))
    plan = plan_segment(path, output, method="watershed", threshold=0.1, task_shape=(40, 24, 6),
                        chunk_size=CHUNK, overwrite=True)
    assert plan.action == "retune"
    assert "reusing the supervoxels and region graphs" in plan.describe()
    for method, threshold in [("mean", 0.3), ("watershed", 0.1)]:
        again = run(path, output, method, threshold, (40, 24, 6), overwrite=True)
        assert set(again.ran) == set(plan.tuning_stages()), again.ran
        np.testing.assert_array_equal(read(output), segment(array, method, threshold))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "chunk stages were rewritten"

    # another task shape is another chunking: everything again, same answer
    other = run(path, output, "watershed", 0.1, SHAPE, overwrite=True)
    # one block: no neighbours, an octree of one node
    assert set(other.ran) == {"supervoxels", "reduce-L0", "region-graph", "agglomerate-L0",
                              "remap"}
    np.testing.assert_array_equal(read(output), segment(array, "watershed", 0.1))


def test_a_run_stopped_in_the_octree_resumes_without_redoing_its_finished_levels(tmp_path,
                                                                                   maps):
    """Resuming compared only remap's manifest, which the stopped run had not reached: every
    finished octree level was reset and done again (hours, on a large volume)."""
    path, array = maps["affinity"]
    output = f"file://{tmp_path / 'seg'}"

    class Stop(Exception):
        pass

    first = InProcess()

    def until_segments(stage: Stage, tasks) -> int:
        if stage.name.startswith("segments-L"):
            raise Stop
        return first(stage, tasks)

    plan = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(40, 24, 6),
                        chunk_size=CHUNK)
    with pytest.raises(Stop):
        run_stages(segment_stages(plan), execute=until_segments, echo=lambda line: None)
    octree_levels = {s for s in first.ran if s.startswith("agglomerate-L")}
    assert len(octree_levels) >= 2, first.ran
    again = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(40, 24, 6),
                         chunk_size=CHUNK)
    assert again.action == "resume"
    resumed = run(path, output, "mean", 0.5, (40, 24, 6))
    assert not set(resumed.ran) & (octree_levels | set(CHUNK_STAGES)), resumed.ran
    assert "remap" in resumed.ran
    np.testing.assert_array_equal(read(output), segment(array, "mean", 0.5))


def test_a_stage_record_cut_short_is_a_stage_to_run_again(tmp_path, maps):
    """A run.json cut short (written in place, before the frame wrote its files whole) made
    every later run fail with a JSON traceback; now the stage is run again."""
    path, array = maps["affinity"]
    output = f"file://{tmp_path / 'seg'}"
    run(path, output, "mean", 0.5, (40, 24, 6))
    record = tmp_path / "seg" / "tasks" / "remap" / "run.json"
    record.write_bytes(record.read_bytes()[:7])
    again = run(path, output, "mean", 0.5, (40, 24, 6))
    assert "remap" in again.ran
    np.testing.assert_array_equal(read(output), segment(array, "mean", 0.5))
    assert not list((tmp_path / "seg" / "tasks").rglob("*.partial"))


def test_levels_and_meshes_are_made_again_over_a_retuned_segmentation(tmp_path, maps):
    """`segment --overwrite` with other settings deleted the levels and meshes but kept their
    stages' markers, so `deepem3d downsample` and `deepem3d mesh` found them complete and ran
    nothing: the info named a level of zeros and meshes with no files."""
    path, _ = maps["affinity"]
    output = f"file://{tmp_path / 'seg'}"
    run(path, output, "mean", 0.5, (40, 24, 6))
    for command in (["downsample", output, "--num-mips", "1"], ["mesh", output, "--mip", "0"]):
        assert cli_here(*command).returncode == 0
    run(path, output, "mean", 0.3, (40, 24, 6), overwrite=True)
    retuned = read(output)
    downsampled = cli_here("downsample", output, "--num-mips", "1")
    assert downsampled.returncode == 0 and "(0 run now)" not in downsampled.stdout, (
        downsampled.stdout)
    level = np.asarray(CloudVolume(output, mip=1, progress=False)[:, :, :])[..., 0]
    # igneous's pooling of segmentations (tinybrain's mode), over the retuned segments
    expected = tinybrain.downsample_segmentation(retuned[..., None], (2, 2, 1), num_mips=1)[0]
    np.testing.assert_array_equal(level, expected[..., 0])
    meshed = cli_here("mesh", output, "--mip", "0")
    assert meshed.returncode == 0 and "(0 run now)" not in meshed.stdout, meshed.stdout
    assert len(list(CloudFiles(output).list(prefix="mesh/"))) > 1


def test_bounds_segment_the_crop_with_whole_volume_ids(tmp_path, maps):
    path, array = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    lo, hi = (8, 16, 2), (72, 56, 8)
    run(path, output, "mean", 0.4, (24, 16, 4), bounds=Bbox(lo, hi))
    crop = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    expected = volume_ids(segment(crop, "mean", 0.4), lo, crop.shape, SHAPE)
    got = read(output)
    np.testing.assert_array_equal(got[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], expected)
    got[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 0
    assert not got.any(), "wrote outside --bounds"
    # an id is 1 + the global index of one of the segment's voxels
    x, y, z = np.unravel_index(expected - np.uint64(1), SHAPE, order="F")
    assert np.all((x >= lo[0]) & (y >= lo[1]) & (z >= lo[2]))


def test_cli_with_two_worker_processes(tmp_path, maps):
    """On a map that starts below 0 on every axis: block ids such as '-24-24_-8-32_-2-4',
    which the workers admit."""
    _, array = maps["affinity"]
    path = f"file://{tmp_path / 'below'}"
    create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                 size=array.shape[:3], voxel_offset=(-24, -8, -2), chunk_size=CHUNK,
                 num_channels=3)[:, :, :] = array
    output = tmp_path / "seg"
    args = ["segment", path, output, "--method", "mean", "--threshold", "0.6", "--dust-size",
            "10", "--task-shape", "48,40,6", "--chunk-size", "8,8,2"]
    dry = run_cli(*args, "--dry-run", check=True)
    assert "8 block(s) of 48 x 40 x 6 voxels" in dry.stdout, dry.stdout
    assert "MiB per block task" in dry.stdout and not output.exists()

    out = run_cli(*args, "--parallel", "2", check=True)
    assert "stage remap: 8 task(s) (8 run now)" in out.stdout, out.stdout
    np.testing.assert_array_equal(read(f"file://{output}"), segment(array, "mean", 0.6,
                                                                    dust_size=10))
    records = [CloudFiles(f"file://{output}").get_json(k) for k in
               CloudFiles(f"file://{output}").list(prefix="tasks/supervoxels/done/")]
    assert len({r["pid"] for r in records}) >= 1 and all(r["seconds"] >= 0 for r in records)

    taken = run_cli(*args[:6], "0.3", *args[7:])
    assert_one_line_error(taken, "holds a segmentation made with other parameters",
                          "--overwrite")


@pytest.mark.parametrize("local", [False, True], ids=["no-local-workers", "another-queue-local"])
def test_waits_for_workers_elsewhere(tmp_path, maps, monkeypatch, local):
    """--queue without --parallel: the run waits on the markers while a worker drains it; so
    does a run whose local workers drain only another queue (a pipeline's own, while the
    queues the file names have their workers elsewhere)."""
    monkeypatch.setattr(runner_module, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(runner_module, "LOCAL_MARKER_POLL_SECONDS", 0.1)
    path, array = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    queue = f"fq://{tmp_path / 'queue'}"
    plan = plan_segment(path, output, method="watershed", threshold=0.19,
                        task_shape=(48, 40, 10), chunk_size=CHUNK)
    worker = Worker(queue, poll_seconds=0.05)
    lines: list[str] = []
    failure: list[BaseException] = []

    runner = Runner(lambda stage: queue, parallel=1, progress=False, echo=lines.append,
                    local_queues={f"fq://{tmp_path / 'local'}"})

    def drive() -> None:
        try:
            if local:
                runner.run(segment_stages(plan))
            else:
                run_stages(segment_stages(plan), queue=queue, progress=False, echo=lines.append)
        except BaseException as err:  # reported by the test below
            failure.append(err)
        finally:
            worker.stop_requested.set()

    driver = threading.Thread(target=drive)
    driver.start()
    report = worker.run()
    driver.join()
    assert not failure, failure
    # halo, supervoxels, reduce-L0, -L1, tables-L1, region-graph, agglomerate-L0, -L1,
    # segments-L1, remap
    assert report.executed == 4 + 4 + 4 + 1 + 1 + 4 + 4 + 1 + 1 + 4 and report.errors == 0
    # every stage but smooth (off) waited: no local worker was started on the queue
    assert sum("waiting for workers" in line for line in lines) == len(plan.stages) - 1
    assert "stage smooth: off (--sigma 0)" in lines
    np.testing.assert_array_equal(read(output), segment(array, "watershed", 0.19))


def test_an_empty_queue_with_unfinished_tasks_fails_instead_of_waiting(tmp_path, maps):
    path, _ = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    queue = f"fq://{tmp_path / 'queue'}"
    insert_tasks(queue, [])
    (tmp_path / "queue").mkdir(exist_ok=True)
    stage = Stage(name="supervoxels", layer=output, key="k", parameters={},
                  make_tasks=lambda: iter([("0-8_0-8_0-2", None)]), task_count=1,
                  memory_bytes=0)
    stage.start()
    runner = Runner(lambda s: queue, progress=False, poll=0.01, echo=lambda line: None)
    with pytest.raises(InputError, match="have no completion marker: .*failed/ holds none"):
        runner._wait(stage, queue, None, None)
    (tmp_path / "queue" / "failed").mkdir()  # a worker set it aside
    (tmp_path / "queue" / "failed" / "task.json").write_text("{}")
    with pytest.raises(InputError, match="have no completion marker: they failed"):
        runner._wait(stage, queue, None, None)


@pytest.fixture(scope="module")
def bad_maps(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, dtype, channels in [("uint16", "uint16", 1), ("two", "uint8", 2)]:
        out[name] = f"file://{root / name}"
        create_layer(out[name], layer_type="image", dtype=dtype, resolution=(4, 4, 40),
                     size=(8, 8, 2), chunk_size=(8, 8, 2), num_channels=channels)
    out["big"] = f"file://{root / 'big'}"  # an info file only: planning reads no chunk
    create_layer(out["big"], layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                 size=(1344, 1344, 1344), chunk_size=(64, 64, 64), num_channels=1)
    return out


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("threshold-high", ("--threshold 1.5 is outside [0, 1]",)),
        ("threshold-negative", ("--threshold -0.1 is outside [0, 1]",)),
        ("uint16", ("holds uint16", "uint8")),
        ("channels", ("has 2 channels", "affinity map 3")),
        ("bounds", ("--bounds", "reach outside")),
        ("holds-data", ("holds data that `deepem3d segment` did not write", "--overwrite")),
        ("block-too-big", ("1344 x 1344 x 1344 voxels", "fewer than 2**31")),
        ("sharded-off-grid", ("--sharded", "off the shard grid", "multiples of 32")),
        ("sharded-chunks", ("--sharded", "same power-of-two number of chunks", "40,24,6")),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, maps, bad_maps, case, fragments):
    path = maps["boundary"][0]
    output = tmp_path / "seg"
    threshold = {"threshold-high": "1.5", "threshold-negative": "-0.1"}.get(case, "0.5")
    extra: list[str] = []
    if case == "uint16":
        path = bad_maps["uint16"]
    elif case == "channels":
        path = bad_maps["two"]
    elif case == "bounds":
        extra = ["--bounds", "0,0,0,96,80,11"]
    elif case == "block-too-big":
        path, extra = bad_maps["big"], ["--task-shape", "1344,1344,1344"]
    elif case == "sharded-off-grid":
        extra = ["--sharded", "--task-shape", "32,32,8", "--chunk-size", "8,8,2",
                 "--bounds", "16,0,0,96,80,10"]
    elif case == "sharded-chunks":
        extra = ["--sharded", "--task-shape", "40,24,6", "--chunk-size", "8,8,2"]
    elif case == "holds-data":
        vol = create_layer(f"file://{output}", layer_type="segmentation", dtype="uint64",
                           resolution=(4, 4, 40), size=SHAPE, chunk_size=CHUNK)
        vol[0:8, 0:8, 0:2] = np.ones((8, 8, 2), np.uint64)
    result = run_cli("segment", path, output, "--method", "mean", "--threshold", threshold,
                     *extra)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("bad", [np.nan, 1.5], ids=["nan", "above-1"])
@pytest.mark.parametrize("sigma", ["0", "1"])
def test_a_float_map_outside_0_1_is_one_line_exit_2(tmp_path, bad, sigma):
    """A float32 map with a NaN or a value above 1 (logits, a failed inference) failed its
    task with a ValueError, retried 5 times with tracebacks on stderr: the same on every try,
    bad input, refused in one line naming the layer and the box."""
    path = f"file://{tmp_path / 'map'}"
    array = np.random.default_rng(0).random((16, 16, 4), dtype=np.float32)
    array[9, 3, 2] = bad
    create_layer(path, layer_type="image", dtype="float32", resolution=(4, 4, 40),
                 size=array.shape, chunk_size=CHUNK, provenance={"task": "InferenceTask"}
                 )[:, :, :] = array
    result = cli_here("segment", path, tmp_path / "seg", "--method", "mean", "--threshold",
                      "0.5", "--sigma", sigma)
    assert_one_line_error(result, path, "outside [0, 1]", "0,0,0,16,16,4")
    assert not list((tmp_path / "seg").glob("4_4_40/*")), "wrote segmentation chunks"


@pytest.fixture(scope="module")
def sample_layers(tmp_path_factory) -> Path:
    """DEST of `deepem3d sample`: DEST/image (the EM image), DEST/ground_truth."""
    dest = tmp_path_factory.mktemp("sample")
    run_cli("sample", dest, check=True)
    return dest


def test_an_em_image_is_refused_as_a_map(tmp_path, sample_layers, maps):
    result = run_cli("segment", sample_layers / "image", tmp_path / "seg", "--method", "mean",
                     "--threshold", "0.5", "--dry-run")
    assert_one_line_error(result, "is an EM image (written by `deepem3d sample`)",
                          "deepem3d infer")
    result = run_cli("segment", sample_layers / "ground_truth", tmp_path / "seg", "--method",
                     "mean", "--threshold", "0.5", "--dry-run")
    assert_one_line_error(result, "is a segmentation layer, not a boundary or affinity map")
    # a map of deepem3d's own (provenance of `deepem3d infer`) plans without a warning
    path, _ = maps["boundary"]
    inferred = f"file://{tmp_path / 'inferred'}"
    vol = create_layer(inferred, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                       size=SHAPE, chunk_size=CHUNK, provenance={"task": "InferenceTask"})
    vol[:, :, :] = CloudVolume(path, progress=False)[:, :, :]
    plan = plan_segment(inferred, f"file://{tmp_path / 'seg'}", method="mean", threshold=0.5)
    assert plan.warnings == []


def test_a_map_without_provenance_is_segmented_with_a_warning_and_not_kept(tmp_path, maps):
    """As other tools make maps: a warning; and since nothing shows such a map's data
    unchanged (its fingerprint is its info alone), --overwrite makes its supervoxels again:
    a map rewritten in place was segmented from the supervoxels of its former data."""
    _, array = maps["boundary"]
    path = f"file://{tmp_path / 'map'}"  # create_layer without provenance
    create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40), size=SHAPE,
                 chunk_size=CHUNK)[:, :, :] = array
    output = tmp_path / "seg"
    result = run_cli("segment", path, output, "--method", "mean", "--threshold", "0.5",
                     "--dry-run", check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("deepem3d:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("deepem3d: warning: ") and "no provenance" in warnings[0]
    assert "1 block(s)" in result.stdout, result.stdout

    run(path, f"file://{output}", "mean", 0.5, (40, 24, 6))
    rewritten = np.ascontiguousarray(array[::-1])  # in place, same geometry
    CloudVolume(path, progress=False)[:, :, :] = rewritten
    plan = plan_segment(path, f"file://{output}", method="mean", threshold=0.3,
                        task_shape=(40, 24, 6), chunk_size=CHUNK, overwrite=True)
    assert plan.action == "rebuild" and plan.reset_chunk_stages
    assert any("--overwrite makes them again" in w for w in plan.warnings), plan.warnings
    run(path, f"file://{output}", "mean", 0.3, (40, 24, 6), overwrite=True)
    np.testing.assert_array_equal(read(f"file://{output}"), segment(rewritten, "mean", 0.3))


def test_work_files_are_stored_narrow_and_read_back_in_full(tmp_path):
    """Stored npz arrays take the narrowest unsigned type; readers get the canonical types."""
    from deepem3d.segmentation.chunks import Chunk
    from deepem3d.segmentation.region_graph import RegionGraph, region_graph
    from deepem3d.segmentation.supervoxels import ChunkExits, supervoxel_chunk, supervoxels
    from deepem3d.storage.npz import get_npz, put_npz

    rng = np.random.default_rng(5)
    m = rng.integers(0, 256, (9, 8, 6, 3)).astype(np.uint8)
    graph = region_graph(supervoxels(m), m)
    _, exits = supervoxel_chunk(m, (0, 0, 0), Chunk((0, 0, 0), (9, 8, 6), (9, 8, 6)))
    files = CloudFiles(f"file://{tmp_path}")
    put_npz(files, "graph.npz", graph.to_arrays())
    put_npz(files, "exits.npz", exits.to_arrays())
    stored = get_npz(files, "graph.npz")
    assert stored["u"].dtype == np.uint16 and stored["count"].dtype == np.uint8  # 432 voxels
    back = RegionGraph.from_arrays(stored)
    assert back.equals(graph)  # values and dtypes (uint64, uint8 floors and saddles)
    again = ChunkExits.from_arrays(get_npz(files, "exits.npz"))
    for name, value in exits.to_arrays().items():
        np.testing.assert_array_equal(getattr(again, name), value)
        assert np.asarray(getattr(again, name)).dtype == value.dtype, name


def _info_only_map(path: Path, size: int) -> str:
    """An affinity map layer with an info and no data: all a --dry-run reads."""
    url = f"file://{path}"
    create_layer(url, layer_type="image", dtype="uint8", resolution=(8, 8, 8),
                 size=(size,) * 3, chunk_size=(256, 256, 64), num_channels=3)
    return url


def test_dry_run_plans_each_octree_level_of_an_info_only_layer(tmp_path):
    """No data read: the plan names every level with its tasks and largest task, sized at the
    default edge density (a real map's) and a smooth map's, and a --max-task-memory it cannot
    meet is refused in one line that names the stage."""
    url = _info_only_map(tmp_path / "map", 2048)
    args = ("segment", url, f"file://{tmp_path / 'seg'}", "--method", "mean", "--threshold",
            "0.5", "--dry-run")
    result = run_cli(*args, "--max-task-memory", "24GiB", "--edges-per-voxel", "0.02")
    assert result.returncode == 0, result.stderr
    plan = plan_segment(url, f"file://{tmp_path / 'seg'}", method="mean", threshold=0.5)
    assert plan.edges_per_voxel == 0.3  # real maps: the shipped model's measured 0.14-0.29
    levels = [s for s in plan.stages if s.startswith(("agglomerate-L", "segments-L"))]
    assert len(levels) == 2 * plan.octree.height + 1 and plan.octree.height >= 3
    for stage in levels + [s for s in plan.stages if s.startswith(("reduce-L", "tables-L"))]:
        assert f"  {stage} " in result.stdout, (stage, result.stdout)
    assert "sized at 0.02 region-graph edges per voxel" in result.stdout
    assert "and for a smooth map at 0.02" in result.stdout
    assert not (tmp_path / "seg").exists()  # a dry run writes nothing
    need = {s: plan.stage_memory_bytes(s) for s in levels}
    limit = max(max(plan.stage_memory_bytes(s) for s in plan.chunk_stages()),
                plan.task_memory_bytes) + 1
    first = next(s for s in plan.stages if s in need and need[s] > limit)
    refused = run_cli(*args, "--max-task-memory", str(limit))
    assert_one_line_error(refused, f"stage {first} needs about", "above --max-task-memory")
    # 10,000^3 (1 Tvox): planned in seconds, every level printed
    big = _info_only_map(tmp_path / "big", 10000)
    result = run_cli("segment", big, f"file://{tmp_path / 'big-seg'}", "--method", "mean",
                     "--threshold", "0.5", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "  agglomerate-L8 " in result.stdout and "  reduce-L8 " in result.stdout
    # 100,000^3 (1 Pvox, 6e7 blocks): the blocks are counted, not listed, and each level's
    # largest node found from a few kinds of node per axis
    huge = _info_only_map(tmp_path / "huge", 100000)
    result = run_cli("segment", huge, f"file://{tmp_path / 'huge-seg'}", "--method", "mean",
                     "--threshold", "0.5", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "60044208 block(s)" in result.stdout and "  agglomerate-L11 " in result.stdout


def test_sharded_layers_hold_the_same_voxels_a_shard_per_block(tmp_path, maps):
    """--sharded: the segmentation and the smoothed map are a shard file per block, with the
    voxels of the whole-array result; their mip levels (igneous's sharded downsampling) equal
    those of the chunked layers."""
    from deepem3d.stages.downsample import downsample_stage, plan_downsample
    from deepem3d.stages.workdir import smoothed_layer_path

    path, array = maps["boundary"]
    layers = {}
    for sharded in (False, True):
        output = f"file://{tmp_path / ('sharded' if sharded else 'chunked')}"
        plan = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(32, 32, 8),
                            chunk_size=CHUNK, sigma=1.0, sharded=sharded)
        run_stages(segment_stages(plan), execute=execute_here, echo=lambda line: None)
        layers[sharded] = output
        for layer in (output, smoothed_layer_path(output)):
            names = list(CloudFiles(layer).list(prefix="4_4_40/"))
            assert all(n.endswith(".shard") for n in names) == sharded
            assert len(names) == (len(plan.blocks) if sharded else 12 * 10 * 5)
        down = plan_downsample(output, num_mips=2)
        assert down.sharded == sharded
        run_stages([downsample_stage(down)], execute=execute_here, echo=lambda line: None)
    np.testing.assert_array_equal(read(layers[True]), segment(array, "mean", 0.5, sigma=1.0))
    assert_same_mips(layers[False], layers[True], range(3))
    assert_same_mips(smoothed_layer_path(layers[False]), smoothed_layer_path(layers[True]),
                     range(1))
    assert CloudVolume(layers[True], mip=2).meta.sharding(2) is not None
