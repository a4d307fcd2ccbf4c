"""benchmarks/scale.py stays runnable and its map is what it says: the cell map generated slab
by slab is the same whichever slabs it is cut into, and a run at tiny sizes prints every
table (the real run, 256^3 to 1024^3, is in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from deepem3d.segmentation.synthetic import voronoi_seeds
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402  (the benchmark script, imported as a module)


def test_the_cell_map_is_the_same_whatever_the_slabs():
    size = 80
    seeds = voronoi_seeds((size,) * 3, scale.SPACING, seed=size)
    whole = scale.cell_slab(size, seeds, 0, size)
    for slab in (1, 7, 64):
        parts = [scale.cell_slab(size, seeds, z, min(size, z + slab))
                 for z in range(0, size, slab)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=2), whole, err_msg=str(slab))
    assert whole.shape == (size, size, size, 3) and len(np.unique(whole[..., 0])) > 50


def test_scale_benchmark_prints_every_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "32,48,32",
         "--task-shape", "16,16,16", "--waterz-up-to", "32", "--against", "",
         "--json", str(tmp_path / "scale.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "== ns per voxel" in out and "== largest task's own peak memory" in out
    assert "agglomerate-L1" in out and "reduce-L1" in out
    assert "10,000^3" in out and "100,000^3" in out and "60,044,208 blocks" in out
    runs = json.loads((tmp_path / "scale.json").read_text())
    assert [r["size"] for r in runs] == [32, 48, 32]
    assert all(r["same_as_whole_array"] for r in runs)
    assert runs[0]["waterz"]["segments"] > 1 and runs[1]["waterz"] is None
