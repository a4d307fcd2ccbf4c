"""deepem3d's segmentation tasks beside waterz on the same affinities: accuracy, throughput,
memory, and how the cost per voxel grows with the volume.

    python benchmarks/segmentation.py [--sizes 128,256,512] [--task-shape 128,128,128]
                                      [--workdir DIR] [--json FILE]

1. ISBI 2012 (the embedded 512 x 512 x 30 sample): affinities from the ground truth plus seeded
   noise (the map contract of docs/design.md, quantised to uint8). Adapted Rand error and VOI
   against the ground truth, waterz (its own fragments, OneMinus<MeanAffinity>) and deepem3d
   (`mean` and `watershed`) at several thresholds each. Throughput: voxels / the sum of every
   task's own seconds (from the completion markers: no process start, no queue), against
   waterz's one whole-array call, medians of 5 runs each in this process, warm (as a worker
   that drains a queue is: imports done, numba's code loaded, one untimed run of each tool
   first) and interleaved, so that the machine's drift falls on both. Memory, in a separate run:
   the first task of each stage runs in a fresh process and reports its peak RSS above the
   same process just before the task (imports and numba's compiled code already loaded),
   against waterz's first whole-array call measured the same way (its input included in both;
   peaks from Linux's VmHWM, reset just before).
2. Synthetic cells (Voronoi, about 32 voxels across, a map shaped like a network's output, see
   `cell_map`) at 128^3, 256^3, 512^3, tasks of 128^3 (`--task-shape`) on 64^3 map chunks:
   seconds per voxel of each stage and of waterz (timed as above), the memory of a block task
   (it should not grow with the volume), and the single tasks' memory against the graph's
   edge count.
3. How many region-graph edges one octree node holds in 24 GiB (its kernel's bytes per edge,
   from the level-0 node tasks, which hold a whole block's graph).

All tasks run in this process or a child of it, one at a time, on the CPU; the numbers are as
good as the machine is quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepem3d.cli.options import Triple, argparse_type
from deepem3d.memory import peak_rss, reset_peak

ROOT = Path(__file__).resolve().parent.parent
MEAN_THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.875, 0.9, 0.91, 0.92, 0.95]
WATERSHED_THRESHOLDS = [0.05, 0.1, 0.19, 0.3, 0.5]
GIB24 = 24 * 2**30
REPEATS = 5  # timed runs of each tool, interleaved, after an untimed one (medians)


@contextlib.contextmanager
def quiet_stdout():
    """Silence what C++ code (waterz) prints on file descriptor 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


# ---------------------------------------------------------------------------------------------
# Child processes: one task, or one waterz call, with the peak memory it adds


def warm_kernels() -> None:
    """Load every numba kernel a task calls, as a worker that has run one task before has
    them (numba loads each compiled signature from its cache on first use: ~0.1 s per
    process, once)."""
    from deepem3d.run.worker import register_tasks

    register_tasks()

    from deepem3d.segmentation.pipeline import segment, segment_chunked
    from deepem3d.segmentation.supervoxels import relabel

    warm = np.random.default_rng(0).integers(0, 256, (6, 5, 4, 3)).astype(np.uint8)
    for m in (warm, warm[..., 0]):
        segment(m, "mean", 0.5, dust_size=3)
        segment(m, "watershed", 0.2, dust_size=3, dust_mode="zero")
        segment_chunked(m, (3, 3, 2), "mean", 0.5, dust_size=3)
    for dtype in (np.uint8, np.uint16, np.uint32):  # labels are stored narrow
        relabel(np.ones((2, 2, 2), dtype, order="F"), np.arange(2, dtype=np.uint64))


def child_task(payload: str) -> None:
    """Run one task (a JSON payload) in this fresh process, kernels warmed; print its memory."""
    from taskqueue.queueables import totask

    warm_kernels()
    before = reset_peak()
    start = time.perf_counter()
    totask(json.loads(payload)).execute()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline": before, "peak": peak_rss(),
                      "added": peak_rss() - before}))


def child_waterz(npy: str, threshold: float) -> None:
    """waterz on x,y,z,3 uint8 affinities from `npy`, in this fresh process: the peak memory
    its call adds (its input included) and that cold call's seconds."""
    import waterz

    tiny = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)
    with quiet_stdout():
        [s.copy() for s in waterz.agglomerate(tiny, [0.5])]  # loads its compiled module
    before = reset_peak()
    affs = waterz_input(np.load(npy))
    start = time.perf_counter()
    with quiet_stdout():
        segs = [s.copy() for s in waterz.agglomerate(affs, [threshold])]
    seconds = time.perf_counter() - start
    print(json.dumps({"cold_seconds": seconds, "baseline": before, "peak": peak_rss(),
                      "added": peak_rss() - before,
                      "segments": int(np.unique(segs[0]).size)}))


