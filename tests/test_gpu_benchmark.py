"""benchmarks/gpu.py stays runnable: its CPU smoke run prints every part's rows (the real run
needs a lent accelerator; docs/gpu.md has its figures)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the module each of the project's dependencies is imported as: a lent GPU host has torch,
#: numpy and scipy, and the script's command carries tqdm's wheel (docs/gpu.md); the others
#: are refused to the script, which must run without them
MODULES = {"cloud-volume": "cloudvolume", "cloud-files": "cloudfiles", "igneous-pipeline":
           "igneous", "task-queue": "taskqueue", "torch": None, "numpy": None,
           "fastremap": "fastremap", "connected-components-3d": "cc3d", "click": "click",
           "tqdm": None, "neuroglancer": "neuroglancer", "matplotlib": "matplotlib",
           "h5py": "h5py", "tifffile": "tifffile", "scipy": None, "numba": "numba",
           "pyyaml": "yaml", "zarr": "zarr", "numcodecs": "numcodecs", "mrcfile": "mrcfile",
           "zstandard": "zstandard", "zfpy": "zfpy"}
REFUSING = """import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {refused!r}:
            raise ImportError(f"{{name}} is not on a lent GPU host")

sys.meta_path.insert(0, Refuse())
"""


def quick_rows(*options: str, host: Path | None = None) -> list[dict]:
    """The JSON rows of `benchmarks/gpu.py --device cpu --quick OPTIONS`, which must exit 0;
    with `host` (a folder), as on a lent GPU host: the project's other dependencies refused."""
    env = dict(os.environ)
    if host is not None:
        refused = sorted(m for m in MODULES.values() if m)
        (host / "sitecustomize.py").write_text(REFUSING.format(refused=refused))
        env["PYTHONPATH"] = os.pathsep.join([str(host), str(ROOT)])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
         *options], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_dependency_is_either_on_a_gpu_host_or_refused_there():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in declared}
    assert names == set(MODULES), names ^ set(MODULES)


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """As on a lent host: the training part imported cloud-files (through the Trainer's path
    spelling) and failed there."""
    rows = quick_rows("--parts", "forward", "inference", "training", "determinism",
                      "--part-timeout", "600",  # a slow machine must not cut a part short
                      host=tmp_path)
    parts = {row["part"] for row in rows}
    assert {"machine", "forward", "inference", "training", "determinism", "total"} <= parts
    forward = next(r for r in rows if r["part"] == "forward")
    assert forward["tflops"] > 0 and forward["same_bytes_twice"]
    ours = [r for r in rows if r.get("method", "").startswith("deepem3d predict_volume")]
    assert [r["method"].split(", ", 1)[1] for r in ours] == [  # the most wanted row first
        "tiles, shipped isbi2012-small-affinity (--dry-run's rate)", "patches",
        "tiles (the tasks' default)"]
    assert not [r for r in rows if "error" in r and "MONAI is missing" not in r["error"]], rows
    assert all(r["mvoxel_per_s"] > 0 and r["tflops"] > 0 for r in ours)
    monai = [r for r in rows if r.get("method") == "MONAI sliding_window_inference"]
    assert len(monai) == 2  # CI installs no MONAI: then each row says it is missing
    assert all("overlap" in r or "MONAI is missing" in r["error"] for r in monai)
    # the patches' overlap (96 of 128 px output, 16 shared), then MONAI's default
    assert [r["overlap"] for r in monai if "overlap" in r] in ([], [0.375, 0.25])
    preparation = next(r for r in rows if r.get("loop") == "batch preparation, one process")
    assert preparation["ms_per_batch"] > 0 and preparation["workers_to_keep_up"] >= 1
    loops = {r["loop"] for r in rows if r["part"] == "training" and "it_per_s" in r}
    assert loops == {"bare step", "Trainer, 0 workers", "Trainer, 2 workers"}
    for row in (r for r in rows if r["part"] == "determinism"):
        assert row["same_bytes_across_processes"]
        assert all(p["chunked_equal"] for p in row["processes"])


def test_a_part_past_its_time_is_stopped_and_said():
    """Each part runs in a process of its own, stopped at --part-timeout: on a lent machine a
    part stuck in autotuning cannot take the others' time."""
    rows = quick_rows("--parts", "training", "forward", "--part-timeout", "0.2")
    stopped = [r["part"] for r in rows if "stopped after 0.2 s" in r.get("error", "")]
    assert stopped == ["training", "forward"]
