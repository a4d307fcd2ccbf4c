"""Seam-free chunked inference: tasks of any shape write the bytes of one whole-array call.

Real file:// layers cut from the embedded ISBI 2012 volume (96 x 80 x 7 voxels, x,y,z, at a
non-zero voxel offset: not a cube, no side a multiple of the task shapes), a tiny random-init
network with a fixed seed and small patches, so each run takes a second. Every equality below is
exact (bit for bit): the patch grid, the reflection, the batch size, the summation order and the
thread count (1) are the same in every run, so there is no float summation-order difference
to bound.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

import deepem3d.models.sliding as core
from deepem3d.axes import xyz_from_zyx, zyx_from_xyz
from deepem3d.errors import InputError
from deepem3d.models import build_model
from deepem3d.models.checkpoint import save_checkpoint
from deepem3d.models.sliding import (
    FunctionPredictor,
    ModelPredictor,
    PatchGeometry,
    _reflect,
    abutting_tiles,
    grid_starts,
    input_box,
    predict_block,
    predict_volume,
    quantize,
)
from deepem3d.models.targets import affinity_target
from deepem3d.sample import load_sample
from deepem3d.stages.frame import Markers
from deepem3d.stages.inference import inference_stage
from deepem3d.stages.inference_plan import plan_inference
from deepem3d.storage.layers import create_layer
from tests.conftest import assert_one_line_error, cli_here, run_cli, start_stage

GEOMETRY = PatchGeometry(size=64, output=32, overlap=8, batch=4)
PATCH_ARGS = ("--patch-size", "64", "--patch-output", "32", "--overlap", "8", "--batch-size", "4")
OFFSET = (10, 20, 3)  # x,y,z
CHUNK = (16, 16, 2)
SHAPES = {"one": (96, 80, 8), "A": (32, 48, 4), "B": (48, 32, 2)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    image, _ = load_sample()
    return np.ascontiguousarray(image[5:12, 100:180, 200:296])  # z,y,x (7, 80, 96)


def make_image(path: Path, array: np.ndarray, dtype: str = "uint8", channels: int = 1) -> str:
    vol = create_layer(
        f"file://{path}", layer_type="image", dtype=dtype, resolution=(4, 4, 50),
        size=array.shape[::-1], voxel_offset=OFFSET, chunk_size=(32, 32, 4),
        num_channels=channels,
    )
    data = xyz_from_zyx(array.astype(dtype))
    vol[:] = np.repeat(data[..., None], channels, axis=-1) if channels > 1 else data
    return f"file://{path}"


def make_model(path: Path, head: str = "boundary", in_sections: int = 5, seed: int = 0,
               resolution=(4, 4, 50)) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model("tiny", head, in_sections).eval()
    save_checkpoint(path, model, {"model": model.config, "resolution": list(resolution)})
    return str(path), model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, crop):
    root = tmp_path_factory.mktemp("inference")
    image = make_image(root / "image", crop)
    ckpt, model = make_model(root / "tiny.pt")
    reference = predict_volume(ModelPredictor(model), crop, GEOMETRY)
    return {"root": root, "image": image, "ckpt": ckpt, "model": model, "reference": reference}


def read_map(path: str) -> np.ndarray:
    """(C, z, y, x) from an output layer."""
    return np.moveaxis(zyx_from_xyz(np.asarray(CloudVolume(path)[:])), -1, 0)


def run_in_process(setup, output: str, task_shape, *, float32=False, order=1, **kwargs):
    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]], task_shape=task_shape,
                          chunk_size=CHUNK, patch=GEOMETRY, float32=float32, **kwargs)
    stage = inference_stage(plan)
    tasks = start_stage(stage)
    for _, task in tasks[::order]:
        task()
    assert stage.is_complete()
    return plan, None if "bounds" in kwargs else read_map(output)


def digests(path: str) -> dict[str, str]:
    directory = Path(path[len("file://"):]) / "4_4_50"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_task_shapes_give_the_bytes_of_one_in_memory_call(setup):
    expected = quantize(setup["reference"])
    maps = {}
    for name, shape in SHAPES.items():
        output = f"file://{setup['root'] / ('out_' + name)}"
        plan, maps[name] = run_in_process(setup, output, shape, order=-1 if name == "B" else 1)
        assert plan.task_count == {"one": 1, "A": 2 * 3 * 2, "B": 2 * 3 * 4}[name]
        assert maps[name].dtype == np.uint8 and maps[name].shape == (1, 7, 80, 96)
    for name in SHAPES:
        np.testing.assert_array_equal(maps[name], expected, err_msg=name)
    # the map is not trivially constant: the test would see a seam
    assert len(np.unique(expected)) > 10


def test_a_deep_task_predicts_slab_by_slab_reading_each_chunk_once(setup, monkeypatch):
    """A task deeper than the map's chunks predicts one chunk-deep slab at a time, the next
    slab's input read and the last slab's map written in threads meanwhile: the bytes of one
    in-memory call, each image chunk read once (the image's chunks are 4 sections deep)."""
    import deepem3d.stages.inference as stage_module

    pieces = []
    read = stage_module._Sections._read
    monkeypatch.setattr(stage_module._Sections, "_read",
                        lambda self, z0, z1: pieces.append((z0, z1)) or read(self, z0, z1))
    output = f"file://{setup['root'] / 'out_slabs'}"
    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]],
                          task_shape=SHAPES["one"], chunk_size=CHUNK, patch=GEOMETRY)
    assert "each task predicts up to 4 slabs of 2 section(s)" in plan.describe()
    stage = inference_stage(plan)
    (_, task), = start_stage(stage)
    task()
    np.testing.assert_array_equal(read_map(output), quantize(setup["reference"]))
    assert stage.markers.records()[0]["slabs"] == 4  # 7 sections, map chunks 2 deep
    assert sorted(pieces) == [(0, 4), (4, 7)]


