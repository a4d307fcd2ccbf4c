"""benchmarks/gpu.py stays runnable: its CPU smoke run prints every part's rows (the real run
needs a lent accelerator; docs/gpu.md has its figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_on_the_cpu():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
         "--parts", "forward", "inference", "training", "determinism"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    parts = {row["part"] for row in rows}
    assert {"machine", "forward", "inference", "training", "determinism", "total"} <= parts
    forward = next(r for r in rows if r["part"] == "forward")
    assert forward["tflops"] > 0 and forward["same_bytes_twice"]
    ours = next(r for r in rows if r.get("method") == "deepem3d predict_volume")
    assert ours["mvoxel_per_s"] > 0
    loops = {r["loop"] for r in rows if r["part"] == "training" and "it_per_s" in r}
    assert loops == {"bare step", "Trainer, 0 workers", "Trainer, 2 workers"}
    for row in (r for r in rows if r["part"] == "determinism"):
        assert row["same_bytes_across_processes"]
        assert all(p["chunked_equal"] for p in row["processes"])
