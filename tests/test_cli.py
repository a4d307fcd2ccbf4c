"""The command group: help, version, one-line errors with exit status 2."""

from __future__ import annotations

import re

import click
import numpy as np
import pytest

from deepem3d.cli.options import Bounds, ByteSize, Number, Triple
from tests.conftest import assert_one_line_error, cli_here, make_layer, run_cli


def test_help_lists_every_command():
    out = run_cli("--help", check=True).stdout
    for command in ("sample", "ingest", "worker", "queue", "downsample", "evaluate", "view",
                    "train", "infer"):
        assert command in out


def test_unknown_queue_scheme():
    assert_one_line_error(run_cli("worker", "redis://localhost/q"), "unknown queue", "fq://")
    assert_one_line_error(run_cli("queue", "status", "/tmp/no-scheme"), "unknown queue")


def test_queue_delete_removes_a_file_queue_and_nothing_else(tmp_path):
    """`queue delete` removes what a file queue holds; a layer that a queue was opened on (taskqueue
    makes queue/ and movement/ in any folder; deepem3d's commands refuse a layer) is refused
    whole, and keeps every file."""
    from taskqueue import TaskQueue

    queue = tmp_path / "q"
    TaskQueue(f"fq://{queue}").insert([])
    run_cli("worker", f"fq://{queue}", "--exit-when-empty", check=True)
    (queue / "workers.log").write_text("a local run's temporary queue keeps its workers' log")
    assert run_cli("queue", "delete", f"fq://{queue}", "--yes", check=True).returncode == 0
    assert not queue.exists()

    layer = tmp_path / "layer"
    make_layer(layer)
    for command in (["queue", "status"], ["worker"], ["queue", "create"]):  # nor made one
        assert_one_line_error(run_cli(*command, f"fq://{layer}"), "precomputed layer")
    plain = tmp_path / "plain"  # a folder that is no queue: status neither reads nor makes one
    plain.mkdir()
    assert_one_line_error(run_cli("queue", "status", f"fq://{plain}"), "not a file queue",
                          "nothing read")
    # without --yes and off a terminal: the path's problem, not a request for --yes
    assert_one_line_error(cli_here("queue", "delete", f"fq://{plain}"), "not a file queue",
                          "nothing deleted")
    assert list(plain.iterdir()) == []
    assert_one_line_error(run_cli("queue", "create", f"fq://{layer}/4_4_40/queue"),
                          "lies in the precomputed layer")
    assert_one_line_error(run_cli("downsample", layer, "--queue", f"fq://{layer}/queue",
                                  "--parallel", "1"), "lies in the precomputed layer")
    TaskQueue(f"fq://{layer}")  # taskqueue itself opens one anywhere
    before = sorted(p.relative_to(layer) for p in layer.rglob("*"))
    assert_one_line_error(run_cli("queue", "delete", f"fq://{layer}", "--yes"),
                          "precomputed layer", "not a file queue")
    assert sorted(p.relative_to(layer) for p in layer.rglob("*")) == before


def test_a_volume_file_where_a_layer_goes_is_sent_to_ingest(tmp_path):
    """`deepem3d infer my.h5 map`, a new user's first try, said only that "a path runs through
    a file where a folder (a layer, a queue, an output) is needed"; now it names ingest, in
    each command that opens a layer."""
    for name in ("volume.h5", "stack.tif"):
        volume = tmp_path / name
        volume.write_bytes(b"not read")
        for args in (("infer", volume, tmp_path / "map", "--dry-run"),
                     ("segment", volume, tmp_path / "seg", "--dry-run"),
                     ("evaluate", volume, volume)):
            assert_one_line_error(cli_here(*args), f"{volume} is a file where a precomputed "
                                  f"layer (a folder) goes", f"deepem3d ingest {volume} LAYER")
        pipeline = tmp_path / "p.yaml"  # in a pipeline file, under the key that names it
        pipeline.write_text(f"version: 1\noutput: {tmp_path / 'run'}\nimage: {volume}\n")
        assert_one_line_error(cli_here("run", pipeline, "--dry-run"),
                              f"p.yaml: image: {volume} is a file where a precomputed layer")
    assert not (tmp_path / "map").exists() and not (tmp_path / "seg").exists()
    assert not (tmp_path / "run").exists()


