"""Agglomeration over a tree of blocks, equal to the global run bit for bit.

The global agglomeration (`deepem3d.segmentation.agglomeration`) holds the whole region graph.
Here each node of a tree over the blocks (the octree, by name) holds only what its
children could not decide: a node reads its children's residual graphs, adds nothing else
(every contact record lives in some block, so the children's residuals hold every edge the node
can need), decides every merge it can prove the global run makes, and hands its parent the
rest. The root has nothing frozen, so it finishes the global run. Why each decision is the
global one is written down, rule by rule, in docs/octree.md; the rules in brief:

- A supervoxel is *open* at a node when a block outside the node mentions it (as a node or an
  edge end of that block's graph): its size, floor and edges are incomplete there. A region
  holding an open supervoxel is *frozen* and merges nothing at that node.
- mean: edges are taken in (score, tie) order as in the global run; an edge whose turn comes
  with a frozen end freezes both ends and is left for the parent. A region never frozen is
  final when its node is done.
- watershed: edges in (saddle, (u, v)) order, once each; an edge met with a frozen end freezes
  both ends and is left for the parent.
- dust (a second sweep over the segments): a segment is open below the node where it became
  final; a dust segment is decided only when no frozen neighbour could come before it, and a
  region's id is kept with the times its parts joined (`DustRegion.history`), so a parent reads
  each region as it was at the moment it looks.

Then down: each node hands each child the segment ids of that child's residual regions, so a
block ends with the segment of every supervoxel it holds, read from its own slices of its
ancestors' decisions; no task holds a table of the whole volume.

Names: a region is named by the supervoxel that makes it open (it holds one at most), else by
its smallest supervoxel id, which is the segment id it gets. Arrays are numpy; nothing here
reads or writes storage.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from deepem3d.segmentation.agglomeration import Method, _mean, _watershed
from deepem3d.segmentation.region_graph import RegionGraph

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = [
    "BlockFaces",
    "DustResidual",
    "Octree",
    "Residual",
    "agglomerate_node",
    "dust_leaf",
    "dust_node",
    "octree_dust",
    "octree_segments",
]

Shape3 = tuple[int, int, int]
_U64 = np.uint64


# --------------------------------------------------------------------------- the octree


@functools.cache
def _halvings(count: int) -> tuple[np.ndarray, ...]:
    """An axis of `count` blocks cut in halves again and again: entry d holds the interval
    boundaries after d halvings ([0, count] first, one per block last); an interval of n
    blocks splits into ceil(n / 2) and floor(n / 2), one of one block stays whole."""
    cuts = [np.array([0, count], np.int64)]
    while np.any(np.diff(cuts[-1]) > 1):
        low, high = cuts[-1][:-1], cuts[-1][1:]
        middle = low + (high - low + 1) // 2
        cuts.append(np.unique(np.concatenate([cuts[-1], middle[high - low > 1]])))
    for c in cuts:
        c.flags.writeable = False  # shared by every caller (cached)
    return tuple(cuts)


# The longest side, in voxels, of a node that may have up to 2 x 2 x 2 children; a larger one
# has two. Eight children make fewer levels, each handing its shell of frozen regions up once:
# benchmarks/scale.py (128^3 blocks) measured 190, 227 and 229 ns per voxel at 256^3, 512^3
# and 1024^3 with eight children per node, and 262, 314 and 373 with two. Two children hold
# one plane of faces instead of three: the largest node of a 10,000^3 plan needs 19.1 GiB, not
# 56.4. A node of 2048 voxels a side with eight children is planned at about 3.6 GiB at 0.02
# edges per voxel (docs/octree.md).
BINARY_ABOVE = 2048


@dataclass(frozen=True)
class Octree:
    """Levels of nodes over a grid of blocks: level 0 is the blocks, the last level one root.

    Balanced, from the root down: each step halves every node along one axis, the axis whose
    nodes are then longest in voxels (ties: x, then y, then z), until every node is one block,
    so nodes stay near cubes, whose faces (what a node holds) are smallest for their volume.
    Where the parent nodes are at most BINARY_ABOVE voxels a side, consecutive steps along
    distinct axes make one level (up to 2 x 2 x 2 children: fewer levels); above it, each step
    is a level (two children: one plane of faces, not three). Thin blocks (512, 512, 64) are
    paired along z at the lowest levels until their nodes are cubes (docs/octree.md).

    `depths[L]` is how many times each axis has been halved from the root to level L.
    """

    grid: Shape3
    depths: tuple[Shape3, ...]

    @classmethod
    def of(cls, grid: Sequence[int], block_shape: Sequence[int],
           binary_above: int | None = None) -> Octree:
        counts = [int(g) for g in grid]
        extent = [int(b) for b in block_shape]
        if len(counts) != 3 or min(counts) < 1 or len(extent) != 3 or min(extent) < 1:
            raise ValueError(f"grid {grid} and block shape {block_shape}: 3 entries >= 1 each")
        limit = BINARY_ABOVE if binary_above is None else int(binary_above)
        cuts = [_halvings(c) for c in counts]

        def longest(depth: Shape3) -> list[int]:  # per axis, the largest node's extent in voxels
            return [int(np.diff(c[d]).max()) * e for c, d, e in zip(cuts, depth, extent)]

        steps = [(0, 0, 0)]
        while any(d + 1 < len(c) for d, c in zip(steps[-1], cuts)):
            sides = [s if d + 1 < len(c) else -1
                     for s, d, c in zip(longest(steps[-1]), steps[-1], cuts)]
            axis = sides.index(max(sides))
            steps.append(tuple(d + (a == axis) for a, d in enumerate(steps[-1])))
        levels = [steps[-1]]  # bottom up: the blocks first
        for depth in reversed(steps[:-1]):
            below = levels[-2] if len(levels) > 1 else None
            if (below is not None and max(longest(depth)) <= limit
                    and all(b - d <= 1 for b, d in zip(below, depth))):
                levels[-1] = depth  # one level of up to 2 x 2 x 2 children
            else:
                levels.append(depth)
        return cls(tuple(counts), tuple(levels))  # type: ignore[arg-type]

    @property
    def height(self) -> int:
        """The root's level."""
        return len(self.depths) - 1

    @property
    def factors(self) -> tuple[Shape3, ...]:
        """Per level, how many of its nodes a parent holds at most per axis."""
        return tuple(tuple(1 + b - a for a, b in zip(up, down))  # type: ignore[misc]
                     for down, up in zip(self.depths, self.depths[1:]))

    def cuts(self, level: int, axis: int) -> np.ndarray:
        """The boundaries of the nodes of `level` along `axis`, in blocks: [0, ..., grid]."""
        return _halvings(self.grid[axis])[self.depths[level][axis]]

    def shape(self, level: int) -> Shape3:
        """Nodes per axis at `level`."""
        return tuple(len(self.cuts(level, a)) - 1 for a in range(3))  # type: ignore[return-value]

    def nodes(self, level: int) -> list[Shape3]:
        sx, sy, sz = self.shape(level)
        return [(x, y, z) for z in range(sz) for y in range(sy) for x in range(sx)]

    def bounds(self, level: int, node: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The blocks under `node`: [low, high) grid coordinates per axis."""
        cuts = [self.cuts(level, a) for a in range(3)]
        low = np.array([c[n] for c, n in zip(cuts, node)], np.int64)
        high = np.array([c[n + 1] for c, n in zip(cuts, node)], np.int64)
        return low, high

    def node_of(self, level: int, blocks: np.ndarray) -> np.ndarray:
        """The node of `level` holding each block (n, 3) grid coordinates."""
        blocks = np.asarray(blocks, np.int64).reshape(-1, 3)
        return np.stack([np.searchsorted(self.cuts(level, a), blocks[:, a], side="right") - 1
                         for a in range(3)], axis=1)

    def children(self, level: int, node: Sequence[int]) -> list[Shape3]:
        """The level-(level - 1) nodes under `node`."""
        low, high = self.bounds(level, node)
        ranges = []
        for a in range(3):
            below = self.cuts(level - 1, a)
            first = int(np.searchsorted(below, low[a]))
            ranges.append(range(first, int(np.searchsorted(below, high[a]))))
        return [(x, y, z) for z in ranges[2] for y in ranges[1] for x in ranges[0]]

    def level_of(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Per row, the lowest level with one node over blocks `low` ... `high` (n, 3)."""
        low = np.asarray(low, np.int64).reshape(-1, 3)
        high = np.asarray(high, np.int64).reshape(-1, 3)
        out = np.full(low.shape[0], self.height, np.int64)
        for level in range(self.height - 1, -1, -1):
            one = np.all(self.node_of(level, low) == self.node_of(level, high), axis=1)
            out[one] = level
        return out


_FAR = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class BlockFaces:
    """Which supervoxels a block holds (`inside`, sorted ids) and which lie on each of its
    faces (`faces`: -x, +x, -y, +y, -z, +z, sorted ids): all a node needs to know which
    supervoxels are open at it. A supervoxel that a block outside the node mentions either
    lies on one of the node's faces (it crosses it, or a record across it names it) or has no
    voxel in the node at all."""

    inside: np.ndarray
    faces: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, labels: np.ndarray, table: np.ndarray) -> BlockFaces:
        """From a block's local labels (x, y, z) and its local label -> supervoxel table."""
        table = np.asarray(table, _U64)
        faces = []
        for axis in range(3):
            for end in (0, labels.shape[axis] - 1):
                plane = np.take(labels, end, axis=axis)
                faces.append(np.unique(table[np.unique(plane)]))
        return cls(np.unique(table[np.unique(labels)]), tuple(faces))


