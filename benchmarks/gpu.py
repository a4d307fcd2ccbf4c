"""What the accelerator gives: forward TFLOP/s per preset and setting, inference end to end
against MONAI at equal settings, the Trainer against its bare step, GPU memory.

    python benchmarks/gpu.py [--device cuda] [--quick] [--part-timeout 240]
                             [--parts forward inference training determinism autotune compile]

One prepared script for an H100/H200 host (under 5 minutes there): it needs torch, numpy,
scipy and tqdm only, plus MONAI for the MONAI row (installed from a wheel where the host has no
network; without it the row says MONAI is missing). `--device cpu --quick` runs every row on tiny
shapes in seconds (the suite's smoke test). Rows print as they finish, one JSON object per
line. Each part runs in a process of its own, stopped after --part-timeout seconds with the
rows it gave kept (cuDNN autotuning's first calls have taken minutes on an H200).

- forward: one batch (16 x in_sections x 512^2 on a GPU) through `ModelPredictor.predict_tensor`
  with each setting (autocast dtype, channels-last, the inference form, cuDNN autotuning, a
  CUDA graph, compile); TFLOP/s counts 2 x every conv's multiply-adds (network.count_macs) of
  the module as trained, also for the form. `same bytes twice` says whether two forwards of
  one batch gave the same bytes; `max |diff|` is against float32.
- inference: `predict_volume` (the inference task's code without its layer I/O: upload uint8,
  gather, blend, quantise on the device, download uint8) over the embedded ISBI sample tiled to
  1024^2 x 30, against MONAI's `sliding_window_inference` with the same model, patch, overlap,
  Gaussian window, batch and forward settings, its input already on the device (favouring it);
  for the first setting also the tasks' default tiles (abutting, the receptive field as margin)
  against MONAI at its default overlap (0.25) with 512 px rois; then the shipped model through
  the default tiles with the tasks' default setting, whose forward FLOP/s is the rate behind
  --dry-run's hours (`EFFECTIVE_FLOPS` in deepem3d/stages/inference.py). Each of our rows
  gives `tflops`: 2 x the conv multiply-adds of every forward it ran, per second.
- determinism: two fresh processes per setting predict one volume; whether their bytes agree
  (cuDNN autotuning picks kernels by timing), and whether four blocks equal one call.
- training: `Trainer.batches()` + `Trainer.step()` (the training loop without its checkpoints)
  with 0 and several batch-preparing workers, against the bare step on one batch already on the
  device, and one batch's preparation time in one process (with the bare step's rate: how many
  workers keep up). The Trainer reads the sample from memory here (its file readers need
  cloud-volume).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepem3d.models import train as training  # noqa: E402
from deepem3d.models.network import build_model, count_macs  # noqa: E402
from deepem3d.models.sliding import (  # noqa: E402
    ModelPredictor,
    PatchGeometry,
    Stats,
    abutting_tiles,
    predict_volume,
    quantize_tensor,
)

ROWS: list[dict] = []


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def packed(name: str) -> np.ndarray:
    with lzma.open(ROOT / "deepem3d" / "data" / "isbi2012" / f"{name}.npy.xz") as raw:
        return np.load(io.BytesIO(raw.read()), allow_pickle=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call, the mean of `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


# part: [(name, ModelPredictor keywords, plus "graph", "compile" and "timed_deterministic")];
# "form": the inference form (BatchNorms folded, the 3D part as 2D convolutions, the side
# outputs' transposed convolutions as matrix products: deepem3d.models.inference_form)
SETTINGS = {
    "forward": [
        ("float32", {"amp": False}),
        ("float16 (default)", {}),
        ("float16 form", {"fused": True}),
        ("float16 channels-last", {"channels_last": True}),
        ("bfloat16 form", {"fused": True, "amp_dtype": "bfloat16"}),
        ("bfloat16 channels-last", {"amp_dtype": "bfloat16", "channels_last": True}),
        ("float16 form + CUDA graph", {"fused": True, "graph": True}),
    ],
    # kernels chosen by timing: the first calls of each shape can take minutes, so these run
    # in a part of their own, after the others. "timed deterministic": cuDNN times only its
    # deterministic algorithms (same bytes twice in a process; another process may time
    # another one the fastest)
    "autotune": [
        ("float16 form, timed deterministic", {"fused": True, "timed_deterministic": True}),
        ("float16 form autotune", {"fused": True, "autotune": True}),
        ("float16 autotune", {"autotune": True}),
        ("bfloat16 autotune channels-last", {"autotune": True, "channels_last": True,
                                             "amp_dtype": "bfloat16"}),
    ],
    "compile": [("float16 form + compile", {"fused": True, "compile": True})],
}


def cuda_graph(forward, x: torch.Tensor):
    """`forward` replayed from a captured CUDA graph (static input and output buffers)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = forward(static_x)

    def replay(batch: torch.Tensor) -> torch.Tensor:
        static_x.copy_(batch)
        graph.replay()
        return static_y

    return replay