def test_paths_through_files_and_unknown_schemes(tmp_path):
    """A file where a folder goes (a layer given as its info file, an output under a file), a
    scheme no reader knows and an empty path are one-line mistakes, and nothing is written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert_one_line_error(run_cli("sample", a_file), "a path runs through a file", "a_file")
    layer = make_layer(tmp_path / "image")
    assert_one_line_error(run_cli("infer", f"{layer}/info", tmp_path / "map", "--dry-run"),
                          "a path runs through a file")
    assert_one_line_error(run_cli("infer", layer, "foo://bucket/map", "--dry-run"),
                          "unknown scheme foo://")
    assert_one_line_error(run_cli("infer", "", tmp_path / "map", "--dry-run"), "an empty path")
    assert_one_line_error(run_cli("infer", "http://localhost:99999/x", tmp_path / "map",
                                  "--dry-run"), "not a URL")
    np.save(tmp_path / "volume.npy", np.zeros((2, 16, 16), np.uint8))
    # /sys: a folder nobody may create files in, root included
    assert_one_line_error(run_cli("ingest", tmp_path / "volume.npy", "/sys/deepem3d-test",
                                  "--resolution", "4,4,40", "--no-progress"),
                          "/sys/deepem3d-test", "permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "image", "volume.npy"]


def test_unknown_command_and_missing_argument():
    assert_one_line_error(run_cli("segmentify"), "No such command")
    assert_one_line_error(run_cli("worker"), "Missing argument")


@pytest.mark.parametrize("secret, words", [
    ("not json", "Expecting value"),
    ('{"type": "authorized_user"}', "no 'project_id'"),  # a user's login, not a key
])
def test_a_cloudfiles_secret_that_is_not_a_key_is_one_line(tmp_path, monkeypatch, secret, words):
    """CloudFiles reads ~/.cloudvolume/secrets/google-secret.json when imported: a file that
    is not a service account's key ended every command, `--help` too, in a traceback."""
    secrets = tmp_path / "cloudvolume" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "google-secret.json").write_text(secret)
    monkeypatch.setenv("CLOUD_VOLUME_DIR", str(tmp_path / "cloudvolume"))
    assert_one_line_error(run_cli("--help"), str(secrets / "google-secret.json"), words)
    (secrets / "google-secret.json").write_text('{"project_id": "lab"}')
    assert run_cli("--help").returncode == 0


def test_worker_import_of_a_missing_module(tmp_path):
    assert_one_line_error(
        run_cli("worker", f"fq://{tmp_path}", "--import", "no_such_module_here"), "--import"
    )


def test_a_mip_that_does_not_exist(tmp_path):
    run_cli("sample", tmp_path, check=True)
    assert_one_line_error(
        run_cli("downsample", tmp_path / "image", "--mip", "5", "--dry-run"), "mip 5"
    )


DAMAGED_INFOS = [  # (what is changed in a sound info, the words of the message)
    ({"scales": []}, "scales is not a list"),
    ({"scales": None}, "scales is not a list"),
    ({"type": "mesh"}, "type 'mesh'"),
    ({"data_type": "banana"}, "data_type 'banana'"),
    ({"data_type": None}, "data_type None"),  # np.dtype(None) is float64
    ({"data_type": "bool"}, "data_type 'bool'"),
    ({"num_channels": 0}, "num_channels 0"),
    ({"key": None}, "scales[0] has no key"),
    ({"resolution": None}, "scales[0].resolution None"),
    ({"resolution": [0, 4, 50]}, "scales[0].resolution [0, 4, 50]"),
    ({"resolution": [4, 50]}, "scales[0].resolution [4, 50]"),
    ({"size": [0, 256, 20]}, "scales[0].size [0, 256, 20]"),
    ({"size": [10**12, 256, 20]}, "scales[0].size"),
    ({"voxel_offset": ["x", 0, 0]}, "scales[0].voxel_offset"),
    ({"chunk_sizes": [[0, 64, 10]]}, "scales[0].chunk_sizes"),
    ({"chunk_sizes": []}, "scales[0].chunk_sizes []"),
    ({"encoding": "foo"}, "scales[0].encoding 'foo'"),
]


