"""Per preset: parameters, FLOPs per output voxel, training iterations/s and inference
voxels/s on this machine, beside the same run's measured torch matmul FLOP/s, so the distance
to the machine's limit reads as a ratio.

    python benchmarks/models.py [--presets tiny,small,full] [--threads N] [--device auto|cpu|cuda]
                                [--batch-size 4] [--patch-size 128] [--infer-size 320] [--amp]
"""

from __future__ import annotations

import argparse
import time

import torch

from deepem3d.models import build_model
from deepem3d.models.losses import balanced_cross_entropy
from deepem3d.models.network import parameter_counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a dense float32 n x n matmul: the machine's practical peak for this run."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def timed(fn, device: torch.device, seconds: float = 5.0, warmup: int = 2) -> float:
    """Mean seconds per call over at least `seconds` of calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    sync(device)
    return (time.perf_counter() - start) / calls


def bench(preset: str, device: torch.device, batch: int, patch: int, infer_size: int,
          amp: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, in_sections=5).to(device)
    params = parameter_counts(model)["total"]
    flops_voxel = model.flops_per_output_voxel(size=infer_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = model.normalize(torch.randint(0, 256, (batch, 1, 5, patch, patch), device=device).float())
    t = torch.randint(0, 2, (batch, patch, patch), device=device)

    def train_step():
        optimizer.zero_grad()
        with torch.autocast(device.type, enabled=amp, dtype=torch.float16):
            logits = model(x)
        balanced_cross_entropy(logits.float(), t).backward()
        optimizer.step()

    model.train()
    step = timed(train_step, device)
    xi = model.normalize(
        torch.randint(0, 256, (1, 1, 5, infer_size, infer_size), device=device).float()
    )
    model.eval()

    @torch.no_grad()
    def infer():
        with torch.autocast(device.type, enabled=amp, dtype=torch.float16):
            model(xi)

    forward = timed(infer, device)
    voxels_per_s = infer_size**2 / forward
    train_flops = 3 * flops_voxel * batch * patch**2 / step  # forward + ~2x for backward
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "preset": preset, "params": params, "flops_voxel": flops_voxel, "train_it_s": 1 / step,
        "infer_voxels_s": voxels_per_s, "infer_flops": voxels_per_s * flops_voxel,
        "train_flops": train_flops, "gpu_mem_gib": mem,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small,full")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when this machine has it")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch")
    parser.add_argument("--patch-size", type=int, default=128, help="training patch, px")
    parser.add_argument("--infer-size", type=int, default=320)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    peak = matmul_flops(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"matmul {peak / 1e9:.1f} GFLOP/s (float32); train batch {args.batch_size} x 5 x "
          f"{args.patch_size}^2, inference 5 x {args.infer_size}^2{', amp' if args.amp else ''}")
    header = (f"{'preset':<6} {'params':>11} {'FLOP/voxel':>11} {'train it/s':>10} "
              f"{'train/peak':>10} {'infer vox/s':>12} {'infer/peak':>10} {'GPU GiB':>8}")
    print(header)
    for preset in args.presets.split(","):
        r = bench(preset, device, args.batch_size, args.patch_size, args.infer_size, args.amp)
        print(f"{r['preset']:<6} {r['params']:>11,} {r['flops_voxel']:>11,.0f} "
              f"{r['train_it_s']:>10.2f} {r['train_flops'] / peak:>10.2f} "
              f"{r['infer_voxels_s']:>12,.0f} {r['infer_flops'] / peak:>10.2f} "
              f"{r['gpu_mem_gib']:>8.2f}")


if __name__ == "__main__":
    main()
