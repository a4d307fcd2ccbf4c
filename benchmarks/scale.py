"""How the segmentation's cost grows with the volume, level by level of its octrees.

    python benchmarks/scale.py [--sizes 256,512,1024,256] [--task-shape 128,128,128]
                               [--waterz-up-to 512] [--workdir DIR] [--json FILE]
    python benchmarks/scale.py --paper            (the 1 Tvox / 1 Pvox table only, seconds)

For each size N, in the order given (a size given twice runs twice: this machine's speed
drifts, so the first size is run again last and its figures are medians): a synthetic cell map
at N^3 (`cell_slab`: Voronoi cells about 32 voxels across, membranes at 0.9, the inside rising
from 0.05 to 0.55, smooth noise; about 0.02 region-graph edges per voxel), generated slab by
slab straight into a file:// layer of 64^3 chunks (a 1024^3 map's arrays do not fit in memory
here), then segmented (mean, 0.5) with the same task shape, every task run in this process,
one at a time, after an untimed run of a small one (imports and numba's compiled code loaded,
as in a worker). Printed side by side per size:

- ns per voxel of all task seconds, per group of stages (the reduce's octree and the
  agglomeration's octree each as one group), from the completion markers;
- per octree level, the largest task's own peak memory (its marker's `peak_added_mib`: the
  process's peak above its memory just before the task) beside the plan's estimate for that
  level at the map's measured edge density, and the level's face voxels (what the model says
  an upper node's memory follows);
- up to `--waterz-up-to`, waterz's whole-array call on the same affinities (in a child
  process, its module loaded first) and the ratio of its seconds to deepem3d's task seconds;
- up to 256^3, whether the layer equals `pipeline.segment` on the whole array.

`--against COMMIT` (default 3b3de4a, the last commit with the single reduce, merge-graph and
agglomerate tasks) installs that commit in its own venv (its source, and this venv's
dependencies through a .pth file) and segments the ISBI map of benchmarks/segmentation.py
(the embedded sample's ground truth as noisy affinities, 512 x 512 x 30, mean 0.5, blocks of
256 x 256 x 10) with it and with this tree, both through `deepem3d segment --parallel 1`,
interleaved, 3 times each after an untimed run of each: the layers' chunk files compared byte
for byte and against `segmentation.pipeline.segment` on the whole array, and the task seconds
(from the markers) side by side, with the in-memory call's.

`--paper` prints, from the planner's own formulas (`SegmentPlan` on info-only layers, nothing
computed), for 10,000^3 (1 Tvox) and 100,000^3 (1 Pvox): tasks per stage, the largest task's
memory per level, the files the run writes (chunked and sharded) and the time to insert its
tasks at the rate measured here for a file queue.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segmentation import in_child, records  # noqa: E402  (the sibling benchmark)

from deepem3d.storage.sharding import default_chunk as sharded_chunk  # noqa: E402

GROUPS = (("supervoxels", ("smooth", "halo", "supervoxels")),
          ("reduce", ("reduce-L", "tables-L")), ("region-graph", ("region-graph",)),
          ("agglomeration", ("agglomerate-L", "segments-L", "dust-L", "dust-segments-L")),
          ("remap", ("remap",)))
CHECK_UP_TO = 256  # sizes whose whole-array segment() fits comfortably here
SPACING = 32  # the cells' grid
NOISE_SIGMA = 1.5  # the smooth noise: white noise through a Gaussian of this sigma...
NOISE_STD = 0.04  # ...scaled to this standard deviation
SLAB = 64  # sections generated at a time (the map's chunk depth)
BEFORE_OCTREE = "3b3de4a"  # the last commit with the single reduce and agglomerate tasks
ROOT = Path(__file__).resolve().parent.parent
MAP_CHUNK = (64, 64, 64)


# ---------------------------------------------------------------------------------------------
# The map, slab by slab


def _noise_radius() -> int:
    return int(4.0 * NOISE_SIGMA + 0.5)  # scipy's gaussian_filter, truncate 4


def _filtered_std() -> float:
    """The standard deviation of unit white noise through scipy's truncated 3D Gaussian of
    NOISE_SIGMA: the product over the axes of its 1D kernel's L2 norm (a constant, so every
    slab scales its noise alike)."""
    r = _noise_radius()
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / NOISE_SIGMA) ** 2)
    w /= w.sum()
    return float(np.sqrt((w**2).sum()) ** 3)


def cell_slab(size: int, seeds: np.ndarray, z0: int, z1: int) -> np.ndarray:
    """Affinities (x, y, z1 - z0, 3) uint8 of sections z0..z1 of the N^3 cell map: the same
    voxels whichever slabs it is cut into (each slab computes a margin of the Gaussian's
    radius, and plane z's white noise is drawn from a generator seeded by (N, z))."""
    from scipy.ndimage import gaussian_filter

    from deepem3d.segmentation.synthetic import affinity_map, voronoi_planes

    margin = _noise_radius()
    lo, hi = max(0, z0 - 1 - margin), min(size, z1 + margin)
    labels, dist = voronoi_planes((size,) * 3, SPACING, seeds, lo, hi)
    edge = np.zeros(labels.shape, bool)
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        upper = [slice(None)] * 3
        lower = [slice(None)] * 3
        upper[axis], lower[axis] = slice(1, None), slice(0, -1)
        edge[tuple(upper)] |= differs
        edge[tuple(lower)] |= differs
    del labels
    noise = np.empty(edge.shape, np.float32, order="F")
    for z in range(lo, hi):
        noise[:, :, z - lo] = np.random.default_rng([size, z]).normal(0, 1, (size, size))
    noise = gaussian_filter(noise, NOISE_SIGMA)
    noise *= np.float32(NOISE_STD / _filtered_std())
    p = np.where(edge, np.float32(0.9), 0.05 + 0.5 * np.minimum(dist / SPACING, 1)) + noise
    del noise, dist, edge
    boundary = np.asfortranarray(np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8))
    start = z0 - lo
    return np.asfortranarray(affinity_map(boundary)[:, :, start:start + z1 - z0])