def forward_rows(args, device: torch.device, part: str = "forward") -> None:
    batch, size = (16, 512) if not args.quick else (2, 128)
    presets = ("full", "small") if not args.quick else ("tiny",)
    if part != "forward":
        presets = presets[:1]
    for preset in presets:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        x = torch.randint(0, 256, (batch, 5, size, size), generator=generator,
                          dtype=torch.uint8).to(device)
        flops = 2.0 * count_macs(build_model(preset, "affinity", 5).config, size) * batch
        reference = None
        settings = SETTINGS[part] if device.type == "cuda" else SETTINGS["forward"][:1]
        for name, keywords in settings:
            keywords = dict(keywords)
            graph, compiled = keywords.pop("graph", False), keywords.pop("compile", False)
            timed_deterministic = keywords.pop("timed_deterministic", False)
            torch.manual_seed(0)
            model = build_model(preset, "affinity", 5).to(device).eval()
            reset_memory(device)
            predictor = ModelPredictor(model, device, **keywords)
            if timed_deterministic:
                torch.backends.cudnn.benchmark = True
            forward = predictor.predict_tensor
            try:
                start = time.perf_counter()
                if compiled:
                    predictor.model = torch.compile(predictor.model)
                    forward(x)
                if graph:
                    forward = cuda_graph(forward, x)
                setup = time.perf_counter() - start
                slow = not predictor.amp and device.type == "cuda"  # the float32 reference
                seconds = timed(lambda f=forward, b=x: f(b), device, 1 if slow else args.repeats,
                                warmup=1 if slow else 2)
                first, second = forward(x).clone(), forward(x).clone()
            except Exception as err:  # a setting this torch or chip lacks: say so, go on
                emit({"part": "forward", "preset": preset, "setting": name,
                      "error": error_text(err)})
                continue
            if reference is None:
                reference = first.float()
            emit({"part": "forward", "preset": preset, "setting": name,
                  "batch": f"{batch}x5x{size}^2", "ms": round(1000 * seconds, 2),
                  "tflops": round(flops / seconds / 1e12, 4),
                  "same_bytes_twice": bool(torch.equal(first, second)),
                  "max_abs_diff_vs_float32": None if part != "forward"
                  else float((first.float() - reference).abs().max()),
                  "setup_s": round(setup, 1), "peak_gib": peak_gib(device)})
            del predictor, model, forward
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def sample_volume(args) -> np.ndarray:
    image = packed("image")
    if args.quick:  # the smoke test: each tile row predicts 256 px plus margins per section
        return np.ascontiguousarray(image[:3, :256, :256])
    return np.ascontiguousarray(np.tile(image[:30], (1, 2, 2)))  # 30 x 1024 x 1024


def warm_up_sections(args, full: int = 6) -> int:
    """Sections of the untimed first call (cuDNN's and the allocator's first calls): `full`,
    or one in the smoke test."""
    return 1 if args.quick else full


def volume_repeats(args) -> int:
    """Timed runs per inference row: at most 3, since each predicts a whole volume (2.4 s for
    the full preset on an H200), so that the part's five rows fit its --part-timeout."""
    return max(1, min(args.repeats, 3))