# --------------------------------------------------------------------------- sweep 1: regions


@dataclass(frozen=True, eq=False)
class Residual:
    """What an octree node leaves its parent: its frozen regions and their edges.

    Regions: `ids` (uint64, sorted): a region's name, the id of the supervoxel that makes it
    open (it holds one at most) or else its smallest id; `min_ids`: its smallest supervoxel id
    (its segment id once final); for the supervoxel that names it: `voxels`, whether it has a
    voxel in the node's blocks, and `touch_low`, `touch_high` (n, 3): per axis, the lowest
    (highest) block coordinate where it lies on the block's low (high) face (far out where
    none; `open_at` reads them; an unnamed region is never open again); `sizes` (voxels
    counted so far); `floors`
    (uint8, lowest floor) and `deepest` (uint64: the supervoxel id where the floor is attained,
    the smallest such). Edges: region ends `ru` < `rv`, and `tie_u`, `tie_v`: the first (u, v)
    supervoxel pair among the edge's contacts (mean: the edges between two regions are one,
    summed; watershed: each supervoxel pair stays one edge, taken once), `count`,
    `affinity_sum` (uint64), `saddle` (uint8).
    """

    ids: np.ndarray
    min_ids: np.ndarray
    voxels: np.ndarray
    touch_low: np.ndarray
    touch_high: np.ndarray
    sizes: np.ndarray
    floors: np.ndarray
    deepest: np.ndarray
    ru: np.ndarray
    rv: np.ndarray
    tie_u: np.ndarray
    tie_v: np.ndarray
    count: np.ndarray
    affinity_sum: np.ndarray
    saddle: np.ndarray

    @classmethod
    def of_block(cls, graph: RegionGraph, faces: BlockFaces, block: Sequence[int]) -> Residual:
        """A block's graph as a leaf (`block`: its grid coordinates): every supervoxel it
        mentions is a region of its own."""
        ids = np.unique(np.concatenate([graph.ids, graph.u, graph.v]))
        at = np.searchsorted(ids, graph.ids)
        sizes = np.zeros(ids.size, _U64)
        sizes[at] = graph.sizes
        floors = np.full(ids.size, 255, np.uint8)
        floors[at] = graph.floors
        touch_low = np.full((ids.size, 3), _FAR, np.int64)
        touch_high = np.full((ids.size, 3), -1, np.int64)
        for axis in range(3):
            touch_low[np.isin(ids, faces.faces[2 * axis]), axis] = block[axis]
            touch_high[np.isin(ids, faces.faces[2 * axis + 1]), axis] = block[axis]
        return cls(ids, ids.copy(), np.isin(ids, faces.inside), touch_low, touch_high, sizes,
                   floors, ids.copy(), graph.u, graph.v, graph.u, graph.v, graph.count,
                   graph.affinity_sum, graph.saddle)

    def open_at(self, low: np.ndarray, high: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        """Which regions are open at the node over blocks [low, high) of a `grid`."""
        inner_low = low > 0
        inner_high = high < np.asarray(grid, np.int64)
        on_face = ((self.touch_low == low) & inner_low) | ((self.touch_high == high - 1)
                                                           & inner_high)
        return ~self.voxels | on_face.any(axis=1)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in vars(self).values())


