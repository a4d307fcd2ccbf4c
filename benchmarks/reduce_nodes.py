"""The reduce's node tasks: peak memory per level against the planner's model.

    python benchmarks/reduce_nodes.py [--size 384] [--block 96] [--map cells|noise]

Builds a map (`cells`: benchmarks/segmentation.py's smooth Voronoi cell map; `noise`: white-noise
uint8 affinities, the worst case for basins and plateaus), runs the supervoxel tasks' kernel per
block and then every reduce node of the octree as its task does: read its children's stored
`nodes` part, their `faces` one child at a time, decide, store its three parts (npz bytes in
memory, not files). Per level it prints the largest node's peak RSS above the process just
before it (Linux VmHWM, reset per node; tracemalloc would miss numba's arrays), the face voxels
it held (its children's, its largest child's, its own outer ones) and the peak the planner
predicts from them (`SegmentPlan.reduce_memory_bytes`'s constants), with the ratio.
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segmentation import cell_map  # noqa: E402  (the benchmark next to this one)

from deepem3d.memory import peak_rss, reset_peak  # noqa: E402
from deepem3d.segmentation import octree_reduce as reduce  # noqa: E402
from deepem3d.segmentation.chunks import as_map, chunk_grid  # noqa: E402
from deepem3d.segmentation.octree import Octree  # noqa: E402
from deepem3d.segmentation.supervoxels import (  # noqa: E402
    SUPERVOXEL_HALO,
    ChunkExits,
    supervoxel_chunk,
)
from deepem3d.stages import segment_costs as costs  # noqa: E402


def save(arrays: dict) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def load(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as npz:
        return {name: npz[name] for name in npz.files}


def make_map(kind: str, size: int) -> np.ndarray:
    """`cells`: the smooth cell map of benchmarks/segmentation.py; `noise`: white-noise uint8
    affinities (x, y, z, 3)."""
    if kind == "cells":
        return cell_map(size)
    rng = np.random.default_rng(0)
    return np.asfortranarray(rng.integers(0, 256, (size,) * 3 + (3,), np.uint8))


def worst_per_level(tree: Octree, run_node: Callable[[int, tuple], tuple]
                    ) -> Iterator[tuple[int, tuple]]:
    """Per level, (level, (peak RSS, *what run_node returned)) of its node of largest peak:
    `run_node(level, node)` does one node's work as its task does."""
    for level in range(tree.height + 1):
        worst = None
        for node in tree.nodes(level):
            gc.collect()
            base = reset_peak()
            row = run_node(level, node)
            peak = peak_rss() - base
            if worst is None or peak > worst[0]:
                worst = (peak, *row)
        yield level, worst


def model(total: int, largest: int, outer: int, block_voxels: int) -> int:
    return (costs.REDUCE_BYTES_PER_FACE_VOXEL * total
            + costs.REDUCE_BYTES_PER_CHILD_FACE_VOXEL * largest
            + costs.REDUCE_BYTES_PER_OUTER_FACE_VOXEL * outer
            + costs.REDUCE_LEAF_BYTES_PER_VOXEL * block_voxels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--block", type=int, default=96)
    parser.add_argument("--map", choices=("cells", "noise"), default="cells")
    args = parser.parse_args()
    start = time.perf_counter()
    values, kind = as_map(make_map(args.map, args.size))
    step = [args.block] * 3
    chunks = chunk_grid(values.shape[:3], step)
    low, high = SUPERVOXEL_HALO[kind]
    stored: dict = {}
    blocks = [tuple(o // s for o, s in zip(c.offset, step)) for c in chunks]
    for chunk, block in zip(chunks, blocks):
        origin, _ = chunk.bounds(low, high)
        exits = supervoxel_chunk(values[chunk.slices(low, high)], origin, chunk)[1]
        stored["exits", block] = save(exits.to_arrays())
    del values
    dataset = [args.size] * 3
    tree = Octree.of([math.ceil(d / s) for d, s in zip(dataset, step)], step)
    index = {b: i for i, b in enumerate(blocks)}
    shape = np.asarray(step)
    first = ChunkExits.from_arrays(load(stored["exits", blocks[0]]))  # numba's code loaded
    reduce.reduce_node([reduce.reduce_leaf(first, 0)], [0, 0, 0], step, dataset)  # once, first
    del first

    def run_node(level: int, node: tuple) -> tuple:
        if level == 0:
            exits = ChunkExits.from_arrays(load(stored["exits", node]))
            children = [reduce.reduce_leaf(exits, index[node])]
            faces = [len(exits.face_index)]
            del exits
        else:
            children, faces = [], []
            for child in tree.children(level, node):
                arrays = load(stored[level - 1, child, "nodes"])
                faces.append(int(arrays["face_count"]))
                children.append(reduce.residual_from_arrays(arrays, lambda c=child, lv=level:
                    reduce.faces_from_arrays(load(stored[lv - 1, c, "faces"]))))
            del arrays
        lo, hi = tree.bounds(level, node)
        resolved, residual = reduce.reduce_node(
            children, (lo * shape).tolist(), np.minimum(hi * shape, dataset).tolist(), dataset)
        for part, arrays in reduce.reduce_arrays(resolved, residual).items():
            stored[level, node, part] = save(arrays)
        outer = len(residual.face_table())
        voxels = math.prod(step) if level == 0 else 0
        return model(sum(faces), max(faces), outer, voxels), sum(faces), max(faces), outer

    print(f"{args.map} map {args.size}^3 in {args.block}^3 blocks, {len(blocks)} blocks, "
          f"{tree.height + 1} levels (built in {time.perf_counter() - start:.0f} s); peak "
          "RSS of the largest node per level:")
    print(f"{'level':>5}{'nodes':>7}{'peak MiB':>10}{'faces':>10}{'largest':>10}{'outer':>10}"
          f"{'model MiB':>11}{'model/peak':>12}")
    for level, (peak, predicted, total, largest, outer) in worst_per_level(tree, run_node):
        print(f"{level:>5}{len(tree.nodes(level)):>7}{peak / 2**20:>10.2f}{total:>10}"
              f"{largest:>10}{outer:>10}{predicted / 2**20:>11.2f}{predicted / peak:>12.2f}")


if __name__ == "__main__":
    main()