def write_cell_map(path: str, size: int) -> str:
    from deepem3d.segmentation.synthetic import voronoi_seeds
    from deepem3d.storage.layers import create_layer

    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                       size=(size,) * 3, chunk_size=MAP_CHUNK, num_channels=3, overwrite=True)
    seeds = voronoi_seeds((size,) * 3, SPACING, seed=size)
    for z0 in range(0, size, SLAB):
        z1 = min(size, z0 + SLAB)
        vol[:, :, z0:z1] = cell_slab(size, seeds, z0, z1)
    return path


# ---------------------------------------------------------------------------------------------
# One size


def run_size(work: Path, size: int, task_shape: tuple[int, int, int], waterz_up_to: int,
             map_path: str | None) -> dict:
    from taskqueue.queueables import totask

    from deepem3d.run.runner import run_stages
    from deepem3d.stages.frame import payload_of
    from deepem3d.stages.segmentation import plan_segment, segment_stages

    start = time.perf_counter()
    if map_path is None:
        map_path = write_cell_map(f"file://{work / f'map{size}'}", size)
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

    started = time.perf_counter()
    run_stages(segment_stages(plan), execute=execute, echo=lambda line: None)
    wall = time.perf_counter() - started
    per_stage = {s: records(output, s) for s in plan.stages}
    edges = sum(r["edges"] for r in per_stage["region-graph"])
    density = edges / size**3
    seconds = {name: sum(r["seconds"] for s, rs in per_stage.items() if s.startswith(prefixes)
                         for r in rs) for name, prefixes in GROUPS}
    levels = {}
    for s, rs in per_stage.items():
        if rs and s.startswith(("reduce-L", "agglomerate-L")):
            level = int(s.rsplit("L", 1)[1])
            levels[s] = {"tasks": len(rs),
                         "peak_mib": max(r.get("peak_added_mib", 0.0) for r in rs),
                         "planned_mib": plan.stage_memory_bytes(s, density) / 2**20,
                         "face_voxels": plan.largest_faces(level)}
    result = {"size": size, "voxels": size**3, "blocks": len(plan.blocks),
              "height": plan.octree.height, "edges_per_voxel": density, "map_seconds": made,
              "wall_seconds": wall, "seconds": seconds, "levels": levels,
              "same_as_whole_array": None, "waterz": None}
    if size <= max(CHECK_UP_TO, waterz_up_to):
        from cloudvolume import CloudVolume

        affinities = np.asarray(CloudVolume(map_path, progress=False)[:, :, :])
        if size <= CHECK_UP_TO:
            from deepem3d.segmentation.pipeline import segment

            layer = np.asarray(CloudVolume(output, progress=False)[:, :, :])[..., 0]
            result["same_as_whole_array"] = bool(np.array_equal(
                layer, segment(affinities, "mean", 0.5)))
        if size <= waterz_up_to:
            npy = work / f"map{size}.npy"
            np.save(npy, affinities)
            del affinities
            result["waterz"] = in_child("--waterz", str(npy), "0.5")
            npy.unlink()
    import shutil

    shutil.rmtree(output.removeprefix("file://"))
    result["map_path"] = map_path
    return result