def _first_of_runs(*keys: np.ndarray) -> np.ndarray:
    """Start positions of runs of equal rows in keys sorted together."""
    n = keys[0].size
    new = np.ones(n, bool)
    if n:
        new[1:] = np.zeros(n - 1, bool)
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(new)


#: a residual's edge columns, in the order `Residual` and `_group_edges` take them
_EDGE_FIELDS = ("ru", "rv", "tie_u", "tie_v", "count", "affinity_sum", "saddle")
_REGION_FIELDS = ("ids", "min_ids", "voxels", "touch_low", "touch_high", "sizes", "floors",
                  "deepest")


def _group_edges(columns: list[np.ndarray], method: str) -> list[np.ndarray]:
    """Edges of equal key as one: mean by region pair, watershed by supervoxel pair.

    `columns` (`_EDGE_FIELDS`) is sorted and grouped in place, one column at a time, so that
    no more than one column is held twice (the caller passes its only reference)."""
    ru, rv, tu, tv = columns[:4]
    order = np.lexsort((tv, tu, rv, ru) if method == "mean" else (tv, tu))
    del ru, rv, tu, tv
    for i in range(len(columns)):
        columns[i] = columns[i][order]
    del order
    starts = _first_of_runs(*(columns[:2] if method == "mean" else columns[2:4]))
    if starts.size == columns[0].size:
        return columns
    for i in range(4):
        columns[i] = columns[i][starts]
    columns[4] = np.add.reduceat(columns[4], starts)
    columns[5] = np.add.reduceat(columns[5], starts)
    columns[6] = np.minimum.reduceat(columns[6], starts)
    return columns


