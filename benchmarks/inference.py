"""Inference cost as tasks: the default tiles vs the former overlapping patches vs MONAI.

    python benchmarks/inference.py [--size 4096,4096] [--sections 8] [--chunk-z 2]
                                   [--preset tiny] [--threads 2] [--repeats 1]
                                   [--methods tiles tiles-deep patches monai monai-fused]

One volume (the embedded ISBI 2012 sample tiled to --size, its first --sections sections),
one model (a random-init --preset with seed 0, or --model), several ways:

- tiles: `deepem3d infer`'s defaults (abutting tiles with the receptive field as margin, tasks
  aligned to them), as InferenceTasks over file:// layers, timed end to end (read, predict,
  quantise, write, marker), the model already loaded as in a worker after its first task;
- tiles-deep: the same tiles in tasks --deep-chunks chunks deep: each predicts chunk-deep slabs
  while a thread reads the next slab's input and another writes the last slab's map, and reads
  each image chunk once (one-chunk tasks read their neighbours' chunks for context);
- patches: the same tasks with the former geometry (--patch-size 512 --patch-output 384
  --overlap 64, 1024 px tasks);
- MONAI: `sliding_window_inference` at its default overlap (0.25) with 512 px rois, Gaussian
  window, from an in-memory array to an in-memory uint8 array (no I/O: favours MONAI), on the
  model as trained;
- MONAI fused: the same, handed the model's CPU inference form that the tasks use
  (deepem3d.models.inference_form), so that the ratio shows the geometry and the task's I/O
  alone.

Every run's process gets GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (as the Docker image sets for
workers): glibc then backs its large allocations with transparent huge pages, and a forward's
activations of hundreds of MB fault in 2 MiB at a time instead of 4 KiB (small preset, 2528 px
tile, one thread: 2.19 million page faults -> 42 thousand, 1,680 -> 1,379 ns per pixel, the
same peak memory). The tasks' CPU forwards also reuse the pages they free
(`deepem3d.memory.reusing_freed_memory`); the MONAI rows run under the same setting.

Each run is its own process (peak RSS its own). Prints seconds, voxels/s, network evaluations
per output voxel (input pixels x sections of every forward pass over output voxels) and the
ratios of the tiles' throughput to the others'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_model(args):
    import torch

    from deepem3d.models import build_model
    from deepem3d.models.checkpoint import load_model as load_ckpt
    from deepem3d.models.checkpoint import resolve_model

    if args.model:
        return load_ckpt(args.model)[0], args.model
    if args.preset:
        torch.manual_seed(0)
        return build_model(args.preset, "boundary", 5).eval(), f"random-init {args.preset}"
    shipped = resolve_model("isbi2012-small")
    if os.path.isfile(shipped):
        return load_ckpt("isbi2012-small")[0], "isbi2012-small (shipped)"
    torch.manual_seed(0)
    return build_model("small", "boundary", 5).eval(), "random-init small (seed 0)"


def volume(args) -> np.ndarray:
    from deepem3d.sample import load_sample

    image = load_sample()[0][: args.sections]
    x, y = args.size
    reps = (1, -(-y // image.shape[1]), -(-x // image.shape[2]))
    return np.ascontiguousarray(np.tile(image, reps)[:, :y, :x])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_baseline(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    volume(args)
    load_model(args)
    return {"peak_rss_mib": peak_rss_mib()}


def run_ours(args) -> dict:
    """One InferenceTask per block over a file:// copy of the volume, timed end to end."""
    import torch
    from cloudvolume import CloudVolume

    from deepem3d.axes import zyx_from_xyz
    from deepem3d.models.checkpoint import save_checkpoint
    from deepem3d.stages.inference import inference_stage
    from deepem3d.stages.inference_plan import plan_inference
    from deepem3d.stages.model_refs import cached_predictor

    torch.set_num_threads(args.threads)
    model, _ = load_model(args)
    work = args.workdir
    ckpt = os.path.join(work, "model.pt")
    save_checkpoint(ckpt, model, {"model": model.config, "resolution": [4, 4, 50]})
    patch = {"size": 512, "output": 384, "overlap": 64} if args.run == "patches" else {}
    deep = None
    if args.run == "tiles-deep":  # the default tiles, tasks --deep-chunks chunks deep
        x, y = args.size
        deep = (min(x, 2048), min(y, 2048), args.chunk_z * args.deep_chunks)
    plan = plan_inference(f"file://{work}/image", f"file://{work}/{args.run}", models=[ckpt],
                          patch=patch, threads=args.threads, device="cpu", overwrite=True,
                          task_shape=deep)
    stage = inference_stage(plan, overwrite=True)
    stage.prepare()
    stage.start()
    tasks = list(stage.tasks())
    # a worker loads the model (and builds its inference form) once for all its tasks;
    # MONAI's time excludes loading it too
    cached_predictor(plan.models[0].location, plan.models[0].sha256, "cpu", False)
    start = time.perf_counter()
    for task in tasks:
        task()
    seconds = time.perf_counter() - start
    records = stage.markers.records()
    out = np.asarray(CloudVolume(stage.layer)[:])[..., 0]
    np.save(os.path.join(work, f"{args.run}.npy"), zyx_from_xyz(out))
    g = plan.geometry
    return {
        "evaluations": plan.evaluations,
        "geometry": f"{g.size} px in, {g.output} px out, overlap {g.overlap}, batch {g.batch}, "
                    f"tasks {'x'.join(map(str, plan.task_shape))}",
        "seconds": seconds,
        "input_wait_seconds": sum(r["input_wait_seconds"] for r in records),
        "write_wait_seconds": sum(r["write_wait_seconds"] for r in records),
        "task_seconds": sum(r["seconds"] for r in records),
        "forward_seconds": sum(r["forward_seconds"] for r in records),
        "tasks": len(records),
        "patches": sum(r["patches"] for r in records),
        "peak_rss_mib": peak_rss_mib(),
        "estimate_mib": plan.memory_bytes / 2**20,
        "task_peak_mib": max(r["peak_added_mib"] for r in records),
    }


