"""`deepem3d downsample` through the CLI, with local workers, against igneous in-process."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError
from deepem3d.run.runner import execute_here, run_stages
from deepem3d.sample import load_sample
from deepem3d.stages.downsample import (
    AVERAGING_EXTRA,
    TASK_BASE_BYTES,
    downsample_stage,
    plan_downsample,
)
from deepem3d.stages.frame import Markers
from deepem3d.stages.meshes import mesh_stages, plan_meshes
from deepem3d.storage.layers import create_layer
from deepem3d.storage.sharding import block_sharding
from deepem3d.units import format_triple
from tests.conftest import (
    assert_one_line_error,
    assert_same_mips,
    cli_here,
    file_digests,
    igneous_reference,
    make_layer,
    run_cli,
)


@pytest.mark.parametrize("layer_type", ["image", "segmentation"])
def test_downsample_cli_equals_igneous(tmp_path, layer_type):
    layer = make_layer(tmp_path / "layer", layer_type)
    full_res = file_digests(tmp_path / "layer" / "4_4_50")
    info_before = CloudFiles(layer).get_json("info")

    dry = run_cli("downsample", layer, "--num-mips", "2", "--dry-run", check=True)
    # one task per chunk row in z: the memory target allows the whole 256 x 256 plane
    assert re.match(r"2 DownsampleTask\(s\) of \d+ x \d+ x 10 voxels at mip 0, adding 2 mip",
                    dry.stdout), dry.stdout
    assert "MiB per task" in dry.stdout
    assert CloudFiles(layer).get_json("info") == info_before, "--dry-run wrote nothing"
    assert not (tmp_path / "layer" / "tasks").exists()

    reference = igneous_reference(
        tmp_path / "layer", tmp_path / "reference", 2, (2, 2, 1), memory_target=3500 * 10**6
    )
    queue = f"fq://{tmp_path / 'queue'}"
    out = run_cli("downsample", layer, "--queue", queue, "--parallel", "2", "--num-mips", "2",
                  check=True)
    assert "run now)" in out.stdout and "(0 run now)" not in out.stdout, out.stdout
    assert Markers(layer, "downsample-mip0").is_complete()
    assert_same_mips(layer, reference, range(1, 3))
    assert file_digests(tmp_path / "layer" / "4_4_50") == full_res

    again = run_cli("downsample", layer, "--queue", queue, "--parallel", "2", "--num-mips", "2",
                    check=True)
    assert "(0 run now)" in again.stdout, again.stdout

    status = run_cli("queue", "status", queue, check=True)
    assert "enqueued: 0" in status.stdout


def test_downsample_on_a_queue_without_local_workers(tmp_path):
    layer = make_layer(tmp_path / "layer")
    queue = f"fq://{tmp_path / 'queue'}"
    out = run_cli("downsample", layer, "--queue", queue, "--num-mips", "1", check=True)
    assert "deepem3d worker" in out.stdout
    status = run_cli("queue", "status", queue, check=True)
    assert "inserted: 2  enqueued: 2" in status.stdout
    assert not Markers(layer, "downsample-mip0").is_complete()
    run_cli("worker", queue, "--exit-when-empty", check=True)
    assert Markers(layer, "downsample-mip0").is_complete()
    assert "enqueued: 0" in run_cli("queue", "status", queue, "--watch", check=True).stdout
    # --bounds are at --mip: a plan from mip 1 covers those voxels of mip 1 (they were read
    # as mip-0 voxels, halved in x and y)
    region = Bbox((0, 0, 0), (128, 128, 10))
    assert plan_downsample(layer, mip=1, bounds=region).bounds == region


def test_levels_stop_where_the_voxel_offset_leaves_their_grid(tmp_path):
    # x 4 is on the grid of factor 2 and 4, y 2 only on that of 2: one level, where memory
    # alone would allow more; a level at floor(2 / 4) would be drawn half a voxel off
    layer = make_layer(tmp_path / "layer", voxel_offset=(4, 2, 0))
    plan = plan_downsample(layer)
    assert plan.num_mips == 1 and "only 1 level(s)" in plan.describe(), plan.describe()
    assert plan_downsample(layer, num_mips=1).offset_note == ""
    assert_one_line_error(run_cli("downsample", layer, "--num-mips", "2", "--dry-run"),
                          "voxel offset 4,2,0", "--num-mips 1 or fewer")
    odd = make_layer(tmp_path / "odd", voxel_offset=(3, 0, 0))
    assert_one_line_error(run_cli("downsample", odd, "--dry-run"), "voxel offset 3,0,0",
                          "--voxel-offset")
    assert not (tmp_path / "odd" / "8_8_50").exists()


def test_fewer_levels_than_asked_say_why(tmp_path):
    """--num-mips 20 was cut to what memory or the layer's size allows without a word, and
    --num-mips 100 on a layer at offset 0 was refused as off the offset's grid."""
    layer = make_layer(tmp_path / "layer")  # 256 x 256 x 20 in 64 x 64 x 10 chunks
    plan = plan_downsample(layer, num_mips=100)
    assert plan.num_mips == 2 and "no larger than a chunk" in plan.describe(), plan.describe()
    plan = plan_downsample(layer, num_mips=2, memory_target=200_000)
    assert plan.num_mips == 1, plan.describe()
    assert "--memory allows 1; downsample again from --mip 1" in plan.describe()
    assert plan_downsample(layer, num_mips=2).offset_note == ""