@pytest.mark.parametrize("change,words", DAMAGED_INFOS)
def test_a_damaged_info_is_one_line_not_a_traceback(tmp_path, change, words):
    """An info CloudVolume cannot read, or reads into a layer nothing can use, raised
    KeyError, IndexError, ZeroDivisionError... from every command that read it, or was taken
    (resolution 0, a mesh's type) and failed later."""
    import json

    from deepem3d.errors import InputError
    from deepem3d.storage.layers import open_layer

    path = tmp_path / "layer"
    make_layer(path)
    info = json.loads((path / "info").read_text())
    for key, value in change.items():
        (info if key in info else info["scales"][0])[key] = value
        if value is None:
            (info if key in info else info["scales"][0]).pop(key)
    (path / "info").write_text(json.dumps(info))
    with pytest.raises(InputError, match=re.escape(words)):
        open_layer(str(path))


def test_whole_numbers_written_as_floats_are_a_sound_info(tmp_path):
    import json

    from deepem3d.storage.layers import open_layer

    path = tmp_path / "layer"
    make_layer(path)
    info = json.loads((path / "info").read_text())
    info["num_channels"] = 1.0
    info["scales"][0]["voxel_offset"] = [0.0, 0, 0]
    (path / "info").write_text(json.dumps(info))
    assert open_layer(str(path)).num_channels == 1


def test_a_damaged_info_through_the_commands(tmp_path):
    path = tmp_path / "layer"
    make_layer(path)
    (path / "info").write_text("[]")
    assert_one_line_error(run_cli("export", path, tmp_path / "out.npy"), "not a JSON object")
    assert not (tmp_path / "out.npy").exists()
    (path / "info").unlink()
    (path / "info").mkdir()
    assert_one_line_error(run_cli("downsample", path, "--dry-run"), "cannot read", "/info")


@pytest.mark.parametrize("text,words", [
    ('{"processing": "x"}', "its 'processing' is \"x\", not a list of objects"),
    ('{"sources": [1]}', "its 'sources' is [1], not a list of distinct strings"),
    ("[]", "it is not a JSON object"),
    ("not json {", "it is not JSON"),
])
def test_a_damaged_provenance_is_one_line_naming_it(tmp_path, text, words):
    """CloudVolume reads the provenance file as it opens a layer: one it refuses was a
    python_jsonschema_objects traceback, or (not JSON) an error blaming the sound info."""
    path = tmp_path / "layer"
    make_layer(path)
    (path / "provenance").write_text(text)
    for command in ("evaluate", "tune"):
        assert_one_line_error(cli_here(command, path, path),
                              f"file://{path}/provenance is not a provenance file CloudVolume "
                              f"can read: {words}")