def error_text(err: BaseException) -> str:
    """An exception as one short line of a row (first line of its message)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


def inference_rows(args, device: torch.device, part: str = "inference") -> None:
    """The shipped model's `--dry-run` rate first (what EFFECTIVE_FLOPS waits for); then per
    setting the patch grid against MONAI on the same patches, and for the first setting the
    tasks' default tiles against MONAI at its default overlap (0.25). A setting or run that
    fails is an error row; the others go on."""
    image = sample_volume(args)
    if part == "inference":
        try:
            shipped_rate_row(args, device, image)
        except Exception as err:  # noqa: BLE001  (said in its row; the rest still runs)
            emit({"part": "inference", "method": "--dry-run's rate", "error": error_text(err)})
    preset = "full" if not args.quick else "tiny"
    size, output, overlap, batch = (512, 384, 64, 16) if not args.quick else (128, 96, 16, 2)
    patches = PatchGeometry(size=size, output=output, overlap=overlap, batch=batch)
    monai_default = PatchGeometry(size=size, output=size, overlap=size // 4, batch=batch)
    settings = ([("float16 (default)", {}), ("float16 form", {"fused": True})]
                if device.type == "cuda" else [("float32 form (default)", {})])
    if part == "autotune":
        settings = ([("float16 form autotune", {"fused": True, "autotune": True})]
                    if device.type == "cuda" else [])
    for index, (name, keywords) in enumerate(settings):
        torch.manual_seed(0)
        model = build_model(preset, "affinity", 5).to(device).eval()
        try:
            predictor = ModelPredictor(model, device, **keywords)
        except Exception as err:  # noqa: BLE001  (a setting this torch or chip lacks)
            emit({"part": "inference", "setting": name, "error": error_text(err)})
            continue
        runs = [("patches", patches, patches)]
        if index == 0 and part == "inference":
            tiles = abutting_tiles(max(image.shape[1:]), max(model.context[:2]),
                                   divisor=model.divisor, batch=1)
            runs.append(("tiles (the tasks' default)", tiles, monai_default))
        for label, geometry, theirs in runs:
            reset_memory(device)  # each run's own peak (not the one before's, nor MONAI's)
            try:
                predict_volume(predictor, image[:warm_up_sections(args)], geometry,
                               quantized=True)  # warm-up
                ours = None
                for _ in range(volume_repeats(args)):
                    stats = Stats()
                    sync(device)
                    start = time.perf_counter()
                    out = predict_volume(predictor, image, geometry, stats=stats,
                                         quantized=True)
                    seconds = time.perf_counter() - start
                    ours = seconds if ours is None else min(ours, seconds)
            except Exception as err:  # noqa: BLE001  (said in its row; the rest still runs)
                emit({"part": "inference", "method": f"deepem3d predict_volume, {label}",
                      "setting": name, "error": error_text(err)})
                continue
            emit({"part": "inference", "method": f"deepem3d predict_volume, {label}",
                  "setting": name, "geometry": f"{geometry.size} px in, {geometry.output} out, "
                  f"overlap {geometry.overlap}, batch {geometry.batch}",
                  "volume": "x".join(map(str, image.shape[::-1])), "seconds": round(ours, 3),
                  "mvoxel_per_s": round(image.size / ours / 1e6, 2),
                  "tflops": round(forward_flops(model, geometry, stats) / ours / 1e12, 4),
                  # the forward's share of the time only means something where calls block
                  "forward_share": round(stats.predict_seconds / stats.seconds, 3)
                  if device.type == "cpu" else None,
                  "peak_gib": peak_gib(device)})
            try:
                monai_seconds = monai_row(args, device, predictor, image, theirs, name, out)
            except Exception as err:  # noqa: BLE001
                emit({"part": "inference", "method": "MONAI sliding_window_inference",
                      "setting": name, "error": error_text(err)})
                continue
            if monai_seconds:
                emit({"part": "inference", "method": f"ratio deepem3d {label} / MONAI "
                      f"(overlap {1 - theirs.stride / theirs.size:g})", "setting": name,
                      "throughput": round(monai_seconds / ours, 2)})
        del predictor, model


def forward_flops(model, geometry: PatchGeometry, stats: Stats) -> float:
    """2 x every conv's multiply-adds of the module as trained, per forward item run."""
    return 2.0 * count_macs(model.config, geometry.size) * stats.patches