def _median_runs(results: list[dict]) -> list[dict]:
    """One row per size, in first-run order: task seconds per group as medians of its runs."""
    rows: dict[int, dict] = {}
    for r in results:
        row = rows.setdefault(r["size"], {**r, "runs": []})
        row["runs"].append(sum(r["seconds"].values()))
        if r["waterz"] and not row["waterz"]:
            row["waterz"] = r["waterz"]
    for size, row in rows.items():
        runs = [r for r in results if r["size"] == size]
        row["seconds"] = {g: float(np.median([r["seconds"][g] for r in runs]))
                          for g, _ in GROUPS}
        for name in row["levels"]:  # the largest peak any run saw
            row["levels"][name]["peak_mib"] = max(r["levels"][name]["peak_mib"] for r in runs)
    return list(rows.values())


def report(results: list[dict]) -> None:
    rows = _median_runs(results)
    print("== ns per voxel of all task seconds (one process, one task at a time; medians of "
          "each size's runs)")
    print(f"{'size':>7}{'blocks':>8}{'levels':>7}" + "".join(f"{g:>14}" for g, _ in GROUPS)
          + f"{'total':>8}{'runs':>6}{'edges/vox':>11}{'waterz':>8}{'ratio':>7}{'== whole':>10}")
    for r in rows:
        ns = {g: 1e9 * v / r["voxels"] for g, v in r["seconds"].items()}
        total = sum(r["seconds"].values())
        wz = r["waterz"]
        wz_ns = f"{1e9 * wz['cold_seconds'] / r['voxels']:>8.0f}" if wz else f"{'-':>8}"
        ratio = f"{wz['cold_seconds'] / total:>7.2f}" if wz else f"{'-':>7}"
        print(f"{r['size']:>6}^3{r['blocks']:>8}{r['height'] + 1:>7}"
              + "".join(f"{ns[g]:>14.0f}" for g, _ in GROUPS) + f"{1e9 * total / r['voxels']:>8.0f}"
              + f"{len(r['runs']):>6}{r['edges_per_voxel']:>11.4f}{wz_ns}{ratio}"
              + f"{str(r['same_as_whole_array']):>10}")
    first, last = rows[0], rows[-1]
    per = [sum(r["seconds"].values()) / r["voxels"] for r in rows]
    print(f"ns per voxel, largest over smallest size: {per[-1] / per[0]:.2f} "
          f"({last['size']}^3 over {first['size']}^3); waterz: ratio = waterz seconds / "
          "deepem3d task seconds (above 1: deepem3d faster), its one call in a child process")
    print("\n== largest task's own peak memory per level, MiB (planned at the measured density)"
          "; face voxels the level's largest node holds (its children's; a block's own at L0)")
    names = sorted({s for r in rows for s in r["levels"]},
                   key=lambda s: (s.split("-L")[0], int(s.rsplit("L", 1)[1])))
    print(f"{'stage':<18}" + "".join(f"{str(r['size']) + '^3':>34}" for r in rows))
    for s in names:
        cells = []
        for r in rows:
            level = r["levels"].get(s)
            cells.append(f"{level['peak_mib']:>9.1f} ({level['planned_mib']:>8.1f}) "
                         f"{level['face_voxels']:>12,}" if level else f"{'-':>33}")
        print(f"{s:<18}" + "".join(f"{c:>34}" for c in cells))


# ---------------------------------------------------------------------------------------------
# ISBI against the commit before the octrees


def commit_venv(work: Path, commit: str) -> Path:
    """A venv whose deepem3d is `commit`'s source (git archive) and whose other packages are
    this venv's (a .pth file: its editable deepem3d finder is not loaded from there). Returns
    its python."""
    src = work / f"deepem3d-{commit}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    venv = work / f"venv-{commit}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    site = Path(site.stdout.strip())
    (site / "00-deepem3d.pth").write_text(f"{src}\n")
    (site / "01-dependencies.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n")
    return python


def segment_with(python: Path, map_path: str, output: str, work: Path) -> float:
    """`deepem3d segment` of that python (run from `work`, so that no other source is on its
    path); the sum of its tasks' seconds from the markers."""
    from cloudfiles import CloudFiles

    done = subprocess.run([str(python), "-m", "deepem3d", "segment", map_path, output,
                           "--method", "mean", "--threshold", "0.5", "--task-shape",
                           "256,256,10", "--parallel", "1"], capture_output=True, text=True,
                          cwd=work)
    if done.returncode:
        raise RuntimeError(f"{python} segment failed: {done.stderr[-2000:]}")
    files = CloudFiles(output)
    return sum(files.get_json(k)["seconds"] for k in files.list(prefix="tasks/")
               if "/done/" in k)