@pytest.mark.parametrize("args,words", [
    (("segment", "map", "out", "--method", "mean", "--threshold", "0.5", "--dust-size",
      str(2**64), "--dry-run"), ["--dust-size", "0<=x<=9223372036854775807"]),
    (("skeleton", "seg", "--dust-threshold", str(2**64)),
     ["--dust-threshold", "0<=x<=9223372036854775807"]),
    (("infer", "image", "map", "--threads", str(2**64)), ["--threads", "1<=x<=2147483647"]),
    (("infer", "image", "map", "--batch-size", str(2**64)), ["--batch-size", "1<=x<=32768"]),
    (("infer", "image", "map", "--patch-size", str(2**64)), ["--patch-size", "16<=x<=32768"]),
    (("train", "--image", "i", "--labels", "l", "--train-sections", "0:1", "--out", "o",
      "--threads", str(2**31)), ["--threads", "1<=x<=2147483647"]),
    (("train", "--image", "i", "--labels", "l", "--train-sections", "0:1", "--out", "o",
      "--workers", str(10**6)), ["--workers", "0<=x<=256"]),
    (("train", "--image", "i", "--labels", "l", "--train-sections", "0:1", "--out", "o",
      "--seed", str(2**64)), ["--seed", "0<=x<=9223372036854775807"]),
    (("tune", "seg", "gt", "--dust-sizes", f"0,{2**64}"), ["--dust-sizes", "at most"]),
    (("worker", "fq://q", "--lease-seconds", str(10**17)), ["--lease-seconds", "1<=x<=43200"]),
    (("worker", "fq://q", "--import", ""), ["--import", "Empty module name"]),
    (("queue", "create", "sqs://a b"), ["sqs://a b", "1 to 80 letters"]),
    (("queue", "create", f"sqs://{'q' * 69}"), ["at most 68 characters", "dead-letter"]),
    (("view", "layer", "--bind-address", ""), ["--bind-address", "0.0.0.0"]),
])
def test_values_past_what_the_tools_hold_are_refused(tmp_path, args, words):
    """A dust size past int64 failed in orjson after the segmentation was written (a skeleton
    dust threshold when the stage's run.json was written; infer's --threads in its tasks'
    JSON, a huge --batch-size or --patch-size in numpy or torch; train's --threads was
    "Overflow when unpacking long long", and so was its --seed past 2^64, and a million
    --workers hung), a lease of 10^17 s killed the renewal thread, an
    empty --import or bind address was a traceback or a URL with no host, an SQS name with a
    space waited for AWS to refuse it."""
    assert_one_line_error(cli_here(*args), *words)


def test_option_types():
    """x,y,z triples, bounds and byte sizes: one parser each, errors naming the option."""

    def convert(kind, option, text):
        return kind.convert(text, click.Option([option]), None)

    assert convert(Triple(int), "--task-shape", "512, 512,64") == (512, 512, 64)
    assert convert(Triple(float), "--resolution", "4,4,50") == (4.0, 4.0, 50.0)
    assert convert(Triple(int, positive=False), "--voxel-offset", "0,-8,3") == (0, -8, 3)
    assert convert(Bounds(), "--bounds", "0,0,0,10,20,3") == ((0, 0, 0), (10, 20, 3))
    for text in ("3.5e9", "3500MB", "3.5GB", "3500000000", "3.5 gb"):
        assert convert(ByteSize(), "--memory", text) == 3_500_000_000
    assert convert(ByteSize(), "--memory", "2GiB") == 2 * 2**30
    for kind, option, text, fragment in [
        (Triple(int), "--factor", "2,2", "malformed --factor '2,2'"),
        (Triple(int), "--chunk-size", "64,64,2.5", "malformed --chunk-size"),
        (Triple(int), "--task-shape", "0,64,64", "--task-shape '0,64,64' must be positive"),
        (Triple(float), "--resolution", "4,nan,40", "malformed --resolution"),
        (Bounds(), "--bounds", "0,0,0,10", "malformed --bounds"),
        (Bounds(), "--bounds", "5,5,5,5,10,10", "--bounds '5,5,5,5,10,10' is empty"),
        (ByteSize(), "--memory", "3.5 parsecs", "malformed --memory"),
        (ByteSize(), "--memory", "0", "--memory '0' must be at least 1 B"),
        (Number(min=0, min_open=True), "--lr", "nan", "--lr 'nan' must be a finite number"),
        (Number(min=0), "--min-cable-nm", "inf", "must be a finite number"),
        (Number(min=0.1), "--poll-seconds", "0", "not in the range x>=0.1"),
        (Bounds(), "--bounds", "0,0,0,3000000000,1,1", "at most 2,147,483,647"),
        (Triple(int), "--voxel-offset", "1,1,99999999999999999999", "at most"),
    ]:
        with pytest.raises(click.UsageError) as err:
            convert(kind, option, text)
        assert fragment in err.value.format_message()


