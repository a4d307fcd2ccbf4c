"""`deepem3d tune`: settings scored on a labelled region from a finished run's kept supervoxels
and region graphs; the run's own setting reproduces the layer it wrote; bad input is refused
with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from cloudfiles import CloudFiles

from deepem3d.axes import xyz_from_zyx
from deepem3d.sample import load_sample
from deepem3d.segmentation.agglomeration import agglomerate, remap
from deepem3d.segmentation.metrics import evaluate
from deepem3d.stages.tune import Setting, _row, load_kept, read_ground_truth, settings_grid
from deepem3d.storage.layers import create_layer
from tests.conftest import CHUNK, SHAPE, assert_one_line_error, cli_here, read, run, run_cli

OWN = {"method": "mean", "threshold": 0.5, "dust_size": 20}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, maps):
    """A segmentation of the affinity map in 12 blocks, and its ground truth as a layer."""
    root = tmp_path_factory.mktemp("tune")
    output = f"file://{root / 'seg'}"
    run(maps["affinity"][0], output, OWN["method"], OWN["threshold"], task_shape=(32, 32, 4),
        dust_size=OWN["dust_size"])
    _, ids = load_sample()
    labels = np.asfortranarray(xyz_from_zyx(ids[: SHAPE[2], : SHAPE[1], : SHAPE[0]]))
    gt = f"file://{root / 'gt'}"
    vol = create_layer(gt, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 40),
                       size=SHAPE, chunk_size=CHUNK)
    vol[:, :, :] = labels.astype(np.uint64)
    return {"root": root, "seg": output, "gt": gt, "labels": labels}


def test_the_runs_own_setting_gives_the_layer_it_wrote(finished):
    labels, box = read_ground_truth(finished["gt"], finished["seg"], None)
    run_ = load_kept(finished["seg"], box)
    assert run_.settings["method"] == "mean" and run_.settings["dust_size"] == 20
    (table,) = agglomerate(run_.graph, "mean", [0.5], 20, "merge")
    np.testing.assert_array_equal(remap(run_.supervoxels, run_.graph.ids, table),
                                  read(finished["seg"]))


def test_a_setting_given_twice_is_scored_once():
    assert settings_grid(["mean", "mean"], [0.5, 0.5, 0.50], [0, 0]) == [Setting("mean", 0.5, 0)]


def test_a_rows_segments_do_not_count_the_dust_zeroed():
    """--dust-mode zero leaves 0 on labelled voxels: the segments column counted it as one."""
    gt = np.array([1, 1, 2, 2, 3, 0], np.uint64)
    seg = np.array([5, 5, 0, 7, 0, 9], np.uint64)
    assert _row(Setting("mean", 0.5, 20), seg, gt).segments == 2


def test_tune_prints_scores_and_writes_the_best_setting(finished, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"# my run\nversion: 1\noutput: {tmp_path / 'run'}\n"
                        f"image: {finished['gt']}\nsegmentation:  # tuned below\n  sigma: 0\n"
                        "  method: watershed  # the first guess\n")
    result = run_cli("tune", finished["seg"], finished["gt"], "--methods", "mean,watershed",
                     "--thresholds", "0.3,0.5,0.7", "--dust-sizes", "0,20", "--json",
                     "--write", pipeline, check=True)
    out = json.loads(result.stdout)
    assert len(out["rows"]) == 2 * 3 * 2
    rows = {(r["method"], r["threshold"], r["dust_size"]): r for r in out["rows"]}
    own = rows[("mean", 0.5, 20)]
    written = evaluate(read(finished["seg"]), finished["labels"].astype(np.uint64))
    assert own["adapted_rand_error"] == pytest.approx(written["adapted_rand_error"], abs=1e-12)
    assert own["voi_split"] == pytest.approx(written["voi_split"], abs=1e-12)
    best = min(out["rows"], key=lambda r: (r["adapted_rand_error"],
                                          r["voi_split"] + r["voi_merge"]))
    assert out["best"] == {k: best[k] for k in ("method", "threshold", "dust_size", "sigma")}
    assert {r["sigma"] for r in out["rows"]} == {0.0}  # the run's own
    assert len({r["adapted_rand_error"] for r in out["rows"]}) > 3  # the settings matter
    written_file = yaml.safe_load(pipeline.read_text())
    assert written_file["segmentation"] == {"sigma": 0.0, **out["best"], "dust_mode": "merge"}
    assert written_file["version"] == 1 and written_file["output"] == str(tmp_path / "run")
    # the user's comments kept, the key's own included
    lines = pipeline.read_text().splitlines()
    assert lines[0] == "# my run" and "segmentation:  # tuned below" in lines
    assert f"  method: {out['best']['method']}  # the first guess" in lines
    # a section the edit cannot change in place: the file rewritten whole, and said so
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"version: 1\noutput: {tmp_path / 'run'}\nimage: {finished['gt']}\n"
                    "segmentation: {method: watershed}\n")
    table = run_cli("tune", finished["seg"], finished["gt"], "--methods", "mean",
                    "--thresholds", "0.5", "--dust-sizes", "20", "--write", flow, check=True)
    assert "<- the run's" in table.stdout
    # the flags that segment the map as it was scored: the run's sigma and dust mode too
    assert ("best: deepem3d segment ... --method mean --threshold 0.5 --dust-size 20 "
            "--dust-mode merge --sigma 0") in table.stdout, table.stdout
    assert "rewritten whole" in table.stdout
    assert yaml.safe_load(flow.read_text())["segmentation"] == {
        "method": "mean", "threshold": 0.5, "dust_size": 20, "sigma": 0.0, "dust_mode": "merge"}


def test_bad_input_is_one_line_exit_2(finished, tmp_path):
    seg, gt = finished["seg"], finished["gt"]
    empty = f"file://{tmp_path / 'empty_gt'}"
    create_layer(empty, layer_type="segmentation", dtype="uint64", resolution=(4, 4, 40),
                 size=SHAPE, chunk_size=CHUNK)[:, :, :] = np.zeros(SHAPE, np.uint64)
    assert_one_line_error(run_cli("tune", seg, empty), "GT is 0 everywhere")
    assert_one_line_error(cli_here("tune", seg, gt, "--thresholds", "0.5,1.5"),
                          "threshold 1.5 is outside [0, 1]")
    assert_one_line_error(cli_here("tune", seg, gt, "--methods", "median"), "median")
    assert_one_line_error(cli_here("tune", seg, gt, "--dust-sizes", ""), "at least one")
    assert_one_line_error(cli_here("tune", seg, gt, "--bounds", "0,0,0,200,80,10"),
                          "reach outside SEG's bounds")
    assert_one_line_error(cli_here("tune", seg, gt, "--sigmas", "1,20"), "--sigmas", "[0, 16]")
    # the whole region graph would not fit: refused before any graph is read
    assert_one_line_error(cli_here("tune", seg, gt, "--max-memory", "32MiB"),
                          "whole region graph", "above --max-memory (32 MiB)", "--bounds")
    # a segmentation whose work files are gone
    files = CloudFiles(seg)
    kept = {k: files.get(k) for k in files.list(prefix="segmentation/graphs/")}
    files.delete(list(kept))
    try:
        assert_one_line_error(cli_here("tune", seg, gt), "no kept region graphs")
        # one graph gone, or cut short: the scores would be another segmentation's
        files.puts([(k, v) for k, v in list(kept.items())[1:]], raw=True)
        assert_one_line_error(cli_here("tune", seg, gt), f"1 of {len(kept)} blocks have no "
                              "kept region graph", "run the segmentation again")
        first, data = next(iter(kept.items()))
        files.put(first, data[: len(data) // 2], raw=True)
        assert_one_line_error(cli_here("tune", seg, gt), "no readable kept region graph")
    finally:
        files.puts([(k, v) for k, v in kept.items()], raw=True)
    marker = next(iter(files.list(prefix="tasks/region-graph/done/")))
    record = files.get(marker)
    files.delete(marker)  # a run stopped before its region-graph stage finished
    try:
        assert_one_line_error(cli_here("tune", seg, gt), "have no finished region graph")
    finally:
        files.put(marker, record, raw=True)
    assert_one_line_error(cli_here("tune", finished["gt"], gt), "not written by `deepem3d segment`")
    # a pipeline file to write into is checked before the sweep, and left as it was
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"version: 1\noutput: {tmp_path}\nimage: {gt}\nsegmentation:\n  "
                    "task_shap: [32, 32, 4]\n")
    before = typo.read_text()
    assert_one_line_error(cli_here("tune", seg, gt, "--write", typo), "segmentation.task_shap",
                          "unknown key")
    assert typo.read_text() == before
    assert_one_line_error(cli_here("tune", seg, gt, "--write", tmp_path / "none.yaml"),
                          "--write", "no such pipeline file")



def test_a_pipeline_file_it_cannot_replace_is_refused_before_the_sweep(finished, tmp_path,
                                                                        monkeypatch):
    """--write replaces the file by a rename: a read-only file (which the rename would replace
    all the same) or a folder it cannot write in is refused in one line before any setting is
    scored, the file left as it was (a folder was found only after the sweep)."""
    import os

    seg, gt = finished["seg"], finished["gt"]
    text = f"version: 1\noutput: {tmp_path / 'run'}\nimage: {gt}\nsegmentation:\n  sigma: 0\n"
    locked = tmp_path / "locked.yaml"
    locked.write_text(text)
    locked.chmod(0o444)
    assert_one_line_error(cli_here("tune", seg, gt, "--write", locked), f"--write {locked}",
                          "read-only")
    assert locked.read_text() == text and (locked.stat().st_mode & 0o777) == 0o444
    folder = tmp_path / "folder"
    folder.mkdir()
    inside = folder / "pipeline.yaml"
    inside.write_text(text)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.path.realpath(path) != str(
        folder.resolve()) and access(path, mode, **kw))  # root may write anywhere
    assert_one_line_error(cli_here("tune", seg, gt, "--write", inside),
                          f"cannot write in its folder {folder.resolve()}")
    assert inside.read_text() == text

def test_gt_is_read_at_its_mip_of_the_segmentations_resolution(finished, tmp_path):
    """Tune scores the run's own voxels: GT with a mip at the segmentation's resolution is
    read there; GT without one is refused with a fix the user can follow (tune has no --mip,
    so evaluate's "compare them at a --mip" would not be one)."""
    from cloudvolume import CloudVolume

    labels = finished["labels"].astype(np.uint64)
    fine = f"file://{tmp_path / 'gt2'}"
    vol = create_layer(fine, layer_type="segmentation", dtype="uint64", resolution=(2, 2, 40),
                       size=(2 * SHAPE[0], 2 * SHAPE[1], SHAPE[2]), chunk_size=CHUNK)
    vol[:, :, :] = labels.repeat(2, axis=0).repeat(2, axis=1)
    vol.add_scale((2, 2, 1), chunk_size=CHUNK)
    vol.commit_info()
    CloudVolume(fine, mip=1, progress=False)[:, :, :] = labels
    read_labels, box = read_ground_truth(fine, finished["seg"], None)
    np.testing.assert_array_equal(read_labels, labels)
    assert [*box.minpt, *box.maxpt] == [0, 0, 0, *SHAPE]
    coarse = f"file://{tmp_path / 'gt8'}"
    create_layer(coarse, layer_type="segmentation", dtype="uint64", resolution=(8, 8, 40),
                 size=(SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2]),
                 chunk_size=CHUNK)[:, :, :] = labels[::2, ::2]
    assert_one_line_error(cli_here("tune", finished["seg"], coarse),
                          "GT has no mip at SEG's mip 0 (4,4,40 nm)",
                          "tune scores the segmentation's own 4,4,40 nm voxels: give GT at "
                          "4,4,40 nm")


