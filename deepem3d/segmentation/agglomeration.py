"""Agglomeration on the merged region graph, and the remap of supervoxels to segments.

Everything here works on the global `RegionGraph` (one per dataset), so merge decisions cannot
depend on chunking. Results are tables parallel to `graph.ids`: entry i is the segment id of
supervoxel `graph.ids[i]`. A segment's id is the smallest supervoxel id in it (a supervoxel id is
1 + a global voxel index, so segment ids are chunk-independent too, and never 0).

- `mean`: waterz's ``OneMinus<MeanAffinity>``: while the edge of lowest score
  1 - mean affinity is below the threshold, merge it; the merged region's edges to a common
  neighbour combine their affinity sums and counts. Ties on the score go to the edge whose
  smallest constituent (u, v) supervoxel pair comes first. Several thresholds are one run,
  snapshotted at each (ascending), as waterz does.
- `watershed`: DeepEM3D's h-minima watershed, on the graph. Each region has a floor and the
  lowest voxel (id) where it is attained; regions compare by (floor, id). Edges are taken by
  increasing saddle (ties: the order of (u, v)). When an edge joins two different regions, the
  one that is higher by (floor, id) has just met a deeper region for the first time at this
  saddle s, so its dynamic is s - floor. If that dynamic is below h * 255 it is merged into the
  deeper one, which keeps its floor; otherwise both stay, and since later saddles are not lower
  they stay separate for good. The result is the catchment basins of the minima whose dynamic
  is at least h: the h-minima of skimage/MATLAB (`imhmin`), each grown over whole supervoxels.
- dust: segments of fewer voxels than `size` (global sizes, from the merged graph) are, from
  the smallest up (ties: smaller id), merged into the neighbouring segment they share most
  contact with (ties: the smaller id), sizes updated as they go, until every segment with a
  neighbour has at least `size` voxels (mode "merge", default; a segment with no neighbour at
  all, a whole connected component, is kept); or set to 0 (mode "zero").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import fastremap
import numpy as np
from numba import njit

from deepem3d.segmentation.region_graph import _GOLDEN, RegionGraph, index_of
from deepem3d.segmentation.supervoxels import find_root

__all__ = [
    "agglomerate",
    "agglomerate_mean",
    "agglomerate_watershed",
    "merge_dust",
    "remap",
]

Method = Literal["mean", "watershed"]


# --------------------------------------------------------------------------- numba kernels


@njit(cache=True)
def _less(hf, hi, i, j):
    return hf[i, 0] < hf[j, 0] or (hf[i, 0] == hf[j, 0] and hi[i, 1] < hi[j, 1])


@njit(cache=True)
def _swap(hi, i, j):
    for c in range(4):
        hi[i, c], hi[j, c] = hi[j, c], hi[i, c]


@njit(cache=True)
def _push(hf, hi, hn, score, tie, item, version):
    """Min-heap on (score, tie); a row is (score as float64 bits, tie, item, version).

    hf and hi are float64 and int64 views of the same (capacity, 4) buffer: one row per
    entry keeps a sift to one cache line per level. Returns the new size.
    """
    i = hn
    hf[i, 0] = score
    hi[i, 1] = tie
    hi[i, 2] = item
    hi[i, 3] = version
    while i > 0:
        p = (i - 1) // 2
        if _less(hf, hi, i, p):
            _swap(hi, i, p)
            i = p
        else:
            break
    return hn + 1


@njit(cache=True)
def _pop(hf, hi, hn):
    """Drop the top of the heap; returns the new size."""
    hn -= 1
    if hn > 0:
        _swap(hi, 0, hn)
        i = 0
        while True:
            left = 2 * i + 1
            if left >= hn:
                break
            c = left
            if left + 1 < hn and _less(hf, hi, left + 1, left):
                c = left + 1
            if _less(hf, hi, c, i):
                _swap(hi, c, i)
                i = c
            else:
                break
    return hn


@njit(cache=True)
def _heap(capacity):
    hi = np.empty((capacity, 4), np.int64)
    return hi.view(np.float64), hi


# edge rows: (a, b, count, affinity sum, tie, version, spare, spare); 64 bytes, one cache
# line. a and b are the edge's endpoints when it was made: its regions are their roots now.
_A, _B, _CNT, _TOT, _TIE, _VER = 0, 1, 2, 3, 4, 5


@njit(cache=True)
def _edge_rows(ea, eb, cnt, tot, tie):
    m = ea.size
    rows = np.zeros((m, 8), np.int64)
    for e in range(m):
        rows[e, _A] = ea[e]
        rows[e, _B] = eb[e]
        rows[e, _CNT] = cnt[e]
        rows[e, _TOT] = tot[e]
        rows[e, _TIE] = tie[e]
    return rows


@njit(cache=True)
def _adjacency(n, ea, eb):
    """Per-node lists of (edge, neighbour) in two parallel pools: start, length, capacity,
    edge pool, neighbour pool, top. A neighbour entry may name a node merged since: the
    region is its root. Looking neighbours up here, in arrays of a few bytes per node and
    edge, instead of in the 64-byte edge rows, keeps a merge's scans in cache. The pools are
    int32: on the ISBI 2012 benchmark graph, the agglomeration peaks at 163 bytes per edge, not
    194, and runs faster."""
    m = ea.size
    if n >= 2**31 or m >= 2**31:
        raise ValueError("agglomeration holds below 2**31 supervoxels and edges (int32 lists)")
    deg = np.zeros(n, np.int64)
    for e in range(m):
        deg[ea[e]] += 1
        deg[eb[e]] += 1
    start = np.empty(n, np.int64)
    acc = 0
    for i in range(n):
        start[i] = acc
        acc += deg[i]
    length = np.zeros(n, np.int64)
    pool = np.empty(max(2 * acc, 16), np.int32)
    nbr = np.empty(pool.size, np.int32)
    for e in range(m):
        a = ea[e]
        b = eb[e]
        pool[start[a] + length[a]] = e
        nbr[start[a] + length[a]] = b
        length[a] += 1
        pool[start[b] + length[b]] = e
        nbr[start[b] + length[b]] = a
        length[b] += 1
    return start, length, deg.copy(), pool, nbr, acc


@njit(cache=True)
def _room(x, y, cap, pool, nbr, top):
    """Pools with room for the merge of x and y (it moves the survivor's list at most once,
    to at most 2 * (cap[x] + cap[y]) entries): grown here, rarely, outside the merge, by a
    quarter (not doubled: they start at twice the edge lists, and on the ISBI 2012 graph at
    1 - mean affinity 0.9 outgrow that by an eighth)."""
    need = top + 2 * (cap[x] + cap[y]) + 8
    if need <= pool.size:
        return pool, nbr
    size = max(pool.size + pool.size // 4, need)
    bigger = np.empty(size, np.int32)
    bigger[:top] = pool[:top]
    bigger_nbr = np.empty(size, np.int32)
    bigger_nbr[:top] = nbr[:top]
    return bigger, bigger_nbr


@njit(cache=True)
def _merge_regions(x, y, rows, alive, parent, start, length, cap, pool, nbr, top, mark, changed):
    """Merge region y with x (their edge already dead); returns survivor, top, #changed.

    The survivor keeps the longer edge list. An edge of the other region to a neighbour the
    survivor also touches is folded into the survivor's edge (sums and counts add, the tie is
    the smaller) and listed in `changed`; any other edge is moved over. The survivor's edge to
    a neighbour is found by marking the survivor's neighbours, or, when that is cheaper (a large
    region absorbing a small one), by scanning each neighbour's own list: the same edges either
    way, so the result does not depend on which. The caller sets parent[other] = survivor.
    """
    if length[x] >= length[y]:
        s, o = x, y
    else:
        s, o = y, x
    need = length[s] + length[o]
    if need > cap[s]:  # move s's list to the pool's end, once, with room for o's edges
        newcap = max(2 * cap[s], need)
        st = start[s]
        for j in range(length[s]):
            pool[top + j] = pool[st + j]
            nbr[top + j] = nbr[st + j]
        start[s] = top
        cap[s] = newcap
        top += newcap
    # compact o's list, resolve its neighbours, and price the two ways of finding s's edges
    through_neighbours = 0
    k = 0
    st = start[o]
    for j in range(length[o]):
        g = pool[st + j]
        if alive[g]:
            z = find_root(parent, nbr[st + j])
            pool[st + k] = g
            nbr[st + k] = z
            k += 1
            through_neighbours += length[z]
    length[o] = k
    by_marks = through_neighbours >= length[s] + length[o]
    if by_marks:
        k = 0
        st = start[s]
        for j in range(length[s]):
            f = pool[st + j]
            if alive[f]:
                z = find_root(parent, nbr[st + j])
                pool[st + k] = f
                nbr[st + k] = z
                k += 1
                mark[z] = f
        length[s] = k
    nch = 0
    so = start[o]
    for j in range(length[o]):
        g = pool[so + j]
        z = nbr[so + j]
        if by_marks:
            f = mark[z]
        else:
            f = -1
            k = 0
            st = start[z]
            for i in range(length[z]):
                h = pool[st + i]
                if alive[h]:
                    w = find_root(parent, nbr[st + i])
                    pool[st + k] = h
                    nbr[st + k] = w
                    k += 1
                    if w == s:
                        f = h
            length[z] = k
        if f >= 0:
            rows[f, _CNT] += rows[g, _CNT]
            rows[f, _TOT] += rows[g, _TOT]
            if rows[g, _TIE] < rows[f, _TIE]:
                rows[f, _TIE] = rows[g, _TIE]
            alive[g] = 0
            changed[nch] = f
            nch += 1
        else:  # z's own entry for g names o, whose root becomes s
            pool[start[s] + length[s]] = g
            nbr[start[s] + length[s]] = z
            length[s] += 1
            if by_marks:
                mark[z] = g
    if by_marks:
        for j in range(length[s]):
            mark[nbr[start[s] + j]] = -1
    length[o] = 0
    return s, top, nch


@njit(cache=True)
def _score(rows, e):
    return 1.0 - (float(rows[e, _TOT]) / float(rows[e, _CNT])) / 255.0


_BINS = 65536


@njit(cache=True)
def _mean(n, ea, eb, cnt, tot, tie, thresholds, frozen):
    """Greedy mean-affinity merging; row t: min node index of each node's region.

    `tie` ranks the edges for equal scores (the global run: their index in the (u, v) order).
    `frozen` (per node, updated in place; all 0 for a global run) marks regions that may not
    merge here: an edge whose turn comes with a frozen end freezes both ends and stays, for an
    octree node's parent (`deepem3d.segmentation.octree`). On return frozen[i] is that of i's
    region.

    The queue is monotone: a merged edge's mean lies between those of its parts, so no score
    pushed is below the last one popped (IEEE rounding is monotone too). Hence a bucket queue
    on the score (`_BINS` bins) with an exact (score, tie) heap only for the current bin: the
    same order as one global heap, at O(1) per push into a later bin. Edges scoring at or
    above the largest threshold are never queued: they can only enter through a merge. The
    slots of a bin moved to the heap take later pushes, so the bins' rows rarely grow past
    the edges first queued (a growth holds the old rows and twice as many at once).
    """
    rows = _edge_rows(ea, eb, cnt, tot, tie)
    m = rows.shape[0]
    alive = np.ones(m, np.uint8)
    start, length, cap, pool, nbr, top = _adjacency(n, ea, eb)
    limit = thresholds[thresholds.size - 1] if thresholds.size else 0.0
    # later bins: singly linked lists of (score bits, tie, edge, version, next)
    head = np.full(_BINS + 1, -1, np.int64)
    items = np.empty((max(m, 16), 5), np.int64)
    itemf = items.view(np.float64)
    nitems = 0
    free = -1  # slots of bins already moved to the heap, reused before the rows grow
    hf, hi = _heap(4096)  # holds one bin at a time; grows if a bin is larger
    hn = 0
    current = 0
    for e in range(m):
        score = _score(rows, e)
        if score < limit:
            b = min(int(score * _BINS), _BINS)
            if nitems == items.shape[0]:
                items = _grow_rows(items, 2 * nitems)
                itemf = items.view(np.float64)
            itemf[nitems, 0] = score
            items[nitems, 1] = tie[e]
            items[nitems, 2] = e
            items[nitems, 3] = 0
            items[nitems, 4] = head[b]
            head[b] = nitems
            nitems += 1
    parent = np.arange(n)
    minidx = np.arange(n)
    mark = np.full(n, -1, np.int64)
    changed = np.empty(m + 1, np.int64)
    out = np.empty((thresholds.size, n), np.int64)
    for ti in range(thresholds.size):
        t = thresholds[ti]
        while True:
            if hn == 0:
                # move on to the next non-empty bin, whose entries become the exact heap
                while current <= _BINS and head[current] < 0:
                    current += 1
                if current > _BINS:
                    break
                k = head[current]
                head[current] = -1
                while k >= 0:
                    if hn == hi.shape[0]:
                        hf, hi = _grow_heap(hi, 2 * hn)
                    hn = _push(hf, hi, hn, itemf[k, 0], items[k, 1], items[k, 2], items[k, 3])
                    following = items[k, 4]
                    items[k, 4] = free  # the slot is free for a later push
                    free = k
                    k = following
                continue
            e = hi[0, 2]
            if alive[e] == 0 or hi[0, 3] != rows[e, _VER]:
                hn = _pop(hf, hi, hn)
                continue
            if not hf[0, 0] < t:
                break
            hn = _pop(hf, hi, hn)
            x = find_root(parent, rows[e, _A])
            y = find_root(parent, rows[e, _B])
            if frozen[x] or frozen[y]:
                frozen[x] = 1
                frozen[y] = 1
                continue
            alive[e] = 0
            pool, nbr = _room(x, y, cap, pool, nbr, top)
            s, top, nch = _merge_regions(
                x, y, rows, alive, parent, start, length, cap, pool, nbr, top, mark, changed
            )
            o = y if s == x else x
            parent[o] = s
            minidx[s] = min(minidx[s], minidx[o])
            for k in range(nch):
                f = changed[k]
                rows[f, _VER] += 1
                score = _score(rows, f)
                if not score < limit:
                    continue
                b = min(int(score * _BINS), _BINS)
                if b <= current:  # == current: monotone, never below
                    if hn == hi.shape[0]:
                        hf, hi = _grow_heap(hi, 2 * hn)
                    hn = _push(hf, hi, hn, score, rows[f, _TIE], f, rows[f, _VER])
                else:
                    if free >= 0:
                        slot = free
                        free = items[slot, 4]
                    else:
                        if nitems == items.shape[0]:
                            items = _grow_rows(items, 2 * nitems)
                            itemf = items.view(np.float64)
                        slot = nitems
                        nitems += 1
                    itemf[slot, 0] = score
                    items[slot, 1] = rows[f, _TIE]
                    items[slot, 2] = f
                    items[slot, 3] = rows[f, _VER]
                    items[slot, 4] = head[b]
                    head[b] = slot
        for i in range(n):
            out[ti, i] = minidx[find_root(parent, i)]
    for i in range(n):
        frozen[i] = frozen[find_root(parent, i)]
    return out


@njit(cache=True)
def _grow_rows(rows, size):
    out = np.empty((size, rows.shape[1]), rows.dtype)
    out[: rows.shape[0]] = rows
    return out


@njit(cache=True)
def _grow_heap(hi, size):
    bigger = _grow_rows(hi, size)
    return bigger.view(np.float64), bigger


@njit(cache=True)
def _watershed(n, ea, eb, order, saddle, floors, lowest, h255, frozen, deferred):
    """Merge by dynamics in saddle order; returns the min node index of each node's region.

    `lowest[i]` ranks node i's deepest supervoxel among equal floors (the global run: i, node
    order being id order). `frozen` as in `_mean` (all 0 for a global run): an edge with a
    frozen end is decided only when its complete end is surely the higher (then the frozen
    region's floor stays); otherwise it freezes both ends and is marked in `deferred`, left
    for the parent (docs/octree.md).
    """
    parent = np.arange(n)
    floor = floors.astype(np.int64)
    minidx = np.arange(n)
    for k in range(order.size):
        e = order[k]
        a = find_root(parent, ea[e])
        b = find_root(parent, eb[e])
        if a == b:
            continue
        if frozen[a] or frozen[b]:
            if not (frozen[a] and frozen[b]):
                # a complete region meeting a frozen one, whose (floor, lowest) can only be
                # lower than seen here: if the complete one is the higher even so, the global
                # run decides on its own dynamic, and a merge leaves the frozen root's floor
                u, f = (b, a) if frozen[a] else (a, b)
                if floor[u] > floor[f] or (floor[u] == floor[f] and lowest[u] > lowest[f]):
                    if saddle[e] - floor[u] < h255:
                        parent[u] = f
                        minidx[f] = min(minidx[f], minidx[u])
                    continue
            frozen[a] = 1
            frozen[b] = 1
            deferred[e] = 1
            continue
        if floor[a] > floor[b] or (floor[a] == floor[b] and lowest[a] > lowest[b]):
            high, deep = a, b
        else:
            high, deep = b, a
        if saddle[e] - floor[high] < h255:
            parent[high] = deep
            minidx[deep] = min(minidx[deep], minidx[high])
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = minidx[find_root(parent, i)]
        frozen[i] = frozen[find_root(parent, i)]
    return out


@njit(cache=True)
def _dust(n, sizes_in, ea, eb, cnt, size):
    """Merge segments below `size` into their best neighbour, smallest first."""
    rows = _edge_rows(ea, eb, cnt, np.zeros(ea.size, np.int64), np.arange(ea.size))
    alive = np.ones(ea.size, np.uint8)
    sizes = sizes_in.astype(np.int64)
    start, length, cap, pool, nbr, top = _adjacency(n, ea, eb)
    parent = np.arange(n)
    minidx = np.arange(n)
    mark = np.full(n, -1, np.int64)
    changed = np.empty(rows.shape[0] + 1, np.int64)
    hf, hi = _heap(2 * n + 1)
    hn = 0
    for i in range(n):
        if sizes[i] < size:
            hn = _push(hf, hi, hn, float(sizes[i]), minidx[i], i, sizes[i])
    while hn > 0:
        i = hi[0, 2]
        stale = parent[i] != i or hi[0, 3] != sizes[i]
        hn = _pop(hf, hi, hn)
        if stale:
            continue
        best = -1
        bz = -1
        for j in range(length[i]):
            f = pool[start[i] + j]
            if alive[f] == 0:
                continue
            z = find_root(parent, nbr[start[i] + j])
            if (
                best < 0
                or rows[f, _CNT] > rows[best, _CNT]
                or (rows[f, _CNT] == rows[best, _CNT] and minidx[z] < minidx[bz])
            ):
                best = f
                bz = z
        if best < 0:
            continue  # no neighbour: a whole connected component, kept
        alive[best] = 0
        pool, nbr = _room(i, bz, cap, pool, nbr, top)
        s, top, _ = _merge_regions(
            i, bz, rows, alive, parent, start, length, cap, pool, nbr, top, mark, changed
        )
        o = bz if s == i else i
        parent[o] = s
        minidx[s] = min(minidx[s], minidx[o])
        sizes[s] += sizes[o]
        if sizes[s] < size:
            hn = _push(hf, hi, hn, float(sizes[s]), minidx[s], s, sizes[s])
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = minidx[find_root(parent, i)]
    return out


# --------------------------------------------------------------------------- public functions


def _check_unit(values: Sequence[float], name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if out.size == 0:
        raise ValueError(f"give at least one {name}")
    if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(out > 1):
        raise ValueError(f"{name} must lie in [0, 1], not {list(map(float, out))}")
    return out


def _endpoints(graph: RegionGraph) -> tuple[np.ndarray, np.ndarray]:
    """Edge endpoints as node indices into graph.ids."""
    ea, eb = index_of(graph.ids, graph.u, graph.v)
    return ea, eb


def agglomerate_mean(graph: RegionGraph, thresholds: Sequence[float]) -> list[np.ndarray]:
    """Mean-affinity agglomeration: per threshold (in the order given), segment id per node.

    A threshold is on waterz's score, 1 - mean affinity: edges merge while their score is
    below it (threshold 0 merges nothing, 1 everything with a mean affinity above 0).
    """
    t = _check_unit(thresholds, "thresholds")
    order = np.argsort(t, kind="stable")
    ea, eb = _endpoints(graph)
    rows = _mean(
        graph.ids.size,
        ea,
        eb,
        graph.count.astype(np.int64),
        graph.affinity_sum.astype(np.int64),
        np.arange(graph.n_edges),
        np.ascontiguousarray(t[order]),
        np.zeros(graph.ids.size, np.uint8),
    )
    out: list[np.ndarray] = [np.empty(0)] * t.size
    for k, i in enumerate(order):
        out[i] = graph.ids[rows[k]]
    return out


def agglomerate_watershed(graph: RegionGraph, h: float) -> np.ndarray:
    """h-minima watershed by dynamics (see the module docstring): segment id per node.

    `h` is in [0, 1] and compared on the 0..255 scale: a basin whose dynamic (saddle - floor)
    is below h * 255 is merged into the deeper basin it meets at that saddle.
    """
    (h,) = _check_unit([h], "h")
    ea, eb = _endpoints(graph)
    order = np.lexsort((np.arange(graph.n_edges), graph.saddle))
    n = graph.ids.size
    rows = _watershed(n, ea, eb, order, graph.saddle, graph.floors, np.arange(n), h * 255.0,
                      np.zeros(n, np.uint8), np.zeros(graph.n_edges, np.uint8))
    return graph.ids[rows]


def merge_dust(
    graph: RegionGraph,
    segments: np.ndarray,
    size: int,
    mode: Literal["merge", "zero"] = "merge",
) -> np.ndarray:
    """Segments (parallel to graph.ids) after removing those smaller than `size` voxels.

    "merge": into the neighbour of largest contact, smallest first (see the module docstring);
    "zero": set to 0, the background.
    """
    segments = np.asarray(segments, dtype=np.uint64)
    if segments.shape != graph.ids.shape:
        raise ValueError("segments must be parallel to graph.ids")
    if mode not in ("merge", "zero"):
        raise ValueError(f"dust mode must be 'merge' or 'zero', not {mode!r}")
    size = int(size)
    if size <= 0 or segments.size == 0:
        return segments.copy()
    seg_ids, seg_index = fastremap.unique(segments, return_inverse=True)
    seg_index = np.asarray(seg_index, dtype=np.int64)
    seg_sizes = np.zeros(seg_ids.size, np.uint64)
    np.add.at(seg_sizes, seg_index, graph.sizes)
    if mode == "zero":
        keep = seg_sizes >= size
        return np.where(keep[seg_index], segments, np.uint64(0)).astype(np.uint64)
    ea, eb = _endpoints(graph)
    su, sv = seg_index[ea], seg_index[eb]
    between = su != sv
    lo = np.minimum(su[between], sv[between])
    hi = np.maximum(su[between], sv[between])
    key = lo * seg_ids.size + hi
    keys, inverse = np.unique(key, return_inverse=True)
    counts = np.zeros(keys.size, np.uint64)
    np.add.at(counts, inverse, graph.count[between])
    rows = _dust(
        seg_ids.size,
        seg_sizes.astype(np.int64),
        keys // seg_ids.size,
        keys % seg_ids.size,
        counts.astype(np.int64),
        size,
    )
    return seg_ids[rows][seg_index]


def agglomerate(
    graph: RegionGraph,
    method: Method = "mean",
    thresholds: float | Sequence[float] = 0.5,
    dust_size: int = 0,
    dust_mode: Literal["merge", "zero"] = "merge",
) -> list[np.ndarray]:
    """Segment tables (parallel to graph.ids), one per threshold: the AgglomerateTask's work.

    `method` "mean": thresholds on 1 - mean affinity (waterz); "watershed": thresholds are h.
    Dust removal, if `dust_size` > 0, runs on each result.
    """
    values = [thresholds] if np.isscalar(thresholds) else list(thresholds)  # type: ignore[list-item]
    if method == "mean":
        tables = agglomerate_mean(graph, values)
    elif method == "watershed":
        _check_unit(values, "thresholds")
        tables = [agglomerate_watershed(graph, h) for h in values]
    else:
        raise ValueError(f"method must be 'mean' or 'watershed', not {method!r}")
    if dust_size > 0:
        tables = [merge_dust(graph, t, dust_size, dust_mode) for t in tables]
    return tables


_REMAP_CACHE_BITS = 16  # 65536 slots, 1 MiB


@njit(cache=True)
def _remap_flat(flat, ids, segments):
    """Segment of each supervoxel id in `flat` (0 stays 0); (out, 0), or (out, id) for the
    first id not in `ids`. Ids come in runs along x and recur row after row: the last id and
    a direct-mapped cache (as large as L2 holds: blocks of small supervoxels touch tens of
    thousands) answer almost every voxel, a binary search the rest."""
    out = np.empty(flat.size, np.uint64)
    zero = np.uint64(0)
    cache_id = np.zeros(1 << _REMAP_CACHE_BITS, np.uint64)  # id 0: never cached, an empty slot
    cache_seg = np.zeros(1 << _REMAP_CACHE_BITS, np.uint64)
    shift = np.uint64(64 - _REMAP_CACHE_BITS)
    prev = zero
    seg = zero
    for i in range(flat.size):
        v = flat[i]
        if v != prev:
            prev = v
            if v == zero:
                seg = zero
            else:
                slot = np.int64((v * _GOLDEN) >> shift)
                if cache_id[slot] == v:
                    seg = cache_seg[slot]
                else:
                    k = np.searchsorted(ids, v)
                    if k >= ids.size or ids[k] != v:
                        return out, v
                    seg = segments[k]
                    cache_id[slot] = v
                    cache_seg[slot] = seg
        out[i] = seg
    return out, zero


def remap(supervoxel_ids: np.ndarray, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Segment ids (uint64, same shape) of an array of supervoxel ids: the RemapTask's work.

    `ids` (sorted, as graph.ids) and `segments` are the agglomeration's table; 0 stays 0.
    """
    arr = np.asarray(supervoxel_ids)
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    flat = np.ravel(arr, order=order).astype(np.uint64, copy=False)
    out, missing = _remap_flat(
        flat,
        np.ascontiguousarray(ids, dtype=np.uint64),
        np.ascontiguousarray(segments, dtype=np.uint64),
    )
    if missing:
        raise ValueError(f"supervoxel {int(missing)} is not in the region graph")
    return out.reshape(arr.shape, order=order)