def _group_regions(name, min_id, voxels, touch_low, touch_high, sizes, floors, deepest):
    """Regions of equal name as one: sizes summed, the lowest (floor, deepest), the smallest
    id; the naming supervoxel's faces joined (a name met in several children is the same
    supervoxel in each)."""
    order = np.lexsort((deepest, floors, name))
    starts = _first_of_runs(name[order])
    if not name.size:
        return name, min_id, voxels, touch_low, touch_high, sizes, floors, deepest
    return (name[order][starts], np.minimum.reduceat(min_id[order], starts),
            np.logical_or.reduceat(voxels[order], starts),
            np.minimum.reduceat(touch_low[order], starts, axis=0),
            np.maximum.reduceat(touch_high[order], starts, axis=0),
            np.add.reduceat(sizes[order], starts), floors[order][starts], deepest[order][starts])


def _combine(residuals: list[Residual], method: str) -> tuple[Residual, dict]:
    """Children's residuals as one graph: a region met in several children (named by the same
    open supervoxel in each) sums its sizes and takes the lowest floor; equal edges combine.
    Returns the regions (a Residual without edges) and the edge columns by name.

    The list is emptied and each child's columns dropped as they are joined, so that, unless
    the caller keeps the children elsewhere, the children and their join are never held
    whole at once (a node's peak: benchmarks/agglomerate_nodes.py)."""
    parts = [dict(vars(r)) for r in residuals]
    residuals.clear()

    def joined(name: str) -> np.ndarray:
        return np.concatenate([p.pop(name) for p in parts])

    nodes = _group_regions(*(joined(name) for name in _REGION_FIELDS))
    edges = _group_edges([joined(name) for name in _EDGE_FIELDS], method)
    none = np.zeros(0, _U64)
    return (Residual(*nodes, none, none, none, none, none, none, np.zeros(0, np.uint8)),
            dict(zip(_EDGE_FIELDS, edges)))


@dataclass(frozen=True, eq=False)
class NodeResult:
    """An octree node's decisions: the names of its children's regions (`names`) and the name
    of the region each is in now (`renamed`), the regions that are `final` here (named by
    their segment ids) with their `final_sizes`, and the residual for the parent."""

    names: np.ndarray
    renamed: np.ndarray
    final: np.ndarray
    final_sizes: np.ndarray
    residual: Residual


def agglomerate_node(
    children: list[Residual],
    blocks: tuple[np.ndarray, np.ndarray],
    grid: Sequence[int],
    method: Method,
    threshold: float,
) -> NodeResult:
    """One octree node over `blocks` ([low, high) of a `grid`): combine the children,
    agglomerate with the regions open here frozen; docs/octree.md says why every merge it
    makes is the global run's. The list `children` is emptied as they are combined, so that,
    unless the caller keeps them elsewhere, their arrays are freed as they are joined (a
    node's peak memory: benchmarks/agglomerate_nodes.py)."""
    if method not in ("mean", "watershed"):
        raise ValueError(f"method must be 'mean' or 'watershed', not {method!r}")
    g, edge = _combine(children, method)
    n = g.ids.size
    m = edge["ru"].size
    # int32 node indices (the kernel holds below 2**31), the region ends dropped once they
    # are indices, and the uint64 sums viewed, not copied, as the kernel's int64: 40 bytes
    # less per edge while it runs
    index = np.int32 if n < 2**31 else np.int64
    ea = np.searchsorted(g.ids, edge.pop("ru")).astype(index)
    eb = np.searchsorted(g.ids, edge.pop("rv")).astype(index)
    is_open = g.open_at(*blocks, grid)
    frozen = is_open.astype(np.uint8)
    if method == "mean":
        tie = np.empty(m, np.int64)
        tie[np.lexsort((edge["tie_v"], edge["tie_u"]))] = np.arange(m)
        label = _mean(n, ea, eb, np.asarray(edge["count"], _U64).view(np.int64),
                      np.asarray(edge["affinity_sum"], _U64).view(np.int64), tie,
                      np.asarray([threshold], np.float64), frozen)[0]
        del tie
        deferred = None
    else:
        order = np.lexsort((edge["tie_v"], edge["tie_u"], edge["saddle"]))
        deferred = np.zeros(m, np.uint8)
        label = _watershed(n, ea, eb, order, edge["saddle"], g.floors,
                           g.deepest.astype(np.int64), threshold * 255.0, frozen, deferred)
        del order
    # a region's new name: its open member's (one at most), else its smallest supervoxel id
    smallest = np.full(n, np.iinfo(np.uint64).max, _U64)
    np.minimum.at(smallest, label, g.min_ids)
    anchor = np.zeros(n, _U64)
    anchor[label[is_open]] = g.ids[is_open]
    has_anchor = np.zeros(n, bool)
    has_anchor[label[is_open]] = True
    name = np.where(has_anchor[label], anchor[label], smallest[label])
    # faces: the naming supervoxel's; a region without one is complete, never open again
    voxels = np.where(is_open, g.voxels, True)
    touch_low = np.where(is_open[:, None], g.touch_low, _FAR)
    touch_high = np.where(is_open[:, None], g.touch_high, -1)
    rname, rmin, rvoxels, rlow, rhigh, rsizes, rfloors, rdeepest = _group_regions(
        name, g.min_ids, voxels, touch_low, touch_high, g.sizes, g.floors, g.deepest)
    rfrozen = np.zeros(rname.size, bool)
    rfrozen[np.searchsorted(rname, name[frozen == 1])] = True
    # edges between frozen regions stay (mean: all of them; watershed: those not yet taken)
    a, b = name[ea], name[eb]
    keep = (frozen[ea] == 1) & (frozen[eb] == 1) & (a != b)
    del ea, eb
    if deferred is not None:
        keep &= deferred == 1
    a, b = a[keep], b[keep]
    columns = [np.minimum(a, b), np.maximum(a, b)]
    del a, b
    columns += [edge.pop(name)[keep] for name in _EDGE_FIELDS[2:]]
    edges = _group_edges(columns, method)
    f = rfrozen
    residual = Residual(rname[f], rmin[f], rvoxels[f], rlow[f], rhigh[f], rsizes[f], rfloors[f],
                        rdeepest[f], *edges)
    final = np.where(f, rname, rmin)[~f]
    return NodeResult(g.ids, np.where(frozen == 1, name, smallest[label]), final, rsizes[~f],
                      residual)