def test_negative_ids_in_gt_are_refused_as_evaluate_refuses_them(finished, tmp_path):
    """A signed GT's -1 read as uint64 would be scored as an object: refused in one line, by
    the check evaluate makes."""
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(1, "segmentation", "int32", "raw", [4, 4, 40],
                                       [0, 0, 0], list(SHAPE), chunk_size=list(CHUNK))
    vol = CloudVolume(f"file://{tmp_path / 'signed'}", info=info, progress=False)
    vol.commit_info()
    signed = finished["labels"].astype(np.int32)
    signed[3, 4, 5] = -1
    vol[:, :, :] = signed
    for command in ("tune", "evaluate"):
        assert_one_line_error(cli_here(command, finished["seg"], vol.cloudpath),
                              f"GT {vol.cloudpath} holds negative ids (min -1")


def test_sigmas_with_a_map_that_no_longer_covers_the_run_is_one_line(finished, maps, tmp_path):
    """--sigmas reads the run's recorded map over the region it segmented: a map made again,
    smaller, at that path is named in one line (it was an OutOfBoundsError traceback)."""
    import shutil

    copy = tmp_path / "seg"
    shutil.copytree(finished["seg"][len("file://"):], copy)
    small = f"file://{tmp_path / 'map'}"
    array = maps["affinity"][1][: SHAPE[0] // 2]
    create_layer(small, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                 size=array.shape[:3], chunk_size=CHUNK, num_channels=3)[:, :, :] = array
    provenance = json.loads((copy / "provenance").read_text())
    provenance["processing"][-1]["method"]["map"] = small
    (copy / "provenance").write_text(json.dumps(provenance))
    assert_one_line_error(cli_here("tune", f"file://{copy}", finished["gt"], "--sigmas", "1"),
                          f"the run's map {small} spans 0,0,0,48,80,10", "no longer the region "
                          "the run segmented (0,0,0,96,80,10)", "tune without --sigmas")


def test_the_readme_gives_the_sigma_sweeps_memory_model_the_code_uses():
    """The README's bytes per voxel for --sigmas are check_sweep_memory's constants (it said
    190, the figure before NODE_BYTES_PER_EDGE went from 400/270 to 360/190)."""
    import re

    from deepem3d.stages.segment_costs import (
        BYTES_PER_VOXEL,
        NODE_BYTES_PER_EDGE,
        NOISY_EDGES_PER_VOXEL,
    )
    from tests.conftest import ROOT

    text = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(r"more than `--max-memory`, at (\d+) bytes per voxel \(a block task's "
                      r"(\d+), and a noisy map's region graph: ([\d.]+) edges per voxel at the "
                      r"mean agglomeration's (\d+) bytes per edge\)", text)
    assert found, "the README's --sigmas memory sentence changed: update this test"
    total, block, edges, per_edge = found.groups()
    assert (int(block), float(edges), int(per_edge)) == (
        BYTES_PER_VOXEL, NOISY_EDGES_PER_VOXEL, NODE_BYTES_PER_EDGE["mean"])
    assert int(total) == BYTES_PER_VOXEL + NOISY_EDGES_PER_VOXEL * NODE_BYTES_PER_EDGE["mean"]
    # and the sizing section's node figures, which had kept 400 and 270 too
    found = re.search(r"at about (\d+) bytes per edge for mean and (\d+) for watershed", text)
    assert found and tuple(map(int, found.groups())) == (NODE_BYTES_PER_EDGE["mean"],
                                                         NODE_BYTES_PER_EDGE["watershed"])


def test_printed_flags_reproduce_the_setting_and_the_path_has_one_spelling(finished):
    """The best's flags give back the exact threshold and sigma scored (`:g` printed 0.4444444
    as 0.444444), and the layer is named file://... with --sigmas as without (it was the path
    as typed with --sigmas)."""
    typed, gt = (finished[k][len("file://"):] for k in ("seg", "gt"))
    args = ("tune", typed, gt, "--methods", "mean", "--thresholds", "0.4444444",
            "--dust-sizes", "20")
    table = cli_here(*args, "--sigmas", "0.3333333")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"{finished['seg']} on {finished['gt']}, ")
    assert "mean       0.4444444    20 0.3333333" in table.stdout, table.stdout
    assert ("best: deepem3d segment ... --method mean --threshold 0.4444444 --dust-size 20 "
            "--dust-mode merge --sigma 0.3333333") in table.stdout, table.stdout
    paths = {json.loads(cli_here(*args, *sigmas, "--json").stdout)["segmentation"]
             for sigmas in ((), ("--sigmas", "0"))}
    assert paths == {finished["seg"]}