def test_downsample_bad_input(tmp_path):
    assert_one_line_error(run_cli("downsample", tmp_path / "nothing"), "no precomputed layer")
    layer = make_layer(tmp_path / "layer")
    assert_one_line_error(
        run_cli("downsample", layer, "--queue", "redis://somewhere"), "unknown queue"
    )
    assert_one_line_error(run_cli("downsample", layer, "--factor", "2,2"), "malformed --factor")
    assert_one_line_error(run_cli("downsample", layer, "--bounds", "0,0,0,10"), "--bounds")
    info = CloudFiles(layer).get_json("info")
    assert_one_line_error(run_cli("downsample", layer, "--bounds", "0,0,0,512,512,20"),
                          "--bounds", "reach outside")  # the layer is 256 x 256 x 20
    assert CloudFiles(layer).get_json("info") == info


def test_a_segmentation_factor_igneous_fails_on_is_refused_at_planning(tmp_path):
    """2,1,1 on a segmentation passed planning and failed in every task (tinybrain's mode
    pooling: "Factors less than one"), 5 leases each; an image takes it."""
    segmentation = make_layer(tmp_path / "seg", "segmentation")
    for factor in ((2, 1, 1), (1, 1, 2), (4, 2, 1)):
        with pytest.raises(InputError, match=f"fails on --factor {format_triple(factor)}: "
                           "with a factor of 1 on an axis, the other two must be equal"):
            plan_downsample(segmentation, factor=factor, num_mips=1)
    for factor in ((2, 2, 1), (2, 1, 2), (4, 4, 1), (2, 2, 2), (3, 1, 1), (4, 4, 2)):
        assert plan_downsample(segmentation, factor=factor, num_mips=1).num_mips == 1
    # above 1 on every axis: tinybrain halves each first (2,2,4 leaves 1,1,2), then fails
    for factor, left in (((2, 2, 4), "1,1,2"), ((4, 2, 2), "2,1,1"), ((4, 4, 8), "1,1,2")):
        with pytest.raises(InputError, match=f"fails on --factor {format_triple(factor)}: .* "
                           f"first halved on each, which leaves {left} here"):
            plan_downsample(segmentation, factor=factor, num_mips=1)
    image = make_layer(tmp_path / "image")
    assert plan_downsample(image, factor=(2, 1, 1), num_mips=1).num_mips == 1


def test_tasks_that_fail_leave_their_queue_and_log_where_the_message_says(tmp_path):
    """A layer with a folder where a chunk goes (an error the frame does not take for bad
    input): the local workers retry its task, then set it aside, and the one-line message
    names the temporary queue's failed/ folder and the workers' log, which are kept. (A
    missing chunk, or one that does not decode, is bad input: test_objects.)"""
    make_layer(tmp_path / "layer", "segmentation")
    chunk = next((tmp_path / "layer" / "4_4_50").glob("0-64_0-64_0-10*"))
    chunk.unlink()
    chunk.mkdir()
    result = run_cli("downsample", tmp_path / "layer", "--num-mips", "1", "--parallel", "1")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    found = re.search(r"see (\S+)/failed/ and the workers' log (\S+)\)", last)
    assert last.startswith("deepem3d: error:") and found, last
    queue, log = found.groups()
    try:
        assert list(Path(queue).glob("failed/*.error")), "nothing set aside"
        assert "Traceback" in Path(log).read_text()
    finally:
        shutil.rmtree(queue, ignore_errors=True)