def isbi_against(work: Path, commit: str, repeats: int = 3) -> dict:
    from cloudfiles import CloudFiles
    from cloudvolume import CloudVolume
    from segmentation import write_map

    from deepem3d.axes import xyz_from_zyx
    from deepem3d.sample import load_sample
    from deepem3d.segmentation.pipeline import segment
    from deepem3d.segmentation.synthetic import affinity_map, boundary_map

    _, ids = load_sample()
    affinities = affinity_map(boundary_map(np.asfortranarray(xyz_from_zyx(ids)), noise=0.1,
                                           seed=0))
    map_path = write_map(f"file://{work / 'isbi_map'}", affinities, (128, 128, 10))
    CloudFiles(map_path).put_json("provenance", {"sources": [], "processing": [
        {"method": {"task": "benchmarks/scale.py: ISBI ground truth as noisy affinities"}}]})
    pythons = {"this tree": Path(sys.executable), commit: commit_venv(work, commit)}
    seconds: dict[str, list[float]] = {name: [] for name in pythons}
    chunks = {}
    for k in range(-1, repeats):  # k = -1: untimed (numba's caches filled, files warm)
        for name, python in pythons.items():
            slug = name.replace(" ", "_")
            output = f"file://{work / f'isbi_{slug}_{k}'}"
            spent = segment_with(python, map_path, output, work)
            if k >= 0:
                seconds[name].append(spent)
            files = CloudFiles(output)
            chunks[name] = {f: files.get(f) for f in files.list(prefix="4_4_40/")}
            if name == "this tree":
                layer = np.asarray(CloudVolume(output, progress=False)[:, :, :])[..., 0]
    whole = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        expected = segment(affinities, "mean", 0.5)
        whole.append(time.perf_counter() - start)
    return {"commit": commit, "seconds": {n: float(np.median(v)) for n, v in seconds.items()},
            "all_seconds": seconds, "whole_array_seconds": float(np.median(whole[1:])),
            "same_chunk_files": chunks["this tree"] == chunks[commit],
            "chunk_files": len(chunks[commit]),
            "same_as_whole_array": bool(np.array_equal(layer, expected)),
            "voxels": int(affinities[..., 0].size)}


def print_isbi(r: dict) -> None:
    ours, theirs = r["seconds"]["this tree"], r["seconds"][r["commit"]]
    ns = 1e9 / r["voxels"]
    print(f"== ISBI map (512 x 512 x 30, mean 0.5, 12 blocks): this tree against {r['commit']} "
          "(before the octrees), task seconds, medians of "
          f"{len(r['all_seconds']['this tree'])} interleaved runs")
    print(f"  {r['commit']:<22}{theirs:>8.2f} s {theirs * ns:>8.0f} ns/voxel")
    print(f"  {'this tree':<22}{ours:>8.2f} s {ours * ns:>8.0f} ns/voxel   "
          f"x{theirs / ours:.2f} the old speed")
    print(f"  {'segment() in memory':<22}{r['whole_array_seconds']:>8.2f} s "
          f"{r['whole_array_seconds'] * ns:>8.0f} ns/voxel")
    print(f"  the same chunk files ({r['chunk_files']}): {r['same_chunk_files']}; equal to "
          f"segment() on the whole array: {r['same_as_whole_array']}")


# ---------------------------------------------------------------------------------------------
# The paper table


