"""`deepem3d resample`: the image at another resolution, the same bytes whatever the task
shape, equal to one whole-volume call, exact where it should be (same resolution; a linear
ramp), and read by `infer` as a model's resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError
from deepem3d.run.runner import execute_here, run_stages
from deepem3d.sample import load_sample
from deepem3d.stages.blocks import block_id, parse_block_id
from deepem3d.stages.resample import (
    SECONDS_PER_SOURCE_VOXEL,
    SECONDS_PER_VOXEL,
    plan_resample,
    resample_block,
    resample_stage,
    target_geometry,
)
from deepem3d.storage.layers import create_layer
from tests.conftest import assert_one_line_error, run_cli

SOURCE = (4.6, 4.6, 50.0)
OFFSET = (10, 20, 3)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 96 x 80 x 7 crop of the sample, said to be at 4.6 x 4.6 x 50 nm."""
    image, _ = load_sample()
    array = np.asfortranarray(xyz_from_zyx(image[5:12, 100:180, 200:296]))
    path = f"file://{tmp_path_factory.mktemp('resample') / 'image'}"
    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=SOURCE,
                       size=array.shape, voxel_offset=OFFSET, chunk_size=(16, 16, 2))
    vol[:, :, :] = array
    return path, array


def run_resample(path: str, output: str, resolution, **kwargs):
    plan = plan_resample(path, output, resolution=resolution, **kwargs)
    run_stages([resample_stage(plan)], execute=execute_here, echo=lambda line: None)
    return plan, np.asarray(CloudVolume(output)[:, :, :])[..., 0]


def test_blocks_of_any_shape_give_the_whole_volume_call(image, tmp_path):
    path, array = image
    target = (4.0, 4.0, 50.0)
    offset, size = target_geometry(SOURCE, OFFSET, array.shape, target)
    whole = resample_block(array, OFFSET, Bbox(offset, np.add(offset, size)), SOURCE, OFFSET,
                           array.shape, target)
    assert whole.shape == tuple(size) == (111, 92, 7) and tuple(offset) == (11, 23, 3)
    outputs = {}
    for shape in ((112, 96, 8), (32, 16, 2), (48, 32, 4)):
        plan, outputs[shape] = run_resample(path, f"file://{tmp_path / str(shape[1])}", target,
                                            task_shape=shape)
        np.testing.assert_array_equal(outputs[shape], whole, err_msg=str(shape))
    assert len(plan.blocks) == 3 * 3 * 2  # the last shape, 48 x 32 x 4
    vol = CloudVolume(f"file://{tmp_path / '32'}")
    assert vol.resolution.tolist() == [4, 4, 50] and vol.voxel_offset.tolist() == [11, 23, 3]


def test_a_layer_that_starts_below_zero_passes_the_workers_checks(image, tmp_path):
    """Blocks that start below x = 0 have ids that begin with "-" ("-16-0_..."): a worker
    admits them (execute_here runs the same checks) and they give the whole-volume call."""
    _, array = image
    crop = np.asfortranarray(array[:40, :30, :3])
    start = (-21, -9, -2)
    path = f"file://{tmp_path / 'below'}"
    create_layer(path, layer_type="image", dtype="uint8", resolution=SOURCE, size=crop.shape,
                 voxel_offset=start, chunk_size=(16, 16, 2))[:, :, :] = crop
    target = (4.0, 4.0, 50.0)
    offset, size = target_geometry(SOURCE, start, crop.shape, target)
    whole = resample_block(crop, start, Bbox(offset, np.add(offset, size)), SOURCE, start,
                           crop.shape, target)
    _, out = run_resample(path, f"file://{tmp_path / 'out'}", target, task_shape=(16, 16, 2))
    np.testing.assert_array_equal(out, whole)
    for box in (Bbox((-32, -16, -4), (-16, 0, -2)), Bbox((-3, 5, 0), (7, 12, 1))):
        assert parse_block_id(block_id(box)) == box