def run_monai(args) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from deepem3d.memory import reusing_freed_memory
    from deepem3d.models.sliding import quantize

    torch.set_num_threads(args.threads)
    model, _ = load_model(args)
    if args.run == "monai-fused":  # our tasks' CPU forward, handed to MONAI
        from deepem3d.models.inference_form import inference_form

        model = inference_form(model)
    image = volume(args)
    half = model.in_sections // 2
    forward = {"seconds": 0.0, "patches": 0}

    @torch.no_grad()
    def predictor(x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        probs = model.probabilities(model(model.normalize(x[:, None])))
        forward["seconds"] += time.perf_counter() - t
        forward["patches"] += x.shape[0]
        return probs

    start = time.perf_counter()
    padded = np.pad(image, ((half, half), (0, 0), (0, 0)), mode="reflect")
    stacks = np.stack([padded[z : z + 2 * half + 1] for z in range(image.shape[0])])
    inputs = torch.from_numpy(stacks).float()  # (Z, in_sections, Y, X): sections as batch
    roi, overlap = 512, 0.25  # MONAI's default overlap
    with torch.no_grad(), reusing_freed_memory():  # the allocator setting of our CPU tasks
        probs = sliding_window_inference(
            inputs, (roi, roi), args.batch_size, predictor, overlap=overlap, mode="gaussian",
            sigma_scale=0.125, padding_mode="reflect",
        )
    out = quantize(probs[:, 0].numpy())
    seconds = time.perf_counter() - start
    np.save(os.path.join(args.workdir, f"{args.run}.npy"), out)
    evaluations = forward["patches"] * roi * roi / image.size  # one forward per roi and section
    return {"seconds": seconds, "task_seconds": seconds, "forward_seconds": forward["seconds"],
            "patches": forward["patches"], "peak_rss_mib": peak_rss_mib(),
            "evaluations": evaluations,
            "geometry": f"{roi} px rois, overlap {overlap}, batch {args.batch_size}"}


def child(method: str, args, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--run", method,
           "--workdir", args.workdir]
    env = {**os.environ, "GLIBC_TUNABLES": HUGE_PAGES}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


HUGE_PAGES = "glibc.malloc.hugetlb=1"  # the Docker image's setting (see the docstring)
METHODS = ("tiles", "tiles-deep", "patches", "monai", "monai-fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split(",")),
                        default=(4096, 4096),
                        metavar="X,Y", help="in-plane size of the tiled sample")
    parser.add_argument("--sections", type=int, default=8)
    parser.add_argument("--chunk-z", type=int, default=2, help="the layer's chunk depth: "
                        "tasks are one chunk deep, so sections / chunk-z task layers")
    parser.add_argument("--preset", default="tiny", help="random-init preset (seed 0); '' "
                        "for the shipped isbi2012-small")
    parser.add_argument("--batch-size", type=int, default=4, help="MONAI's rois per forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="checkpoint (instead of --preset)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each method, alternating; the fastest counts")
    parser.add_argument("--deep-chunks", type=int, default=4, help="tiles-deep: chunks per "
                        "task in z (each task predicts chunk-deep slabs, the next one's input "
                        "read and the last one's map written meanwhile)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which to run (tiles always)")
    parser.add_argument("--run", choices=[*METHODS, "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        fn = {"tiles": run_ours, "tiles-deep": run_ours, "patches": run_ours, "monai": run_monai,
              "monai-fused": run_monai, "baseline": run_baseline}[args.run]
        print(json.dumps(fn(args)))
        return

    argv = [a for a in sys.argv[1:]]
    methods = ["tiles", *(m for m in METHODS[1:] if m in args.methods)]
    with tempfile.TemporaryDirectory(prefix="deepem3d-bench-") as work:
        args.workdir = work
        from deepem3d.axes import xyz_from_zyx
        from deepem3d.storage.layers import create_layer

        image = volume(args)
        vol = create_layer(f"file://{work}/image", layer_type="image", dtype="uint8",
                           resolution=(4, 4, 50), size=image.shape[::-1],
                           chunk_size=(256, 256, args.chunk_z))
        vol[:] = xyz_from_zyx(image)
        _, name = load_model(args)
        try:
            if {"monai", "monai-fused"} & set(methods):
                import monai  # noqa: F401
        except ImportError:
            raise SystemExit("MONAI is not installed: pip install monai") from None
        results = {"baseline": child("baseline", args, argv)}
        for _ in range(args.repeats):  # alternate, so a busy spell hits every method
            for method in methods:
                r = child(method, args, argv)
                best = results.get(method)
                if best is None or r["seconds"] < best["seconds"]:
                    r["peak_rss_mib"] = max(r["peak_rss_mib"], (best or r)["peak_rss_mib"])
                    results[method] = r
                else:
                    best["peak_rss_mib"] = max(best["peak_rss_mib"], r["peak_rss_mib"])
        maps = {m: np.load(os.path.join(work, f"{m}.npy")) for m in methods}

    voxels = image.size
    base = results["baseline"]["peak_rss_mib"]
    print(f"volume: embedded ISBI 2012 sample tiled to {image.shape[2]} x {image.shape[1]} x "
          f"{image.shape[0]} voxels (x,y,z), chunks 256 x 256 x {args.chunk_z}; model: {name}; "
          f"{args.threads} CPU thread(s)")
    for method in methods:
        r = results[method]
        tasks = f", {r['tasks']} tasks" if "tasks" in r else ""
        print(f"  {method}: {r['geometry']}{tasks}")
    print(f"{'method':<12}{'seconds':>9}{'voxels/s':>12}{'evaluations':>13}{'peak RSS MiB':>14}"
          f"{'above base':>12}{'forward share':>15}")
    for method in methods:
        r = results[method]
        print(f"{method:<12}{r['seconds']:>9.1f}{voxels / r['seconds']:>12,.0f}"
              f"{r['evaluations']:>13.2f}{r['peak_rss_mib']:>14.0f}"
              f"{r['peak_rss_mib'] - base:>12.0f}{r['forward_seconds'] / r['task_seconds']:>15.1%}")
    t = results["tiles"]
    print(f"baseline (python + torch + model, no inference): {base:.0f} MiB peak RSS; the "
          f"dry-run estimate of one tiles task was {t['estimate_mib']:.0f} MiB, the largest "
          f"tiles task's own peak (its record) {t['task_peak_mib']:.0f} MiB")
    for other in methods[1:]:
        o = results[other]
        print(f"ratio tiles/{other}: throughput {o['seconds'] / t['seconds']:.2f}x, "
              f"evaluations {t['evaluations'] / o['evaluations']:.2f}x, peak RSS "
              f"{t['peak_rss_mib'] / o['peak_rss_mib']:.2f}x")
    for method in (m for m in methods if "input_wait_seconds" in results[m]):
        r = results[method]
        print(f"{method}: the forward waited {r['input_wait_seconds']:.1f} s for input and "
              f"{r['write_wait_seconds']:.1f} s for writes, of {r['task_seconds']:.1f} s")
    for other in methods[1:]:
        diff = np.abs(maps["tiles"].astype(int) - maps[other].astype(int))
        why = ("the same geometry: they must be equal" if other == "tiles-deep" else
               "they differ by design: context and blending differ")
        print(f"maps (uint8): mean |tiles - {other}| {diff.mean():.2f}, max {diff.max()} "
              f"({why})")


if __name__ == "__main__":
    main()