@dataclass
class BlockSegments:
    """A block's slice of the result: the ids it mentions (sorted) and, parallel, their
    segment ids, the level at which each segment became final (it is open below that level:
    the dust sweep's rule) and each segment's size (voxels)."""

    ids: np.ndarray
    segments: np.ndarray
    home_level: np.ndarray
    sizes: np.ndarray


#: a slice a node hands a child: names (sorted), segment ids, home levels, sizes
Slice = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
EMPTY_SLICE: Slice = (np.zeros(0, _U64), np.zeros(0, _U64), np.zeros(0, np.int64),
                      np.zeros(0, _U64))


def segments_of(result: NodeResult, level: int, above: Slice, names: np.ndarray) -> Slice:
    """The down pass at one node: for names of its children's regions (sorted), the segment
    id, home level and size, from the node's own result and its parent's slice `above`."""
    now = _rename(names, result.names, result.renamed)
    order = np.argsort(result.final)
    final, final_sizes = result.final[order], result.final_sizes[order]
    here = np.isin(now, final)
    seg, home, size = (np.empty(names.size, _U64), np.empty(names.size, np.int64),
                       np.empty(names.size, _U64))
    seg[here] = now[here]
    home[here] = level
    size[here] = _lookup_rows(final, (final_sizes,), now[here])[0]
    seg[~here], home[~here], size[~here] = _lookup_rows(above[0], above[1:], now[~here])
    return names, seg, home, size


def _lookup_rows(keys: np.ndarray, rows: tuple[np.ndarray, ...], needles: np.ndarray):
    at = np.searchsorted(keys, needles)
    if needles.size and (at.max() >= keys.size or np.any(keys[at] != needles)):
        raise ValueError("a name is missing from the slice its parent wrote")
    return tuple(r[at] for r in rows)


def _sweep_up(octree: Octree, levels: list[list[Shape3]], leaf: Callable, decide: Callable
              ) -> dict:
    """The up sweep both octree passes share: level 0 from `leaf(node)`, each node above from
    its children's residuals; `decide(children, level, node)` returns a result with a
    `residual`. Returns every node's result by (level, node)."""
    residual: dict = {}
    results: dict = {}
    for level, nodes in enumerate(levels):
        for node in nodes:
            if level == 0:
                children = [leaf(node)]
            else:
                children = [residual.pop((level - 1, c)) for c in octree.children(level, node)
                            if (level - 1, c) in residual]
            result = decide(children, level, node)
            results[level, node] = result
            residual[level, node] = result.residual
    return results


def _present(octree: Octree, blocks: Iterable[Shape3]) -> list[list[Shape3]]:
    """Per level, the nodes that hold at least one of `blocks`."""
    blocks = np.asarray(list(blocks), np.int64).reshape(-1, 3)
    return [sorted(set(map(tuple, octree.node_of(level, blocks).tolist())))
            for level in range(octree.height + 1)]