def test_another_factor_is_refused_where_levels_exist(tmp_path, monkeypatch):
    """--factor 2,2,2 on a layer with a 2,2,1 mip 1: igneous appended its level as mip 2 while
    its tasks wrote mip 1 over, and exited 0. Each planned level must be new or the scale
    already at its index, as igneous would write it; refused before the info is touched."""
    make_layer(tmp_path / "source")
    layer = igneous_reference(tmp_path / "source", tmp_path / "layer", 1, (2, 2, 1))
    info, mip1 = CloudFiles(layer).get_json("info"), file_digests(tmp_path / "layer" / "8_8_50")
    assert_one_line_error(
        cli_here("downsample", layer, "--factor", "2,2,2", "--num-mips", "1", "--parallel", "1"),
        "mip 1 exists at 8,8,50 nm", "makes 8,8,100 nm", "--factor 2,2,1", "--mip 1")
    assert CloudFiles(layer).get_json("info") == info
    assert file_digests(tmp_path / "layer" / "8_8_50") == mip1
    # the same factor again, more levels of it, or the new factor above the existing levels
    assert plan_downsample(layer, factor=(2, 2, 1), num_mips=2).num_mips == 2
    assert plan_downsample(layer, mip=1, factor=(2, 2, 2), num_mips=1).num_mips == 1
    # once mip 2 is made by 2,2,2 above mip 1, more 2,2,1 levels stop short of it (the advice
    # was the factor between mips 1 and 2, which the first level then refused)
    grown = {**info, "scales": [*info["scales"], {  # as `--mip 1 --factor 2,2,2` leaves it
        **info["scales"][1], "key": "16_16_100", "resolution": [16, 16, 100]}]}
    CloudFiles(layer).put_json("info", grown)
    with pytest.raises(InputError, match=r"mip 2 exists at 16,16,100 nm.*ask for --num-mips 1, "
                                         r"or add levels above"):
        plan_downsample(layer, factor=(2, 2, 1), num_mips=2)
    assert plan_downsample(layer, factor=(2, 2, 1), num_mips=1).num_mips == 1
    CloudFiles(layer).put_json("info", info)
    # mip 1 made with other chunks: igneous would give it the chunks of mip 0
    info["scales"][1]["chunk_sizes"] = [[32, 32, 10]]
    CloudFiles(layer).put_json("info", info)
    with pytest.raises(InputError, match=r"mip 1 \(8_8_50\) exists with another chunk_sizes"):
        plan_downsample(layer, factor=(2, 2, 1), num_mips=1)

    # a failure while igneous lists the tasks, after it added the scales: the info is put back
    import igneous.task_creation.image as image

    def fails(*args, **kwargs):
        image_create(*args, **kwargs)
        raise OSError("listing failed")

    fresh = make_layer(tmp_path / "fresh")
    before = CloudFiles(fresh).get_json("info")
    image_create = image.create_downsampling_tasks
    monkeypatch.setattr(image, "create_downsampling_tasks", fails)
    with pytest.raises(OSError, match="listing failed"):
        list(downsample_stage(plan_downsample(fresh, num_mips=1)).make_tasks())
    assert CloudFiles(fresh).get_json("info") == before


def _sharded_segmentation_downsampled(tmp_path, segment_voxels: int) -> str:
    """A 128 x 128 x 32 sharded segmentation (runs of `segment_voxels` voxels in x order),
    downsampled by two levels."""
    size, chunk = (128, 128, 32), (32, 32, 8)
    layer = f"file://{tmp_path / 'layer'}"
    vol = create_layer(layer, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 4),
                       size=size, chunk_size=chunk, sharding=block_sharding(size, chunk, size))
    vol[vol.bounds] = np.arange(np.prod(size), dtype=np.uint64).reshape((*size, 1)) // \
        segment_voxels
    run_stages([downsample_stage(plan_downsample(layer, num_mips=2))], execute=execute_here,
               echo=lambda line: None)
    return layer


def test_sharded_levels_above_those_planned_are_not_dropped(tmp_path):
    """igneous's sharded downsampling cuts the info's scales to those it makes: --num-mips 1 on
    a layer with two sharded levels took mip 2 out of the info."""
    layer = _sharded_segmentation_downsampled(tmp_path, segment_voxels=1000)
    assert plan_downsample(layer, num_mips=2).num_mips == 2  # the same levels again
    with pytest.raises(InputError, match="mip 2 exists above the 1 level"):
        plan_downsample(layer, num_mips=1)
    with pytest.raises(InputError, match=r"mip 1 exists at 8,8,8 nm.*--factor 2,2,2"):
        plan_downsample(layer, num_mips=1, factor=(2, 2, 1))


def test_a_sharded_layer_meshed_above_its_mip_downsamples_again(tmp_path):
    """igneous's sharded downsampling cuts the info's scales to `mip` before it opens the
    layer, which then fails where meshes (or skeletons) are made at a mip above: a second
    downsample (a resumed run's) of a sharded segmentation meshed at mip 2 was a traceback."""
    layer = _sharded_segmentation_downsampled(tmp_path, segment_voxels=5000)
    run_stages(mesh_stages(plan_meshes(layer, mip=2, sharded=True)), execute=execute_here,
               echo=lambda line: None)
    before = CloudFiles(layer).get_json("info")
    again = cli_here("downsample", layer, "--num-mips", "2")
    assert again.returncode == 0, again.stderr
    assert "(0 run now)" in again.stdout
    assert CloudFiles(layer).get_json("info") == before