def test_malformed_option_values_are_one_line_usage_errors():
    assert_one_line_error(run_cli("downsample", "nowhere", "--memory", "lots"),
                          "malformed --memory 'lots'", "3500MB")
    assert_one_line_error(run_cli("infer", "a", "b", "--task-shape", "1,2"),
                          "malformed --task-shape", "1024,1024,16")


def test_an_http_layer_behind_a_proxy_is_not_checked_directly(monkeypatch):
    """The server check opens a socket itself; behind a proxy (as CloudFiles reaches it) the
    host may not even resolve here, so the check is left to the proxied request."""
    from deepem3d.errors import InputError
    from deepem3d.storage.cloud import check_bucket

    with pytest.raises(InputError, match="does not answer"):
        check_bucket("http://layers.invalid/image")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    check_bucket("http://layers.invalid/image")


@pytest.mark.parametrize("args,words", [
    (("run", "isbi2012-demo", "--output", "", "--dry-run"), ["output: ''", "names no folder"]),
    (("run", "isbi2012-demo", "--output", "out", "--queue", "", "--dry-run"),
     ["--queue", "unknown queue ''"]),
])
def test_run_refuses_empty_values_as_other_commands_do(args, words):
    """`run --output ''` ran into the file's output (the shipped pipeline's: ./demo) and
    `run --queue ''` on local workers, where `infer --queue ''` and `train --out ''` refuse
    the empty value."""
    assert_one_line_error(cli_here(*args), *words)


@pytest.mark.parametrize("args", [
    ("infer", "image", "map", "--model", "", "--dry-run"),
    ("infer", "image", "map", "--mask", " ", "--dry-run"),
    ("tune", "seg", "gt", "--write", ""),
    ("train", "--image", "i", "--labels", "l", "--train-sections", "0:1", "--out", "o",
     "--val-sections", ""),
    ("train", "--image", "i", "--labels", "l", "--train-sections", "0:1", "--out", "o",
     "--init", ""),
])
def test_an_empty_option_value_is_refused_not_taken_as_left_out(args):
    """`infer --model ''` ran the default model, `--mask ''` masked nothing, `tune --write ''`
    wrote nothing, train's `--val-sections ''` validated nothing and `--init ''` started from
    scratch: each silently, as if the option were left out."""
    option = args[-2] if args[-1] != "--dry-run" else args[-3]
    assert_one_line_error(cli_here(*args), f"{option} ", "an empty value")


def test_commands_to_paste_quote_paths_with_spaces(tmp_path):
    """A command a message tells the user to run, for a path with a space in it (`my data/`),
    was printed unquoted (`deepem3d worker fq:///x/my data/q`): pasted, it ran on another
    path and an extra argument. Now the path is quoted as a shell reads it."""
    import shlex

    folder = tmp_path / "my data"
    folder.mkdir()
    volume = folder / "volume.h5"
    volume.write_bytes(b"not read")
    assert_one_line_error(cli_here("infer", volume, folder / "map", "--dry-run"),
                          f"deepem3d ingest {shlex.quote(str(volume))} LAYER")
    layer = make_layer(folder / "layer")
    queue = f"fq://{folder / 'queue'}"
    out = run_cli("downsample", layer, "--queue", queue, "--num-mips", "1", check=True)
    assert f"deepem3d worker {shlex.quote(queue)}`" in out.stdout, out.stdout


def test_the_worker_command_to_paste_names_a_file_queue_by_its_absolute_path(tmp_path,
                                                                            monkeypatch):
    """A file queue given relative to this folder was printed so: a worker started, as the
    message says, from another folder would drain another queue."""
    import shlex

    layer = make_layer(tmp_path / "layer")
    monkeypatch.chdir(tmp_path)
    out = cli_here("downsample", layer, "--queue", "fq://q 2", "--num-mips", "1")
    assert out.returncode == 0, out.stderr
    assert f"deepem3d worker {shlex.quote(f'fq://{tmp_path}/q 2')}`" in out.stdout, out.stdout