def test_a_uint8_segmentation_is_written_as_uint32(tmp_path):
    """Neuroglancer allows uint8 segmentation layers (other tools write them); deepem3d's
    hold uint32 or uint64, so the ids widen, each voxel the nearest source voxel's."""
    ids = np.random.default_rng(1).integers(0, 256, size=(20, 12, 2), dtype=np.uint8)
    info = CloudVolume.create_new_info(1, "segmentation", "uint8", "raw", [8, 8, 50],
                                       [0, 0, 0], list(ids.shape), chunk_size=[16, 16, 2])
    path = f"file://{tmp_path / 'seg8'}"
    vol = CloudVolume(path, info=info, progress=False)
    vol.commit_info()
    vol[:, :, :] = ids
    _, out = run_resample(path, f"file://{tmp_path / 'out'}", (4.0, 4.0, 50.0))
    assert out.dtype == np.uint32 and out.shape == (40, 24, 2)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(ids, 2, 0), 2, 1))


def test_the_same_resolution_is_the_image_and_a_ramp_stays_a_ramp(image, tmp_path):
    path, array = image
    _, same = run_resample(path, f"file://{tmp_path / 'same'}", SOURCE)
    np.testing.assert_array_equal(same, array)
    x = np.arange(96, dtype=np.float64)
    ramp = np.broadcast_to((x * 2.0)[:, None, None], (96, 8, 2)).astype(np.uint8)
    out = resample_block(ramp, (0, 0, 0), Bbox((0, 0, 0), (192, 8, 2)), (2.0, 1, 1),
                         (0, 0, 0), ramp.shape, (1.0, 1, 1))
    inside = (np.arange(192) + 0.5) * 0.5 - 0.5  # source coordinate of each target voxel
    expected = np.rint(np.clip(inside, 0, 95) * 2.0)
    np.testing.assert_array_equal(out[:, 0, 0], expected)


def test_infer_reads_the_resampled_image_and_bad_input_is_one_line(image, tmp_path):
    path, _ = image
    result = run_cli("infer", path, tmp_path / "map", "--dry-run")
    assert_one_line_error(result, "trained at 4x4x50", "deepem3d resample IMAGE OUTPUT "
                          "--resolution 4,4,50")
    out = tmp_path / "resampled"
    done = run_cli("resample", path, out, "--resolution", "4,4,50", "--parallel", "1",
                   check=True)
    assert "resampled image written" in done.stdout
    assert run_cli("infer", out, tmp_path / "map", "--dry-run", check=True).returncode == 0
    again = run_cli("resample", path, out, "--resolution", "4,4,50", check=True)
    assert "resuming" in again.stdout  # the same run: its finished tasks are skipped
    # another resample's output: what it holds and what this plan wants, both named (a grid
    # made before the far end was rounded up differs only there)
    assert_one_line_error(run_cli("resample", path, out, "--resolution", "4.2,4.2,50"),
                          "already holds data, resampled with other settings or onto another "
                          "grid (at 4,4,50 nm", "this plan: 4.2,4.2,50 nm", "--overwrite")
    assert_one_line_error(run_cli("resample", path, tmp_path / "x", "--resolution", "0,4,50"),
                          "must be positive")
    assert_one_line_error(run_cli("resample", path, tmp_path / "x", "--resolution", "1,1,50"),
                          "more than 4 times", "deepem3d downsample")
    with pytest.raises(InputError, match="one-channel uint8 EM images .* uint32 or uint64 ids"):
        two = f"file://{tmp_path / 'two'}"
        create_layer(two, layer_type="image", dtype="uint8", resolution=SOURCE,
                     size=(8, 8, 2), num_channels=2)
        plan_resample(two, f"file://{tmp_path / 'y'}", resolution=(4, 4, 50))
    assert_one_line_error(run_cli("resample", path, tmp_path / "x"), "--resolution X,Y,Z or "
                          "--like LAYER")
    assert_one_line_error(run_cli("resample", path, tmp_path / "x", "--resolution", "4,4,50",
                                  "--like", path), "--resolution X,Y,Z or --like LAYER")