def shipped_rate_row(args, device: torch.device, image: np.ndarray) -> None:
    """The shipped model (small preset) through the tasks' default tiles with the tasks'
    default setting: its forward FLOP/s is `EFFECTIVE_FLOPS`, behind --dry-run's hours."""
    from deepem3d.models.checkpoint import load_model
    from deepem3d.models.shipped import DEFAULT_MODEL

    model, _ = load_model(DEFAULT_MODEL)
    predictor = ModelPredictor(model.to(device), device)
    reset_memory(device)
    image = image[:2] if args.quick else image
    tiles = abutting_tiles(max(image.shape[1:]), max(model.context[:2]), divisor=model.divisor,
                           batch=1)
    predict_volume(predictor, image[:warm_up_sections(args, 2)], tiles, quantized=True)
    best, stats = None, Stats()
    for _ in range(volume_repeats(args)):
        stats = Stats()
        sync(device)
        start = time.perf_counter()
        predict_volume(predictor, image, tiles, stats=stats, quantized=True)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    emit({"part": "inference", "method": f"deepem3d predict_volume, tiles, shipped "
          f"{DEFAULT_MODEL} (--dry-run's rate)", "setting": "default",
          "geometry": f"{tiles.size} px in, {tiles.output} out",
          "volume": "x".join(map(str, image.shape[::-1])), "seconds": round(best, 3),
          "mvoxel_per_s": round(image.size / best / 1e6, 2),
          "tflops": round(forward_flops(model, tiles, stats) / best / 1e12, 4),
          "peak_gib": peak_gib(device)})


def monai_row(args, device, predictor, image, geometry, name, ours) -> float | None:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        emit({"part": "inference", "method": "MONAI sliding_window_inference", "setting": name,
              "error": "MONAI is missing (carry its wheel: see docs/gpu.md)"})
        return None
    half = predictor.in_sections // 2
    padded = np.pad(image, ((half, half), (0, 0), (0, 0)), mode="reflect")
    stacks = np.stack([padded[z: z + 2 * half + 1] for z in range(image.shape[0])])
    # (Z, in_sections, Y, X): sections as MONAI's batch; float, as MONAI's buffers take its type
    inputs = torch.from_numpy(stacks).to(device).float()
    overlap = 1 - geometry.stride / geometry.size

    def run() -> torch.Tensor:
        with torch.no_grad():
            probs = sliding_window_inference(
                inputs, (geometry.size, geometry.size), geometry.batch,
                predictor.predict_tensor, overlap=overlap, mode="gaussian", sigma_scale=0.125,
                padding_mode="reflect")
        return quantize_tensor(probs).cpu()

    run()  # warm-up
    best = None
    for _ in range(volume_repeats(args)):
        sync(device)
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    diff = np.abs(out.numpy().transpose(1, 0, 2, 3).astype(int) - ours.astype(int))
    emit({"part": "inference", "method": "MONAI sliding_window_inference", "setting": name,
          "overlap": round(overlap, 3), "seconds": round(best, 3),
          "mvoxel_per_s": round(image.size / best / 1e6, 2),
          "mean_abs_diff_uint8": round(float(diff.mean()), 3)})
    return best


def preparation_seconds(trainer, count: int) -> float:
    """Seconds to draw one batch in this process (sampling, augmentation, targets): what
    each batch-preparing worker spends per batch."""
    cfg = trainer.cfg
    data = training.IterationBatches(trainer.sampler, cfg.seed, cfg.batch_size, count + 1)
    data[0]
    start = time.perf_counter()
    for i in range(1, count + 1):
        data[i]
    return (time.perf_counter() - start) / count


