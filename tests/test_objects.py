"""Meshes and skeletons (igneous's tasks in the frame): unsharded and sharded, each loading
through CloudVolume where its segment is; the segmentation's info naming a product only once
its merge is complete; bad input refused in one line before anything is written.

The layer is a 128 x 128 x 10 crop of the sample's ground truth at 16 x 16 x 50 nm, so that
mip 0 is the near-isotropic mip and no downsampling is needed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

from deepem3d.axes import xyz_from_zyx
from deepem3d.run.runner import Runner, execute_here, run_stages
from deepem3d.sample import load_sample
from deepem3d.stages.meshes import mesh_stages, plan_meshes
from deepem3d.stages.skeletons import plan_skeletons, skeleton_stages
from deepem3d.storage.layers import create_layer
from tests.conftest import assert_one_line_error, check_objects, cli_here, run_cli

SHAPE = (128, 128, 10)


@pytest.fixture
def labels(tmp_path) -> str:
    _, ids = load_sample()
    cut = ids[: SHAPE[2], 100:100 + SHAPE[1], 200:200 + SHAPE[0]].astype("uint64")
    path = f"file://{tmp_path / 'seg'}"
    vol = create_layer(path, layer_type="segmentation", dtype="uint64",
                       resolution=(16, 16, 50), size=SHAPE, chunk_size=(64, 64, 10))
    vol[:, :, :] = xyz_from_zyx(cut)
    return path


def info(path: str) -> dict:
    return CloudFiles(path).get_json("info")


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_meshes_and_skeletons_are_named_once_merged_and_load(labels, sharded):
    meshes = mesh_stages(plan_meshes(labels, sharded=sharded, task_shape=(64, 64, 10)))
    skeletons = skeleton_stages(plan_skeletons(labels, sharded=sharded, task_shape=(64, 64, 10),
                                               dust_threshold=100))
    # forged, not merged: the info names neither (Neuroglancer would ask for them)
    runner = Runner(lambda stage: "", execute=execute_here, progress=False)
    runner.run([meshes[0], skeletons[0]])
    forged = CloudFiles(labels)
    assert any(forged.list(prefix="mesh/")) and any(forged.list(prefix="skeletons/"))
    assert "mesh" not in info(labels) and "skeletons" not in info(labels)
    assert "mesh" not in CloudVolume(labels).info  # the in-memory naming did not leak
    runner.run(meshes[1:] + skeletons[1:])
    assert info(labels)["mesh"] == "mesh" and info(labels)["skeletons"] == "skeletons"
    kind = CloudFiles(f"{labels}/mesh").get_json("info")["@type"]
    assert kind == ("neuroglancer_multilod_draco" if sharded else "neuroglancer_legacy_mesh")
    assert ("sharding" in CloudFiles(f"{labels}/skeletons").get_json("info")) == sharded
    check_objects(labels, min_voxels=500, slack=2.0)


def test_a_second_run_of_the_same_stages_keeps_the_names(labels):
    stages = skeleton_stages(plan_skeletons(labels, dust_threshold=100))
    first = run_stages(stages, execute=execute_here, progress=False)
    again = run_stages(skeleton_stages(plan_skeletons(labels, dust_threshold=100)),
                       execute=execute_here, progress=False)
    assert [s.ran for s in first] == [1, 9] and [s.ran for s in again] == [0, 0]
    assert info(labels)["skeletons"] == "skeletons"
    largest = np.bincount(np.asarray(CloudVolume(labels)[:, :, :]).ravel())[1:].argmax() + 1
    assert len(CloudVolume(labels).skeleton.get(int(largest)).vertices) > 0


def test_other_settings_replace_the_products_files(labels, tmp_path):
    """Skeletons forged in other blocks, then again in one block: the folder holds what a
    run with the second settings alone writes (the first run's fragments would be merged)."""
    def run(path, shape):
        stages = skeleton_stages(plan_skeletons(path, task_shape=shape, dust_threshold=100))
        run_stages(stages, execute=execute_here, progress=False)
        return sorted(CloudFiles(path).list(prefix="skeletons/"))

    run(labels, (64, 64, 10))
    again = run(labels, (128, 128, 10))
    fresh = f"file://{tmp_path / 'fresh'}"
    CloudFiles(fresh).put_json("info", info(labels))
    vol = CloudVolume(fresh)
    vol[:, :, :] = CloudVolume(labels)[:, :, :]
    assert again == run(fresh, (128, 128, 10))
    assert info(labels)["skeletons"] == "skeletons"


def test_object_bad_input_is_one_line_before_anything_is_written(labels, tmp_path):
    image = f"file://{tmp_path / 'image'}"
    create_layer(image, layer_type="image", dtype="uint8", resolution=(16, 16, 50), size=SHAPE,
                 chunk_size=(64, 64, 10))
    before = sorted(CloudFiles(labels).list())
    for command in ("mesh", "skeleton"):
        assert_one_line_error(run_cli(command, image), "is an image layer",
                              f"{'meshes' if command == 'mesh' else 'skeletons'} are made of "
                              "a segmentation layer")
        assert_one_line_error(run_cli(command, labels, "--mip", "3"),
                              f"{command} mip 3 does not exist", "downsample it first")
        assert_one_line_error(run_cli(command, labels, "--sharded", "--no-spatial-index"),
                              "need the spatial index", "sharded merge")
    assert sorted(CloudFiles(labels).list()) == before
    dry = run_cli("skeleton", labels, "--dry-run", check=True)
    assert "1 SkeletonTask(s) of 128 x 128 x 10 voxels at mip 0" in dry.stdout, dry.stdout


def test_an_unsharded_merge_is_split_by_the_volume_size(labels):
    """igneous splits an unsharded merge by the leading digits of segment ids (999 tasks at
    its default): a small volume takes 9, a whole-brain one keeps 999."""
    from deepem3d.stages.objects import VOXELS_PER_SEGMENT, prefix_digits

    assert [prefix_digits(v) for v in (0, 128 * 128 * 10, 5 * 10**6, 6 * 10**6, 10**12)] == \
        [1, 1, 1, 2, 3]
    assert prefix_digits(2000 * VOXELS_PER_SEGMENT * 99) == 2  # 99 tasks' worth: 2 digits
    _, merge = skeleton_stages(plan_skeletons(labels))
    assert merge.task_count == 9 and len(list(merge.make_tasks())) == 9


def test_a_missing_chunk_fails_the_mesh_once_in_one_line(tmp_path):
    """igneous's EmptyVolumeException was retried five times, each a traceback on stderr,
    before the run stopped: a missing chunk is bad input, the same on every attempt."""
    from tests.conftest import make_layer

    make_layer(tmp_path / "seg", "segmentation")
    next((tmp_path / "seg" / "4_4_50").glob("0-64_0-64_0-10*")).unlink()
    result = run_cli("mesh", tmp_path / "seg", "--mip", "0")
    assert_one_line_error(result, "met a missing chunk", "0-64_0-64_0-10")
    assert result.stderr.count("Traceback") == 0, result.stderr


def test_a_chunk_that_does_not_decode_fails_downsampling_once_in_one_line(tmp_path):
    """A chunk file that is not what the info says (here not gzip) was retried five times,
    each a traceback in the workers' log, before the run stopped: it is bad input, the same on
    every attempt, like a missing chunk."""
    from tests.conftest import make_layer

    make_layer(tmp_path / "image")
    next((tmp_path / "image" / "4_4_50").glob("0-64_0-64_0-10*")).write_bytes(b"garbage")
    result = run_cli("downsample", tmp_path / "image", "--num-mips", "1", "--parallel", "1")
    assert_one_line_error(result, "met a chunk that cannot be decoded", "write the layer again")
    log = (tmp_path / "image" / "tasks").rglob("errors/*.json")
    attempts = [json.loads(p.read_text()).get("attempt") for p in log]
    assert attempts == [1], attempts


def test_mesh_fill_missing_meshes_an_incomplete_layer(labels):
    """`mesh --fill-missing` reads a missing chunk as background: the other chunks' segments
    are meshed, and the info names the meshes. (`skeleton` has no such option: CloudVolume's
    renumbering read, which igneous's SkeletonTask uses, fails on a missing chunk.)"""
    from pathlib import Path

    folder = Path(labels.removeprefix("file://"))
    next((folder / "16_16_50").glob("0-64_0-64_0-10*")).unlink()  # without: the test above
    run_cli("mesh", labels, "--fill-missing", check=True)
    assert info(labels)["mesh"] == "mesh"
    kept = np.asarray(CloudVolume(labels, fill_missing=True)[:, :, :])
    assert not kept[:64, :64].any()
    largest = np.bincount(kept.ravel())[1:].argmax() + 1
    assert len(CloudVolume(labels).mesh.get(int(largest)).vertices) > 0


def test_another_mip_and_back_forges_again(labels):
    """Meshes at mip 1, then 0, then 1 again: the third run forged nothing (its stage, named
    by the mip, still had its markers), so the merge took in the mip-0 fragments under an
    info that says mip 1. Another mip is another run of the one forge stage."""
    from deepem3d.stages.downsample import downsample_stage, plan_downsample

    run_stages([downsample_stage(plan_downsample(labels, num_mips=1))], execute=execute_here,
               progress=False)

    def run(mip: int) -> tuple[list[int], list[str]]:
        summaries = run_stages(mesh_stages(plan_meshes(labels, mip=mip)),
                               execute=execute_here, progress=False)
        return [s.ran for s in summaries], sorted(CloudFiles(labels).list(prefix="mesh/"))

    ran, first = run(1)
    assert run(0)[0] == ran == [1, 1]
    assert run(1) == (ran, first)
    assert CloudFiles(f"{labels}/mesh").get_json("info")["mip"] == 1
    # a run at mip 0 stopped once its forge had started (and deleted the mip-1 files), then
    # mip 1 again: the merge, recorded complete for mip 1, was skipped and no mesh was left
    forge = mesh_stages(plan_meshes(labels, mip=0))[0]
    forge.prepare()
    forge.start()
    assert run(1) == (ran, first)


def test_products_deepem3d_did_not_make_are_refused_and_kept(labels, tmp_path, maps):
    """Meshes in mesh/ with no run of deepem3d recorded were deleted by the run's prepare
    (and gone for good when the run then failed); an info key naming another directory
    (igneous's mesh_mip_0_err_40) was dropped. Both are refused at planning, --dry-run too,
    by `mesh`, `skeleton` and a pipeline, and left as they are."""
    files = CloudFiles(labels)
    files.put("mesh/7:0", b"igneous's", compress=None)
    files.put("skeletons/7", b"igneous's", compress=None)

    def held() -> dict:
        return {path: files.get(path) for path in files.list()}

    before = held()
    for command, product in (("mesh", "mesh"), ("skeleton", "skeletons")):
        for dry in (("--dry-run",), ()):
            assert_one_line_error(cli_here(command, labels, *dry), f"{labels}/{product} holds "
                                  f"files that no {command} run of deepem3d made",
                                  "move or delete them first")
    assert held() == before
    # a pipeline, on the segmentation it writes, before anything is written
    output = tmp_path / "out"
    CloudFiles(f"file://{output / 'segmentation'}").put("mesh/7:0", b"igneous's")
    pipeline = tmp_path / "meshes.yaml"
    pipeline.write_text(f"version: 1\noutput: {output}\nimage: {maps['affinity'][0]}\n"
                        f"map: {maps['affinity'][0]}\nproducts: [segmentation, meshes]\n"
                        "segmentation:\n  method: mean\n  threshold: 0.5\n")
    assert_one_line_error(cli_here("run", pipeline, "--dry-run"), "meshes.yaml: meshes: ",
                          "holds files that no mesh run of deepem3d made")
    assert [p.name for p in output.iterdir()] == ["segmentation"]
    assert [p.name for p in (output / "segmentation").iterdir()] == ["mesh"]

    files.delete(["mesh/7:0", "skeletons/7"])
    # igneous's mesh/info alone, written as a first run's task creation started and was
    # stopped before the run recorded itself: no product, and the run goes on
    files.put_json("mesh/info", {"@type": "neuroglancer_legacy_mesh"})
    assert cli_here("mesh", labels, "--dry-run").returncode == 0
    files.delete("mesh/info")
    stored = files.get_json("info")
    files.put_json("info", {**stored, "mesh": "mesh_mip_0_err_40"})
    before = held()
    for dry in (("--dry-run",), ()):
        assert_one_line_error(cli_here("mesh", labels, *dry), "info names meshes in "
                              "mesh_mip_0_err_40/ that deepem3d did not make",
                              "remove the info's \"mesh\" key first")
    assert held() == before
    # a product deepem3d made is its own to replace
    files.put_json("info", stored)
    run_stages(skeleton_stages(plan_skeletons(labels, dust_threshold=100)),
               execute=execute_here, progress=False)
    assert cli_here("skeleton", labels, "--dust-threshold", "50", "--dry-run").returncode == 0
    run_stages(skeleton_stages(plan_skeletons(labels, dust_threshold=50)),
               execute=execute_here, progress=False)
    assert info(labels)["skeletons"] == "skeletons"


def test_one_skeleton_task_is_pruned_like_several(labels):
    """igneous's lone SkeletonTask (the volume no larger than a task) uploaded final
    skeletons, which the merge passes over: --min-cable-nm and --tick-threshold were not
    applied. A cable minimum no skeleton reaches leaves none, in one task as in four."""
    kept = {}
    for shape in ((128, 128, 10), (64, 64, 10)):
        plan = plan_skeletons(labels, task_shape=shape, dust_threshold=100,
                              min_cable_nm=1e6, tick_threshold=1e6)
        run_stages(skeleton_stages(plan), execute=execute_here, progress=False)
        names = [k.split("/")[1] for k in CloudFiles(labels).list(prefix="skeletons/")]
        merged = [int(n) for n in names if n.isdigit()]
        skeletons = CloudVolume(labels).skeleton
        kept[plan.task_count] = (len(merged),
                                 sum(len(skeletons.get(i).vertices) > 0 for i in merged))
    assert kept[1][0] > 20 and kept[4][0] > 20, kept
    assert kept[1][1] == kept[4][1] == 0, kept


def test_a_products_name_gives_the_info_cloudvolumes_bytes_whatever_its_key_order(tmp_path):
    """Naming a product's directory writes the info as CloudVolume's commit_info does: the
    same info is the same bytes whether its keys were read in CloudVolume's sorted order (a
    run resumed after its runner was killed) or in the order they were added (the
    undisturbed run), which the fault campaign compared and found differing."""
    from deepem3d.stages.objects import set_info_name

    layer = f"file://{tmp_path / 'labels'}"
    vol = create_layer(layer, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 40),
                       size=(32, 32, 4), chunk_size=(32, 32, 4))
    info = dict(vol.info)
    written = []
    for order in (list(info) + ["mesh"], ["mesh", *sorted(info)]):
        content = {key: info.get(key, "mesh") for key in order}
        CloudFiles(layer).put_json("info", content, compress=None)
        set_info_name(layer, "skeletons", "skeletons")
        written.append(CloudFiles(layer).get("info"))
    vol = CloudVolume(layer)
    vol.commit_info()
    assert written[0] == written[1] == CloudFiles(layer).get("info")
    assert vol.info["mesh"] == "mesh" and vol.info["skeletons"] == "skeletons"
