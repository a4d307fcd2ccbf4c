"""The smoothing stage (--sigma): DeepEM3D's in-plane Gaussian on the map, chunk invariant.

Pure: a chunk smoothed from its box with the x, y halo equals that part of the whole-array
result bit for bit; so does the whole chunked pipeline. Tasks: the smoothed layer and the
segmentation are the same whatever --task-shape and equal `pipeline.segment(map, sigma=...)`;
the same sigma reuses the supervoxels, another rebuilds them; a bad sigma is a one-line error.
The map layers are tests/conftest.py's `maps` fixture (an ISBI 2012 crop, 96 x 80 x 10).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox
from scipy.ndimage import gaussian_filter

from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError
from deepem3d.sample import load_sample
from deepem3d.segmentation.chunks import Chunk, chunk_grid
from deepem3d.segmentation.pipeline import segment, segment_chunked, smooth_chunked
from deepem3d.segmentation.smoothing import (
    smooth_chunk,
    smooth_map,
    smoothing_bounds,
    smoothing_halo,
)
from deepem3d.segmentation.synthetic import affinity_map, boundary_map
from deepem3d.stages.segmentation import plan_segment
from deepem3d.stages.supervoxels import volume_ids
from deepem3d.stages.workdir import smoothed_layer_path
from deepem3d.storage.layers import create_layer
from tests.conftest import (
    CHUNK,
    ROOT,
    SHAPE,
    assert_one_line_error,
    check_invariance,
    chunk_files,
    read,
    run,
    run_cli,
    synthetic_maps,
)

SIGMAS = [0.4, 1.0, 1.5, 3.3]


@pytest.fixture(scope="module")
def isbi() -> np.ndarray:
    """A 64 x 64 x 8 (x, y, z) noisy boundary map from the sample's ground truth."""
    _, ids = load_sample()
    labels = np.asfortranarray(xyz_from_zyx(ids[4:12, 100:164, 200:264]))
    return boundary_map(labels, noise=0.1, seed=5)


def chunked(m: np.ndarray, chunk_shape, sigma: float, extra: int = 0) -> np.ndarray:
    """smooth_chunk over a grid, each box read with the halo (+ `extra` voxels, all axes)."""
    out = np.zeros_like(m)
    for chunk in chunk_grid(m.shape[:3], chunk_shape):
        start, stop = smoothing_bounds(chunk, sigma)
        lo = [max(0, a - extra) for a in start]
        hi = [min(d, b + extra) for b, d in zip(stop, m.shape)]
        box = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        out[chunk.slices()] = smooth_chunk(box, lo, chunk, sigma)
    return out


# ---------------------------------------------------------------------------------------------
# Pure


def test_halo_is_the_reach_of_scipys_kernel() -> None:
    for sigma in [0.0, 0.1, 0.4, 1.0, 1.5, 2.2, 7.0]:
        impulse = np.zeros((81, 1, 1))
        impulse[40] = 1.0
        reach = np.flatnonzero(gaussian_filter(impulse, (sigma, 0, 0)))
        assert smoothing_halo(sigma) == 40 - reach.min() == reach.max() - 40, sigma
    assert smoothing_halo(1.5) == 6 and smoothing_halo(0) == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            smoothing_halo(bad)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_chunks_with_halo_equal_the_whole_array(isbi: np.ndarray, sigma: float) -> None:
    whole = smooth_map(isbi, sigma)
    assert whole.dtype == np.uint8 and whole.shape == isbi.shape and whole.flags.f_contiguous
    assert not np.array_equal(whole, isbi)
    # z is never mixed: each section is its own 2D Gaussian of the uint8 values
    section = gaussian_filter(isbi[:, :, 3].astype(np.float64), sigma, mode="reflect")
    np.testing.assert_array_equal(whole[:, :, 3], np.rint(section).astype(np.uint8))
    for shape in [(64, 64, 8), (13, 7, 3), (5, 64, 1), (30, 50, 8), (64, 3, 2)]:
        np.testing.assert_array_equal(chunked(isbi, shape, sigma), whole, err_msg=str(shape))
    # more than the halo read changes nothing
    np.testing.assert_array_equal(chunked(isbi, (13, 7, 3), sigma, extra=5), whole)