def test_a_failed_slab_write_fails_the_task(setup, monkeypatch):
    """An error in the writing thread is the task's error: no completion marker, the task is
    retried (each chunk it wrote is whole, and rewritten with the same bytes)."""
    import deepem3d.stages.inference as stage_module

    calls = []
    write = stage_module.write_block

    def failing(vol, lo, array):
        calls.append(lo)
        if len(calls) == 2:
            raise OSError("disk full")
        return write(vol, lo, array)

    monkeypatch.setattr(stage_module, "write_block", failing)
    output = f"file://{setup['root'] / 'out_slab_error'}"
    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]],
                          task_shape=SHAPES["one"], chunk_size=CHUNK, patch=GEOMETRY)
    stage = inference_stage(plan)
    (_, task), = start_stage(stage)
    with pytest.raises(OSError, match="disk full"):
        task()
    assert not stage.is_complete() and stage.markers.records() == []


def test_float32_blocks_equal_the_in_memory_floats(setup):
    output = f"file://{setup['root'] / 'out_float'}"
    _, floats = run_in_process(setup, output, SHAPES["B"], float32=True)
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(floats, setup["reference"])


def test_bounds_write_the_same_bytes_as_the_whole_run(setup):
    output = f"file://{setup['root'] / 'out_bounds'}"
    bounds = Bbox((30, 40, 4), (70, 70, 8))  # expanded to the chunk grid: x 26..74, y 36..84
    plan, _ = run_in_process(setup, output, SHAPES["A"], bounds=bounds)
    assert plan.bounds == Bbox((26, 36, 3), (74, 84, 9))
    written = np.moveaxis(zyx_from_xyz(np.asarray(
        CloudVolume(output, fill_missing=True)[26:74, 36:84, 3:9])), -1, 0)
    np.testing.assert_array_equal(written, quantize(setup["reference"])[:, 0:6, 16:64, 16:64])


def test_retried_and_duplicated_tasks_rewrite_the_same_bytes(setup):
    output = f"file://{setup['root'] / 'out_retry'}"
    run_in_process(setup, output, SHAPES["A"])
    before = digests(output)
    stage = Markers(output, "inference")
    CloudFiles(output).delete(list(CloudFiles(output).list(prefix="tasks/inference/done/")))
    assert not stage.is_complete()
    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]],
                          task_shape=SHAPES["A"], chunk_size=CHUNK, patch=GEOMETRY)
    assert plan.output_exists  # resumed: same geometry, same parameters
    tasks = start_stage(inference_stage(plan))
    assert len(tasks) == plan.task_count
    for _, task in tasks[::-1] + tasks[:3]:  # every task again, in another order, some twice
        task()
    assert digests(output) == before
    assert start_stage(inference_stage(plan)) == []  # a re-run skips finished tasks



def test_an_overwrite_stopped_while_deleting_leaves_no_marker_over_a_hole(setup, monkeypatch):
    """--overwrite deletes the old map's chunks and markers before it writes; stopped part-way
    (Ctrl-C on a large layer), the markers outlived the chunks they vouch for, and a re-run
    without --overwrite skipped every task and left the holes."""
    output = f"file://{setup['root'] / 'out_stopped'}"
    run_in_process(setup, output, SHAPES["one"])
    real = CloudFiles.delete

    def stopped(self, paths, *args, **kwargs):  # deletes half of the first prefix, then stops
        paths = list(paths)
        real(self, paths[: len(paths) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]],
                          task_shape=SHAPES["one"], chunk_size=CHUNK, patch=GEOMETRY,
                          overwrite=True)
    monkeypatch.setattr(CloudFiles, "delete", stopped)
    with pytest.raises(KeyboardInterrupt):
        inference_stage(plan, overwrite=True).prepare()
    monkeypatch.setattr(CloudFiles, "delete", real)
    try:
        plan = plan_inference(setup["image"], output, models=[setup["ckpt"]],
                              task_shape=SHAPES["one"], chunk_size=CHUNK, patch=GEOMETRY)
    except InputError as err:  # refused: the user is told to --overwrite
        assert "--overwrite" in str(err)
        return
    for _, task in start_stage(inference_stage(plan)):
        task()
    np.testing.assert_array_equal(read_map(output), quantize(setup["reference"]))