def test_bounds_keep_the_tasks_inside_them(tmp_path):
    """--bounds 0,0,0,128,128,20 of a 256 x 256 layer: igneous's tasks, 256 x 256 from the
    bounds' start, wrote the levels over the whole layer (and failed on a chunk missing outside
    the bounds), while the plan showed, and sized the memory of, 128 x 128 tasks. The task
    shape is now what the bounds hold whole, with the levels that allows."""
    layer = make_layer(tmp_path / "layer")  # 256 x 256 x 20 in 64 x 64 x 10 chunks
    reference = igneous_reference(tmp_path / "layer", tmp_path / "reference", 1, (2, 2, 1))
    next((tmp_path / "layer" / "4_4_50").glob("192-256_192-256_10-20*")).unlink()
    plan = plan_downsample(layer, bounds=Bbox((0, 0, 0), (128, 128, 20)))
    assert plan.num_mips == 1 and plan.task_shape == (128, 128, 10), plan.describe()
    assert plan.task_count == 2 and plan.memory_bytes == int(
        128 * 128 * 10 * (4 / 3 + AVERAGING_EXTRA) + TASK_BASE_BYTES)
    assert "hold whole tasks of only 1 level(s) of factor 2,2,1 (blocks of 128,128,10" \
        in plan.describe()
    run_cli("downsample", layer, "--bounds", "0,0,0,128,128,20", "--parallel", "1", check=True)
    written = {p.name.split(".")[0] for p in (tmp_path / "layer" / "8_8_50").iterdir()}
    assert written == {"0-64_0-64_0-10", "0-64_0-64_10-20"}
    assert (CloudVolume(layer, mip=1)[0:64, 0:64, 0:20]
            == CloudVolume(reference, mip=1)[0:64, 0:64, 0:20]).all()
    assert_one_line_error(cli_here("downsample", layer, "--bounds", "0,0,0,128,128,20",
                                   "--num-mips", "2", "--dry-run"), "--num-mips 1 or fewer")
    assert_one_line_error(cli_here("downsample", layer, "--bounds", "64,64,0,128,128,20",
                                   "--dry-run"), "hold no whole task of factor 2,2,1",
                          "blocks of 128,128,10 voxels from the voxel offset 0,0,0")
    # bounds ending at the layer's end hold the last, clipped task
    assert plan_downsample(layer, bounds=Bbox((128, 128, 0), (256, 256, 20))).num_mips == 1


def test_a_factor_not_a_power_of_two_keeps_the_dry_runs_output_its_own(tmp_path):
    """--factor 3,3,1 --dry-run printed CloudVolume's `WARNING: adding scale with a
    non-power-of-two scale factor: [3 3 1]This is very uncommon...` (no line break) on stdout,
    from the plan's copy of the info, before the plan's own line."""
    layer = make_layer(tmp_path / "layer")  # 256 x 256 x 20 in 64 x 64 x 10 chunks
    info = CloudFiles(layer).get_json("info")
    done = cli_here("downsample", layer, "--factor", "3,3,1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stdout and done.stdout.startswith("2 DownsampleTask"), \
        done.stdout
    assert CloudFiles(layer).get_json("info") == info


def test_the_offset_note_only_where_the_offset_is_the_limit(tmp_path):
    """At offset 8,16,4 the grid allows 3 levels, the layer's size 2: the plan said the
    offset had made fewer levels."""
    plan = plan_downsample(make_layer(tmp_path / "layer", voxel_offset=(8, 16, 4)))
    assert plan.num_mips == 2 and plan.offset_note == "", plan.describe()


@pytest.mark.parametrize("layer_type", ["image", "segmentation"])
def test_a_task_peaks_within_its_plan(tmp_path, layer_type):
    """A task's own peak (its marker's peak_added_mib) stays within the plan's memory. One
    1024 x 1024 x 8 task of 3 levels: the uint8 image's peaked at 16.2 MiB where the plan, then
    igneous's model alone (the source box and its levels), said 10.7."""
    image, ids = (a[:8, :256, :256] for a in load_sample())
    array = (image if layer_type == "image" else ids).astype(
        "uint8" if layer_type == "image" else "uint64")
    path = f"file://{tmp_path / 'layer'}"
    vol = create_layer(path, layer_type=layer_type, dtype=str(array.dtype),
                       resolution=(4, 4, 50), size=(1024, 1024, 8), chunk_size=(128, 128, 8))
    vol[vol.bounds] = np.tile(xyz_from_zyx(array), (4, 4, 1))
    plan = plan_downsample(path)
    assert plan.task_count == 1 and plan.num_mips == 3, plan.describe()
    run_cli("downsample", path, "--parallel", "1", check=True)
    peak = max(m["peak_added_mib"] for m in Markers(path, "downsample-mip0").records())
    assert peak * 2**20 <= plan.memory_bytes, (peak, plan.memory_bytes / 2**20)
