"""What a segmentation's tasks cost: peak bytes and seconds of each stage's largest task.

Models fitted to measurements (each constant says which), for `--dry-run`'s table, the
planner's `--max-task-memory` check and the queue routing by memory. `SegmentCosts` is the
part of `stages.segmentation.SegmentPlan` that applies them to a plan's geometry: a block task
scales with its block and halo; an octree node task (the reduce's, the agglomeration's) with
the faces of its children inside the region, computed per kind of node so that planning a
petavoxel of 10^8 blocks stays instant. Nothing here reads or writes storage.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# Peak bytes per voxel of the largest block task, above a worker's imports, measured by
# benchmarks/segmentation.py on uint8 affinity maps: up to 68 (region-graph, 128^3 block of a
# white-noise map with 0.3 graph edges per voxel), 19 (remap) on a smooth map with 0.02.
# A float32 map adds 4 bytes per channel and voxel.
BYTES_PER_VOXEL = 70
# Peak bytes per voxel (and channel) of a smooth task's box with its halo: the uint8 map and
# three float64 arrays at once (scipy's output, np.rint's and np.clip's: smooth_map); a float32
# map read adds its own 4. Measured (markers' peak_added_mib, `deepem3d segment --parallel 1`,
# a 512 x 512 x 20 affinity map in 64 x 64 x 10 chunks, 256^2 and 512^2 x 20 blocks, sigma 4
# and 16): 25.1-25.3 per voxel and channel of the box read for uint8, 29.2-29.4 for float32.
# It was 17 (and + 12 for float32): the smooth tasks of uint8 affinity maps measured above
# their plan (107 MiB against 103, 147 against 143, where the block model was the larger)
SMOOTH_BYTES_PER_VOXEL = 27
SMOOTH_FLOAT_BYTES_PER_VOXEL = 4
# Peak bytes of an agglomeration octree node task: NODE_BASE_BYTES + these per region-graph
# edge its children hand it (at level 0, its block's graph). Fitted above the peak RSS of the
# task's work (reading its children, the kernel, its stored result) by
# benchmarks/agglomerate_nodes.py on white-noise affinities (192^3 in 48^3 blocks, 0.16-3.0
# million edges per node), bytes per edge above 38 MiB at levels 0, 1 and 2: 224, 206, 261
# (mean, 1 - mean affinity 0.5), 341, 284, 312 (0.95: merged edge lists grow), 92, 169, 135
# (watershed 0.19). Before the node joined its children column by column, freeing each as it
# went, and its kernel reused its queue's slots, the same runs gave 321-330, 379-395 and
# 171-269 (the constants were 400 and 270). The kernel alone, as benchmarks/segmentation.py
# traces it on level-0 tasks, is 199-252 and 79.
NODE_BYTES_PER_EDGE = {"mean": 360, "watershed": 190}
NODE_BASE_BYTES = 64 * 2**20
# Region-graph edges per voxel: 0.0186 on benchmarks/segmentation.py's synthetic cells (a smooth
# map), 0.3 on its ISBI map (white noise on the ground truth), 0.35 on a noisy 96^3 synthetic map;
# the shipped model's real maps 0.14-0.29 (below). The plan sizes tasks for real maps by
# default: sized for a smooth one, the upper octree nodes of a real run needed ten times what
# was planned (vnc_gerhard2013: 750 MiB against 77), and a cluster worker's pod is killed for
# memory, retried and set aside without a word of why.
SMOOTH_EDGES_PER_VOXEL = 0.02
NOISY_EDGES_PER_VOXEL = 0.3
DEFAULT_EDGES_PER_VOXEL = NOISY_EDGES_PER_VOXEL
# What an octree node hands its parent: about this many voxels deep of edges along its faces
# (residual edges / (face voxels x edges per voxel), the largest node of each level, mean 0.5
# and 0.9, watershed 0.19): 9.0 to 13.7 for nodes of 16^3 to 128^3 voxels of
# benchmarks/segmentation.py's smooth cell map (128^3 and 256^3, 0.017-0.018 edges per voxel);
# 3.4 to 4.6 on a noisy 96^3 map (0.35 edges per voxel). Not growing with the node: the
# residual follows the area of the faces. But on the shipped model's map of vnc_gerhard2013
# (1177 x 1177 x 20 at 4 nm, 0.27-0.29 edges per voxel, mean 0.55 after sigma 4; 256^3 to
# 1024-voxel nodes) 42 to 67: there large merged segments reach the faces and stay open (71-97%
# of a block's voxels); on its map of the ISBI sample (256 x 256 x 10 in 64 x 64 x 10 blocks,
# 0.14 edges per voxel) 29 and 39. Real maps are that dense (the demo's: 0.16), so from
# DENSE_MAP_EDGES_PER_VOXEL up the plan takes the real map's depth
RESIDUAL_SHELL_VOXELS = 14
DENSE_RESIDUAL_SHELL_VOXELS = 64
DENSE_MAP_EDGES_PER_VOXEL = 0.1

#: what one task of each stage costs on one core, per voxel of its block, for --dry-run's
#: core-hours: measured on the demo's run (`deepem3d run isbi2012-demo`: ISBI 2012
#: affinities, 512 x 512 x 30 in one block, sigma 4, mean 0.55; this project's 2-core
#: machine), task seconds read from the markers; the reduce's
#: figure is the single reduce task's per voxel of the region, before its octree replaced it
SECONDS_PER_VOXEL = {
    "smooth": 300e-9, "halo": 10e-9, "supervoxels": 200e-9, "reduce": 3e-9, "tables": 3e-9,
    "region-graph": 46e-9, "remap": 30e-9,
}
# The single agglomerate task's seconds per voxel on that run, before the octree replaced it:
# a node's estimate is its share, per voxel of its block(s) at level 0 (the higher levels hold
# only their children's residuals; not yet measured apart)
AGGLOMERATE_SECONDS_PER_VOXEL = 290e-9
# Peak bytes of a reduce node task: A x its children's face voxels inside the region (their
# unresolved nodes, about 0.17 per face voxel, packed, and the node's own arrays over them) +
# B x the largest child's (a child's face table is read whole, one child at a time) + C x its
# own outer face voxels (handed up, sorted) + at level 0 D x the voxels of its block (the
# block's exits: an entry per local label). Fitted above the peak RSS of reduce node tasks'
# work (reading its inputs, the node, its stored results) on benchmarks/segmentation.py's
# smooth cell map (256^3 in 64^3 and 128^3 blocks, 384^3 in 96^3: the root 27.3 MB for 880,136
# face voxels, the model 31.2) and on white-noise affinities (128^3 in 32^3 blocks, 192^3 in
# 96^3); tracemalloc saw about 2/3 of it
REDUCE_BYTES_PER_FACE_VOXEL = 28
REDUCE_BYTES_PER_CHILD_FACE_VOXEL = 60
REDUCE_BYTES_PER_OUTER_FACE_VOXEL = 70
REDUCE_LEAF_BYTES_PER_VOXEL = 26


class SegmentCosts:
    """The cost model of a segmentation plan, inherited by `SegmentPlan`, whose geometry it
    reads: `bounds`, `task_shape`, `block_extent`, `octree`, `method`, `kind`, `map_dtype`,
    `sigma` and `smoothed`."""

    def _axis_nodes(self, level: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Per node coordinate of `level` along `axis`: (extent in voxels, open sides: how
        many of its two faces on that axis lie inside the region)."""
        cuts = self.octree.cuts(level, axis) * self.task_shape[axis]
        size = int(self.bounds.size3()[axis])
        low, high = cuts[:-1], np.minimum(cuts[1:], size)
        return high - low, (low > 0).astype(np.int64) + (high < size)

    def _axis_classes(self, level: int, axis: int) -> set[tuple]:
        """The distinct kinds of node coordinate along `axis` at `level`: (extent, open sides,
        children's extents summed, their open sides summed, their distinct (extent, open
        sides)); a level-0 node is its own child. A node's face voxels are a sum of products
        of these per axis, so the largest over every node is the largest over the product of
        the axes' kinds: a handful, however many nodes (10^8 blocks at 1 Pvox)."""
        extent, open_sides = self._axis_nodes(level, axis)
        if level == 0:
            return {(e, o, e, o, ((e, o),)) for e, o in zip(extent.tolist(), open_sides.tolist())}
        below_e, below_o = self._axis_nodes(level - 1, axis)
        first = np.searchsorted(self.octree.cuts(level - 1, axis), self.octree.cuts(level, axis))
        kinds = set()
        for p, (e, o) in enumerate(zip(extent.tolist(), open_sides.tolist())):
            kids = slice(int(first[p]), int(first[p + 1]))
            pairs = tuple(sorted(set(zip(below_e[kids].tolist(), below_o[kids].tolist()))))
            kinds.add((e, o, int(below_e[kids].sum()), int(below_o[kids].sum()), pairs))
        return kinds

    def _face_extremes(self, level: int) -> list[tuple[int, int, int]]:
        """For every kind of node of `level`: (its face voxels inside the region, its
        children's, its largest child's); at level 0 a block is its own child."""
        out = []
        for x, y, z in itertools.product(*(self._axis_classes(level, a) for a in range(3))):
            own = _faces((x[0], y[0], z[0]), (x[1], y[1], z[1]))
            children = _faces((x[2], y[2], z[2]), (x[3], y[3], z[3]))
            largest = max(_faces((a[0], b[0], c[0]), (a[1], b[1], c[1]))
                          for a, b, c in itertools.product(x[4], y[4], z[4]))
            out.append((own, children, largest))
        return out

    def node_faces(self, level: int) -> int:
        """The largest face voxel count inside the region of a node of `level`: what it
        hands its parent at most."""
        return max(own for own, _, _ in self._face_extremes(level))

    def largest_faces(self, level: int) -> int:
        """Face voxels inside the region that the largest node of `level` holds: its
        children's (at level 0, the block's own)."""
        return max(children for _, children, _ in self._face_extremes(level))

    def reduce_memory_bytes(self, level: int) -> int:
        """Peak bytes of the largest reduce node task of `level` (its model: see
        REDUCE_BYTES_PER_FACE_VOXEL)."""
        peak = max(REDUCE_BYTES_PER_FACE_VOXEL * children
                   + REDUCE_BYTES_PER_CHILD_FACE_VOXEL * largest
                   + REDUCE_BYTES_PER_OUTER_FACE_VOXEL * own
                   for own, children, largest in self._face_extremes(level))
        leaf = REDUCE_LEAF_BYTES_PER_VOXEL * math.prod(self.block_extent) if level == 0 else 0
        return int(peak) + leaf

    def node_memory_bytes(self, level: int, edges_per_voxel: float) -> int:
        """Peak bytes of the largest octree node task at `level`: a block's whole graph at
        level 0; above, its children's residuals: a shell along each child's faces inside the
        region (a face on the region's edge has nothing open)."""
        per_edge = NODE_BYTES_PER_EDGE[self.method]
        if level == 0:
            edges = edges_per_voxel * math.prod(self.block_extent)
        else:
            node = math.prod(int(self._axis_nodes(level, a)[0].max()) for a in range(3))
            depth = (DENSE_RESIDUAL_SHELL_VOXELS if edges_per_voxel >= DENSE_MAP_EDGES_PER_VOXEL
                     else RESIDUAL_SHELL_VOXELS)
            edges = edges_per_voxel * min(node, self.largest_faces(level) * depth)
        return int(NODE_BASE_BYTES + per_edge * edges)

    @property
    def task_memory_bytes(self) -> int:
        """Peak bytes of the largest block task (a model measured by the benchmark)."""
        channels = 1 if self.kind == "boundary" else 3
        float_map = self.map_dtype == "float32"
        # the smoothed layer that the later stages read is uint8
        per_voxel = BYTES_PER_VOXEL + (4 * channels if float_map and not self.smoothed else 0)
        from deepem3d.segmentation.chunks import SUPERVOXEL_HALO
        from deepem3d.segmentation.smoothing import smoothing_halo

        low, high = SUPERVOXEL_HALO[self.kind]
        extent = self.block_extent
        peak = per_voxel * math.prod(e + low + high for e in extent)
        if self.smoothed:
            halo = 2 * smoothing_halo(self.sigma)
            box = (extent[0] + halo) * (extent[1] + halo) * extent[2]
            read = SMOOTH_FLOAT_BYTES_PER_VOXEL if float_map else 0
            per_voxel = channels * (SMOOTH_BYTES_PER_VOXEL + read)
            peak = max(peak, per_voxel * box)
        return peak


def _faces(extent, open_sides) -> int:
    """Face voxels inside the region of a box of `extent` with `open_sides` inner faces per
    axis: per axis, the area across it times its open sides."""
    x, y, z = extent
    return int(y * z * open_sides[0] + x * z * open_sides[1] + x * y * open_sides[2])