def test_sigmas_rows_score_what_the_run_gives_on_a_labelled_part(finished):
    """--sigmas on a labelled part of the run's region: the map over the whole region is
    segmented, so the row at the run's own sigma and setting scores the layer as written,
    the row the kept supervoxels give (the part alone, as if it were the volume, would let no
    segment merge through its faces)."""
    part = ["--bounds", "8,8,2,40,40,8", "--methods", "mean", "--thresholds", "0.5",
            "--dust-sizes", "20", "--json"]
    kept = json.loads(cli_here("tune", finished["seg"], finished["gt"], *part).stdout)["rows"]
    swept = json.loads(cli_here("tune", finished["seg"], finished["gt"], *part, "--sigmas",
                                "0").stdout)["rows"]
    written = evaluate(read(finished["seg"])[8:40, 8:40, 2:8],
                       finished["labels"][8:40, 8:40, 2:8].astype(np.uint64))
    assert kept[0]["adapted_rand_error"] == pytest.approx(written["adapted_rand_error"],
                                                          abs=1e-12)
    assert swept[0]["adapted_rand_error"] == pytest.approx(written["adapted_rand_error"],
                                                           abs=1e-12)
    assert swept[0]["voi_merge"] == pytest.approx(written["voi_merge"], abs=1e-12)


