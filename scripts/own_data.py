"""The own-data workflow, end to end, on a volume the shipped model never saw: gala_fib_small
(FIB-SEM, about 10 nm isotropic; the shipped model is for 4 x 4 x 50 nm ssTEM).

    python scripts/own_data.py [--iterations 300] [--work DIR] [--data DIR]

--data is the folder holding gala_fib_small/gala_fib_small.h5 (default: $DEEPEM3D_DATA, else
the fallback tests/conftest.py uses).

For each model, the fine-tuned one and the shipped one as it is (the baseline, run with
--force at the data's resolution), with the CLI a user would type:

1. ingest the train and test crops (image and neuron ids) as layers;
2. (fine-tuned only) `deepem3d train --init isbi2012-small-affinity` on the train crop's
   sections 0..39, validating on 40..49;
3. infer and segment the train crop (shipped segmentation settings), then `deepem3d tune` on its
   sections 40..49;
4. infer the test crop, segment it with the tuned flags, and score it once (`deepem3d
   evaluate`).

Prints each step's seconds and a last table: per model, the tuned setting, its tuning score and
the test score.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = "10,10,10"
SEGMENT = ["--method", "mean", "--threshold", "0.55", "--sigma", "2", "--dust-size", "200"]


def cli(*args: str) -> str:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deepem3d", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"deepem3d {' '.join(map(str, args))} failed:\n{done.stderr}")
    print(f"  {time.perf_counter() - start:7.1f} s  deepem3d {args[0]} {args[1]}", flush=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(
        "DEEPEM3D_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--work", default=None)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    h5 = os.path.join(args.data, "gala_fib_small", "gala_fib_small.h5")
    if not os.path.exists(h5):
        raise SystemExit(f"{h5} is missing: give --data")
    work = Path(args.work or tempfile.mkdtemp(prefix="deepem3d-own-"))
    print(f"work: {work}")
    layers = {}
    for crop in ("train", "test"):
        for name, kind in (("raw", "image"), ("neuron_ids", "segmentation")):
            dest = f"file://{work / crop / name}"
            if not (work / crop / name / "info").exists():
                cli("ingest", f"{h5}:/{crop}/{name}", dest, "--resolution", RESOLUTION,
                    "--layer-type", kind, "--chunk-size", "64,64,10", "--no-progress")
            layers[crop, name] = dest
    model = work / "fine-tuned" / "best.pt"
    if not model.exists():
        cli("train", "--image", f"{h5}:/train/raw", "--labels", f"{h5}:/train/neuron_ids",
            "--train-sections", "0:40", "--val-sections", "40:50", "--out", model.parent,
            "--preset", "small", "--head", "affinity", "--init", "isbi2012-small-affinity",
            "--resolution", RESOLUTION, "--iterations", args.iterations, "--batch-size", 4,
            "--patch-size", 96, "--val-every", max(args.iterations // 3, 1))
    results = {}
    for label, model_args in (("fine-tuned", ["--model", model]),
                              ("shipped", ["--model", "isbi2012-small-affinity", "--force"])):
        out = work / label
        maps, segs = {}, {}
        for crop in ("train", "test"):
            maps[crop] = f"file://{out / crop / 'map'}"
            cli("infer", layers[crop, "raw"], maps[crop], *model_args, "--parallel",
                args.parallel, "--overwrite")
        segs["train"] = f"file://{out / 'train' / 'seg'}"
        cli("segment", maps["train"], segs["train"], *SEGMENT, "--parallel", args.parallel,
            "--overwrite")
        tuned = json.loads(cli("tune", segs["train"], layers["train", "neuron_ids"],
                               "--bounds", "0,0,40,200,100,50", "--json"))
        best = tuned["best"]
        row = next(r for r in tuned["rows"] if all(r[k] == best[k] for k in best))
        segs["test"] = f"file://{out / 'test' / 'seg'}"
        flags = ["--method", best["method"], "--threshold", str(best["threshold"]),
                 "--dust-size", str(best["dust_size"]), "--sigma", "2"]
        cli("segment", maps["test"], segs["test"], *flags, "--parallel", args.parallel,
            "--overwrite")
        scores = json.loads(cli("evaluate", segs["test"], layers["test", "neuron_ids"], "--json"))
        results[label] = {"setting": best, "tune_are": row["adapted_rand_error"],
                          "test_are": scores["adapted_rand_error"],
                          "test_voi_split": scores["voi_split"],
                          "test_voi_merge": scores["voi_merge"]}
    print(f"{'model':<12}{'tuned setting':<34}{'tune ARE':>9}{'test ARE':>9}{'VOI split':>10}"
          f"{'merge':>7}")
    for label, r in results.items():
        s = r["setting"]
        setting = f"{s['method']} {s['threshold']:g}, dust {s['dust_size']}, sigma 2"
        print(f"{label:<12}{setting:<34}{r['tune_are']:>9.4f}{r['test_are']:>9.4f}"
              f"{r['test_voi_split']:>10.3f}{r['test_voi_merge']:>7.3f}")


if __name__ == "__main__":
    main()
