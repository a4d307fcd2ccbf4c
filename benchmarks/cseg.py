"""deepem3d.storage.cseg beside the reference compressed_segmentation encoder (what CloudVolume
calls) on the same 64^3 uint64 chunks: milliseconds per chunk and their ratio, the two timed
alternately in this process (this VM's speed drifts between minutes), and a check that the
bytes are the same.

Chunks: a segmentation of Voronoi cells (about 32 voxels across, ids above 2^32: what the remap
stage writes), and blocks of 20, 40 and 2^40 (white noise) distinct values each.

    python benchmarks/cseg.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cloudvolume import chunks

from deepem3d.segmentation.synthetic import voronoi_cells
from deepem3d.storage import cseg

BLOCK = (8, 8, 8)


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels, _, _ = voronoi_cells((64, 64, 64), 32, seed=1)
    ids = labels.astype(np.uint64) * np.uint64(2**33 + 7)
    out = {"cells, 32 voxels across": ids}
    for name, high in (("20 values a block", 20), ("40 values a block", 40),
                       ("white noise", 2**40)):
        out[name] = rng.integers(0, high, (64, 64, 64)).astype(np.uint64)
    return {k: np.asfortranarray(v) for k, v in out.items()}


def reference(array: np.ndarray) -> bytes:
    return chunks.encode(array[..., np.newaxis], "compressed_segmentation", BLOCK)


def ours(array: np.ndarray) -> bytes:
    return cseg.encode(array, BLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{'64^3 uint64 chunk':<26}{'reference ms':>13}{'deepem3d ms':>13}{'ratio':>7}"
          f"{'same bytes':>11}")
    for name, array in inputs().items():
        same = ours(array) == reference(array)  # also compiles the kernels
        times: dict = {reference: [], ours: []}
        for _ in range(args.repeats):
            for encode in (reference, ours):
                start = time.perf_counter()
                encode(array)
                times[encode].append(time.perf_counter() - start)
        theirs_ms, ours_ms = (1e3 * float(np.median(times[f])) for f in (reference, ours))
        print(f"{name:<26}{theirs_ms:>13.2f}{ours_ms:>13.2f}{theirs_ms / ours_ms:>7.2f}"
              f"{str(same):>11}")
        if not same:
            raise SystemExit(f"deepem3d.storage.cseg's bytes differ from the reference's on {name}")


if __name__ == "__main__":
    main()