def in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Running the stages


class Runner:
    """Runs a stage's tasks here; the first one of each stage in a child when measuring."""

    def __init__(self, measure: bool) -> None:
        self.measure = measure
        self.memory: dict[str, dict] = {}

    def __call__(self, stage, tasks) -> int:
        from taskqueue.queueables import totask

        from deepem3d.stages.frame import payload_of

        count = 0
        for k, task in enumerate(tasks):
            payload = payload_of(task)
            if k == 0 and self.measure:
                self.memory[stage.name] = in_child("--run-task", json.dumps(payload))
            else:
                totask(payload).execute()
            count += 1
        return count


def waterz_input(affinities: np.ndarray) -> np.ndarray:
    """waterz's layout of x,y,z,3 uint8 affinities: float32 (c, z, y, x), channels z, y, x."""
    return np.ascontiguousarray(affinities.transpose(3, 2, 1, 0)[::-1]).astype(np.float32) / 255


def race(map_path: str, output: str, task_shape, affinities: np.ndarray, threshold: float,
         repeats: int) -> tuple[dict, list[float], list[float]]:
    """Both tools timed in this process, warm (a worker that drains a queue is: one untimed
    run of each first) and interleaved, deepem3d then waterz, `repeats` times, so that the
    machine's drift (this VM's speed wanders by tens of percent over minutes) falls on both.
    Returns deepem3d's median seconds per stage, its totals, and waterz's seconds. Each
    deepem3d run writes a fresh layer beside `output`, deleted after."""
    import waterz

    warm_kernels()
    affs = waterz_input(affinities)

    def ours(k: int) -> dict:
        timed = f"{output}_timed{k}"
        seconds = run(map_path, timed, "mean", threshold, task_shape, False, True)[0]
        shutil.rmtree(timed.removeprefix("file://"))
        return seconds

    def theirs() -> float:
        start = time.perf_counter()
        with quiet_stdout():
            [seg.copy() for seg in waterz.agglomerate(affs, [threshold])]
        return time.perf_counter() - start

    ours(-1)
    theirs()
    runs, waterz_seconds = [], []
    for k in range(repeats):
        runs.append(ours(k))
        waterz_seconds.append(theirs())
    seconds = {s: float(np.median([r[s] for r in runs])) for s in runs[0]}
    return seconds, [sum(r.values()) for r in runs], waterz_seconds


def records(output: str, stage: str) -> list[dict]:
    from cloudfiles import CloudFiles

    files = CloudFiles(output)
    return [files.get_json(k) for k in files.list(prefix=f"tasks/{stage}/done/")]


def run(map_path: str, output: str, method: str, threshold: float, task_shape, measure: bool,
        overwrite: bool) -> tuple[dict, dict]:
    """Run (or retune) the pipeline; (seconds per stage, memory per stage)."""
    from deepem3d.run.runner import run_stages
    from deepem3d.stages.segmentation import (
        OCTREE_STAGES,
        REDUCE_STAGES,
        plan_segment,
        segment_stages,
    )

    plan = plan_segment(map_path, output, method=method, threshold=threshold,
                        task_shape=task_shape, overwrite=overwrite)
    runner = Runner(measure)
    run_stages(segment_stages(plan), execute=runner, echo=lambda line: None)
    seconds = {s: sum(r["seconds"] for r in records(output, s)) for s in plan.stages}
    # each octree's stages as one column (every level, up and down): "reduce" and "octree"
    memory = dict(runner.memory)
    for column, prefixes in (("reduce", REDUCE_STAGES), ("octree", OCTREE_STAGES)):
        levels = [s for s in seconds if s.startswith(prefixes)]
        seconds = {s: v for s, v in seconds.items() if s not in levels}
        seconds[column] = sum(records_seconds(output, s) for s in levels)
        nodes = [memory.pop(s) for s in list(memory) if s.startswith(prefixes)]
        if nodes:
            memory[column] = max(nodes, key=lambda m: m["added"])
    return seconds, memory


def records_seconds(output: str, stage: str) -> float:
    return sum(r["seconds"] for r in records(output, stage))


def block_edges(output: str) -> int:
    """Edges summed over the blocks' graphs (an edge whose contacts span blocks counts once per
    block): the graph the octree's level-0 nodes hold."""
    return sum(r["edges"] for r in records(output, "region-graph"))


def read(path: str) -> np.ndarray:
    from cloudvolume import CloudVolume

    return np.asarray(CloudVolume(path, progress=False)[:, :, :])[..., 0]