def insert_rate(work: Path, count: int = 20000) -> float:
    """Tasks per second that taskqueue inserts into a file queue here (the tasks the reduce's
    first stage makes, payloads of their real size)."""
    from taskqueue import TaskQueue

    from deepem3d.stages.frame import payload_of
    from deepem3d.stages.supervoxels import ReduceNodeTask

    queue = TaskQueue(f"fq://{work / 'insert-queue'}", progress=False)
    out = "gs://bucket/run/segmentation"
    tasks = [partial(ReduceNodeTask, output_path=out, level=0,
                     node=[k % 200, (k // 200) % 200, k // 40000], grid=[200, 200, 160],
                     task_shape=[512, 512, 64], dataset=[0] * 3 + [100000] * 3,
                     volume=[0] * 3 + [100000] * 3,
                     run={"layer": out, "stage": "reduce-L0", "id": f"{k}", "key": "0" * 20})
             for k in range(count)]
    payload_of(tasks[0])
    start = time.perf_counter()
    queue.insert(tasks, parallel=1)
    return count / (time.perf_counter() - start)


def paper(work: Path) -> None:
    from deepem3d.stages.segment_costs import NOISY_EDGES_PER_VOXEL, SMOOTH_EDGES_PER_VOXEL
    from deepem3d.stages.segmentation import plan_segment
    from deepem3d.storage.layers import create_layer
    from deepem3d.units import format_bytes

    rate = insert_rate(work)
    plans = {}
    for side in (10_000, 100_000):
        path = f"file://{work / f'info{side}'}"
        create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                     size=(side,) * 3, chunk_size=(64, 64, 64), num_channels=3,
                     overwrite=True, provenance={"task": "deepem3d infer"})
        start = time.perf_counter()
        plans[side] = plan_segment(path, f"file://{work / f'seg{side}'}", method="mean",
                                   threshold=0.5, edges_per_voxel=SMOOTH_EDGES_PER_VOXEL)
        plans[side].describe()  # what --dry-run prints: every level sized
        plans[side].seconds = time.perf_counter() - start
    print("== on paper: the planner's formulas (what `segment --dry-run` prints), default task "
          "shape 512 x 512 x 64, mean; largest task at 0.02 region-graph edges per voxel (and "
          f"{NOISY_EDGES_PER_VOXEL:g}, a noisy map)")
    print(f"{'stage':<16}" + "".join(f"{f'{side:,}^3 tasks':>18}{'largest':>11}{'noisy':>11}"
                                     for side in plans))
    names = max((p.stages for p in plans.values()), key=len)
    for name in names:
        cells = []
        for plan in plans.values():
            if name not in plan.stages or plan.task_count(name) == 0:
                cells.append(f"{'-':>18}{'':>22}")
                continue
            noisy = plan.stage_memory_bytes(name, NOISY_EDGES_PER_VOXEL)
            cells.append(f"{plan.task_count(name):>18,}"
                         f"{format_bytes(plan.stage_memory_bytes(name)):>11}"
                         f"{format_bytes(noisy):>11}")
        print(f"{name:<16}" + "".join(cells))
    for side, plan in plans.items():
        total = sum(plan.task_count(s) for s in plan.stages)
        chunks = math.prod(-(-side // c) for c in plan.chunk_size)
        shard_chunk = sharded_chunk(plan.task_shape)
        largest = max(plan.stage_memory_bytes(s) for s in plan.stages if plan.task_count(s))
        print(f"{side:,}^3: {len(plan.blocks):,} blocks, octree of {plan.octree.height + 1} "
              f"levels, planned in {plan.seconds:.1f} s; {total:,} tasks, inserted in "
              f"{total / rate / 3600:.2g} h at {rate:,.0f} tasks/s (a file queue here, one "
              f"process); largest task {format_bytes(largest)}; the segmentation layer "
              f"{chunks:,} chunk files of {'x'.join(map(str, plan.chunk_size))}, or "
              f"{len(plan.blocks):,} shard files with --sharded (chunks "
              f"{'x'.join(map(str, shard_chunk))}); the work directory about 3 files per block "
              "(labels, table, graph) and 2-3 per octree node")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024,256")
    parser.add_argument("--task-shape", default="128,128,128")
    parser.add_argument("--waterz-up-to", type=int, default=512)
    parser.add_argument("--paper", action="store_true", help="the paper table only")
    parser.add_argument("--no-paper", action="store_true", help="the measured runs only")
    parser.add_argument("--against", default=BEFORE_OCTREE,
                        help="the commit the ISBI run is compared with ('' to skip it)")
    parser.add_argument("--isbi-only", action="store_true", help="that comparison only")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="Also write every figure to this file.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    task_shape = tuple(int(s) for s in args.task_shape.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.paper:
            return paper(work)
        if args.isbi_only:
            return print_isbi(isbi_against(work, args.against))
        print(f"machine: {os.cpu_count()} CPU(s); load average {os.getloadavg()[0]:.1f} at "
              "start", flush=True)
        results, maps = [], {}
        # an untimed run first: numba's compiled code and the imports loaded, as in a worker
        run_size(work, 2 * min(task_shape), task_shape, 0, None)
        for size in sizes:
            start = time.perf_counter()
            result = run_size(work, size, task_shape, args.waterz_up_to, maps.get(size))
            maps[size] = result["map_path"]
            results.append(result)
            print(f"{size}^3 done in {time.perf_counter() - start:.0f} s (map "
                  f"{result['map_seconds']:.0f} s, tasks {sum(result['seconds'].values()):.0f}"
                  f" s)", file=sys.stderr, flush=True)
        report(results)
        if args.against:
            print()
            print_isbi(isbi_against(work, args.against))
        if not args.no_paper:
            print()
            paper(work)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
