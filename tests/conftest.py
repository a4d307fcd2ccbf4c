"""Shared fixtures: the repository root, the shared data folder, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m deepem3d ARGS` from the repository root, capturing text output."""
    result = subprocess.run(
        [sys.executable, "-m", "deepem3d", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, a single line on stderr, no traceback, naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present: the shared EM volumes are not on this machine")
    return SHARED_DATA


def start_stage(stage) -> list[tuple[str, object]]:
    """Prepare a stage and record its run (as the runner does); its tasks as (task id, task)."""
    if stage.prepare is not None:
        stage.prepare()
    stage.start()
    return [(task.keywords["run"]["id"], task) for task in stage.tasks()]
