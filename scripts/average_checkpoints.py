"""Average the weights of several checkpoints of one training run (stochastic weight averaging,
Izmailov et al. 2018), then re-estimate the BatchNorm statistics of the averaged network on
training patches (an average of weights is not the average of their statistics).

    python scripts/average_checkpoints.py OUT.pt RUN/ckpt-a.pt RUN/ckpt-b.pt ... \
        --image FILE.h5:/raw --labels FILE.h5:/labels/neuron_ids --train-sections 0:15

The checkpoints must hold the same network. OUT.pt is a training checkpoint (no optimizer)
with the last one's meta, plus `training.averaged` (the iterations averaged, the batches the
statistics were estimated on); `export_checkpoint` makes it shippable.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deepem3d.models import build_model
from deepem3d.models.checkpoint import load_checkpoint, save_checkpoint
from deepem3d.models.data import PatchSampler, load_pair, parse_sections


def _at_least_one(text: str) -> int:
    """--batches: with none, the statistics stay reset (mean 0, variance 1), not estimated."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1 batch estimates the statistics")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--image", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--train-sections", required=True)
    parser.add_argument("--batches", type=_at_least_one, default=200,
                        help="training batches to estimate BatchNorm statistics on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    payloads = [load_checkpoint(path) for path in args.checkpoints]
    meta = payloads[-1]["meta"]
    if any(p["meta"]["model"] != meta["model"] for p in payloads):
        raise SystemExit("the checkpoints hold different networks")
    model = build_model(**meta["model"])
    state = {}
    for name, value in payloads[-1]["state_dict"].items():
        if value.is_floating_point() and "running_" not in name:
            state[name] = sum(p["state_dict"][name].float() for p in payloads) / len(payloads)
        else:
            state[name] = value
    model.load_state_dict(state)

    config = meta["model"]
    image, ids = load_pair(args.image, args.labels,
                           parse_sections(args.train_sections, "--train-sections"),
                           "--train-sections")
    sampler = PatchSampler(image, ids, in_sections=config["in_sections"],
                           patch=meta["training"]["config"]["patch"], head=config["head"],
                           name=f"--train-sections {args.train_sections}")
    batch_size = meta["training"]["config"]["batch_size"]
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the batches below
    model.train()
    start = time.time()
    with torch.no_grad():
        for k in range(args.batches):
            images, _ = sampler.batch(np.random.default_rng([args.seed, k]), batch_size)
            model(model.normalize(torch.from_numpy(images)))
    model.eval()
    iterations = [int(p["iteration"]) for p in payloads]
    meta["training"]["averaged"] = {
        "iterations": iterations, "sha256": [p["sha256"] for p in payloads],
        "batchnorm_batches": args.batches, "batchnorm_sections": args.train_sections,
        "batchnorm_seed": args.seed,
    }
    save_checkpoint(args.out, model, meta, iteration=max(iterations))
    print(f"averaged iterations {iterations}; BatchNorm statistics from {args.batches} batches "
          f"in {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