def test_nearest_is_exact_on_resolutions_of_many_digits():
    """25/3 nm is written 8.333333333333334: a 16-digit ratio, past int64 once multiplied."""
    from fractions import Fraction

    from deepem3d.stages.resample import _nearest

    q = Fraction(str(25 / 3)) / Fraction(8)
    expected = [math.floor((a + Fraction(1, 2)) * q) - 5 for a in range(2000, 2003)]
    assert _nearest(2000, 2003, 8.0, 25 / 3, 5).tolist() == expected == [2078, 2079, 2080]


def test_a_segmentation_goes_back_onto_the_image_grid_by_nearest_neighbour(image, tmp_path):
    """The way back for a user's own resolution: a segmentation made at 4 nm onto the 4.6 nm
    image's grid (--like), each voxel the id of the 4 nm voxel holding its centre (exact
    fractions: 4.6 is 23/5), 0 outside; the same bytes whatever the task shape."""
    path, array = image
    at4 = f"file://{tmp_path / 'at4'}"
    run_resample(path, at4, (4.0, 4.0, 50.0))
    vol4 = CloudVolume(at4)
    offset4, size4 = vol4.voxel_offset.tolist(), vol4.volume_size.tolist()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 2**40, size=(7, 6, 2), dtype=np.uint64)  # 16 x 16 x 4 voxel cells
    labels = np.repeat(np.repeat(np.repeat(ids, 16, 0), 16, 1), 4, 2)[
        :size4[0], :size4[1], :size4[2]].copy()
    labels[:5] = 0  # background stays background
    seg = f"file://{tmp_path / 'seg4'}"
    create_layer(seg, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 50),
                 size=size4, voxel_offset=offset4, chunk_size=(32, 32, 2))[:, :, :] = labels
    outputs = []
    for shape in ((96, 80, 8), (16, 32, 2)):
        out = tmp_path / f"back{shape[1]}"
        if shape[2] == 8:  # the command, once; then the same plan in this process
            done = run_cli("resample", seg, out, "--like", path, "--task-shape",
                           ",".join(map(str, shape)), "--parallel", "1", check=True)
            assert "(4x4x50 nm, nearest)" in done.stdout, done.stdout
            assert "segmentation written" in done.stdout
        else:
            run_resample(seg, f"file://{out}", None, like=path, task_shape=shape)
        back = CloudVolume(f"file://{out}")
        assert back.layer_type == "segmentation" and back.dtype == np.uint64
        assert back.voxel_offset.tolist() == list(OFFSET)
        assert back.volume_size.tolist() == list(array.shape)
        assert back.resolution.tolist() == list(SOURCE)
        assert back.chunk_size.tolist() == [16, 16, 2]  # the image's chunks
        outputs.append(np.asarray(back[:, :, :])[..., 0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    expected = np.zeros(array.shape, np.uint64)
    for i in range(array.shape[0]):  # the 4 nm voxel holding each 4.6 nm voxel's centre
        kx = int((OFFSET[0] + i + 0.5) * 46 // 40) - offset4[0]
        for j in range(array.shape[1]):
            ky = int((OFFSET[1] + j + 0.5) * 46 // 40) - offset4[1]
            if 0 <= kx < size4[0] and 0 <= ky < size4[1]:
                expected[i, j] = labels[kx, ky]
    np.testing.assert_array_equal(outputs[0], expected)
    assert (outputs[0] == 0).any() and np.unique(outputs[0]).size > 10


@pytest.mark.parametrize("source_res,target_res", [
    ((4.6, 4.0, 50.0), (4.0, 4.6, 50.0)),  # the README's way, finer in x, coarser in y
    ((4.0, 3.5, 8.0), (3.5, 4.0, 25 / 3)),
    ((4.0, 4.0, 40.0), (15.9, 8.0, 10.0)),  # nearly 4 times coarser, 2, 4 times finer
    ((7.0, 3.3, 50.0), (2.0, 10.0, 50.0)),
])
def test_the_round_trip_gives_every_voxel_an_id_whatever_the_sizes_and_offsets(
        source_res, target_res):
    """Source -> target grid -> back onto the source's grid (--like), by nearest neighbour:
    the target grid covers every source voxel's centre (rounding its far end down lost the
    partial last voxel: a strip of 0 on the way back), and each of its voxels has an id (a
    coarser grid's edge voxel whose centre lies outside the source takes the nearest); where
    the target is finer, the way back is exact."""
    from itertools import product

    from deepem3d.stages.resample import nearest_block

    for offset, size in product(((0, 0, 0), (3, -7, 11), (-13, 5, -1), (1, 1, 1)),
                                ((1, 2, 5), (13, 9, 3), (26, 17, 2))):
        ids = np.arange(1, math.prod(size) + 1, dtype=np.uint64).reshape(size)
        t_off, t_size = target_geometry(source_res, offset, size, target_res)
        there = nearest_block(ids, offset, Bbox(t_off, np.add(t_off, t_size)), source_res,
                              offset, size, target_res)
        back = nearest_block(there, t_off, Bbox(offset, np.add(offset, size)), target_res,
                             t_off, t_size, source_res)
        case = f"offset {offset}, size {size} -> {t_off}, {t_size}"
        assert there.all() and back.all(), case
        came_from = np.unravel_index((back - 1).astype(np.int64), size)  # ids count voxels
        for axis, here in enumerate(np.indices(size)):
            if target_res[axis] <= source_res[axis]:  # finer there: each voxel its own id
                np.testing.assert_array_equal(came_from[axis], here, err_msg=case)


@pytest.mark.parametrize("layer_type, dtype, target", [
    ("image", "uint8", (16.0, 16.0, 40.0)),  # 4 times coarser in x and y: 16 read a voxel
    ("image", "uint8", (4.0, 4.0, 160.0)),
    ("segmentation", "uint64", (16.0, 16.0, 40.0)),
])
def test_the_memory_a_task_is_planned_with_covers_what_it_holds(tmp_path, layer_type, dtype,
                                                                target):
    """A block at a coarser target reads more source voxels than it writes: the plan's (and
    --dry-run's) memory per task, which routes the stage to a queue, counts them (it was 40
    bytes per output voxel whatever the factor, an eighth of the peak from 4 to 16 nm)."""
    import tracemalloc

    from deepem3d.stages.blocks import bounds_list
    from deepem3d.stages.resample import ResampleTask

    values = np.random.default_rng(2).integers(1, 200, size=(264, 264, 34)).astype(dtype)
    path = f"file://{tmp_path / 'source'}"
    create_layer(path, layer_type=layer_type, dtype=dtype, resolution=(4, 4, 40),
                 size=values.shape, chunk_size=(64, 64, 8))[:, :, :] = values
    plan = plan_resample(path, f"file://{tmp_path / 'out'}", resolution=target,
                         task_shape=(64, 64, 8))
    stage = resample_stage(plan)
    stage.prepare()
    block = dict(image_path=path, output_path=plan.output_path, mip=0, target=list(target),
                 bounds=bounds_list(plan.blocks[0]), interpolation=plan.interpolation)
    done = ResampleTask.__wrapped__(**block)  # once before: the first-call allocations
    tracemalloc.start()
    try:
        ResampleTask.__wrapped__(**block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= stage.memory_bytes <= 2 * peak
    assert f"about {stage.memory_bytes / 2**20:.0f} MiB per task" in plan.describe()
    # and --dry-run's seconds count the voxels it reads, not only those it writes
    read = SECONDS_PER_SOURCE_VOXEL * done["read_voxels"]
    assert read <= stage.seconds_per_task - SECONDS_PER_VOXEL * done["voxels"] <= 2 * read
