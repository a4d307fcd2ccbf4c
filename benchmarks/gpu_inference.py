"""Patch-grid inference throughput on whatever device is here: the FLOP/s behind --dry-run's
hours (`deepem3d.stages.inference.EFFECTIVE_FLOPS`), measured the way an InferenceTask
predicts (deepem3d.models.sliding.predict_volume, fixed batch, float16 autocast on CUDA).

Needs only torch and numpy (runs on a bare accelerator machine from the repository root):

    python benchmarks/gpu_inference.py [--sections 30] [--repeats 2] [--batch-size 4]

Prints one JSON line per model: voxels/s, patches/s and patch FLOP/s (2 x multiply-adds of
every conv per patch, as network.count_macs counts them), with the same run's torch matmul
FLOP/s beside it as the peer figure.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepem3d.models.checkpoint import load_model  # noqa: E402
from deepem3d.models.network import build_model, count_macs  # noqa: E402
from deepem3d.models.sliding import ModelPredictor, PatchGeometry, Stats, predict_volume  # noqa: E402,I001


def sample_image(sections: int) -> np.ndarray:
    packed = ROOT / "deepem3d" / "data" / "isbi2012" / "image.npy.xz"
    with lzma.open(packed) as raw:
        return np.load(io.BytesIO(raw.read()), allow_pickle=False)[:sections]


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start, count = time.perf_counter(), 10
    for _ in range(count):
        a @ b
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, model, image, geometry, device, repeats: int) -> dict:
    predictor = ModelPredictor(model.to(device), device)
    predict_volume(predictor, image[: model.in_sections + 1], geometry)  # warm-up
    best = None
    for _ in range(repeats):
        stats = Stats()
        sync(device)
        start = time.perf_counter()
        predict_volume(predictor, image, geometry, stats=stats)
        sync(device)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    flops = 2.0 * count_macs(model.config, geometry.size) * stats.patches
    return {"model": name, "device": str(device), "seconds": round(best, 3),
            "voxels_per_s": image.size / best, "patches": stats.patches,
            "patch_flops_per_s": flops / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--no-full", action="store_true", help="skip the full preset")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = False
    image = sample_image(args.sections)
    geometry = PatchGeometry(size=args.patch_size, output=args.patch_size * 3 // 4,
                             overlap=args.patch_size // 8, batch=args.batch_size)
    peer_dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "matmul_flops_per_s":
                      matmul_flops(device, peer_dtype, 8192 if device.type == "cuda" else 1024),
                      "matmul_dtype": str(peer_dtype)}), flush=True)
    models = [("isbi2012-small-affinity", load_model("isbi2012-small-affinity")[0])]
    if not args.no_full:
        torch.manual_seed(0)
        models.append(("full (random weights)", build_model("full", "affinity", 5)))
    for name, model in models:
        print(json.dumps(measure(name, model, image, geometry, device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