def octree_segments(
    octree: Octree,
    blocks: Sequence[Shape3],
    graphs: Sequence[RegionGraph],
    faces: Sequence[BlockFaces],
    method: Method,
    threshold: float,
) -> tuple[list[BlockSegments], list[int]]:
    """The agglomeration over the octree, as the tasks run it: up from the blocks' graphs and
    faces (one per block of `blocks`, grid coordinates) to the root, each node writing its
    residual for its parent; then down, each node handing each child the segments of that
    child's residual regions, to a slice per block. Returns the blocks' slices (their segment
    ids equal `agglomerate` on the merged graph) and the largest residual per level (bytes)."""
    levels = _present(octree, blocks)
    by_block = {tuple(b): (g, f) for b, g, f in zip(blocks, graphs, faces)}
    results = _sweep_up(
        octree, levels, lambda node: Residual.of_block(*by_block[node], node),
        lambda children, level, node: agglomerate_node(
            children, octree.bounds(level, node), octree.grid, method, threshold))
    largest = [max(results[level, n].residual.nbytes for n in nodes)
               for level, nodes in enumerate(levels)]
    # down: a node's slice covers its residual's names
    slices = {(octree.height, levels[-1][0]): EMPTY_SLICE}
    out = {}
    for level in range(octree.height, -1, -1):
        for node in levels[level]:
            result = results.pop((level, node))
            above = slices.pop((level, node))
            if level == 0:
                out[node] = BlockSegments(*segments_of(result, level, above, result.names))
                continue
            for child in octree.children(level, node):
                if (level - 1, child) in results:
                    names = results[level - 1, child].residual.ids
                    slices[level - 1, child] = segments_of(result, level, above, names)
    return [out[tuple(b)] for b in blocks], largest