def test_tiny_chunks_and_a_kernel_wider_than_the_volume() -> None:
    rng = np.random.default_rng(1)
    m = rng.integers(0, 256, (11, 9, 3), dtype=np.uint8)
    for sigma in [0.7, 2.0, 9.0]:  # 9: the reflection folds more than once
        whole = smooth_map(m, sigma)
        for shape in [(1, 1, 1), (2, 3, 1), (4, 9, 3)]:
            np.testing.assert_array_equal(chunked(m, shape, sigma), whole)


def test_a_box_without_the_halo_is_refused(isbi: np.ndarray) -> None:
    chunk = Chunk((16, 16, 0), (8, 8, 8), isbi.shape)
    start, stop = smoothing_bounds(chunk, 1.5)
    assert start == (10, 10, 0) and stop == (30, 30, 8)
    with pytest.raises(ValueError, match="does not cover"):
        smooth_chunk(isbi[11:30, 10:30], (11, 10, 0), chunk, 1.5)


def test_float_map_smooths_as_its_uint8_layer(isbi: np.ndarray) -> None:
    p = isbi / 255.0
    np.testing.assert_array_equal(smooth_map(p, 1.5), smooth_map(isbi, 1.5))
    np.testing.assert_array_equal(smooth_map(p.astype(np.float32), 1.5), smooth_map(isbi, 1.5))
    np.testing.assert_array_equal(smooth_map(p, 0), isbi)
    np.testing.assert_array_equal(segment(p, "watershed", 0.19, sigma=1.5),
                                  segment_chunked(isbi, (13, 7, 3), "watershed", 0.19,
                                                  sigma=1.5))


def test_affinity_channels_are_smoothed_each_on_their_own(isbi: np.ndarray) -> None:
    aff = affinity_map(isbi)
    whole = smooth_map(aff, 1.5)
    assert whole.shape == aff.shape and whole.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(whole[..., c], smooth_map(aff[..., c], 1.5))
    np.testing.assert_array_equal(smooth_chunked(aff, (13, 7, 3), 1.5), whole)
    np.testing.assert_array_equal(chunked(aff, (1, 64, 8), 1.5), whole)


@pytest.mark.parametrize("kind", ["boundary", "affinity"])
def test_isbi_segmentation_with_sigma_chunked_equals_whole(isbi: np.ndarray, kind: str) -> None:
    m = isbi if kind == "boundary" else affinity_map(isbi)
    assert not np.array_equal(segment(m, "watershed", 0.19, sigma=1.5),
                              segment(m, "watershed", 0.19)), "smoothing changed nothing"
    np.testing.assert_array_equal(segment(m, "mean", 0.5, sigma=0.0), segment(m, "mean", 0.5))
    check_invariance(m, [(64, 64, 8), (13, 7, 3), (30, 50, 4)], sigma=1.5)


@pytest.mark.parametrize("name", ["two-valued", "stripes", "bowls", "affinity-two-valued"])
def test_synthetic_segmentation_with_sigma_chunked_equals_whole(name: str) -> None:
    m = synthetic_maps()[name]
    check_invariance(m, [(4, 4, 2), (2, 3, 1), (7, 5, 4)], sigma=1.0)


# ---------------------------------------------------------------------------------------------
# Tasks


def smoothed_layer(output: str) -> CloudVolume:
    return CloudVolume(smoothed_layer_path(output), progress=False)


@pytest.mark.parametrize("name, shapes", [("boundary", [(48, 40, 10), (40, 24, 6)]),
                                          ("float32", [(32, 32, 4)])])
