"""`deepem3d evaluate SEG GT` on real file:// layers: results, block plan, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.cli.main import main
from deepem3d.segmentation.metrics import evaluate
from deepem3d.stages.scoring import plan_blocks
from deepem3d.storage.layers import create_layer
from tests.conftest import assert_one_line_error, run_cli

OFFSET = (8, 16, 4)
SIZE = (40, 36, 20)  # x, y, z
CHUNK = (16, 16, 8)


def make_layer(
    path: Path, array_xyz: np.ndarray, *, resolution=(4, 4, 40), offset=OFFSET, chunk=CHUNK
) -> str:
    vol = create_layer(
        str(path), layer_type="segmentation", dtype="uint64", resolution=resolution,
        size=array_xyz.shape, voxel_offset=offset, chunk_size=chunk,
    )
    vol[:, :, :] = array_xyz
    return str(path)


def labels() -> tuple[np.ndarray, np.ndarray]:
    """gt (x, y, z): boxes with 0 borders; seg: gt with a split, a merge, noise and some 0."""
    rng = np.random.default_rng(42)
    x, y, z = np.meshgrid(*(np.arange(s) for s in SIZE), indexing="ij")
    gt = (1 + x // 10 + 4 * (y // 12) + 12 * (z // 7)).astype(np.uint64)
    gt[(x % 10 == 0) | (y % 12 == 0)] = 0
    seg = gt * 3 + 5
    seg[(gt == 2) & (z > 3)] = 999  # split
    seg[seg == 3 * 6 + 5] = 3 * 7 + 5  # merge
    seg[rng.random(SIZE) < 0.05] = 77  # noise
    seg[(gt == 9) & (x > 34)] = 0  # predicted background inside a gt object
    return seg, gt


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    seg, gt = labels()
    return {
        "seg": make_layer(root / "seg", seg),
        "gt": make_layer(root / "gt", gt),
        "seg_array": seg,
        "gt_array": gt,
        "root": root,
    }


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """main() in this process, as the console script runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_stderr(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deepem3d: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# results


def test_json_equals_the_pure_function(layers: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["evaluate", layers["seg"], layers["gt"], "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    expected = evaluate(layers["seg_array"], layers["gt_array"])
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert 0 < result["adapted_rand_error"] < 1
    lo, hi = OFFSET, tuple(o + s for o, s in zip(OFFSET, SIZE))
    assert result["bounds"] == [*lo, *hi]
    assert result["voxels"] == int(np.prod(SIZE))
    assert result["labelled_voxels"] == int((layers["gt_array"] != 0).sum())
    assert result["mip"] == 0 and result["voi_units"] == "bits"
    assert result["gt"].startswith("file://") and result["seg"].startswith("file://")
    assert err == ""  # stdout is the JSON alone; no progress bar where stderr is no terminal


def test_bounds_score_the_subvolume(layers: dict, capsys: pytest.CaptureFixture) -> None:
    bounds = (11, 20, 5, 45, 50, 22)  # unaligned on every side
    code, out, err = run(
        ["evaluate", layers["seg"], layers["gt"], "--json", "--bounds", ",".join(map(str, bounds))],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    x0, y0, z0 = (b - o for b, o in zip(bounds[:3], OFFSET))
    x1, y1, z1 = (b - o for b, o in zip(bounds[3:], OFFSET))
    seg = layers["seg_array"][x0:x1, y0:y1, z0:z1]
    gt = layers["gt_array"][x0:x1, y0:y1, z0:z1]
    expected = evaluate(seg, gt)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert result["bounds"] == list(bounds)
    assert result["voxels"] == gt.size


def test_human_readable_table(layers: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["evaluate", layers["seg"], layers["gt"]], capsys)
    assert code == 0, err
    expected = evaluate(layers["seg_array"], layers["gt_array"])
    assert f"adapted Rand error  {expected['adapted_rand_error']:.6f}" in out
    assert f"VOI split           {expected['voi_split']:.6f}   bits" in out
    assert f"VOI merge           {expected['voi_merge']:.6f}   bits" in out
    assert f"{np.prod(SIZE):,} voxels" in out


def test_against_itself_is_perfect(layers: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["evaluate", layers["gt"], layers["gt"], "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["adapted_rand_error"] == 0.0 and result["voi"] == 0.0


def test_mip_level(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seg, gt = labels()
    paths = {}
    for name, array in (("seg", seg), ("gt", gt)):
        paths[name] = make_layer(tmp_path / name, array)
        vol = CloudVolume("file://" + paths[name], progress=False)
        vol.add_scale((2, 2, 1), chunk_size=CHUNK)
        vol.commit_info()
        CloudVolume("file://" + paths[name], mip=1, progress=False)[:, :, :] = array[::2, ::2]
    code, out, err = run(["evaluate", paths["seg"], paths["gt"], "--mip", "1", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    expected = evaluate(seg[::2, ::2], gt[::2, ::2])
    assert result["voi"] == pytest.approx(expected["voi"], rel=1e-12)
    assert result["voxels"] == seg[::2, ::2].size


def test_gt_at_one_of_segs_mips_is_compared_at_that_resolution(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """GT labelled at 8,8,40 nm against SEG with a mip at 8,8,40: --mip names SEG's mip and GT
    is read at its mip of the same resolution (the same --mip index for both could never
    work: GT has no mip 1); without --mip, the finest resolution GT has."""
    seg, gt = labels()
    seg_path = make_layer(tmp_path / "seg", seg)
    vol = CloudVolume("file://" + seg_path, progress=False)
    vol.add_scale((2, 2, 1), chunk_size=CHUNK)
    vol.commit_info()
    CloudVolume("file://" + seg_path, mip=1, progress=False)[:, :, :] = seg[::2, ::2]
    offset = (OFFSET[0] // 2, OFFSET[1] // 2, OFFSET[2])
    gt_path = make_layer(tmp_path / "gt8", gt[::2, ::2], resolution=(8, 8, 40), offset=offset)
    expected = evaluate(seg[::2, ::2], gt[::2, ::2])
    for flags in ([], ["--mip", "1"]):
        code, out, err = run(["evaluate", seg_path, gt_path, "--json", *flags], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["voi"] == pytest.approx(expected["voi"], rel=1e-12)
        assert (result["mip"], result["gt_mip"], result["resolution"]) == (1, 0, [8, 8, 40])
    code, _, err = run(["evaluate", seg_path, gt_path, "--mip", "0"], capsys)
    assert_one_line_stderr(code, err, "GT has no mip at SEG's mip 0 (4,4,40 nm)", "--mip 1")
    # the other way round: the 8 nm layer as SEG, GT's mip 1 is read
    code, out, err = run(["evaluate", gt_path, seg_path, "--json"], capsys)
    assert code == 0, err
    assert (json.loads(out)["mip"], json.loads(out)["gt_mip"]) == (0, 1)


def test_python_dash_m_end_to_end(layers: dict) -> None:
    proc = run_cli("evaluate", layers["seg"], layers["gt"], "--json", check=True)
    result = json.loads(proc.stdout)
    expected = evaluate(layers["seg_array"], layers["gt_array"])
    assert result["adapted_rand_error"] == pytest.approx(expected["adapted_rand_error"])
    proc = run_cli("evaluate", layers["root"] / "nope", layers["gt"])
    assert_one_line_error(proc, "no precomputed layer", "nope")


# ---------------------------------------------------------------------------------------------
# expected mistakes: exit 2 and one line


def test_missing_layer(layers: dict, capsys: pytest.CaptureFixture) -> None:
    missing = str(layers["root"] / "missing")
    code, _, err = run(["evaluate", layers["seg"], missing], capsys)
    assert_one_line_stderr(code, err, "no precomputed layer", "missing")


@pytest.mark.parametrize("bounds", ["1,2,3", "0,0,0,10,10,x", "5,5,5,5,10,10"])
def test_malformed_bounds(layers: dict, capsys: pytest.CaptureFixture, bounds: str) -> None:
    code, _, err = run(["evaluate", layers["seg"], layers["gt"], "--bounds", bounds], capsys)
    assert_one_line_stderr(code, err, "--bounds")


def test_bounds_outside_the_volume(layers: dict, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        ["evaluate", layers["seg"], layers["gt"], "--bounds", "0,0,0,20,20,10"], capsys
    )
    assert_one_line_stderr(code, err, "outside", "inside both")


def test_resolution_mismatch(layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = make_layer(tmp_path / "coarse", layers["gt_array"], resolution=(8, 8, 40))
    code, _, err = run(["evaluate", layers["seg"], other], capsys)
    assert_one_line_stderr(code, err, "GT has no mip at any of SEG's resolutions (4,4,40 nm)",
                           "8,8,40", "deepem3d downsample")


def test_missing_mip(layers: dict, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["evaluate", layers["seg"], layers["gt"], "--mip", "2"], capsys)
    assert_one_line_stderr(code, err, "no mip 2")


def test_seg_smaller_than_gt(layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = make_layer(tmp_path / "small", layers["seg_array"][:20])
    code, _, err = run(["evaluate", small, layers["gt"]], capsys)
    assert_one_line_stderr(code, err, "not inside", "--bounds")


def test_not_a_label_layer(layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    floats = create_layer(
        str(tmp_path / "boundary"), layer_type="image", dtype="float32", resolution=(4, 4, 40),
        size=SIZE, voxel_offset=OFFSET, chunk_size=CHUNK,
    )
    code, _, err = run(["evaluate", floats.cloudpath, layers["gt"]], capsys)
    assert_one_line_stderr(code, err, "float32", "integer")
    affinities = create_layer(
        str(tmp_path / "affinity"), layer_type="image", dtype="uint8", resolution=(4, 4, 40),
        size=SIZE, voxel_offset=OFFSET, chunk_size=CHUNK, num_channels=3,
    )
    code, _, err = run(["evaluate", affinities.cloudpath, layers["gt"]], capsys)
    assert_one_line_stderr(code, err, "3 channels")


def test_an_em_image_or_a_map_is_refused_as_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_cli("sample", tmp_path, check=True)
    image, gt = str(tmp_path / "image"), str(tmp_path / "ground_truth")
    # uint8, one channel: integer ids as far as dtype and channels tell
    assert_one_line_error(run_cli("evaluate", image, gt),
                          "SEG", "is an EM image (written by `deepem3d sample`), not labels")
    code, _, err = run(["evaluate", gt, image], capsys)
    assert_one_line_stderr(code, err, "GT", "is an EM image")
    inferred = create_layer(
        str(tmp_path / "map"), layer_type="image", dtype="uint8", resolution=(4, 4, 40),
        size=SIZE, voxel_offset=OFFSET, chunk_size=CHUNK, provenance={"task": "InferenceTask"},
    )
    code, _, err = run(["evaluate", inferred.cloudpath, gt], capsys)
    assert_one_line_stderr(code, err, "is a boundary or affinity map (written by `deepem3d "
                           "infer`)", "deepem3d segment")


def test_an_image_layer_without_provenance_is_scored_with_a_warning(
    layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    vol = create_layer(
        str(tmp_path / "ids"), layer_type="image", dtype="uint32", resolution=(4, 4, 40),
        size=SIZE, voxel_offset=OFFSET, chunk_size=CHUNK,
    )
    vol[:, :, :] = layers["seg_array"].astype(np.uint32)
    code, out, err = run(["evaluate", vol.cloudpath, layers["gt"], "--json"], capsys)
    assert code == 0, err
    assert err.startswith("deepem3d: warning: SEG ") and "without provenance" in err
    assert len(err.strip().splitlines()) == 1, err
    expected = evaluate(layers["seg_array"], layers["gt_array"])
    assert json.loads(out)["voi"] == pytest.approx(expected["voi"], rel=1e-12)


def test_negative_ids_of_a_signed_layer_are_one_line(
    layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Other tools write signed segmentation layers: a negative id is named, not a crash."""
    info = CloudVolume.create_new_info(1, "segmentation", "int32", "raw", [4, 4, 40],
                                       list(OFFSET), list(SIZE), chunk_size=list(CHUNK))
    vol = CloudVolume(f"file://{tmp_path / 'signed'}", info=info, progress=False)
    vol.commit_info()
    signed = layers["gt_array"].astype(np.int32)
    signed[3, 4, 5] = -1
    vol[:, :, :] = signed
    for argv, name in (([vol.cloudpath, layers["gt"]], "SEG"),
                       ([layers["gt"], vol.cloudpath], "GT")):
        code, _, err = run(["evaluate", *argv], capsys)
        assert_one_line_stderr(code, err, name, "negative ids (min -1")


def test_gt_all_zero_in_bounds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seg, gt = labels()
    gt_path = make_layer(tmp_path / "gt", np.zeros_like(gt))
    seg_path = make_layer(tmp_path / "seg", seg)
    code, _, err = run(["evaluate", seg_path, gt_path], capsys)
    assert_one_line_stderr(code, err, "nothing to score")


def test_unwritten_chunks(layers: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = create_layer(
        str(tmp_path / "empty"), layer_type="segmentation", dtype="uint64",
        resolution=(4, 4, 40), size=SIZE, voxel_offset=OFFSET, chunk_size=CHUNK,
    )
    code, _, err = run(["evaluate", empty.cloudpath, layers["gt"]], capsys)
    # without --bounds: perhaps a layer segmented with --bounds, complete for its region
    assert_one_line_stderr(code, err, "missing chunks", "--fill-missing",
                           "score the region it covers with --bounds")
    bounds = ",".join(str(v) for v in (*OFFSET, *(o + s for o, s in zip(OFFSET, SIZE))))
    code, _, err = run(["evaluate", empty.cloudpath, layers["gt"], "--bounds", bounds], capsys)
    assert_one_line_stderr(code, err, "missing chunks", "--fill-missing")
    assert "score the region" not in err
    code, out, err = run(
        ["evaluate", empty.cloudpath, layers["gt"], "--fill-missing", "--json"], capsys
    )
    assert code == 0, err
    expected = evaluate(np.zeros_like(layers["gt_array"]), layers["gt_array"])
    assert json.loads(out)["rand_recall"] == pytest.approx(expected["rand_recall"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# the block plan


def covers_exactly(bbox: Bbox, blocks: list[Bbox]) -> bool:
    lo, hi = np.asarray(bbox.minpt), np.asarray(bbox.maxpt)
    hits = np.zeros(hi - lo, dtype=np.int32)
    for b in blocks:
        (x0, y0, z0), (x1, y1, z1) = np.asarray(b.minpt) - lo, np.asarray(b.maxpt) - lo
        hits[x0:x1, y0:y1, z0:z1] += 1
    return bool((hits == 1).all())


def test_blocks_are_z_slabs_on_the_chunk_grid() -> None:
    bbox = Bbox((11, 20, 5), (45, 50, 30))
    blocks = plan_blocks(bbox, CHUNK, OFFSET)
    assert [(int(b.minpt[2]), int(b.maxpt[2])) for b in blocks] == [
        (5, 12), (12, 20), (20, 28), (28, 30)
    ]
    assert all(tuple(b.minpt[:2]) == (11, 20) and tuple(b.maxpt[:2]) == (45, 50) for b in blocks)
    assert covers_exactly(bbox, blocks)


def test_large_slabs_are_cut_in_y_then_x() -> None:
    bbox = Bbox((3, 1, 0), (200, 170, 17))
    chunk, offset = (32, 32, 8), (3, 1, 0)
    rows = plan_blocks(bbox, chunk, offset, max_voxels=197 * 64 * 8)
    assert covers_exactly(bbox, rows)
    assert all(b.size3()[0] == 197 and b.size3()[1] <= 64 for b in rows)
    assert all((int(b.minpt[1]) - offset[1]) % 32 == 0 for b in rows)
    tiles = plan_blocks(bbox, chunk, offset, max_voxels=32 * 32 * 8 * 2)
    assert covers_exactly(bbox, tiles)
    assert all(np.prod(b.size3()) <= 32 * 32 * 8 * 2 for b in tiles)
    assert all((int(b.minpt[0]) - offset[0]) % 32 == 0 for b in tiles)
