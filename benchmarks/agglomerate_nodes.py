"""The agglomeration's octree node tasks: peak memory per level against the planner's model.

    python benchmarks/agglomerate_nodes.py [--size 192] [--block 48] [--map noise|cells]
                                           [--method mean] [--threshold 0.5]

Builds a map (`noise`: white-noise uint8 affinities, about 0.3 region-graph edges per voxel;
`cells`: benchmarks/segmentation.py's smooth cell map, about 0.02), the blocks' region graphs
and faces (the chunk stages in memory), then runs every node of the agglomeration's octree as
its task does: read its children's stored results (npz bytes in memory, not files), combine,
agglomerate, store. Per level it prints the largest node's peak RSS above the process just
before it (Linux VmHWM, reset per node), the region-graph edges its children handed it, the
bytes per edge, and what the planner's model (`NODE_BASE_BYTES` + `NODE_BYTES_PER_EDGE` per
edge) says for those edges, with its ratio to the peak.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reduce_nodes import load, make_map, save, worst_per_level  # noqa: E402  (next to this)

from deepem3d.segmentation.octree import (  # noqa: E402
    BlockFaces,
    Octree,
    Residual,
    agglomerate_node,
    node_arrays,
    node_from_arrays,
)
from deepem3d.segmentation.pipeline import chunk_stages  # noqa: E402
from deepem3d.stages.segment_costs import NODE_BASE_BYTES, NODE_BYTES_PER_EDGE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--block", type=int, default=48)
    parser.add_argument("--map", choices=("cells", "noise"), default="noise")
    parser.add_argument("--method", choices=("mean", "watershed"), default="mean")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    start = time.perf_counter()
    affinities = make_map(args.map, args.size)
    step = [args.block] * 3
    chunks, labels, tables, graphs = chunk_stages(affinities, step)
    del affinities
    blocks = [tuple(o // s for o, s in zip(c.offset, step)) for c in chunks]
    leaves = {b: (g, BlockFaces.of(lab, t))
              for b, g, lab, t in zip(blocks, graphs, labels, tables)}
    del labels, tables, graphs
    tree = Octree.of([math.ceil(args.size / s) for s in step], step)
    stored: dict = {}
    first = blocks[0]  # numba's code loaded once, before anything is measured
    agglomerate_node([Residual.of_block(*leaves[first], first)], tree.bounds(0, first),
                     tree.grid, args.method, args.threshold)
    planner = NODE_BYTES_PER_EDGE[args.method]
    print(f"{args.map} map {args.size}^3 in {args.block}^3 blocks, {args.method} "
          f"{args.threshold}, {tree.height + 1} levels (built in "
          f"{time.perf_counter() - start:.0f} s); peak RSS of the largest node per level:")
    print(f"{'level':>5}{'nodes':>7}{'peak MiB':>10}{'edges':>10}{'regions':>10}"
          f"{'B/edge':>8}{'model MiB':>11}{'model/peak':>12}")
    def run_node(level: int, node: tuple) -> tuple:
        if level == 0:
            children = [Residual.of_block(*leaves[node], node)]
        else:
            children = [node_from_arrays(load(stored[level - 1, c])).residual
                        for c in tree.children(level, node)]
        edges = sum(c.ru.size for c in children)
        regions = sum(c.ids.size for c in children)
        result = agglomerate_node(children, tree.bounds(level, node), tree.grid, args.method,
                                  args.threshold)
        stored[level, node] = save(node_arrays(result))
        return edges, regions

    for level, (peak, edges, regions) in worst_per_level(tree, run_node):
        model = NODE_BASE_BYTES + planner * edges
        print(f"{level:>5}{len(tree.nodes(level)):>7}{peak / 2**20:>10.1f}{edges:>10}"
              f"{regions:>10}{peak / max(edges, 1):>8.0f}{model / 2**20:>11.1f}"
              f"{model / peak:>12.2f}")


if __name__ == "__main__":
    main()