def training_rows(args, device: torch.device) -> None:
    image, ids = packed("image"), packed("neuron_ids").astype(np.int64)
    preset, batch, patch = ((args.train_preset, args.train_batch, args.train_patch)
                            if not args.quick else ("tiny", 2, 64))
    iterations = args.train_iterations if not args.quick else 4
    training.load_pair = lambda *a: (image, ids)  # in memory: the file readers need cloud-volume
    workers = [0, *args.workers] if not args.quick else [0, 2]
    if device.type == "cuda":  # the Trainer runs with torch's cuDNN defaults
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = False
    for count in [None, *workers]:  # None: the bare step
        with tempfile.TemporaryDirectory() as out:
            n = iterations if count != 0 else max(2, iterations // 4)
            cfg = training.TrainConfig(
                image="sample", labels="sample", train_sections=(0, 30), val_sections=None,
                out_dir=out, preset=preset, head="affinity", iterations=n + 3,
                batch_size=batch, patch=patch, workers=count or 0)
            trainer = training.Trainer(cfg, device=str(device), progress=False)
            reset_memory(device)
            if count is None:
                images, targets = trainer.batches().__next__()
                images, targets = images.to(device), targets.to(device)
                seconds = timed(lambda t=trainer, i=images, g=targets: t.step(i, g), device, n,
                                warmup=3)
                rate = 1 / seconds
                prepare = preparation_seconds(trainer, max(2, n // 4))
                emit({"part": "training", "preset": preset, "batch": f"{batch}x{patch}^2",
                      "loop": "batch preparation, one process",
                      "ms_per_batch": round(1000 * prepare, 1),
                      "workers_to_keep_up": math.ceil(prepare * rate)})
            else:
                batches = trainer.batches()
                for _ in range(3):  # warm-up: workers started, first batches in
                    trainer.step(*next(batches))
                sync(device)
                start = time.perf_counter()
                for images, targets in batches:
                    trainer.step(images, targets)
                sync(device)
                rate = n / (time.perf_counter() - start)
            emit({"part": "training", "preset": preset, "batch": f"{batch}x{patch}^2",
                  "loop": "bare step" if count is None else f"Trainer, {count} workers",
                  "it_per_s": round(rate, 2), "samples_per_s": round(rate * batch, 1),
                  "peak_gib": peak_gib(device)})
    bare = next(r["it_per_s"] for r in ROWS if r.get("loop") == "bare step")
    for row in [r for r in ROWS if str(r.get("loop", "")).startswith("Trainer")]:
        emit({"part": "training", "loop": f"ratio {row['loop']} / bare step",
              "ratio": round(row["it_per_s"] / bare, 2)})


DETERMINISM_SETTINGS = {"float16": {}, "float16-form": {"fused": True}}


def determinism_child(args, device: torch.device) -> None:
    """In a fresh process: the sha256 of one volume's uint8 map, and whether predicting it as
    four blocks gives the same bytes as one call (the seam-free contract on this device)."""
    import hashlib

    from deepem3d.models.sliding import input_box, predict_block

    image = sample_volume(args)[:8]
    geometry = (PatchGeometry(size=512, output=384, overlap=64, batch=16) if not args.quick
                else PatchGeometry(size=128, output=96, overlap=16, batch=2))
    torch.manual_seed(0)
    model = build_model("full" if not args.quick else "tiny", "affinity", 5).to(device).eval()
    predictor = ModelPredictor(model, device, **DETERMINISM_SETTINGS[args.child])
    whole = predict_volume(predictor, image, geometry, quantized=True)
    shape = image.shape
    half_y, half_x = shape[1] // 2, shape[2] // 2
    chunked = np.empty_like(whole)
    for y0, y1 in ((0, half_y), (half_y, shape[1])):
        for x0, x1 in ((0, half_x), (half_x, shape[2])):
            block = ((0, y0, x0), (shape[0], y1, x1))
            lo, hi = input_box(predictor, block, shape, geometry)
            part = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            chunked[:, :, y0:y1, x0:x1] = predict_block(predictor, part, lo, block, shape,
                                                        geometry, quantized=True)
    print(json.dumps({"sha256": hashlib.sha256(whole.tobytes()).hexdigest()[:16],
                      "chunked_equal": bool(np.array_equal(whole, chunked))}))


def determinism_rows(args, device: torch.device) -> None:
    import subprocess

    # the smoke test's one setting shows the part works
    for name in list(DETERMINISM_SETTINGS)[:1] if args.quick else DETERMINISM_SETTINGS:
        results = []
        for _ in range(2):
            cmd = [sys.executable, __file__, "--device", str(device), "--child", name,
                   *(["--quick"] if args.quick else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:  # (a child killed for memory says nothing on stderr)
                said = done.stderr.strip().splitlines()
                results.append({"error": said[-1][:160] if said else f"exit {done.returncode}"})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        hashes = [r.get("sha256") for r in results]
        emit({"part": "determinism", "setting": name, "processes": results,
              # failed children are no evidence of the same bytes
              "same_bytes_across_processes": None not in hashes and len(set(hashes)) == 1})


PARTS = {"forward": forward_rows, "inference": inference_rows, "training": training_rows,
         "determinism": determinism_rows,
         "autotune": lambda args, device: (forward_rows(args, device, "autotune"),
                                           inference_rows(args, device, "autotune")),
         "compile": lambda args, device: forward_rows(args, device, "compile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the smoke test)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 14],
                        help="batch-preparing worker counts to time (besides 0)")
    parser.add_argument("--train-iterations", type=int, default=40)
    parser.add_argument("--train-preset", default="full")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-patch", type=int, default=256)
    parser.add_argument("--parts", nargs="+", default=["forward", "inference", "training"],
                        choices=list(PARTS), help="what to run, in order ('autotune': cuDNN "
                        "autotuned forwards and inference, 'compile': a torch.compile forward; "
                        "both can take minutes before their first result)")
    parser.add_argument("--part-timeout", type=float, default=240,
                        help="seconds each part may run (in a process of its own) before it "
                        "is stopped; its rows so far are kept")
    parser.add_argument("--child", choices=list(DETERMINISM_SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return determinism_child(args, torch.device(args.device))
    if args.quick:
        args.repeats = 1  # the smoke test: every row once
    device = torch.device(args.device)
    if args.in_process:  # one part, in the process its parent started for it
        if device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads()))
        for part in args.parts:
            PARTS[part](args, device)
        return None
    emit({"part": "machine", "device": str(device), "torch": torch.__version__,
          "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    start = time.perf_counter()
    for part in args.parts:
        run_part(part, args)
    emit({"part": "total", "seconds": round(time.perf_counter() - start, 1)})


def run_part(part: str, args) -> None:
    """One part in a fresh process (its own cuDNN settings, GPU memory and compile caches), its
    rows relayed as they come; stopped after --part-timeout seconds, so that one part whose
    first autotuned call takes minutes cannot spend a timed machine's whole time."""
    import subprocess
    import threading

    # this command's own options; the last --parts is the one argparse keeps
    cmd = [sys.executable, __file__, *sys.argv[1:], "--parts", part, "--in-process"]
    with tempfile.TemporaryFile("w+") as errors:
        # a session of its own, so that stopping it also stops its children (the determinism
        # part's processes, DataLoader workers), which would skew the next part's timings
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT,
                                start_new_session=True)
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(args.part_timeout, stop)
        timer.start()
        for line in proc.stdout:
            if line.startswith("{"):
                emit(json.loads(line))
        proc.wait()
        timer.cancel()
        errors.seek(0)
        lines = errors.read().strip().splitlines()
    if stopped.is_set():
        emit({"part": part, "error": f"stopped after {args.part_timeout:g} s (--part-timeout)"
              "; the rows above are what it gave"})
    elif proc.returncode:
        emit({"part": part, "error": (lines or [f"exit status {proc.returncode}"])[-1][:200]})


if __name__ == "__main__":
    main()
