"""The command group: help, version, one-line errors with exit status 2."""

from __future__ import annotations

from tests.conftest import assert_one_line_error, run_cli


def test_help_lists_every_command():
    out = run_cli("--help", check=True).stdout
    for command in ("sample", "ingest", "worker", "status", "downsample", "evaluate", "view",
                    "train", "infer"):
        assert command in out


def test_unknown_queue_scheme():
    assert_one_line_error(run_cli("worker", "redis://localhost/q"), "unknown queue", "fq://")
    assert_one_line_error(run_cli("status", "/tmp/no-scheme"), "unknown queue")


def test_unknown_command_and_missing_argument():
    assert_one_line_error(run_cli("segmentify"), "No such command")
    assert_one_line_error(run_cli("worker"), "Missing argument")


def test_worker_import_of_a_missing_module(tmp_path):
    assert_one_line_error(
        run_cli("worker", f"fq://{tmp_path}", "--import", "no_such_module_here"), "--import"
    )


def test_a_mip_that_does_not_exist(tmp_path):
    run_cli("sample", tmp_path, check=True)
    assert_one_line_error(
        run_cli("downsample", tmp_path / "image", "--mip", "5", "--dry-run"), "mip 5"
    )