def test_sigmas_segment_the_labelled_region_again_per_sigma(finished, maps):
    """--sigmas: the region's map segmented in memory per sigma (its supervoxels and graph
    once per sigma), each row scoring `pipeline.segment` of that map, sigma and setting."""
    from deepem3d.segmentation.pipeline import segment

    result = run_cli("tune", finished["seg"], finished["gt"], "--methods", "mean",
                     "--thresholds", "0.5", "--dust-sizes", "0,20", "--sigmas", "0,1.5",
                     "--json", check=True)
    rows = json.loads(result.stdout)["rows"]
    assert [(r["sigma"], r["dust_size"]) for r in rows] == [(0, 0), (0, 20), (1.5, 0), (1.5, 20)]
    array = maps["affinity"][1]
    for r in rows:
        seg = segment(array, "mean", 0.5, dust_size=r["dust_size"], sigma=r["sigma"])
        assert r["adapted_rand_error"] == evaluate(seg, finished["labels"])["adapted_rand_error"]
    assert len({r["adapted_rand_error"] for r in rows}) > 1


def test_a_failed_write_leaves_the_file_and_nothing_beside_it(tmp_path, monkeypatch):
    """--write writes a hidden file of its own beside the pipeline and renames it over: a
    user's NAME.partial is left alone, and a write that fails (a full disk) is one line
    naming the file, with the file as it was and no partial one left (it was a traceback and
    a NAME.partial left behind)."""
    import errno
    import os

    from deepem3d.cli.tune import write_setting
    from deepem3d.errors import InputError
    from deepem3d.stages.tune import Row, Setting

    row = Row(Setting("mean", 0.4, 20), 3, 0.1, 0.2, 0.3)
    pipeline = tmp_path / "pipeline.yaml"
    text = "version: 1  # mine\nsegmentation:\n  method: watershed\n"
    pipeline.write_text(text)
    users = tmp_path / "pipeline.yaml.partial"
    users.write_text("the user's own\n")
    assert write_setting(str(pipeline), yaml.safe_load(text), row, {})
    assert yaml.safe_load(pipeline.read_text())["segmentation"]["threshold"] == 0.4
    assert users.read_text() == "the user's own\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml",
                                                          "pipeline.yaml.partial"]
    pipeline.write_text(text)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(InputError, match=f"cannot write {pipeline}: No space left on device"):
        write_setting(str(pipeline), yaml.safe_load(text), row, {})
    assert pipeline.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml",
                                                          "pipeline.yaml.partial"]