def test_a_run_keyed_by_the_full_torch_version_resumes_under_that_key(setup, monkeypatch):
    """Runs once keyed their inference by torch.__version__ (2.13.0+cpu), now by the release
    (2.13.0): such a run, resumed, skips its finished tasks instead of starting again."""
    import torch

    from deepem3d.stages import inference as inference_module
    from deepem3d.stages.model_refs import torch_release

    output = f"file://{setup['root'] / 'out_legacy_key'}"

    def plan():
        return plan_inference(setup["image"], output, models=[setup["ckpt"]],
                              task_shape=SHAPES["A"], chunk_size=CHUNK, patch=GEOMETRY)

    monkeypatch.setattr(torch, "__version__", f"{torch_release()}+cu128")
    with monkeypatch.context() as before:  # the key as runs made it before
        before.setattr(inference_module, "torch_release", lambda: str(torch.__version__))
        first = inference_stage(plan())
        tasks = start_stage(first)
        for _, task in tasks[:2]:
            task()
    again = inference_stage(plan())
    assert again.key == first.key
    assert len(start_stage(again)) == len(tasks) - 2 > 0


def test_cli_with_worker_processes(setup, tmp_path):
    output = f"file://{tmp_path / 'out'}"
    second, second_model = make_model(tmp_path / "second.pt", seed=1)
    args = ("infer", setup["image"], output, "--model", setup["ckpt"], "--model", second,
            "--task-shape", "48,48,4", "--chunk-size", "16,16,2", *PATCH_ARGS)
    dry = cli_here(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "8 InferenceTask(s) of 48 x 48 x 4 voxels" in dry.stdout, dry.stdout
    assert "MiB per task" in dry.stdout
    assert not (tmp_path / "out").exists(), "--dry-run wrote nothing"

    out = run_cli(*args, "--queue", f"fq://{tmp_path / 'queue'}", "--parallel", "2",
                  check=True)
    assert "stage inference: 8 task(s) (8 run now)" in out.stdout, out.stdout
    # two models: voxel-wise maximum of boundary probability, then one rounding
    ensemble = predict_block([ModelPredictor(setup["model"]), ModelPredictor(second_model)],
                             setup_image(setup), (0, 0, 0), ((0, 0, 0), (7, 80, 96)),
                             (7, 80, 96), GEOMETRY)
    np.testing.assert_array_equal(ensemble, np.maximum(
        setup["reference"], predict_volume(ModelPredictor(second_model), setup_image(setup),
                                           GEOMETRY)))
    np.testing.assert_array_equal(read_map(output), quantize(ensemble))
    markers = Markers(output, "inference")
    record = CloudFiles(output).get_json(markers.marker_key(markers.task_ids()[0]))
    assert record["device"] == "cpu" and record["threads"] == 1
    provenance = CloudVolume(output).provenance.processing[-1]["method"]
    assert [m["sha256"] for m in provenance["models"]] == [
        hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (setup["ckpt"], second)]
    assert provenance["patch"] == GEOMETRY.to_dict() and provenance["tta"] == 1

    again = cli_here(*args, "--parallel", "2")
    assert "(0 run now)" in again.stdout


def setup_image(setup) -> np.ndarray:
    return np.ascontiguousarray(zyx_from_xyz(np.asarray(CloudVolume(setup["image"])[:])[..., 0]))


@pytest.mark.parametrize(("shape", "edge"), [("B", 48), ("A", 64)])
def test_mask_skips_blocks_without_tissue(setup, tmp_path, crop, shape, edge):
    """Blocks without tissue are written as background without the model; "A" tasks are two
    map chunks deep, written slab by slab."""
    mask = np.zeros(crop.shape, dtype=np.uint8)
    mask[:, :, :40] = 1  # tissue in x < 40 only: blocks from `edge` on hold none
    mask_path = make_image(tmp_path / "mask", mask)
    output = f"file://{tmp_path / 'out'}"
    _, result = run_in_process(setup, output, SHAPES[shape], mask=mask_path)
    expected = quantize(setup["reference"])
    np.testing.assert_array_equal(result[..., :edge], expected[..., :edge])
    assert np.all(result[..., edge:] == 255)  # no tissue: boundary everywhere


def test_missing_chunks_fail_or_read_as_zeros(setup, tmp_path, crop):
    image = make_image(tmp_path / "image", crop)
    missing = next((tmp_path / "image" / "4_4_50").glob("42-74_52-84_7-10*"))
    missing.unlink()  # x 42..74, y 52..84, z 7..10 (absolute voxels)
    plan = plan_inference(image, f"file://{tmp_path / 'fail'}", models=[setup["ckpt"]],
                          task_shape=SHAPES["one"], chunk_size=CHUNK, patch=GEOMETRY)
    tasks = start_stage(inference_stage(plan))
    with pytest.raises(InputError, match="--fill-missing"):
        tasks[0][1]()
    output = f"file://{tmp_path / 'zeros'}"
    plan = plan_inference(image, output, models=[setup["ckpt"]], task_shape=SHAPES["A"],
                          chunk_size=CHUNK, patch=GEOMETRY, fill_missing=True)
    for _, task in start_stage(inference_stage(plan)):
        task()
    zeroed = crop.copy()
    zeroed[4:7, 32:64, 32:64] = 0  # the missing chunk, in the crop's z,y,x
    expected = quantize(predict_volume(ModelPredictor(setup["model"]), zeroed, GEOMETRY))
    np.testing.assert_array_equal(read_map(output), expected)


def test_abutting_tiles_equal_one_whole_section_forward(setup, crop):
    """Tiles that abut, each read with the receptive field (230 px, rounded up to 240) around
    it, give the map of one forward over each whole section (reflected at the dataset's
    bounds): the same floats up to the last bits (convolutions of other sizes sum in another
    order) and the same uint8 bytes."""
    model = setup["model"]
    image = crop[:, :, :96]
    geometry = PatchGeometry(size=32 + 480, output=32, overlap=0, batch=2)
    tiles = predict_volume(ModelPredictor(model), image, geometry)
    assert len(grid_starts(image.shape[2], geometry)) == 3  # wider than two tiles
    depth, height, width = image.shape
    ys = _reflect(np.arange(-240, -240 + -(-(height + 480) // 16) * 16), height)
    xs = _reflect(np.arange(-240, -240 + -(-(width + 480) // 16) * 16), width)
    zs = _reflect(np.arange(-2, depth + 2), depth)
    padded = torch.from_numpy(image[np.ix_(zs, ys, xs)])
    stacks = torch.stack([padded[z: z + 5] for z in range(depth)])[:, None]
    form = ModelPredictor(model).model  # what the tiles ran: the CPU inference form
    with torch.no_grad():
        whole = form.probabilities(form(form.normalize(stacks)))
    whole = whole[:, :, 240: 240 + height, 240: 240 + width].permute(1, 0, 2, 3).numpy()
    assert np.abs(tiles - whole).max() <= 1e-6
    np.testing.assert_array_equal(quantize(tiles), quantize(whole))
    assert len(np.unique(quantize(tiles))) > 10


def test_the_image_spelled_another_way_is_refused_as_output(setup, tmp_path, monkeypatch):
    """OUTPUT was compared with the image as text: `precomputed://`, a relative path, a link
    or a folder inside the image passed, and --overwrite then deleted the image's chunks."""
    image = setup["image"]
    folder = image.removeprefix("file://")
    before = sorted(p.name for p in Path(folder).rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(folder)
    monkeypatch.chdir(Path(folder).parent)
    for output in (f"precomputed://{image}", f"file://{Path(folder).name}", link, f"{folder}/",
                   f"{folder}/map"):
        result = cli_here("infer", image, output, "--model", setup["ckpt"], "--chunk-size",
                     "16,16,2", *PATCH_ARGS, "--overwrite")
        assert_one_line_error(result, "overlaps the image layer")
    assert sorted(p.name for p in Path(folder).rglob("*")) == before


def test_a_tile_that_covers_the_layer_is_cut_to_it_whatever_the_chunks():
    """Chunks of 128 x 100 px make the tile step lcm(128, 100, 16) = 3200 px: a 200 x 100
    layer paid for a 3200 px tile (677 evaluations per voxel, 22x the time). One tile over the
    whole layer has no chunk border to align with; tiles over a larger layer keep the step."""
    assert abutting_tiles(200, 230, step=3200).output == 208
    assert abutting_tiles(200, 230, step=3200).size == 208 + 480
    assert abutting_tiles(5000, 230, step=3200, tile=2048).output == 3200
    assert abutting_tiles(512, 230, step=128).output == 512
    assert abutting_tiles(8192, 230, step=128).output == 2048
    assert abutting_tiles(600, 230, step=128).output == 608


def test_default_tiles_are_the_same_bytes_whatever_the_task_shape(setup, crop):
    """The default geometry: abutting tiles with the full receptive field, cut down to the
    volume, computed once per voxel; tasks of any shape write what one call gives."""
    maps = {}
    for name, shape in (("default", None), ("A", SHAPES["A"])):
        output = f"file://{setup['root'] / ('tiles_' + name)}"
        plan = plan_inference(setup["image"], output, models=[setup["ckpt"]], task_shape=shape,
                              chunk_size=CHUNK)
        assert plan.geometry == PatchGeometry(size=96 + 480, output=96, overlap=0, batch=1)
        stage = inference_stage(plan)
        for _, task in start_stage(stage):
            task()
        maps[name] = read_map(output)
    assert plan.task_count == 2 * 3 * 2
    expected = predict_volume(ModelPredictor(setup["model"]), crop, plan.geometry,
                              quantized=True)
    for name, found in maps.items():
        np.testing.assert_array_equal(found, expected, err_msg=name)


def test_dry_run_counts_evaluations_per_output_voxel(setup, tmp_path):
    """On a large volume the default tiles cost at most 1.6 network evaluations per output
    voxel; the former patches (512 in, 384 out, 64 overlap) at 1024 px tasks about 4."""
    layer = f"file://{tmp_path / 'big'}"
    create_layer(layer, layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                 size=(8192, 8192, 64), chunk_size=(256, 256, 16))
    tiles = plan_inference(layer, f"file://{tmp_path / 'out'}", models=[setup["ckpt"]])
    assert tiles.geometry.output == 2048 and tiles.geometry.size == 2528
    assert tiles.task_shape == (2048, 2048, 16) and tiles.task_count == 4 * 4 * 4
    assert tiles.evaluations == pytest.approx((2528 / 2048) ** 2)
    assert "evaluations per output voxel: 1.52" in tiles.describe()
    # bounds off the tile grid: the same tiles (sized by the layer), one task per tile cell
    # (it was up to four tiles per task: 6.09 evaluations per voxel here)
    off = plan_inference(layer, f"file://{tmp_path / 'out'}", models=[setup["ckpt"]],
                         bounds=Bbox((1024, 1024, 0), (8192, 8192, 64)))
    assert off.geometry == tiles.geometry and off.task_count == 4 * 4 * 4
    assert {tuple(b.minpt)[:2] for b in off.blocks} >= {(1024, 1024), (2048, 2048)}
    assert off.evaluations == pytest.approx(16 * 2528**2 / 7168**2)  # 1.99
    small = plan_inference(layer, f"file://{tmp_path / 'out'}", models=[setup["ckpt"]],
                           bounds=Bbox((0, 0, 0), (200, 200, 10)))  # within one tile cell
    # what its task writes: the bounds grown to whole chunks, not the tile cell (2048 x 2048)
    assert "1 InferenceTask(s) of 256 x 256 x 16 voxels" in small.describe()
    old = plan_inference(layer, f"file://{tmp_path / 'out'}", models=[setup["ckpt"]],
                         patch={"size": 512, "output": 384, "overlap": 64})
    # 8 tasks a side, 7 touching 4 patches and one 5: 33 patches of 512 px a side, 4.25
    assert old.evaluations == pytest.approx(33**2 * 512**2 / 8192**2)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"against {old.evaluations:.2f} on an 8192 x 8192" in " ".join(readme.split())
    result = cli_here("infer", layer, f"file://{tmp_path / 'out'}", "--model", setup["ckpt"],
                 "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "evaluations per output voxel: 1.52" in result.stdout


@pytest.mark.parametrize("head, tta", [("boundary", 8), ("affinity", 16)])
def test_the_plans_patch_count_is_what_the_tasks_compute(setup, tmp_path, head, tta):
    """The plan's patches (behind `--dry-run`'s evaluations and hours) against the patches
    the tasks record: affinity with tta 16 also predicts the section below each slab in its
    8 z-reversed variants, which the plan left out (a third of the work at slabs of 1)."""
    ckpt, _ = make_model(tmp_path / f"{head}.pt", head=head)
    output = f"file://{tmp_path / 'map'}"
    plan = plan_inference(setup["image"], output, models=[ckpt], task_shape=(48, 32, 2),
                          chunk_size=(16, 16, 1), patch=GEOMETRY, tta=tta,
                          bounds=Bbox((10, 20, 3), (74, 52, 7)))
    for _, task in start_stage(inference_stage(plan)):
        task()
    recorded = sum(r["patches"] for r in Markers(output, "inference").records())
    assert recorded == plan.patches * tta


def test_default_tasks_partition_any_bounds_on_whole_chunks(setup, tmp_path):
    """Tasks on the tile grid, for layers with an offset and sizes off the chunk grid, bounds
    anywhere, explicit task shapes or none: every block starts on the chunk grid and ends on
    it or at the layer's end, the blocks cover the bounds exactly once, and the plan's memory
    is at least every block's (a review found clipped blocks off the chunk grid, whose writes
    failed, and a largest block missed)."""
    from deepem3d.stages.inference_plan import _Shape, _task_memory, _zyx_box

    rng = np.random.default_rng(7)
    for case in range(12):
        chunk = [(32, 32, 4), (64, 64, 8), (96, 96, 5)][case % 3]
        size = [int(rng.integers(c, 700 if a < 2 else 40)) for a, c in enumerate(chunk)]
        offset = [int(v) for v in rng.integers(-50, 50, 3)]
        lo = [int(rng.integers(o, o + s)) for o, s in zip(offset, size)]
        hi = [int(rng.integers(a + 1, o + s + 1)) for a, o, s in zip(lo, offset, size)]
        layer = f"file://{tmp_path / f'layer{case}'}"
        create_layer(layer, layer_type="image", dtype="uint8", resolution=(4, 4, 50), size=size,
                     voxel_offset=offset, chunk_size=chunk)
        task_shape = None if case % 2 else tuple(c * 2 for c in chunk)
        plan = plan_inference(layer, f"file://{tmp_path / f'out{case}'}",
                              models=[setup["ckpt"]], bounds=Bbox(lo, hi),
                              task_shape=task_shape)
        end = np.array(offset) + np.array(size)
        covered = 0
        for block in plan.blocks:
            a, b = np.array(block.minpt), np.array(block.maxpt)
            assert not np.any((a - offset) % chunk), (case, block)
            assert np.all(((b - offset) % chunk == 0) | (b == end)), (case, block)
            covered += int(np.prod(b - a))
        assert covered == int(np.prod(plan.bounds.size3())), case
        assert len({str(b) for b in plan.blocks}) == len(plan.blocks)
        shapes = [_Shape(5, "boundary")]
        assert plan.memory_bytes >= max(
            _task_memory(plan.models, shapes, _zyx_box(b, offset), size[::-1], plan.geometry,
                         1, plan.dtype, plan.chunk_size[2], chunk[2])
            for b in plan.blocks), case


def test_bump_window_is_seam_free_too(setup, crop):
    geometry = PatchGeometry(size=64, output=48, overlap=16, batch=2, window="bump")
    weights = core.window(geometry)
    assert weights.max() == 1 and weights.min() >= core.WINDOW_FLOOR
    np.testing.assert_array_equal(weights, weights[::-1, ::-1])
    predictor = ModelPredictor(setup["model"])
    image = crop[:, :60, :70]
    np.testing.assert_array_equal(chunked(predictor, image, geometry, 1, (3, 32, 32)),
                                  predict_volume(predictor, image, geometry))


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "float32"])
def test_other_image_dtypes_give_the_uint8_result_with_tta(setup, crop, dtype):
    """Images of other dtypes holding the same values predict the same floats, TTA included
    (torch flips no uint16 or uint32 tensor: those are widened first)."""
    predictor = ModelPredictor(setup["model"])
    image, geometry = crop[:, :40, :40], PatchGeometry(size=32, output=16, overlap=4)
    np.testing.assert_array_equal(
        predict_volume(predictor, image.astype(dtype), geometry, tta=8),
        predict_volume(predictor, image, geometry, tta=8))


# ---------------------------------------------------------------------------------------------
# Test-time augmentation of affinities


def affinities_of_labels(batch: np.ndarray) -> np.ndarray:
    """A fake 3-section affinity 'model': the exact affinities of its (label) input's middle
    section, channel z with the section below. Equivariant by construction, so every TTA
    variant, once undone with its offsets restored, must give the same map."""
    return np.stack([affinity_target(stack)[:, 1] for stack in batch])


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    _, ids = load_sample()
    return ids[3:8, 150:190, 60:104].astype(np.int64)  # z,y,x (5, 40, 44)


def blocks(shape, step):
    for z in range(0, shape[0], step[0]):
        for y in range(0, shape[1], step[1]):
            for x in range(0, shape[2], step[2]):
                hi = (min(z + step[0], shape[0]), min(y + step[1], shape[1]),
                      min(x + step[2], shape[2]))
                yield (z, y, x), hi


def chunked(predictors, image, geometry, tta, step) -> np.ndarray:
    """predict_block over blocks of `step`, each given only its input_box of the image."""
    shape = image.shape
    out = None
    for block in blocks(shape, step):
        lo, hi = input_box(predictors, block, shape, geometry, tta)
        sub = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        part = predict_block(predictors, sub, lo, block, shape, geometry, tta=tta)
        if out is None:
            out = np.full((part.shape[0], *shape), np.nan, dtype=np.float32)
        (z0, y0, x0), (z1, y1, x1) = block
        out[:, z0:z1, y0:y1, x0:x1] = part
    return out


@pytest.mark.parametrize("tta", [1, 8, 16])
def test_tta_restores_affinity_offsets(labels, tta):
    fake = FunctionPredictor(affinities_of_labels, in_sections=3, head="affinity")
    geometry = PatchGeometry(size=32, output=16, overlap=4, batch=3)
    # the dataset reflected at its bounds, as the sliding window reads it
    expected = affinity_target(np.pad(labels, 1, mode="reflect"))[:, 1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(predict_volume(fake, labels, geometry, tta=tta), expected)
    np.testing.assert_array_equal(chunked(fake, labels, geometry, tta, (2, 24, 16)), expected)


def test_tta_check_fails_without_offset_restoration(labels, monkeypatch):
    """The TTA test has teeth: without the channel swaps and shifts it fails."""
    fake = FunctionPredictor(affinities_of_labels, in_sections=3, head="affinity")
    geometry = PatchGeometry(size=32, output=16, overlap=4, batch=3)
    monkeypatch.setattr(core, "affinity_channel_fix", lambda k: ((0, 0), (1, 0)))
    expected = affinity_target(np.pad(labels, 1, mode="reflect"))[:, 1:-1, 1:-1, 1:-1]
    assert not np.array_equal(predict_volume(fake, labels, geometry, tta=8), expected)


def test_affinity_model_with_16_variants_is_seam_free(tmp_path, crop):
    _, model = make_model(tmp_path / "aff.pt", head="affinity", in_sections=3)
    predictor = ModelPredictor(model)
    image = crop[:3, :40, :44]
    geometry = PatchGeometry(size=48, output=24, overlap=8, batch=4)
    whole = predict_volume(predictor, image, geometry, tta=16)
    assert whole.shape == (3, 3, 40, 44)
    np.testing.assert_array_equal(chunked(predictor, image, geometry, 16, (2, 24, 32)), whole)


def test_affinity_ensemble_is_the_mean_and_seam_free(tmp_path, crop):
    """Affinity maps combine by their mean (boundary maps by the maximum: the CLI test)."""
    predictors = [ModelPredictor(make_model(tmp_path / f"aff{seed}.pt", seed=seed,
                                            head="affinity", in_sections=3)[1])
                  for seed in (0, 1)]
    image = crop[:3, :40, :44]
    geometry = PatchGeometry(size=48, output=24, overlap=8, batch=4)
    one, two = (predict_volume(p, image, geometry, tta=8) for p in predictors)
    both = predict_volume(predictors, image, geometry, tta=8)
    np.testing.assert_array_equal(both, (one + two) / np.float32(2))
    assert not np.array_equal(both, np.minimum(one, two))
    np.testing.assert_array_equal(chunked(predictors, image, geometry, 8, (2, 24, 32)), both)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def test_bad_input(setup, tmp_path, crop):
    image, ckpt = setup["image"], setup["ckpt"]
    base = ("--chunk-size", "16,16,2", *PATCH_ARGS, "--dry-run")

    wide = make_image(tmp_path / "wide", crop, dtype="uint16")
    # one through a real process, the rest through the same entry point in this process
    assert_one_line_error(run_cli("infer", wide, tmp_path / "o", "--model", ckpt, *base),
                          "holds uint16")
    two = make_image(tmp_path / "two", crop, channels=2)
    assert_one_line_error(cli_here("infer", two, tmp_path / "o", "--model", ckpt, *base),
                          "2 channels")

    coarse, _ = make_model(tmp_path / "coarse.pt", resolution=(4, 4, 40))
    assert_one_line_error(cli_here("infer", image, tmp_path / "o", "--model", coarse, *base),
                          "anisotropy differs", "--force")
    far, _ = make_model(tmp_path / "far.pt", resolution=(40, 40, 50))  # 10x: not resampled
    result = cli_here("infer", image, tmp_path / "o", "--model", far, *base)
    assert_one_line_error(result, "anisotropy differs", "deepem3d train --init", "--force")
    assert "resample" not in result.stderr
    forced = cli_here("infer", image, tmp_path / "o", "--model", coarse, *base, "--force")
    assert forced.returncode == 0 and "warning: model coarse.pt was trained at 4x4x40" in \
        forced.stderr, forced.stderr

    other = tmp_path / "other"
    create_layer(f"file://{other}", layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                 size=(96, 80, 7), voxel_offset=OFFSET, chunk_size=(32, 32, 4))
    assert_one_line_error(cli_here("infer", image, other, "--model", ckpt, *base),
                          "exists with another geometry", "chunk_size")

    assert_one_line_error(
        cli_here("infer", image, tmp_path / "o", "--model", ckpt, *base,
                "--bounds", "10,20,3,200,100,10"), "--bounds", "reach outside")

    broken = tmp_path / "broken.pt"
    broken.write_bytes(Path(ckpt).read_bytes()[:5000])
    assert_one_line_error(cli_here("infer", image, tmp_path / "o", "--model", broken, *base),
                          "not a readable deepem3d checkpoint")
    foreign = tmp_path / "foreign.pt"  # torch warned (two lines) before the error
    foreign.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    assert_one_line_error(run_cli("infer", image, tmp_path / "o", "--model", foreign, *base),
                          "holds objects besides tensors")
    for i, resolution in enumerate(("4,4,50", [0, 0, 0], [4, 4], [4, 4, float("nan")])):
        odd, _ = make_model(tmp_path / f"odd{i}.pt", resolution=resolution)
        assert_one_line_error(cli_here("infer", image, tmp_path / "o", "--model", odd, *base),
                              "records the training resolution", "three positive numbers")

    assert_one_line_error(
        cli_here("infer", image, tmp_path / "o", "--model", ckpt, *base, "--task-shape", "20,16,2"),
        "not a multiple of the output chunk size")
    assert not (tmp_path / "o").exists()
    assert os.path.exists(ckpt)


def test_a_forced_map_says_its_models_settings_were_chosen_elsewhere(tmp_path):
    """A shipped model run at another resolution with --force: the settings it records are
    kept, with the resolution they were chosen at, and choosing them says to tune them (they
    scored 0.721 on gala_fib_small's 10 nm test crop, 0.335 once tuned)."""
    from deepem3d.stages.segmentation import choose_settings

    layers = {}
    for name, resolution in (("fib", (10, 10, 10)), ("em", (4, 4, 50))):
        layers[name] = f"file://{tmp_path / name}"
        create_layer(layers[name], layer_type="image", dtype="uint8", resolution=resolution,
                     size=(64, 64, 8), chunk_size=(64, 64, 8))
    forced = plan_inference(layers["fib"], f"file://{tmp_path / 'map'}",
                            models=["isbi2012-small-affinity"], force=True)
    assert forced.segmentation["resolution"] == [4.0, 4.0, 50.0]
    chosen, line = choose_settings({}, forced.segmentation, "the model")
    assert chosen["method"] == "mean" and "chosen at the model's 4,4,50 nm" in line
    assert "deepem3d tune" in line
    plain = plan_inference(layers["em"], f"file://{tmp_path / 'map2'}",
                           models=["isbi2012-small-affinity"])
    assert "resolution" not in plain.segmentation
    assert "tune" not in choose_settings({}, plain.segmentation, "the model")[1]


def test_sharded_maps_hold_the_same_voxels_a_shard_per_task(setup, crop):
    """--sharded: one shard file per task (given chunks, and chunks derived from the default
    tiles), the same voxels as the chunked map."""
    output = f"file://{setup['root'] / 'out_sharded'}"
    plan, found = run_in_process(setup, output, (32, 32, 4), sharded=True)
    np.testing.assert_array_equal(found, quantize(setup["reference"]))
    names = list(digests(output))
    assert len(names) == plan.task_count and all(n.endswith(".shard") for n in names)
    assert "sharded: a shard file per task, in chunks of 16 x 16 x 2" in plan.describe()

    output = f"file://{setup['root'] / 'tiles_sharded'}"
    plan = plan_inference(setup["image"], output, models=[setup["ckpt"]], sharded=True)
    for _, task in start_stage(inference_stage(plan)):
        task()
    expected = predict_volume(ModelPredictor(setup["model"]), crop, plan.geometry,
                              quantized=True)
    np.testing.assert_array_equal(read_map(output), expected)
    assert len(digests(output)) == plan.task_count
    assert CloudVolume(output).meta.sharding(0) is not None


def test_sharded_runs_with_other_bounds_keep_each_others_shards(setup):
    """A task writes its shard whole: with --bounds ending inside a shard, a later run with
    other bounds replaced the shard and erased what the first had written there. Bounds are
    on the shard grid (or at the layer's ends), or refused; runs on it add up to the map."""
    output = f"file://{setup['root'] / 'bounded_sharded'}"
    with pytest.raises(InputError, match=r"--bounds ends at 26 on x, off the shard grid"):
        run_in_process(setup, output, (32, 32, 4), sharded=True,
                       bounds=Bbox((10, 20, 3), (26, 52, 7)))
    run_in_process(setup, output, (32, 32, 4), sharded=True,
                   bounds=Bbox((10, 20, 3), (42, 52, 7)))
    run_in_process(setup, output, (32, 32, 4), sharded=True,
                   bounds=Bbox((42, 20, 3), (106, 100, 10)))
    # (C, z, y, x) from the offset; x < 42 beyond the first run's bounds was never written
    found = np.moveaxis(zyx_from_xyz(np.asarray(CloudVolume(output, fill_missing=True)[:])),
                        -1, 0)
    expected = quantize(setup["reference"])
    np.testing.assert_array_equal(found[:, :4, :32, :32], expected[:, :4, :32, :32])
    np.testing.assert_array_equal(found[:, :, :, 32:], expected[:, :, :, 32:])
    # each run says what it did (the second run's bounds were missing from the provenance)
    records = CloudVolume(output).provenance.processing
    assert [r["method"]["bounds"] for r in records] == [[10, 20, 3, 42, 52, 7],
                                                        [42, 20, 3, 106, 100, 10]]


def test_the_mip_at_the_models_resolution_is_read_without_mip(setup, crop, tmp_path):
    """An image whose mip 0 is finer than the model's training resolution and whose mip 1 is
    at it: without --mip (and --bounds) the plan reads mip 1 and says so; the map is the
    model's output on mip 1. With --bounds it stays at mip 0 and refuses, naming --mip 1."""
    fine = np.repeat(np.repeat(crop, 2, axis=1), 2, axis=2)  # z, y, x at 2 x 2 x 50 nm
    path = f"file://{tmp_path / 'fine'}"
    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=(2, 2, 50),
                       size=fine.shape[::-1], chunk_size=(32, 32, 4))
    vol[:, :, :] = xyz_from_zyx(fine)
    vol.add_scale((2, 2, 1), chunk_size=(32, 32, 4))
    vol.commit_info()
    CloudVolume(path, mip=1)[:, :, :] = xyz_from_zyx(crop)
    output = f"file://{tmp_path / 'map'}"
    plan = plan_inference(path, output, models=[setup["ckpt"]], patch=GEOMETRY)
    assert plan.mip == 1 and "reading mip 1 (4x4x50 nm)" in plan.describe()
    for _, task in start_stage(inference_stage(plan)):
        task()
    np.testing.assert_array_equal(read_map(output), quantize(setup["reference"]))
    assert CloudVolume(output).resolution.tolist() == [4, 4, 50]
    with pytest.raises(InputError, match="use --mip 1"):
        plan_inference(path, f"file://{tmp_path / 'map2'}", models=[setup["ckpt"]],
                       patch=GEOMETRY, bounds=Bbox((0, 0, 0), (64, 64, 4)))


def test_a_worker_matches_the_runs_torch_release_whatever_its_build():
    """A run planned on a CPU build for GPU workers is taken by their CUDA build of the same
    release; another release refuses it in one line."""
    from deepem3d.stages.model_refs import check_worker, torch_release

    check_worker("cpu", torch_release())
    check_worker("cpu", f"{torch_release()}+cu128")
    with pytest.raises(InputError, match="not of the class the inference run was made for"):
        check_worker("cpu", "1.0.0+cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without CUDA")
def test_cuda_tasks_for_local_workers_without_cuda_are_refused_first(tmp_path):
    """`infer --device cuda` here ran its task, which failed on the worker, and left the
    stage's records (and with --overwrite, deleted the old map first)."""
    from tests.conftest import make_layer

    image = make_layer(tmp_path / "image")
    output = tmp_path / "map"
    assert_one_line_error(run_cli("infer", image, output, "--bounds", "0,0,0,64,64,4",
                                  "--device", "cuda"), "planned for CUDA", "on a queue")
    assert not output.exists()