def write_map(path: str, array: np.ndarray, chunk) -> str:
    from deepem3d.storage.layers import create_layer

    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                       size=array.shape[:3], chunk_size=chunk, num_channels=array.shape[3],
                       overwrite=True)
    vol[:, :, :] = array
    return path


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# 1. ISBI 2012


def isbi(work: Path) -> dict:
    import waterz

    from deepem3d.axes import xyz_from_zyx
    from deepem3d.sample import load_sample
    from deepem3d.segmentation.metrics import evaluate
    from deepem3d.segmentation.pipeline import segment
    from deepem3d.segmentation.synthetic import affinity_map, boundary_map

    _, ids = load_sample()
    gt = np.asfortranarray(xyz_from_zyx(ids))
    affinities = affinity_map(boundary_map(gt, noise=0.1, seed=0))
    voxels = int(gt.size)
    gt_zyx = np.ascontiguousarray(ids)
    map_path = write_map(f"file://{work / 'isbi_map'}", affinities, (128, 128, 10))
    output = f"file://{work / 'isbi_seg'}"
    task_shape = (256, 256, 10)

    rows = []
    _, memory = run(map_path, output, "mean", 0.5, task_shape, True, True)
    first = read(output)
    identical = bool(np.array_equal(first, segment(affinities, "mean", 0.5)))
    seconds, totals, waterz_seconds = race(map_path, output, task_shape, affinities, 0.5,
                                           REPEATS)
    total_seconds = float(np.median(totals))
    for method, thresholds in (("mean", MEAN_THRESHOLDS), ("watershed", WATERSHED_THRESHOLDS)):
        for t in thresholds:
            measure = method == "watershed" and t == thresholds[0]
            secs, mem = run(map_path, output, method, t, task_shape, measure, True)
            memory.update({f"{k} ({method})": v for k, v in mem.items()})
            seg = np.ascontiguousarray(read(output).transpose(2, 1, 0))
            score = evaluate(seg, gt_zyx)
            rows.append({"tool": f"deepem3d {method}", "threshold": t,
                         "adapted_rand_error": score["adapted_rand_error"], "voi": score["voi"],
                         "voi_split": score["voi_split"], "voi_merge": score["voi_merge"],
                         "retune_seconds": secs["octree"] + secs["remap"]})
    with quiet_stdout():
        waterz_segs = [s.copy() for s in waterz.agglomerate(waterz_input(affinities),
                                                            MEAN_THRESHOLDS)]
    for t, seg in zip(MEAN_THRESHOLDS, waterz_segs):
        score = evaluate(seg, gt_zyx)
        rows.append({"tool": "waterz", "threshold": t,
                     "adapted_rand_error": score["adapted_rand_error"], "voi": score["voi"],
                     "voi_split": score["voi_split"], "voi_merge": score["voi_merge"]})
    npy = work / "isbi_affinities.npy"
    np.save(npy, affinities)
    wz = dict(in_child("--waterz", str(npy), "0.5"), seconds=float(np.median(waterz_seconds)),
              all_seconds=waterz_seconds)
    edges = block_edges(output)
    return {
        "voxels": voxels, "task_shape": task_shape, "blocks": len(records(output, "remap")),
        "identical_to_whole_array": identical, "stage_seconds": seconds,
        "deepem3d_seconds": total_seconds, "deepem3d_all_seconds": totals,
        "deepem3d_voxels_per_s": voxels / total_seconds,
        "waterz": wz, "waterz_voxels_per_s": voxels / wz["seconds"], "edges": edges,
        "memory": memory, "scores": rows,
    }


