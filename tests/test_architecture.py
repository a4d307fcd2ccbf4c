"""The shape of the code: imports follow the data flow, and the commands start light.

The layers (pyproject.toml's [tool.importlinter]) run cli -> run -> stages -> models ->
storage -> the pure segmentation core, with no import running back up; the core imports no
storage, queue or network library. `deepem3d --help` and `deepem3d worker --help` must not
pay for torch, numba or igneous (each costs a worker start-up 0.3-2 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "numba", "igneous")


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(ROOT / ".venv" / "bin")) or shutil.which(
        "lint-imports")
    assert lint, "import-linter is a test dependency (pip install -e '.[test]')"
    result = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("args", [["--help"], ["worker", "--help"], ["run", "--help"]])
def test_help_starts_without_heavy_imports(args):
    code = (
        "import json, sys\n"
        "from deepem3d.cli.main import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"print(json.dumps([code, sorted(m for m in {list(HEAVY)!r} if m in sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    code, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0, result.stderr
    assert loaded == [], f"`deepem3d {' '.join(args)}` imported {loaded}"
