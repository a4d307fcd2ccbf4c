"""How the segmentation's cost grows with the volume, level by level of its octrees.

    python benchmarks/scale.py [--sizes 128,256,512] [--task-shape 64,64,64] [--workdir DIR]

For each size N: the synthetic cell map of benchmarks/segmentation.py (`cell_map`, about 0.02
region-graph edges per voxel) at N^3, segmented (mean 0.5) with the same task shape, every task
run in this process, one at a time. Printed side by side per size:

- ns per voxel of all task seconds, per group of stages (the reduce's octree and the
  agglomeration's octree each as one group), from the completion markers;
- per octree level, the largest task's own peak memory (its marker's `peak_added_mib`: the
  process's peak above its memory just before the task), beside the plan's estimate for that
  level (`SegmentPlan.stage_memory_bytes` at the map's measured edge density);
- up to 256^3, whether the layer equals `pipeline.segment` on the whole array.

Sizes run in order; the machine's speed drifts, so compare within one command's output.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segmentation import cell_map, records, write_map  # noqa: E402  (the sibling benchmark)

GROUPS = (("supervoxels", ("halo", "supervoxels")), ("reduce", ("reduce-L", "tables-L")),
          ("region-graph", ("region-graph",)),
          ("agglomeration", ("agglomerate-L", "segments-L", "dust-L", "dust-segments-L")),
          ("remap", ("remap",)))
CHECK_UP_TO = 256  # sizes whose whole-array segment() fits comfortably here


def run_size(work: Path, size: int, task_shape: tuple[int, int, int]) -> dict:
    from taskqueue.queueables import totask

    from deepem3d.run.runner import run_stages
    from deepem3d.segmentation.pipeline import segment
    from deepem3d.stages.frame import payload_of
    from deepem3d.stages.segmentation import plan_segment, segment_stages

    start = time.perf_counter()
    affinities = cell_map(size)
    map_path = write_map(f"file://{work / f'map{size}'}", affinities, (64, 64, 64))
    made = time.perf_counter() - start
    output = f"file://{work / f'seg{size}'}"
    plan = plan_segment(map_path, output, method="mean", threshold=0.5, task_shape=task_shape,
                        chunk_size=tuple(math.gcd(64, t) for t in task_shape), overwrite=True)

    def execute(stage, tasks) -> int:
        count = 0
        for task in tasks:
            totask(payload_of(task)).execute()
            count += 1
        return count

    run_stages(segment_stages(plan), execute=execute, echo=lambda line: None)
    per_stage = {s: records(output, s) for s in plan.stages}
    edges = sum(r["edges"] for r in per_stage["region-graph"])
    density = edges / size**3
    seconds = {name: sum(r["seconds"] for s, rs in per_stage.items() if s.startswith(prefixes)
                         for r in rs) for name, prefixes in GROUPS}
    levels = {}
    for s, rs in per_stage.items():
        if rs and s.startswith(("reduce-L", "agglomerate-L")):
            levels[s] = {"tasks": len(rs),
                         "peak_mib": max(r.get("peak_added_mib", 0.0) for r in rs),
                         "planned_mib": plan.stage_memory_bytes(s, density) / 2**20}
    same = None
    if size <= CHECK_UP_TO:
        from cloudvolume import CloudVolume

        layer = np.asarray(CloudVolume(output, progress=False)[:, :, :])[..., 0]
        same = bool(np.array_equal(layer, segment(affinities, "mean", 0.5)))
    return {"size": size, "voxels": size**3, "blocks": len(plan.blocks),
            "height": plan.octree.height, "edges_per_voxel": density, "map_seconds": made,
            "seconds": seconds, "levels": levels, "same_as_whole_array": same}


def report(results: list[dict]) -> None:
    print("== ns per voxel of all task seconds (one process, one task at a time)")
    print(f"{'size':>7}{'blocks':>8}{'levels':>7}" + "".join(f"{g:>15}" for g, _ in GROUPS)
          + f"{'total':>9}{'edges/voxel':>13}{'== whole':>10}")
    for r in results:
        ns = {g: 1e9 * v / r["voxels"] for g, v in r["seconds"].items()}
        print(f"{r['size']:>6}^3{r['blocks']:>8}{r['height'] + 1:>7}"
              + "".join(f"{ns[g]:>15.0f}" for g, _ in GROUPS) + f"{sum(ns.values()):>9.0f}"
              + f"{r['edges_per_voxel']:>13.4f}{str(r['same_as_whole_array']):>10}")
    print("\n== largest task's own peak memory per level, MiB (planned at the measured density)")
    names = sorted({s for r in results for s in r["levels"]},
                   key=lambda s: (s.split("-L")[0], int(s.rsplit("L", 1)[1])))
    print(f"{'stage':<18}" + "".join(f"{str(r['size']) + '^3':>22}" for r in results))
    for s in names:
        cells = []
        for r in results:
            level = r["levels"].get(s)
            cells.append(f"{level['peak_mib']:>10.1f} ({level['planned_mib']:>8.1f})"
                         if level else f"{'-':>21}")
        print(f"{s:<18}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--task-shape", default="64,64,64")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    task_shape = tuple(int(s) for s in args.task_shape.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = []
        for size in sizes:
            results.append(run_size(Path(tmp), size, task_shape))
            print(f"{size}^3 done", file=sys.stderr, flush=True)
        report(results)


if __name__ == "__main__":
    main()