def print_isbi(result: dict) -> None:
    print(f"\n== ISBI 2012 sample, {result['voxels']} voxels, affinities = ground truth + noise "
          f"0.1 (uint8); {result['blocks']} tasks of {result['task_shape']} per block stage")
    print(f"chunked == whole-array pipeline.segment: {result['identical_to_whole_array']}")
    print(f"{'tool':<20}{'threshold':>10}{'adapted Rand':>14}{'VOI':>8}{'split':>8}{'merge':>8}")
    for r in result["scores"]:
        print(f"{r['tool']:<20}{r['threshold']:>10}{r['adapted_rand_error']:>14.4f}"
              f"{r['voi']:>8.3f}{r['voi_split']:>8.3f}{r['voi_merge']:>8.3f}")
    for tool in ("waterz", "deepem3d mean", "deepem3d watershed"):
        best = min((r for r in result["scores"] if r["tool"] == tool),
                   key=lambda r: r["adapted_rand_error"])
        print(f"best {tool}: adapted Rand {best['adapted_rand_error']:.4f} at {best['threshold']}"
              f" (VOI {best['voi']:.3f})")
    wz = result["waterz"]
    print(f"throughput: deepem3d {result['deepem3d_voxels_per_s'] / 1e6:.2f} Mvoxel/s (all "
          f"task seconds summed: {result['deepem3d_seconds']:.2f} s), waterz "
          f"{result['waterz_voxels_per_s'] / 1e6:.2f} Mvoxel/s ({wz['seconds']:.2f} s); ratio "
          f"{result['deepem3d_voxels_per_s'] / result['waterz_voxels_per_s']:.2f} (medians of "
          f"{REPEATS} interleaved warm runs each; deepem3d "
          f"{', '.join(f'{v:.2f}' for v in result['deepem3d_all_seconds'])} s, waterz "
          f"{', '.join(f'{v:.2f}' for v in wz['all_seconds'])} s; waterz's first, cold call "
          f"{wz['cold_seconds']:.2f} s)")
    print("  per stage, medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                           result["stage_seconds"].items()))
    print(f"memory added by one task (fresh process; its baseline ~"
          f"{mib(next(iter(result['memory'].values()))['baseline'])}):")
    for stage, m in result["memory"].items():
        print(f"  {stage:<28}{mib(m['added']):>10}")
    print(f"  {'waterz whole array':<28}{mib(wz['added']):>10}  (baseline {mib(wz['baseline'])})")


# ---------------------------------------------------------------------------------------------
# 2. Synthetic volumes


def cell_map(size: int, spacing: int = 32) -> np.ndarray:
    """Affinities of Voronoi cells that look like a network's output: membranes at 0.9, the
    inside rising from 0.05 at the cell's seed to 0.55 at its edge, plus smooth noise (a
    Gaussian of sigma 1.5, standard deviation 0.04). About one supervoxel per 400 voxels and
    0.02 region-graph edges per voxel, where the white noise of the ISBI map gives 0.3."""
    from scipy.ndimage import gaussian_filter

    from deepem3d.segmentation.synthetic import affinity_map, boundary_map, voronoi_cells

    labels, dist, _ = voronoi_cells((size,) * 3, spacing, seed=size)
    edge = boundary_map(labels, noise=0, low=0, high=1) > 127
    del labels
    noise = np.random.default_rng(size).normal(0, 1, edge.shape).astype(np.float32)
    noise = gaussian_filter(noise, 1.5)
    noise *= np.float32(0.04 / noise.std())
    p = np.where(edge, np.float32(0.9), 0.05 + 0.5 * np.minimum(dist / spacing, 1)) + noise
    del noise, dist, edge
    return affinity_map(np.asfortranarray(np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)))


def synthetic(work: Path, size: int, task_shape: tuple = (128, 128, 128)) -> dict:
    start = time.perf_counter()
    affinities = cell_map(size)
    map_path = write_map(f"file://{work / f'syn{size}_map'}", affinities, (64, 64, 64))
    npy = work / f"syn{size}.npy"
    np.save(npy, affinities)
    made = time.perf_counter() - start
    output = f"file://{work / f'syn{size}_seg'}"
    _, memory = run(map_path, output, "mean", 0.5, task_shape, True, True)
    repeats = REPEATS if size <= 256 else 3  # 512^3: about a minute a pair
    seconds, totals, waterz_seconds = race(map_path, output, task_shape, affinities, 0.5,
                                           repeats)
    del affinities
    supervoxels = sum(r["supervoxels"] for r in records(output, "region-graph"))
    wz = dict(in_child("--waterz", str(npy), "0.5"), seconds=float(np.median(waterz_seconds)),
              all_seconds=waterz_seconds)
    npy.unlink()
    voxels = size**3
    return {"size": size, "task_shape": list(task_shape), "voxels": voxels, "setup_seconds": made,
            "repeats": repeats, "stage_seconds": seconds,
            "deepem3d_seconds": float(np.median(totals)), "deepem3d_all_seconds": totals,
            "waterz": wz, "memory": memory,
            "edges": block_edges(output), "supervoxels": supervoxels}


