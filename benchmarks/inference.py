"""Seam-free inference task vs MONAI's sliding_window_inference, side by side.

    python benchmarks/inference.py [--sections 12] [--patch-size 256 --patch-output 192]
                                   [--overlap 32] [--batch-size 4] [--threads 2]
                                   [--task-shape X,Y,Z] [--model CKPT]

One volume (the embedded ISBI 2012 sample, its first --sections sections, 512 x 512 each), one
model (the shipped isbi2012-small if present, else a random-init `small` with seed 0), the same
patch geometry for both: --patch-size px patch inputs whose inputs overlap by the same number
of pixels (ours: a --patch-output window in the middle, windows --overlap apart; MONAI: the
whole roi, overlap = 1 - stride / size), the same Gaussian window (sigma 0.125 of the window),
the same batch, threads and in-memory model. Each method runs in its own process so peak RSS is its
own; a third process that only loads the model gives the baseline.

Ours is timed as a task: read the layer (file://), pad, patch, predict, blend, quantise, write
the layer, write the marker (the model already loaded, as in a worker after its first task).
MONAI is timed from an in-memory array to an in-memory uint8 array (its input stacks built
from the array; no I/O): the comparison favours MONAI.
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

from deepem3d.cli.options import Triple, argparse_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_model(args):
    import torch

    from deepem3d.models import build_model
    from deepem3d.models.checkpoint import load_model as load_ckpt
    from deepem3d.models.checkpoint import resolve_model

    if args.model:
        return load_ckpt(args.model)[0], args.model
    shipped = resolve_model("isbi2012-small")
    if os.path.isfile(shipped):
        return load_ckpt("isbi2012-small")[0], "isbi2012-small (shipped)"
    torch.manual_seed(0)
    return build_model("small", "boundary", 5).eval(), "random-init small (seed 0)"


def volume(args) -> np.ndarray:
    from deepem3d.sample import load_sample

    return np.ascontiguousarray(load_sample()[0][: args.sections])


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
    from deepem3d.models.sliding import PatchGeometry
    from deepem3d.stages.inference import cached_model, inference_stage, plan_inference

    torch.set_num_threads(args.threads)
    model, _ = load_model(args)
    work = args.workdir
    ckpt = os.path.join(work, "model.pt")
    save_checkpoint(ckpt, model, {"model": model.config, "resolution": [4, 4, 50]})
    geometry = PatchGeometry(size=args.patch_size, output=args.patch_output,
                             overlap=args.overlap, batch=args.batch_size, window="gaussian")
    task_shape = args.task_shape or (512, 512, args.sections)
    plan = plan_inference(f"file://{work}/image", f"file://{work}/ours", models=[ckpt],
                          geometry=geometry, threads=args.threads, device="cpu",
                          task_shape=task_shape, chunk_size=(128, 128, args.sections),
                          overwrite=True)
    stage = inference_stage(plan, overwrite=True)
    stage.prepare()
    stage.start()
    tasks = list(stage.tasks())
    # a worker loads the model once for all its tasks (MONAI's time excludes loading it too)
    cached_model(plan.models[0].location, plan.models[0].sha256, "cpu")
    start = time.perf_counter()
    for task in tasks:
        task()
    seconds = time.perf_counter() - start
    records = stage.markers.records()
    out = np.asarray(CloudVolume(stage.layer)[:])[..., 0]
    np.save(os.path.join(work, "ours.npy"), zyx_from_xyz(out))
    return {
        "seconds": seconds,
        "task_seconds": sum(r["seconds"] for r in records),
        "forward_seconds": sum(r["forward_seconds"] for r in records),
        "tasks": len(records),
        "patches": sum(r["patches"] for r in records),
        "peak_rss_mib": peak_rss_mib(),
        "estimate_mib": plan.memory_bytes / 2**20,
    }


def run_monai(args) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from deepem3d.models.sliding import quantize

    torch.set_num_threads(args.threads)
    model, _ = load_model(args)
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
    stride = args.patch_output - args.overlap
    with torch.no_grad():
        probs = sliding_window_inference(
            inputs, (args.patch_size, args.patch_size), args.batch_size, predictor,
            overlap=1 - stride / args.patch_size, mode="gaussian", sigma_scale=0.125,
            padding_mode="reflect",
        )
    out = quantize(probs[:, 0].numpy())
    seconds = time.perf_counter() - start
    np.save(os.path.join(args.workdir, "monai.npy"), out)
    return {"seconds": seconds, "task_seconds": seconds, "forward_seconds": forward["seconds"],
            "patches": forward["patches"], "peak_rss_mib": peak_rss_mib()}


def child(method: str, args, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--run", method,
           "--workdir", args.workdir]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=12)
    parser.add_argument("--patch-size", type=int, default=256, help="patch input, px")
    parser.add_argument("--patch-output", type=int, default=192, help="our output window, px")
    parser.add_argument("--overlap", type=int, default=32, help="between our output windows")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per forward pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task-shape", type=argparse_type(Triple(int), "--task-shape"),
                        default=None, metavar="X,Y,Z",
                        help="our tasks' block (default: one task, the whole volume)")
    parser.add_argument("--model", default=None, help="checkpoint (default: see above)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each method, alternating; the fastest counts")
    parser.add_argument("--run", choices=["ours", "monai", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        fn = {"ours": run_ours, "monai": run_monai, "baseline": run_baseline}[args.run]
        print(json.dumps(fn(args)))
        return

    argv = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="deepem3d-bench-") as work:
        args.workdir = work
        from deepem3d.axes import xyz_from_zyx
        from deepem3d.storage.layers import create_layer

        image = volume(args)
        vol = create_layer(f"file://{work}/image", layer_type="image", dtype="uint8",
                           resolution=(4, 4, 50), size=image.shape[::-1],
                           chunk_size=(128, 128, args.sections))
        vol[:] = xyz_from_zyx(image)
        _, name = load_model(args)
        try:
            import monai  # noqa: F401
        except ImportError:
            raise SystemExit("MONAI is not installed: pip install monai") from None
        results = {"baseline": child("baseline", args, argv)}
        for _ in range(args.repeats):  # alternate, so a busy spell hits both methods
            for method in ("ours", "monai"):
                r = child(method, args, argv)
                best = results.get(method)
                if best is None or r["seconds"] < best["seconds"]:
                    r["peak_rss_mib"] = max(r["peak_rss_mib"], (best or r)["peak_rss_mib"])
                    results[method] = r
                else:
                    best["peak_rss_mib"] = max(best["peak_rss_mib"], r["peak_rss_mib"])
        ours_map = np.load(os.path.join(work, "ours.npy"))
        monai_map = np.load(os.path.join(work, "monai.npy"))

    voxels = image.size
    base = results["baseline"]["peak_rss_mib"]
    stride = args.patch_output - args.overlap
    print(f"volume: embedded ISBI 2012 sample, {image.shape[2]} x {image.shape[1]} x "
          f"{image.shape[0]} voxels (x,y,z); model: {name}; {args.threads} CPU thread(s)")
    print(f"patches: {args.patch_size} px inputs {args.patch_size - stride} px overlapping, "
          f"Gaussian window sigma 0.125, batch {args.batch_size}; ours: {args.patch_output} px "
          f"output windows, {args.overlap} px overlap; MONAI: overlap "
          f"{1 - stride / args.patch_size:.3f} of the roi")
    print(f"{'method':<8}{'seconds':>9}{'voxels/s':>12}{'peak RSS MiB':>14}"
          f"{'above base':>12}{'forward share':>15}{'patches':>9}")
    for method in ("ours", "monai"):
        r = results[method]
        print(f"{method:<8}{r['seconds']:>9.2f}{voxels / r['seconds']:>12,.0f}"
              f"{r['peak_rss_mib']:>14.0f}{r['peak_rss_mib'] - base:>12.0f}"
              f"{r['forward_seconds'] / r['task_seconds']:>15.1%}{r['patches']:>9}")
    o, m = results["ours"], results["monai"]
    print(f"baseline (python + torch + model, no inference): {base:.0f} MiB peak RSS; "
          f"the dry-run estimate of one task was {o['estimate_mib']:.0f} MiB")
    print(f"ratios ours/MONAI: throughput {m['seconds'] / o['seconds']:.2f}x, peak RSS "
          f"{o['peak_rss_mib'] / m['peak_rss_mib']:.2f}x, above baseline "
          f"{(o['peak_rss_mib'] - base) / max(m['peak_rss_mib'] - base, 1e-9):.2f}x")
    diff = np.abs(ours_map.astype(int) - monai_map.astype(int))
    print(f"maps (uint8): mean |ours - MONAI| {diff.mean():.2f}, max {diff.max()} (they differ "
          "by design: ours drops each patch's margin, MONAI blends whole rois)")


if __name__ == "__main__":
    main()
