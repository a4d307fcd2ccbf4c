"""The fault campaign: the whole pipeline, SIGKILLed again and again, ends with the content of an
undisturbed run.

    python scripts/fault_campaign.py --runs 50 [--crop 256,256,30] [--lease-seconds 15]
        [--kills-per-run 1] [--runner-every 4] [--seed 0] [--dir DIR] [--keep]

A crop of the embedded ISBI 2012 sample goes through the whole pipeline (inference, the
segmentation's stages, downsampling of image and segmentation, meshes and skeletons), run by
`deepem3d run --parallel 2` with a short lease. First one undisturbed reference run; then, in
each of `--runs` runs, the campaign watches the workers' log and SIGKILLs the worker that runs
a task of a chosen stage, at a random moment while the task is in flight (the stage least hit
so far is chosen, so every stage is hit about equally). In every `--runner-every`-th run the
runner itself is SIGKILLed a random moment after that, and the same command started again.

Each run must finish (exit 0), and the decoded content of every object of every layer (chunks
of every mip, segment table arrays, mesh, skeleton, index and info files; compressed files
decompressed) must equal the reference's. Completion markers, run records, provenance, the
report, the queue and logs are left out: they hold times, hosts and paths. Workers run with a
fixed PYTHONHASHSEED (igneous's sharded skeleton merge iterates over a set of names).

The table printed at the end (and DIR/campaign.json) gives runs, kills per stage (with the
runner kills), objects compared and differences found. Exit status 1 when a run failed or
differed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HASH_SEED = "0"
RUN_TIMEOUT = 900  # seconds: a run that takes longer has hung
RUNNING = re.compile(r"worker\[(\d+)\] INFO running task (\S+) \(.*, stage (\S+) (\S+), "
                     r"attempt \d+\)")
FINISHED = re.compile(r"worker\[(\d+)\] INFO finished task (\S+) .*?in ([\d.]+) s")
LEFT_OUT_DIRS = ("tasks", "queue", "logs")
LEFT_OUT_FILES = ("provenance", "report.json")


# ---------------------------------------------------------------------------------------------
# The input and the pipeline


def write_crop(folder: Path, crop: tuple[int, int, int]) -> dict[str, str]:
    """image and gt layers of a crop of the sample (x, y from its middle; z from 0)."""
    from deepem3d.axes import xyz_from_zyx
    from deepem3d.sample import RESOLUTION, load_sample
    from deepem3d.storage.layers import create_layer

    image, ids = load_sample()
    x, y, z = crop
    if z > image.shape[0] or y > image.shape[1] or x > image.shape[2]:
        sys.exit(f"fault_campaign: --crop {x},{y},{z} exceeds the sample (512,512,30)")
    y0, x0 = (image.shape[1] - y) // 2, (image.shape[2] - x) // 2
    layers = {}
    for name, array, kind, dtype in (("image", image, "image", "uint8"),
                                     ("gt", ids, "segmentation", "uint64")):
        cut = array[:z, y0:y0 + y, x0:x0 + x].astype(dtype)
        path = f"file://{folder / name}"
        vol = create_layer(path, layer_type=kind, dtype=dtype, resolution=RESOLUTION,
                           size=crop, chunk_size=(64, 64, min(z, 10)))
        vol[:, :, :] = xyz_from_zyx(cut)
        layers[name] = path
    return layers


def pipeline_text(layers: dict[str, str], crop: tuple[int, int, int]) -> str:
    """Several tasks per stage (so a kill lands mid-stage), meshes and skeletons at mip 2."""
    x, y, z = crop
    task = (x // 2, y // 2, z // 2 if z % 2 == 0 else z)
    chunk = (task[0] // 2, task[1] // 2, 5 if task[2] % 5 == 0 else task[2])
    patch = min(512, 16 * -(-(max(task[:2]) + 32) // 16))  # a task's block and its context
    objects = f"[{max(8, x // 8)}, {max(8, y // 8)}, {z}]"  # 4 forge tasks at mip 2
    return f"""\