def print_synthetic(results: list[dict]) -> None:
    task = " x ".join(map(str, results[0]["task_shape"]))
    print(f"\n== synthetic cells (Voronoi, ~32 voxels across, smooth noise), tasks of {task}, "
          "mean 0.5; ns per voxel, medians of `runs` interleaved warm runs of each tool")
    stages = list(results[0]["stage_seconds"])
    head = f"{'size':>6}" + "".join(f"{s[:12]:>13}" for s in stages)
    print(head + f"{'deepem3d':>10}{'waterz':>9}{'ratio':>7}{'runs':>6}")
    for r in results:
        ns = {s: 1e9 * v / r["voxels"] for s, v in r["stage_seconds"].items()}
        ours = 1e9 * r["deepem3d_seconds"] / r["voxels"]
        theirs = 1e9 * r["waterz"]["seconds"] / r["voxels"]
        print(f"{r['size']:>5}^3" + "".join(f"{ns[s]:>13.1f}" for s in stages)
              + f"{ours:>10.1f}{theirs:>9.1f}{theirs / ours:>7.2f}{r['repeats']:>6}")
    print(f"memory added by one task (MiB; block stages: one {task} block):")
    print(f"{'size':>6}" + "".join(f"{s[:12]:>13}" for s in stages) + f"{'waterz':>9}")
    for r in results:
        print(f"{r['size']:>5}^3" + "".join(
            f"{r['memory'].get(s, {}).get('added', float('nan')) / 2**20:>13.0f}"
            for s in stages) + f"{r['waterz']['added'] / 2**20:>9.0f}")
    print("against the whole volume:")
    for r in results:
        m = r["memory"]
        print(f"  {r['size']}^3: {r['edges']} block edges ({r['edges'] / r['voxels']:.4f}/voxel),"
              f" {r['supervoxels']} block supervoxels; largest octree node "
              f"{mib(m['octree']['added'])}, "
              f"largest reduce node {mib(m['reduce']['added'])}, "
              f"remap {mib(m['remap']['added'])}")


# ---------------------------------------------------------------------------------------------
# 3. Capacity of one octree node


def capacity(isbi_result: dict | None, synthetic_results: list[dict]) -> None:
    print("\n== one octree node on 24 GiB")
    measured = {}
    for r in synthetic_results[-1:]:
        m = r["memory"]
        measured["mean (measured here)"] = m["octree"]["added"] / r["edges"]
    if isbi_result:
        m = isbi_result["memory"]
        measured["mean, ISBI (measured here)"] = m["octree"]["added"] / isbi_result["edges"]
        if "octree (watershed)" in m:
            measured["watershed, ISBI (measured here)"] = (
                m["octree (watershed)"]["added"] / isbi_result["edges"])
    from deepem3d.stages.segment_costs import NODE_BYTES_PER_EDGE

    for method, per_edge in NODE_BYTES_PER_EDGE.items():
        measured[f"{method} (the planner's per node task, all included)"] = per_edge
    densities = {f"synthetic {r['size']}^3": r["edges"] / r["voxels"] for r in synthetic_results}
    if isbi_result:
        densities["ISBI"] = isbi_result["edges"] / isbi_result["voxels"]
    for name, per_edge in measured.items():
        edges = GIB24 / per_edge
        sizes = ", ".join(f"{edges / d / 1e9:.1f} Gvoxel ({(edges / d) ** (1 / 3):.0f}^3) at "
                          f"{name2}" for name2, d in densities.items())
        print(f"  {name}: {per_edge:.0f} B/edge -> {edges / 1e9:.2f} G edges; {sizes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-task", help=argparse.SUPPRESS)
    parser.add_argument("--waterz", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--task-shape", type=argparse_type(Triple(int), "--task-shape"),
                        default=(128, 128, 128), metavar="X,Y,Z",
                        help="the synthetic volumes' task blocks (map chunks: 64^3), a multiple "
                        "of 64; a block reads up to (task / 64 + 2)^3 chunks for its halo")
    parser.add_argument("--skip-isbi", action="store_true")
    parser.add_argument("--workdir", default=None,
                        help="where the layers go (made if missing; default: the system's temp)")
    parser.add_argument("--json", default=None, help="Also write every figure to this file.")
    args = parser.parse_args()
    if args.run_task:
        return child_task(args.run_task)
    if args.waterz:
        return child_waterz(args.waterz[0], float(args.waterz[1]))
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deepem3d-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        print(f"machine: {os.cpu_count()} CPU(s); load average {os.getloadavg()[0]:.1f} at start")
        result: dict = {}
        if not args.skip_isbi:
            result["isbi"] = isbi(work)
            print_isbi(result["isbi"])
        result["synthetic"] = []
        for size in [int(s) for s in args.sizes.split(",") if s]:
            start = time.perf_counter()
            result["synthetic"].append(synthetic(work, size, args.task_shape))
            print_synthetic(result["synthetic"])
            print(f"({size}^3 took {time.perf_counter() - start:.0f} s in all)", flush=True)
        capacity(result.get("isbi"), result["synthetic"])
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