def test_smoothed_layer_and_segmentation_are_the_same_for_every_task_shape(
    tmp_path, maps, name, shapes
):
    path, array = maps[name]
    smoothed = smooth_map(array, 1.5)
    expected = segment(array, "watershed", 0.19, sigma=1.5)
    reference = None
    for k, shape in enumerate(shapes):
        output = f"file://{tmp_path / f'seg{k}'}"
        runner = run(path, output, "watershed", 0.19, shape, sigma=1.5)
        blocks = np.prod([-(-s // t) for s, t in zip(SHAPE, shape)])
        assert runner.ran["smooth"] == runner.ran["supervoxels"] == blocks
        vol = smoothed_layer(output)
        assert (vol.dtype, vol.num_channels, vol.layer_type) == (np.uint8, 1, "image")
        assert list(vol.voxel_offset) == [0, 0, 0] and list(vol.volume_size) == list(SHAPE)
        assert list(vol.chunk_size) == list(CHUNK) and list(vol.resolution) == [4, 4, 40]
        np.testing.assert_array_equal(np.asarray(vol[:, :, :])[..., 0], smoothed)
        np.testing.assert_array_equal(read(output), expected, err_msg=f"task shape {shape}")
        files = chunk_files(smoothed_layer_path(output))
        reference = reference or files
        assert files == reference, f"task shape {shape}: other chunk bytes"
    prov = CloudFiles(output).get_json("provenance")["processing"][-1]["method"]
    assert prov["sigma"] == 1.5 and "smooth" in prov["stages"]
    prov = CloudFiles(smoothed_layer_path(output)).get_json("provenance")
    assert prov["processing"][-1]["method"]["sigma"] == 1.5


def test_same_sigma_reuses_the_supervoxels_and_another_rebuilds(tmp_path, maps):
    path, array = maps["affinity"]
    output = f"file://{tmp_path / 'seg'}"
    shape = (48, 40, 6)
    first = run(path, output, "mean", 0.5, shape, sigma=1.5)
    planned = plan_segment(path, output, method="watershed", threshold=0.19, task_shape=shape,
                           chunk_size=CHUNK, sigma=1.5, overwrite=True)
    tuning = set(planned.tuning_stages())
    stages = set(planned.stages)
    assert set(first.ran) == stages - {"halo"}  # the smooth tasks publish the slabs
    assert smoothed_layer(output).num_channels == 3
    np.testing.assert_array_equal(read(output), segment(array, "mean", 0.5, sigma=1.5))
    root = Path(output[len("file://"):])
    kept = {p: p.stat().st_mtime_ns for p in [*(root / "segmentation" / "smoothed").rglob("*"),
                                              *(root / "tasks" / "smooth").rglob("*"),
                                              *(root / "tasks" / "supervoxels").rglob("*")]
            if p.is_file()}

    plan = plan_segment(path, output, method="watershed", threshold=0.19, task_shape=shape,
                        chunk_size=CHUNK, overwrite=True, sigma=1.5)
    assert plan.action == "retune"
    assert "reusing the smoothed map, the supervoxels and region graphs" in plan.describe()
    again = run(path, output, "watershed", 0.19, shape, overwrite=True, sigma=1.5)
    assert set(again.ran) == tuning, again.ran
    np.testing.assert_array_equal(read(output), segment(array, "watershed", 0.19, sigma=1.5))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "chunk stages were rewritten"

    plan = plan_segment(path, output, method="watershed", threshold=0.19, task_shape=shape,
                        chunk_size=CHUNK, overwrite=True, sigma=2.0)
    assert plan.action == "rebuild" and plan.reset_chunk_stages
    other = run(path, output, "watershed", 0.19, shape, overwrite=True, sigma=2.0)
    assert set(other.ran) == stages - {"halo"}
    np.testing.assert_array_equal(read(output), segment(array, "watershed", 0.19, sigma=2.0))
    vol = smoothed_layer(output)
    np.testing.assert_array_equal(np.asarray(vol[:, :, :]), smooth_map(array, 2.0))

    off = run(path, output, "watershed", 0.19, shape, overwrite=True)  # back to --sigma 0
    assert set(off.ran) == stages - {"smooth"}
    np.testing.assert_array_equal(read(output), segment(array, "watershed", 0.19))
    assert not CloudFiles(smoothed_layer_path(output)).exists("info")


def test_bounds_smooth_the_region_as_if_it_were_the_volume(tmp_path, maps):
    path, array = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    lo, hi = (8, 16, 2), (72, 56, 8)
    run(path, output, "mean", 0.4, (24, 16, 4), bounds=Bbox(lo, hi), sigma=1.5)
    crop = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    expected = volume_ids(segment(crop, "mean", 0.4, sigma=1.5), lo, crop.shape, SHAPE)
    np.testing.assert_array_equal(read(output)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], expected)
    vol = CloudVolume(smoothed_layer_path(output), progress=False, fill_missing=True)
    np.testing.assert_array_equal(np.asarray(vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])[..., 0],
                                  smooth_map(crop, 1.5))


def test_plan_counts_and_describes_the_smooth_stage(tmp_path, maps):
    path, _ = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    off = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(48, 40, 10),
                       chunk_size=CHUNK)
    on = plan_segment(path, output, method="mean", threshold=0.5, task_shape=(48, 40, 10),
                      chunk_size=CHUNK, sigma=1.5)
    assert off.task_count("smooth") == 0 and on.task_count("smooth") == 4
    assert "smooth 0, halo 4, supervoxels 4" in off.describe()
    assert "Gaussian" not in off.describe()
    assert "smooth 4, halo 0, supervoxels 4" in on.describe()
    assert "in-plane Gaussian sigma 1.5 first (halo 6" in on.describe()
    assert on.chunk_key != off.chunk_key and on.segmented_map == (smoothed_layer_path(output), 0)
    assert off.segmented_map == (path, 0)