def test_json_says_on_stderr_when_the_file_was_rewritten_whole(finished, tmp_path):
    """--write's promise, a file rewritten whole says so, holds with --json too: stdout is
    the JSON object alone, the lost comments a warning on stderr (it said nothing)."""
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"# mine\nversion: 1\noutput: {tmp_path / 'run'}\nimage: {finished['gt']}\n"
                    "segmentation: {method: watershed}\n")
    result = cli_here("tune", finished["seg"], finished["gt"], "--methods", "mean",
                      "--thresholds", "0.5", "--dust-sizes", "20", "--json", "--write", flow)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["best"]["method"] == "mean"
    assert f"deepem3d: warning: --write {flow} (rewritten whole" in result.stderr
    assert "comments are lost" in result.stderr
    assert "# mine" not in flow.read_text()


def test_a_region_graph_marker_left_empty_is_read_as_the_run_reads_it(finished, tmp_path):
    """A task killed while writing its completion marker (a file:// write is not atomic)
    leaves it empty or cut short; the run reads such a marker as no record, and tune's memory
    estimate does too (it was a JSONDecodeError traceback)."""
    import shutil

    copy = tmp_path / "seg"
    shutil.copytree(finished["seg"][len("file://"):], copy)
    markers = sorted((copy / "tasks" / "region-graph" / "done").iterdir())
    markers[0].write_text("")
    markers[1].write_text('{"edg')
    result = cli_here("tune", f"file://{copy}", finished["gt"], "--methods", "mean",
                      "--thresholds", "0.5", "--dust-sizes", "20", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["method"] == "mean"


def test_a_missing_gt_chunk_is_an_error_unless_fill_missing(finished, tmp_path):
    """evaluate refuses a GT chunk that is missing; tune read it as 0 and scored fewer
    labelled voxels (another table than evaluate's) without a word."""
    import shutil

    gt_dir = tmp_path / "gt"
    shutil.copytree(str(finished["gt"]).removeprefix("file://"), gt_dir)
    chunk = sorted(p for p in gt_dir.glob("4_4_40/*") if p.is_file())[0]
    chunk.unlink()
    gt = f"file://{gt_dir}"
    args = ("tune", finished["seg"], gt, "--methods", "mean", "--thresholds", "0.5",
            "--dust-sizes", "20", "--json")
    assert_one_line_error(cli_here(*args), "GT", "missing chunks", "--fill-missing")
    result = cli_here(*args, "--fill-missing")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    labels = finished["labels"].astype(np.uint64)
    x0, x1, y0, y1, z0, z1 = (int(v) for v in chunk.name.split(".")[0].replace("_", "-")
                              .split("-"))
    labels[x0:x1, y0:y1, z0:z1] = 0
    expected = evaluate(read(finished["seg"]), labels)
    assert row["adapted_rand_error"] == pytest.approx(expected["adapted_rand_error"], abs=1e-12)
