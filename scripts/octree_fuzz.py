"""Fuzz the octree agglomeration against the global one: `segment_chunked == segment`.

Each seed draws a small uint8 map (boundary or affinity; white noise, few-valued noise with
many ties, or smooth bowls with plateaus), a block shape, a method and threshold, dust
settings and the tree's shape (BINARY_ABOVE), and compares the two results bit for bit.
Run: python scripts/octree_fuzz.py --seeds 10000. tests/test_octree.py runs the first seeds of
the same draw.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from deepem3d.segmentation import octree
from deepem3d.segmentation.pipeline import segment, segment_chunked


def draw(seed: int) -> dict:
    """One random case: the map and the settings."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(2, 13)), int(rng.integers(2, 13)), int(rng.integers(1, 7)))
    kind = rng.choice(["noise", "levels", "smooth"])
    channels = (3,) if rng.random() < 0.5 else ()
    if kind == "noise":
        m = rng.integers(0, 256, shape + channels)
    elif kind == "levels":
        m = rng.choice(np.array([0, 40, 128, 200, 255]), shape + channels)
    else:
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        centres = rng.integers(0, np.maximum(shape, 1), (int(rng.integers(1, 6)), 3))
        d = np.min(np.linalg.norm(grid[..., None, :] - centres, axis=-1), axis=-1)
        m = np.minimum(255, (d * rng.integers(10, 60)) // 8 * 8)
        if channels:
            m = np.repeat(255 - m[..., None], 3, axis=-1)
    block = tuple(int(rng.integers(1, s + 1)) for s in shape)
    method = str(rng.choice(["mean", "watershed"]))
    threshold = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0]))
    dust = int(rng.choice([0, 0, 2, 5, 12, 40]))
    mode = str(rng.choice(["merge", "merge", "zero"]))
    # the tree: eight children per node at these sizes, or two above 0, 4 or 8 voxels a side
    binary_above = int(rng.choice([octree.BINARY_ABOVE, 0, 4, 8]))
    return dict(map=np.asfortranarray(m.astype(np.uint8)), block=block, method=method,
                threshold=threshold, dust_size=dust, dust_mode=mode, binary_above=binary_above)


def check(seed: int) -> str | None:
    """None if the octree equals the global run for this seed, else what differed."""
    case = draw(seed)
    settings = dict(dust_size=case["dust_size"], dust_mode=case["dust_mode"])
    want = segment(case["map"], case["method"], case["threshold"], **settings)
    default, octree.BINARY_ABOVE = octree.BINARY_ABOVE, case["binary_above"]
    try:
        got = segment_chunked(case["map"], case["block"], case["method"], case["threshold"],
                             **settings)
    finally:
        octree.BINARY_ABOVE = default
    if np.array_equal(want, got):
        return None
    return (f"seed {seed}: map {case['map'].shape} block {case['block']} {case['method']} "
            f"{case['threshold']} dust {case['dust_size']} {case['dust_mode']} binary above "
            f"{case['binary_above']}: "
            f"{int(np.sum(want != got))} voxels differ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10000)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    failed = [m for s in range(args.first, args.first + args.seeds) if (m := check(s))]
    for line in failed:
        print(line)
    print(f"{args.seeds} seeds from {args.first}: {len(failed)} differ "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