@pytest.mark.parametrize("layer", ["output", "smoothed"])
def test_a_layer_of_another_geometry_is_refused(tmp_path, maps, layer):
    path, _ = maps["boundary"]
    output = f"file://{tmp_path / 'seg'}"
    target = output if layer == "output" else smoothed_layer_path(output)
    layer_type, dtype = ("segmentation", "uint64") if layer == "output" else ("image", "uint8")
    vol = create_layer(target, layer_type=layer_type, dtype=dtype, resolution=(8, 8, 40),
                       size=SHAPE, chunk_size=CHUNK)
    vol[0:8, 0:8, 0:2] = np.ones((8, 8, 2), dtype)
    with pytest.raises(InputError, match=r"holds a layer of another geometry \(resolution"):
        plan_segment(path, output, method="mean", threshold=0.5, chunk_size=CHUNK, sigma=1.5)
    plan = plan_segment(path, output, method="mean", threshold=0.5, chunk_size=CHUNK,
                        sigma=1.5, overwrite=True)
    assert plan.reset_chunk_stages


@pytest.mark.parametrize("sigma", ["-1", "nan", "100"])
def test_cli_bad_sigma_is_one_line_exit_2(tmp_path, maps, sigma):
    output = tmp_path / "seg"
    result = run_cli("segment", maps["boundary"][0], output, "--method", "mean",
                     "--threshold", "0.5", "--sigma", sigma)
    assert_one_line_error(result, f"--sigma {float(sigma)}", "must lie in [0, 16.0]")
    assert not output.exists()


SMOOTH_ONLY = """
import sys
from deepem3d.run.runner import execute_here, run_stages
from deepem3d.stages.segmentation import plan_segment, segment_stages
plan = plan_segment(sys.argv[1], sys.argv[2], method="mean", threshold=0.5, sigma=16.0,
                    task_shape=(128, 128, 10))
run_stages(segment_stages(plan)[:1], execute=execute_here, echo=lambda line: None)
"""


def test_a_smooth_task_peaks_within_its_plan(tmp_path):
    """The smooth stage's largest task (its marker's peak_added_mib, in a fresh process) stays
    within the plan's memory: the middle block of 3 x 3 reads 128 voxels of halo around its
    128 x 128, so the smooth term of the plan decides. At 17 bytes per voxel and channel of the
    box the plan said 31.9 MiB; the task peaked near 48 (three float64 arrays at once)."""
    from deepem3d.stages.frame import Markers

    rng = np.random.default_rng(0)
    path = f"file://{tmp_path / 'map'}"
    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                       size=(384, 384, 10), chunk_size=(128, 128, 10), num_channels=3)
    vol[vol.bounds] = rng.integers(0, 256, (384, 384, 10, 3), dtype=np.uint8)
    output = f"file://{tmp_path / 'seg'}"
    plan = plan_segment(path, output, method="mean", threshold=0.5, sigma=16.0,
                        task_shape=(128, 128, 10))
    done = subprocess.run([sys.executable, "-c", SMOOTH_ONLY, path, output], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    peak = max(m["peak_added_mib"] for m in Markers(output, "smooth").records())
    assert peak * 2**20 <= plan.stage_memory_bytes("smooth"), (
        peak, plan.stage_memory_bytes("smooth") / 2**20)