def _rename(names: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """`names` through the mapping old -> new (old unique); names not among `old` stay."""
    if not old.size:
        return names
    order = np.argsort(old)
    old, new = old[order], new[order]
    at = np.minimum(np.searchsorted(old, names), old.size - 1)
    hit = old[at] == names
    out = names.copy()
    out[hit] = new[at[hit]]
    return out


# --------------------------------------------------------------------------- sweep 2: dust

Key = tuple[int, int]  # (size, id): the order in which dust segments are taken
_NEVER: Key = (-1, -1)


@dataclass
class DustRegion:
    """A region of segments in the dust sweep.

    `base`: the smallest id among the segments it started with; `history`: (key, id) of each
    region that joined it later, at the moment (the key of the joining region) it joined, so
    `id_at(t)` is its id as the global run sees it at t. `home`: the level at which the segment
    that names it became final (it is open below). `lower`: for a frozen region, a key before
    which it cannot be taken (its size so far, or the key at which it was frozen).
    """

    size: int
    base: int
    home: int
    history: list[tuple[Key, int]] = field(default_factory=list)
    lower: Key = _NEVER

    def current_id(self) -> int:
        return min([self.base] + [i for _, i in self.history])

    def id_at(self, t: Key) -> int:
        return min([self.base] + [i for k, i in self.history if k < t])


@dataclass
class DustResidual:
    """What a dust node leaves its parent: regions by anchor id (the open segment a frozen
    region holds, or the region's first id) and contact counts between them."""

    regions: dict[int, DustRegion]
    edges: dict[tuple[int, int], int]


def dust_leaf(graph: RegionGraph, block: BlockSegments) -> DustResidual:
    """A block's graph over segments: sizes and contacts counted in the block."""
    seg_of = dict(zip(block.ids.tolist(), block.segments.tolist()))
    home = dict(zip(block.segments.tolist(), block.home_level.tolist()))
    regions: dict[int, DustRegion] = {}
    for s in block.segments.tolist():
        regions.setdefault(s, DustRegion(0, s, home[s]))
    for sv, size in zip(graph.ids.tolist(), graph.sizes.tolist()):
        regions[seg_of[sv]].size += size
    edges: dict[tuple[int, int], int] = {}
    for u, v, c in zip(graph.u.tolist(), graph.v.tolist(), graph.count.tolist()):
        a, b = seg_of[u], seg_of[v]
        if a != b:
            key = (min(a, b), max(a, b))
            edges[key] = edges.get(key, 0) + c
    return DustResidual(regions, edges)


@dataclass
class DustResult:
    """A dust node's decisions: each region that joined another (`joined`: region -> the
    region it joined), the ids of the regions that are final here, and the residual."""

    joined: dict[int, int]
    final: dict[int, int]
    residual: DustResidual

    def id_of(self, anchor: int, above: dict[int, int]) -> int:
        """The down pass: the id after dust of a child's region, from this node's decisions
        and its parent's slice `above` (ids of this node's residual regions)."""
        while anchor in self.joined:
            anchor = self.joined[anchor]
        return self.final[anchor] if anchor in self.final else above[anchor]


def dust_node(children: Iterable[DustResidual], level: int, size: int) -> DustResult:
    """One octree node of the dust sweep; the rules and why they hold: docs/octree.md."""
    regions: dict[int, DustRegion] = {}
    counts: dict[tuple[int, int], int] = {}
    for child in children:
        for anchor, r in child.regions.items():
            have = regions.get(anchor)
            if have is None:
                regions[anchor] = DustRegion(r.size, r.base, r.home, list(r.history), r.lower)
            else:  # an open segment seen by several children
                have.size += r.size
                have.base = min(have.base, r.base)
                have.history += r.history
                have.lower = max(have.lower, r.lower)
        for key, c in child.edges.items():
            counts[key] = counts.get(key, 0) + c
    frozen = {a for a, r in regions.items() if r.home > level}
    for a, r in regions.items():
        r.lower = max(r.lower, (r.size, 0)) if a in frozen else _NEVER
    adj: dict[int, dict[int, int]] = {a: {} for a in regions}
    for (a, b), c in counts.items():
        adj[a][b] = c
        adj[b][a] = c

    def key(a: int) -> Key:
        return (regions[a].size, regions[a].current_id())

    def early(a: int, t: Key) -> bool:  # a frozen region that could be taken before t
        return a in frozen and regions[a].lower < t

    def uncertain(z: int, t: Key) -> bool:  # z's id could still drop before t
        return z in frozen or any(early(y, t) for y in adj[z])

    heap = [(*key(a), a) for a in regions if a not in frozen and regions[a].size < size]
    heapq.heapify(heap)
    joined = {}
    while heap:
        s, i, a = heapq.heappop(heap)
        if a not in regions or a in frozen or key(a) != (s, i):
            continue
        t = (s, i)
        near = adj[a]
        if not near:
            continue  # no neighbour: a whole connected component, kept
        if any(early(z, t) for z in near):
            frozen.add(a)
            regions[a].lower = t
            continue
        best = max(near.values())
        candidates = [z for z, c in near.items() if c == best]
        winner = min(candidates, key=lambda z: regions[z].id_at(t))
        if any(uncertain(z, t) for z in candidates if z != winner):
            frozen.add(a)
            regions[a].lower = t
            continue
        # a joins the winner at t
        w = regions[winner]
        w.size += s
        w.history.append((t, i))
        joined[a] = winner
        for z, c in adj.pop(a).items():
            del adj[z][a]
            if z != winner:
                adj[winner][z] = adj[winner].get(z, 0) + c
                adj[z][winner] = adj[winner][z]
        del regions[a]
        if winner not in frozen and w.size < size:
            heapq.heappush(heap, (*key(winner), winner))
    up = {a for a in regions if a in frozen or any(z in frozen for z in adj[a])}
    residual = DustResidual(
        {a: regions[a] for a in up},
        {(a, b): c for a in up for b, c in adj[a].items() if a < b and b in up},
    )
    final = {a: r.current_id() for a, r in regions.items() if a not in up}
    return DustResult(joined, final, residual)


def octree_dust(
    octree: Octree,
    blocks: Sequence[Shape3],
    graphs: Sequence[RegionGraph],
    segments: Sequence[BlockSegments],
    size: int,
    mode: Literal["merge", "zero"] = "merge",
) -> list[np.ndarray]:
    """Per block, the segment ids after dust removal, parallel to its slice's ids: `merge_dust`
    on the whole graph, computed up and down the octree like `octree_segments`."""
    if size <= 0:
        return [b.segments.copy() for b in segments]
    if mode == "zero":  # a segment's size is complete where it became final
        return [np.where(b.sizes < size, _U64(0), b.segments).astype(_U64) for b in segments]
    if mode != "merge":
        raise ValueError(f"dust mode must be 'merge' or 'zero', not {mode!r}")
    levels = _present(octree, blocks)
    by_block = {tuple(b): (g, s) for b, g, s in zip(blocks, graphs, segments)}
    results = _sweep_up(octree, levels, lambda node: dust_leaf(*by_block[node]),
                        lambda children, level, node: dust_node(children, level, size))
    # down: a node's slice is the final id of each of its residual's regions
    slices: dict[tuple[int, Shape3], dict[int, int]] = {(octree.height, levels[-1][0]): {}}
    out = {}
    for level in range(octree.height, -1, -1):
        for node in levels[level]:
            result = results.pop((level, node))
            above = slices.pop((level, node))
            if level == 0:
                anchors = by_block[node][1].segments.tolist()
                out[node] = np.asarray([result.id_of(a, above) for a in anchors], _U64)
                continue
            for child in octree.children(level, node):
                if (level - 1, child) in results:
                    anchors = results[level - 1, child].residual.regions
                    slices[level - 1, child] = {a: result.id_of(a, above) for a in anchors}
    return [out[tuple(b)] for b in blocks]


# --------------------------------------------------------------------------- as arrays, for tasks

_RESIDUAL_U64 = ("ids", "min_ids", "sizes", "deepest", "ru", "rv", "tie_u", "tie_v", "count",
                 "affinity_sum")


def node_arrays(result: NodeResult) -> dict[str, np.ndarray]:
    """A node's result and residual as plain arrays (what its task stores)."""
    out = {f"node_{k}": getattr(result, k) for k in ("names", "renamed", "final", "final_sizes")}
    out.update({f"residual_{k}": v for k, v in vars(result.residual).items()})
    return out


def node_from_arrays(arrays: dict[str, np.ndarray]) -> NodeResult:
    """The inverse of `node_arrays`, with the types `narrow`ed storage lost restored."""
    def get(name: str) -> np.ndarray:
        a = np.asarray(arrays[name])
        field_name = name.split("_", 1)[1]
        if name.startswith("node_") or field_name in _RESIDUAL_U64:
            return a.astype(_U64, copy=False)
        if field_name in ("floors", "saddle"):
            return a.astype(np.uint8, copy=False)
        if field_name == "voxels":
            return a.astype(bool, copy=False)
        return a.astype(np.int64, copy=False)

    residual = Residual(**{k: get(f"residual_{k}") for k in Residual.__dataclass_fields__})
    return NodeResult(*(get(f"node_{k}") for k in ("names", "renamed", "final", "final_sizes")),
                      residual)


def slice_arrays(part: Slice) -> dict[str, np.ndarray]:
    return dict(zip(("names", "segments", "home", "sizes"), part))


def slice_from_arrays(arrays: dict[str, np.ndarray]) -> Slice:
    return (np.asarray(arrays["names"]).astype(_U64), np.asarray(arrays["segments"]).astype(_U64),
            np.asarray(arrays["home"]).astype(np.int64), np.asarray(arrays["sizes"]).astype(_U64))


def dust_arrays(result: DustResult) -> dict[str, np.ndarray]:
    """A dust node's result and residual as plain arrays (what its task stores)."""
    regions = result.residual.regions
    anchors = sorted(regions)
    history = [(a, k[0], k[1], i) for a in anchors for k, i in regions[a].history]
    edges = sorted(result.residual.edges.items())

    def col(rows: list, k: int, dtype: DTypeLike) -> np.ndarray:
        return np.asarray([r[k] for r in rows], dtype)

    return {
        "joined": np.asarray(sorted(result.joined.items()), _U64).reshape(-1, 2),
        "final": np.asarray(sorted(result.final.items()), _U64).reshape(-1, 2),
        "anchor": np.asarray(anchors, _U64),
        "size": np.asarray([regions[a].size for a in anchors], np.int64),
        "base": np.asarray([regions[a].base for a in anchors], _U64),
        "home": np.asarray([regions[a].home for a in anchors], np.int64),
        "lower": np.asarray([regions[a].lower for a in anchors], np.int64).reshape(-1, 2),
        "history_anchor": col(history, 0, _U64), "history_size": col(history, 1, np.int64),
        "history_key": col(history, 2, _U64), "history_id": col(history, 3, _U64),
        "edge_a": np.asarray([a for (a, _), _ in edges], _U64),
        "edge_b": np.asarray([b for (_, b), _ in edges], _U64),
        "edge_count": np.asarray([c for _, c in edges], np.int64),
    }


def dust_from_arrays(arrays: dict[str, np.ndarray]) -> DustResult:
    """The inverse of `dust_arrays`."""
    def ints(name: str) -> list[int]:
        return np.asarray(arrays[name]).astype(np.int64 if name in (
            "size", "home", "history_size", "edge_count") else _U64).reshape(-1).tolist()

    regions = {}
    lower = np.asarray(arrays["lower"]).astype(np.int64).reshape(-1, 2).tolist()
    for a, size, base, home, low in zip(ints("anchor"), ints("size"), ints("base"), ints("home"),
                                        lower):
        regions[a] = DustRegion(size, base, home, [], (low[0], low[1]))
    for a, size, key, i in zip(ints("history_anchor"), ints("history_size"), ints("history_key"),
                               ints("history_id")):
        regions[a].history.append(((size, key), i))
    edges = {(a, b): c for a, b, c in zip(ints("edge_a"), ints("edge_b"), ints("edge_count"))}
    pairs = {name: np.asarray(arrays[name]).astype(_U64).reshape(-1, 2).tolist()
             for name in ("joined", "final")}
    return DustResult({a: b for a, b in pairs["joined"]}, {a: b for a, b in pairs["final"]},
                      DustResidual(regions, edges))