version: 1
output: unused
image: {layers['image']}
ground_truth: {layers['gt']}
products: [map, segmentation, downsample, meshes, skeletons]
inference:
  model: isbi2012-small-affinity
  patch_size: {patch}
  patch_output: {patch - 32}
  overlap: 16
  chunk_size: [{chunk[0]}, {chunk[1]}, {chunk[2]}]
  task_shape: [{task[0]}, {task[1]}, {task[2]}]
segmentation:
  task_shape: [{task[0]}, {task[1]}, {task[2]}]
downsample:
  layers: [image, segmentation]
  num_mips: 2
meshes:
  mip: 2
  task_shape: {objects}
skeletons:
  mip: 2
  task_shape: {objects}
  dust_threshold: 100
  min_cable_nm: 200
"""


# ---------------------------------------------------------------------------------------------
# What a run left


def _decoded(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".br":
        import brotli

        return brotli.decompress(data)
    if path.suffix == ".zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def contents(output: Path) -> dict[str, str]:
    """Every object the run left under `output`, by path (a compression suffix dropped), as a
    digest of its decoded content; without markers, run records, provenance, the report, the
    queue and logs. The octree's files sit under the run's key, which names the map's path:
    that part of their path is left out."""
    found = {}
    for path in sorted(output.rglob("*")):
        rel = path.relative_to(output).as_posix()
        parts = rel.split("/")
        if (not path.is_file() or any(p in LEFT_OUT_DIRS for p in parts[:-1])
                or parts[0] in LEFT_OUT_DIRS or path.name in LEFT_OUT_FILES):
            continue
        data = _decoded(path)
        key = re.sub(r"\.(gz|br|zstd)$", "", rel)
        key = re.sub(r"/octree/[^/]+/", "/octree/RUN/", key)  # the run key names the map
        found[key] = hashlib.sha256(data).hexdigest()
    return found


def stage_times(output: Path) -> dict[str, float]:
    """LAYER/STAGE -> the median seconds of its tasks, in the order the stages ran, from the
    markers of a finished run."""
    found = []
    for done in output.glob("*/tasks/*/done"):
        records = [json.loads(p.read_text()) for p in done.glob("*.json")]
        if records:
            found.append((min(r["started"] for r in records),
                          f"{done.parent.parent.parent.name}/{done.parent.name}",
                          statistics.median(r.get("seconds", 0.0) for r in records)))
    return {stage: seconds for _, stage, seconds in sorted(found)}


# ---------------------------------------------------------------------------------------------
# Runs


def run_command(pipeline: Path, output: Path, lease: int) -> list[str]:
    return [sys.executable, "-m", "deepem3d", "run", str(pipeline), "--output", str(output),
            "--parallel", "2", "--lease-seconds", str(lease)]


def start(command: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": HASH_SEED, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


class LogWatch:
    """The tasks in flight per worker pid, from the workers' log as it grows."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, ""
        self.in_flight: dict[int, tuple[str, str, float]] = {}  # pid -> stage, task, seen
        self.seconds: dict[str, list[float]] = {}  # stage -> its tasks' seconds seen here

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.rest + text).split("\n")
        self.rest = lines.pop()
        for line in lines:
            if m := RUNNING.search(line):
                self.in_flight[int(m.group(1))] = (m.group(3), m.group(4), time.monotonic())
            elif m := FINISHED.search(line):
                flight = self.in_flight.pop(int(m.group(1)), None)
                if flight is not None:
                    self.seconds.setdefault(flight[0], []).append(float(m.group(3)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def workers_of(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def disturbed_run(output: Path, command: list[str], targets: list[str],
                  times: dict[str, float], kill_runner: bool, rng: random.Random) -> dict:
    """One run with a worker SIGKILLed in flight in each target stage (in the order they come)
    and, with `kill_runner`, the runner SIGKILLed after the last of them and restarted. A
    target whose tasks all passed unseen (too short to catch) gives way to the first later
    stage not hit yet in this run."""
    log_path = output.parent / f"{output.name}.out"
    order = {stage: k for k, stage in enumerate(times)}
    kills: list[dict] = []
    missed: list[str] = []
    runner_kill = None
    with open(log_path, "ab") as out:
        runner = start(command, out)
        watch = LogWatch(output / "logs" / "workers.log")
        pending = list(targets)
        chosen: dict[tuple[int, str], float] = {}  # (pid, task) -> when to kill it
        runner_at = None
        deadline = time.monotonic() + RUN_TIMEOUT
        while runner.poll() is None and time.monotonic() < deadline:
            watch.poll()
            now = time.monotonic()
            for pid, (stage, task, seen) in list(watch.in_flight.items()):
                hit = {k["stage"] for k in kills}
                passed = [t for t in pending if order.get(t, -1) < order.get(stage, -1)]
                if passed and stage not in pending and stage not in hit:
                    missed.append(passed[0])
                    pending[pending.index(passed[0])] = stage
                if stage not in pending:
                    continue
                when = chosen.setdefault((pid, task), seen + rng.uniform(
                    0, 0.5 * times.get(stage, 0.1)))
                if now >= when and alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    pending.remove(stage)
                    watch.in_flight.pop(pid)
                    kills.append({"stage": stage, "task": task, "pid": pid,
                                  "after_seconds": round(now - seen, 3)})
                    print(f"  killed worker {pid} in {stage} task {task} "
                          f"{now - seen:.2f} s into it", flush=True)
                    if kill_runner and not pending:
                        runner_at = now + rng.uniform(0, 3)
            if runner_at is not None and now >= runner_at:
                flight = sorted({s for s, _, _ in watch.in_flight.values()}) or ["no task"]
                orphans = workers_of(runner.pid)
                runner.send_signal(signal.SIGKILL)
                runner.wait()
                for pid in orphans:  # they finish their task and stop: the runner is gone
                    while alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                runner_kill = ", ".join(flight)
                print(f"  killed the runner (in flight: {runner_kill}); starting it again",
                      flush=True)
                runner = start(command, out)
                runner_at = None
                kill_runner = False
            time.sleep(0.005)
        watch.poll()
        for stage, seconds in watch.seconds.items():  # the reference's first tasks compile
            if stage in times:                        # numba kernels: later ones are faster
                times[stage] = min(times[stage], statistics.median(seconds))
        if runner.poll() is None:
            runner.kill()
            runner.wait()
            return {"kills": kills, "runner_kill": runner_kill, "status": "timed out",
                    "missed": missed + pending}
    return {"kills": kills, "runner_kill": runner_kill, "status": runner.returncode,
            "missed": missed + pending}


def campaign(args) -> int:
    folder = Path(args.dir or tempfile.mkdtemp(prefix="deepem3d-faults-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    layers = write_crop(folder / "input", args.crop)
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(pipeline_text(layers, args.crop))
    reference = folder / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    print(f"campaign in {folder}: reference run on a {'x'.join(map(str, args.crop))} crop",
          flush=True)
    started = time.monotonic()
    with open(folder / "reference.out", "wb") as out:
        result = start(run_command(pipeline, reference, args.lease_seconds), out).wait()
    if result != 0:
        print(f"the reference run failed (exit {result}): see {folder / 'reference.out'}")
        return 1
    expected = contents(reference)
    times = stage_times(reference)
    print(f"reference: {len(expected)} objects, {len(times)} stages, "
          f"{time.monotonic() - started:.0f} s", flush=True)

    unknown = sorted(set(args.stages or []) - set(times))
    if unknown:
        print(f"--stages: no stage {', '.join(unknown)} (the stages: {', '.join(times)})")
        return 2
    hits: Counter = Counter({stage: 0 for stage in times})  # worker kills so far
    runner_kills: Counter = Counter()
    rows, failures, differences, compared = [], 0, 0, 0
    for run in range(args.runs):
        targets = []
        for _ in range(min(args.kills_per_run, len(times))):
            candidates = [s for s in (args.stages or times) if s not in targets]
            fewest = min(hits[s] for s in candidates)
            stage = rng.choice([s for s in candidates if hits[s] == fewest])
            targets.append(stage)
        kill_runner = args.runner_every > 0 and run % args.runner_every == args.runner_every - 1
        output = folder / f"run-{run:03d}"
        shutil.rmtree(output, ignore_errors=True)
        print(f"run {run + 1}/{args.runs}: kill in {', '.join(targets)}"
              + (", then the runner" if kill_runner else ""), flush=True)
        t0 = time.monotonic()
        outcome = disturbed_run(output, run_command(pipeline, output, args.lease_seconds),
                                targets, times, kill_runner, rng)
        hits.update(k["stage"] for k in outcome["kills"])
        if outcome["runner_kill"]:
            runner_kills[outcome["runner_kill"]] += 1
        found = contents(output) if outcome["status"] == 0 else {}
        differing = sorted(k for k in set(found) | set(expected)
                           if found.get(k) != expected.get(k))
        if outcome["status"] != 0:
            failures += 1
        compared += len(found)
        differences += len(differing) if outcome["status"] == 0 else 0
        rows.append({"run": run, **outcome, "objects": len(found),
                     "differences": differing[:20], "seconds": round(time.monotonic() - t0, 1)})
        print(f"  exit {outcome['status']}, {len(found)} objects, {len(differing)} "
              f"differing, {time.monotonic() - t0:.0f} s"
              + (f" (missed: {', '.join(outcome['missed'])})" if outcome["missed"] else ""),
              flush=True)
        if not args.keep and outcome["status"] == 0 and not differing:
            shutil.rmtree(output, ignore_errors=True)

    kills = Counter(k["stage"] for row in rows for k in row["kills"])
    summary = {
        "runs": args.runs, "crop": list(args.crop), "lease_seconds": args.lease_seconds,
        "kills_per_stage": dict(sorted(kills.items())),
        "runner_kills": dict(runner_kills), "objects_per_run": len(expected),
        "objects_compared": compared, "differences": differences, "failed_runs": failures,
        "seconds": round(time.monotonic() - started, 1), "rows": rows,
    }
    (folder / "campaign.json").write_text(json.dumps(summary, indent=1))
    print_table(summary, list(times))
    return 1 if failures or differences else 0


def print_table(summary: dict, stages: list[str]) -> None:
    width = max(len(s) for s in stages) + 2
    print(f"\nruns {summary['runs']} ({summary['crop'][0]} x {summary['crop'][1]} x "
          f"{summary['crop'][2]} crop, lease {summary['lease_seconds']} s), "
          f"{summary['seconds']:.0f} s")
    print(f"{'stage':<{width}}worker kills")
    for stage in stages:
        print(f"{stage:<{width}}{summary['kills_per_stage'].get(stage, 0)}")
    runner = sum(summary["runner_kills"].values())
    print(f"{'runner kills':<{width}}{runner}"
          + (f" (in flight: {'; '.join(sorted(summary['runner_kills']))})" if runner else ""))
    print(f"objects compared: {summary['objects_compared']} ({summary['objects_per_run']} per "
          "run)")
    print(f"failed runs: {summary['failed_runs']}")
    print(f"differences found: {summary['differences']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--crop", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(256, 256, 30), help="x,y,z of the sample (default 256,256,30)")
    parser.add_argument("--lease-seconds", type=int, default=15)
    parser.add_argument("--kills-per-run", type=int, default=1)
    parser.add_argument("--runner-every", type=int, default=4,
                        help="kill the runner too in every N-th run (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", type=lambda s: s.split(","), default=None,
                        help="kill only in these LAYER/STAGE stages (default: every stage)")
    parser.add_argument("--dir", default=None, help="where to work (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every run's output")
    args = parser.parse_args(argv)
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
