"""Supervoxels: steepest-descent basins of a uint8 map, computed per chunk and stitched exactly.

Arrays are x, y, z (CloudVolume order); an affinity map is x, y, z, 3 with channel c the affinity
between v and v - e_c (c = 0 for x). Neighbours are the 6 face neighbours inside the dataset.
Every choice below is a function of values and global voxel indices (x + X * (y + Y * z)), never
of where a chunk begins, which is why a chunked run equals a whole-array run.

**Descent rule.**

- Boundary map b: a voxel is *flat* when no neighbour has a strictly lower value. A voxel that
  is not flat points to its lowest neighbour under the total order (value, global index), which
  is strictly lower in value.
- Affinity map: m(v) is the highest affinity of v's edges. A voxel points across an edge of
  affinity m(v) to a neighbour u with m(u) > m(v) (u has a still stronger edge: the descent goes
  on there); among several, an in-plane (x, y) edge before a z edge, then the lowest global
  index. When every edge of affinity m(v) leads to a neighbour with m(u) == m(v), v is *flat*.
  This is the steepest-descent graph of Zlateski & Seung's affinity watershed (waterz, abiss),
  with ties broken by a fixed, position-free rule. In-plane first because EM sections are
  anisotropic (ISBI 2012: 4 nm in-plane, 50 nm in z): on `benchmarks/segmentation.py`'s ISBI
  map, ties on the global index alone (which put -z first) gave a best adapted Rand error of
  0.258, in-plane first 0.215 (waterz 0.251).

**Plateau rule.** Flat voxels are the bottoms: every flat voxel is joined by union-find to each
neighbour that is flat too and equal to it (boundary: same value; affinity: the edge between
them has affinity m(v) = m(u)): a *flat set*. A flat set is touched by the *rim* of its plateau
when a member has an equal neighbour (same value; affinity: an edge of affinity m(v)) that is
not flat, i.e. that descends. A flat set with no rim is a minimum: it and everything that
descends into it is one basin. A flat set with a rim drains, whole, through the rim voxel of
lowest global index, into that voxel's basin. So a plateau with no lower exit is one basin
however it is cut into chunks, and a plateau with exits goes, whole, to one of them. waterz
divides such plateaus among their exits by breadth-first distance instead; that distance is
not a function of a bounded neighbourhood, while "the rim voxel of lowest index of the flat
set" is a minimum over a union-find set, which the reduce can take across chunks.

Drains and pointers go strictly downhill (to a lower root value, resp. a higher m), so
following them always ends, at a flat set without a rim.

**Ids.** A supervoxel's id is 1 + the lowest global index of its flat voxels (for a boundary
map: of its lowest voxel under the total order). It depends on the volume alone.

**Chunks.** `supervoxel_chunk` labels the chunk's own voxels by their local terminal (a flat set
inside the chunk, or the voxel whose pointer leaves the chunk) and returns `ChunkExits`: the
pointers that leave, the plateau links across its faces, the best rim inside it, and the labels
of the face voxels that a neighbour chunk may point or link to. `resolve_supervoxels` unites
flat sets across chunks, drains those with a rim, follows everything to the true roots, and
gives each chunk a table from local label to supervoxel id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from numba import njit

from deepem3d.segmentation.chunks import SUPERVOXEL_HALO, Chunk, as_map

__all__ = [
    "NO_ROOT",
    "ChunkExits",
    "relabel",
    "resolve_supervoxels",
    "supervoxel_chunk",
    "supervoxels",
]

#: root_index of a local basin that drains out of its chunk
NO_ROOT = np.uint64(2**64 - 1)

# the 6 neighbours in increasing order of their global index: -z, -y, -x, +x, +y, +z
_DX = np.array([0, 0, -1, 1, 0, 0], dtype=np.int64)
_DY = np.array([0, -1, 0, 0, 1, 0], dtype=np.int64)
_DZ = np.array([-1, 0, 0, 0, 0, 1], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class ChunkExits:
    """The compact record one chunk hands to the reduce (all arrays 1D).

    - `n_labels`: local labels are 1..n_labels.
    - `root_index` (uint64, n_labels): per local label, the lowest global index of its flat
      voxels when the basin bottoms out inside the chunk, else `NO_ROOT` (it drains out).
    - `exit_label` (uint32), `exit_target` (uint64): the local basin whose descent leaves the
      chunk, and the global index of the voxel in another chunk it points to.
    - `plateau_label` (uint32), `plateau_target` (uint64): a flat voxel's local label and the
      global index of an equal neighbour across a face. If that neighbour is flat (its own
      chunk reports `face_flat`) the two flat sets are one; if not, it is a rim voxel.
    - `rim_label` (uint32), `rim_target` (uint64), `rim_target_label` (uint32): per local flat
      set, its rim voxel of lowest global index inside the chunk, and that voxel's local label.
    - `face_index` (uint64), `face_label` (uint32), `face_flat` (bool): face voxels that a
      neighbour chunk may point or link to, with their local label and flatness.
    """

    n_labels: int
    root_index: np.ndarray
    exit_label: np.ndarray
    exit_target: np.ndarray
    plateau_label: np.ndarray
    plateau_target: np.ndarray
    rim_label: np.ndarray
    rim_target: np.ndarray
    rim_target_label: np.ndarray
    face_index: np.ndarray
    face_label: np.ndarray
    face_flat: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays by field name, for `np.savez` by a task."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ChunkExits:
        """The inverse of `to_arrays` (e.g. from `np.load`); arrays stored in narrower types
        come back in their own (uint32 labels, uint64 indices, bool flatness)."""
        values = {f.name: np.asarray(arrays[f.name]) for f in fields(cls)}
        for name in values:
            if name.endswith("_label"):
                values[name] = values[name].astype(np.uint32, copy=False)
            elif name.endswith(("_index", "_target")):
                values[name] = values[name].astype(np.uint64, copy=False)
        values["n_labels"] = int(values["n_labels"])
        return cls(**values)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays: what a task would store."""
        return sum(int(np.asarray(getattr(self, f.name)).nbytes) for f in fields(self))


# --------------------------------------------------------------------------- numba kernels


@njit(cache=True)
def _find(ptr, i):
    """Terminal of i: follow pointers to a voxel pointing to itself or out (< 0); compress."""
    r = i
    while True:
        p = ptr[r]
        if p < 0 or p == r:
            break
        r = p
    while True:
        p = ptr[i]
        if p < 0 or p == i or p == r:
            break
        ptr[i] = r
        i = p
    return r


@njit(cache=True)
def _union(ptr, i, j):
    ri = _find(ptr, i)
    rj = _find(ptr, j)
    if ri < rj:
        ptr[rj] = ri
    elif rj < ri:
        ptr[ri] = rj


@njit(cache=True)
def _valid(gx, gy, gz, dx_, dy_, dz_):
    """Which of the 6 neighbours (-z, -y, -x, +x, +y, +z) lie inside the dataset."""
    return (gz > 0, gy > 0, gx > 0, gx < dx_ - 1, gy < dy_ - 1, gz < dz_ - 1)


@njit(cache=True)
def _boundary_pass(b, bxn, byn, c0x, c0y, c0z, nx, ny, nz, ox, oy, oz, dx_, dy_, dz_):
    """Pointers, flat unions, exits, plateau links, rims and face candidates of a boundary chunk.

    b is the box, flattened x fastest, of shape (bxn, byn, .); the chunk is its block at
    (c0x, c0y, c0z) of shape (nx, ny, nz); (ox, oy, oz) is the box's global origin and
    (dx_, dy_, dz_) the dataset's shape. ptr[i] >= 0 points inside the chunk (local index,
    x fastest); ptr[i] == i marks a flat voxel; ptr[i] = -2 - k marks exit k. After the
    second pass ptr doubles as the union-find of flat voxels (a flat voxel points to a flat
    voxel of its set). Plateau links: flat voxel, equal neighbour in another chunk. Rims: flat
    voxel, its equal non-flat neighbour of lowest index in this chunk.
    """
    n = nx * ny * nz
    nfaces = nx * ny + ny * nz + nx * nz
    sy = bxn
    sz = bxn * byn
    boff = (-sz, -sy, -1, 1, sy, sz)
    goff = (-dx_ * dy_, -dx_, -1, 1, dx_, dx_ * dy_)
    ptr = np.empty(n, np.int64)
    flat = np.zeros(n, np.uint8)
    ex_src = np.empty(2 * nfaces, np.int64)
    ex_tgt = np.empty(2 * nfaces, np.uint64)
    nex = 0
    i = 0
    for z in range(nz):
        gz = oz + c0z + z
        for y in range(ny):
            gy = oy + c0y + y
            j = c0x + sy * (c0y + y) + sz * (c0z + z)
            g = ox + c0x + dx_ * (gy + dy_ * gz)
            for x in range(nx):
                gx = ox + c0x + x
                ok = _valid(gx, gy, gz, dx_, dy_, dz_)
                best = b[j]
                bd = -1
                for d in range(6):
                    if ok[d]:
                        w = b[j + boff[d]]
                        if w < best:  # strict: among equal values the first (lowest index) wins
                            best = w
                            bd = d
                if bd < 0:
                    ptr[i] = i
                    flat[i] = 1
                else:
                    lx = x + _DX[bd]
                    ly = y + _DY[bd]
                    lz = z + _DZ[bd]
                    if 0 <= lx < nx and 0 <= ly < ny and 0 <= lz < nz:
                        ptr[i] = lx + nx * (ly + ny * lz)
                    else:
                        ptr[i] = -2 - nex
                        ex_src[nex] = i
                        ex_tgt[nex] = np.uint64(g + goff[bd])
                        nex += 1
                i += 1
                j += 1
                g += 1

    # flat unions inside the chunk, plateau links across faces, rims, face candidates
    j_src = np.empty(2 * nfaces, np.int64)
    j_tgt = np.empty(2 * nfaces, np.uint64)
    nj = 0
    # at most one rim per flat voxel: sized once, since an array reassigned inside the loop
    # costs reference counting on every voxel (it tripled this pass's time)
    nflat = np.count_nonzero(flat)
    r_src = np.empty(nflat, np.int64)
    r_dst = np.empty(nflat, np.int64)
    nr = 0
    face = np.empty(2 * nfaces, np.int64)
    nf = 0
    i = 0
    for z in range(nz):
        gz = oz + c0z + z
        for y in range(ny):
            gy = oy + c0y + y
            j = c0x + sy * (c0y + y) + sz * (c0z + z)
            g = ox + c0x + dx_ * (gy + dy_ * gz)
            yz_face = y == 0 or z == 0 or y == ny - 1 or z == nz - 1
            for x in range(nx):
                on_face = yz_face or x == 0 or x == nx - 1
                if flat[i] == 1 or on_face:
                    gx = ox + c0x + x
                    ok = _valid(gx, gy, gz, dx_, dy_, dz_)
                    val = b[j]
                    keep = False
                    rim = -1
                    for d in range(6):
                        if not ok[d]:
                            continue
                        lx = x + _DX[d]
                        ly = y + _DY[d]
                        lz = z + _DZ[d]
                        inside = 0 <= lx < nx and 0 <= ly < ny and 0 <= lz < nz
                        w = b[j + boff[d]]
                        if flat[i] == 1 and w == val:
                            if inside:
                                k = lx + nx * (ly + ny * lz)
                                if flat[k] == 1:
                                    if d < 3:
                                        _union(ptr, i, k)
                                elif rim < 0 or k < rim:  # local order is global order
                                    rim = k
                            else:
                                j_src[nj] = i
                                j_tgt[nj] = np.uint64(g + goff[d])
                                nj += 1
                        if not inside and val <= w:
                            keep = True  # a neighbour chunk's voxel may point or link here
                    if keep:
                        face[nf] = i
                        nf += 1
                    if rim >= 0:
                        r_src[nr] = i
                        r_dst[nr] = rim
                        nr += 1
                i += 1
                j += 1
                g += 1
    return (
        ptr, flat, ex_src[:nex], ex_tgt[:nex], j_src[:nj], j_tgt[:nj], r_src[:nr], r_dst[:nr],
        face[:nf],
    )


@njit(cache=True)
def _edges(a, j, eoff, ok):
    """The 6 affinities of box voxel j (-1 where the neighbour is outside the dataset)."""
    return (
        np.int64(a[j + eoff[0]]) if ok[0] else np.int64(-1),
        np.int64(a[j + eoff[1]]) if ok[1] else np.int64(-1),
        np.int64(a[j + eoff[2]]) if ok[2] else np.int64(-1),
        np.int64(a[j + eoff[3]]) if ok[3] else np.int64(-1),
        np.int64(a[j + eoff[4]]) if ok[4] else np.int64(-1),
        np.int64(a[j + eoff[5]]) if ok[5] else np.int64(-1),
    )


@njit(cache=True)
def _affinity_pass(a, bxn, byn, bzn, c0x, c0y, c0z, nx, ny, nz, ox, oy, oz, dx_, dy_, dz_):
    """The affinity-map counterpart of `_boundary_pass` (same outputs).

    a is the box x, y, z, c flattened x fastest: channel c of box voxel j is a[j + c * V].
    Edge d of voxel j: -z a[j + 2V], -y a[j + V], -x a[j], +x a[j + 1], +y a[j + sy + V],
    +z a[j + sz + 2V].
    """
    sy = bxn
    sz = bxn * byn
    vol = bxn * byn * bzn
    eoff = (2 * vol, vol, 0, 1, sy + vol, sz + 2 * vol)
    goff = (-dx_ * dy_, -dx_, -1, 1, dx_, dx_ * dy_)
    # m over the chunk and its 1-voxel shell (what the pointers of the chunk look at). The
    # two passes below test the dataset's faces once per row, not once per edge: they are
    # most of a supervoxel task's time.
    m = np.full(vol, -1, np.int16)
    v2 = 2 * vol
    xlast = dx_ - 1 - ox
    for bz in range(max(c0z - 1, 0), min(c0z + nz + 1, bzn)):
        zlo = oz + bz > 0
        zhi = oz + bz < dz_ - 1
        for by in range(max(c0y - 1, 0), min(c0y + ny + 1, byn)):
            ylo = oy + by > 0
            yhi = oy + by < dy_ - 1
            row = sy * by + sz * bz
            for bx in range(max(c0x - 1, 0), min(c0x + nx + 1, bxn)):
                j = row + bx
                mv = np.int16(-1)
                if zlo:
                    mv = np.int16(a[j + v2])
                if ylo:
                    mv = max(mv, np.int16(a[j + vol]))
                if ox + bx > 0:
                    mv = max(mv, np.int16(a[j]))
                if bx < xlast:
                    mv = max(mv, np.int16(a[j + 1]))
                if yhi:
                    mv = max(mv, np.int16(a[j + sy + vol]))
                if zhi:
                    mv = max(mv, np.int16(a[j + sz + v2]))
                m[j] = mv

    n = nx * ny * nz
    nfaces = nx * ny + ny * nz + nx * nz
    ptr = np.empty(n, np.int64)
    flat = np.zeros(n, np.uint8)
    ex_src = np.empty(2 * nfaces, np.int64)
    ex_tgt = np.empty(2 * nfaces, np.uint64)
    nex = 0
    loff = (-nx * ny, -nx, -1, 1, nx, nx * ny)
    i = 0
    for z in range(nz):
        gz = oz + c0z + z
        zlo = gz > 0
        zhi = gz < dz_ - 1
        for y in range(ny):
            gy = oy + c0y + y
            ylo = gy > 0
            yhi = gy < dy_ - 1
            j = c0x + sy * (c0y + y) + sz * (c0z + z)
            g = ox + c0x + dx_ * (gy + dy_ * gz)
            for x in range(nx):
                mv = np.int16(m[j])
                bd = -1
                if mv >= 0:  # in-plane edges first, then z; each group by global index
                    if ylo and a[j + vol] == mv and m[j - sy] > mv:
                        bd = 1
                    elif c0x + x + ox > 0 and a[j] == mv and m[j - 1] > mv:
                        bd = 2
                    elif c0x + x < xlast and a[j + 1] == mv and m[j + 1] > mv:
                        bd = 3
                    elif yhi and a[j + sy + vol] == mv and m[j + sy] > mv:
                        bd = 4
                    elif zlo and a[j + v2] == mv and m[j - sz] > mv:
                        bd = 0
                    elif zhi and a[j + sz + v2] == mv and m[j + sz] > mv:
                        bd = 5
                if bd < 0:
                    ptr[i] = i
                    flat[i] = 1
                else:
                    if bd == 0:
                        inside = z > 0
                    elif bd == 1:
                        inside = y > 0
                    elif bd == 2:
                        inside = x > 0
                    elif bd == 3:
                        inside = x < nx - 1
                    elif bd == 4:
                        inside = y < ny - 1
                    else:
                        inside = z < nz - 1
                    if inside:
                        ptr[i] = i + loff[bd]
                    else:
                        ptr[i] = -2 - nex
                        ex_src[nex] = i
                        ex_tgt[nex] = np.uint64(g + goff[bd])
                        nex += 1
                i += 1
                j += 1
                g += 1

    j_src = np.empty(2 * nfaces, np.int64)
    j_tgt = np.empty(2 * nfaces, np.uint64)
    nj = 0
    # at most one rim per flat voxel: sized once, since an array reassigned inside the loop
    # costs reference counting on every voxel (it tripled this pass's time)
    nflat = np.count_nonzero(flat)
    r_src = np.empty(nflat, np.int64)
    r_dst = np.empty(nflat, np.int64)
    nr = 0
    face = np.empty(2 * nfaces, np.int64)
    nf = 0
    i = 0
    for z in range(nz):
        gz = oz + c0z + z
        for y in range(ny):
            gy = oy + c0y + y
            j = c0x + sy * (c0y + y) + sz * (c0z + z)
            g = ox + c0x + dx_ * (gy + dy_ * gz)
            yz_face = y == 0 or z == 0 or y == ny - 1 or z == nz - 1
            for x in range(nx):
                on_face = yz_face or x == 0 or x == nx - 1
                if flat[i] == 1 or on_face:
                    gx = ox + c0x + x
                    mv = np.int64(m[j])
                    e = _edges(a, j, eoff, _valid(gx, gy, gz, dx_, dy_, dz_))
                    keep = False
                    rim = -1
                    for d in range(6):
                        if e[d] < 0:
                            continue
                        lx = x + _DX[d]
                        ly = y + _DY[d]
                        lz = z + _DZ[d]
                        inside = 0 <= lx < nx and 0 <= ly < ny and 0 <= lz < nz
                        if flat[i] == 1 and e[d] == mv:
                            # v is flat, so m(neighbour) == m(v): a plateau edge
                            if inside:
                                k = lx + nx * (ly + ny * lz)
                                if flat[k] == 1:
                                    if d < 3:
                                        _union(ptr, i, k)
                                elif rim < 0 or k < rim:  # local order is global order
                                    rim = k
                            else:
                                j_src[nj] = i
                                j_tgt[nj] = np.uint64(g + goff[d])
                                nj += 1
                        if not inside and mv >= e[d]:
                            keep = True  # the neighbour may point here (m(v) > e) or link
                    if keep:
                        face[nf] = i
                        nf += 1
                    if rim >= 0:
                        r_src[nr] = i
                        r_dst[nr] = rim
                        nr += 1
                i += 1
                j += 1
                g += 1
    return (
        ptr, flat, ex_src[:nex], ex_tgt[:nex], j_src[:nj], j_tgt[:nj], r_src[:nr], r_dst[:nr],
        face[:nf],
    )


@njit(cache=True)
def _drain_local_plateaus(ptr, flat, j_src, r_src, r_dst):
    """Drain, here, the flat sets that no plateau link joins to another chunk.

    Such a set lies wholly inside the chunk, and no neighbour chunk links to it (plateau links
    are symmetric), so its rim voxel of lowest global index is known now: point the set's root
    there and mark its voxels not flat, as the reduce would have done. The chunk then has one
    local label (and one basin in its region graph) where it had two, and hands the reduce
    fewer rims (single-block ISBI-like maps: about a third of the local labels). Returns the
    rims of the sets that stay, for the reduce.
    """
    n = ptr.size
    linked = np.zeros(n, np.uint8)  # by set root
    for k in range(j_src.size):
        linked[_find(ptr, j_src[k])] = 1
    best = np.full(n, -1, np.int32)  # by set root: its lowest rim voxel, if it drains here
    rim_root = np.empty(r_src.size, np.int64)
    for k in range(r_src.size):
        r = _find(ptr, r_src[k])
        rim_root[k] = r
        if linked[r] == 0 and (best[r] < 0 or r_dst[k] < best[r]):
            best[r] = r_dst[k]  # local order is global order: the lowest index wins
    keep = np.zeros(r_src.size, np.bool_)
    for k in range(r_src.size):
        keep[k] = best[rim_root[k]] < 0
    if r_src.size == keep.sum():
        return r_src, r_dst
    for i in range(n):
        if flat[i] == 1 and best[_find(ptr, i)] >= 0:
            flat[i] = 0
    for k in range(r_src.size):
        r = rim_root[k]
        if best[r] >= 0:
            ptr[r] = best[r]  # strictly downhill: the rim voxel descends, never back here
    return r_src[keep], r_dst[keep]


@njit(cache=True)
def _label_chunk(ptr, flat, nx, ny, nz, gx0, gy0, gz0, dx_, dy_):
    """Local labels 1..n in scan order of first appearance, and each label's root index."""
    n = ptr.size
    labels = np.zeros(n, np.uint32)
    nlab = 0
    for i in range(n):
        k = ptr[i]
        if 0 <= k < i:  # descends to an earlier voxel: its terminal is labelled already
            labels[i] = labels[k]
            continue
        t = _find(ptr, i)
        if labels[t] == 0:
            nlab += 1
            labels[t] = nlab
        labels[i] = labels[t]
    root = np.full(nlab, np.uint64(2**64 - 1), np.uint64)
    i = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if flat[i] == 1:
                    k = labels[i] - 1
                    g = np.uint64((gx0 + x) + dx_ * ((gy0 + y) + dy_ * (gz0 + z)))
                    if g < root[k]:  # scan order is global-index order: the first one wins
                        root[k] = g
                i += 1
    return labels, root


@njit(cache=True)
def _local_to_global(idx, nx, ny, gx0, gy0, gz0, dx_, dy_):
    out = np.empty(idx.size, np.uint64)
    for k in range(idx.size):
        i = idx[k]
        x = i % nx
        y = (i // nx) % ny
        z = i // (nx * ny)
        out[k] = np.uint64((gx0 + x) + dx_ * ((gy0 + y) + dy_ * (gz0 + z)))
    return out


@njit(cache=True)
def _min_per_label(label_of_src, dst, n_labels):
    """Per label, the smallest dst (local index, so the lowest global index), or -1."""
    best = np.full(n_labels, -1, np.int64)
    for k in range(dst.size):
        lab = label_of_src[k] - 1
        if best[lab] < 0 or dst[k] < best[lab]:
            best[lab] = dst[k]
    return best


@njit(cache=True)
def find_root(parent: np.ndarray, i: int) -> int:
    """Union-find root of i with path halving (numba; the agglomeration's too)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True)
def _resolve(exit_next, link_a, link_b, rim_src, rim_index, rim_dst, root_index):
    """Supervoxel id of every node (chunk, local label); 0 marks inconsistent input.

    Flat nodes linked across faces form flat sets (union-find); a flat set with a rim drains
    to its rim voxel of lowest global index; exits and drains are followed to a flat set
    without a rim, whose lowest flat-voxel index + 1 is the id.
    """
    n = exit_next.size
    parent = np.arange(n)
    for k in range(link_a.size):
        a = find_root(parent, link_a[k])
        b = find_root(parent, link_b[k])
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    none = np.uint64(2**64 - 1)
    best_index = np.full(n, none, np.uint64)
    best_node = np.full(n, -1, np.int64)
    for k in range(rim_src.size):
        r = find_root(parent, rim_src[k])
        if rim_index[k] < best_index[r]:
            best_index[r] = rim_index[k]
            best_node[r] = rim_dst[k]
    lowest = np.full(n, none, np.uint64)
    for i in range(n):
        r = find_root(parent, i)
        if root_index[i] < lowest[r]:
            lowest[r] = root_index[i]
    nxt = exit_next.copy()
    for i in range(n):
        if nxt[i] == i:  # a flat node: drains if its flat set has a rim
            r = find_root(parent, i)
            if best_node[r] >= 0:
                nxt[i] = best_node[r]
    ids = np.zeros(n, np.uint64)
    for i in range(n):
        r = i
        steps = 0
        while nxt[r] != r:
            r = nxt[r]
            steps += 1
            if steps > n:  # a cycle: the chunks disagree
                return np.zeros(n, np.uint64)
        j = i
        while nxt[j] != r:
            k = nxt[j]
            nxt[j] = r
            j = k
        ids[i] = lowest[find_root(parent, r)] + np.uint64(1)
    return ids


# --------------------------------------------------------------------------- public functions


def _check_box(box_shape: tuple[int, ...], box_offset: Sequence[int], need: tuple) -> None:
    start, stop = need
    offset = tuple(int(v) for v in box_offset)
    if len(offset) != 3:
        raise ValueError(f"box_offset must be x, y, z, not {box_offset!r}")
    end = tuple(o + s for o, s in zip(offset, box_shape[:3]))
    if any(o > s for o, s in zip(offset, start)) or any(e < s for e, s in zip(end, stop)):
        raise ValueError(
            f"the box at {offset} of shape {tuple(box_shape[:3])} does not cover {start}..{stop},"
            " the chunk and the halo this stage needs"
        )


def supervoxel_chunk(
    box: np.ndarray, box_offset: Sequence[int], chunk: Chunk
) -> tuple[np.ndarray, ChunkExits]:
    """Local basins of one chunk, from the map cut out with its halo.

    `box` is the map (x, y, z, or x, y, z, 3 for affinities; uint8 or float in [0, 1]) over a
    region holding `chunk.bounds(*SUPERVOXEL_HALO[kind])`, with global origin `box_offset`.
    Returns uint32 local labels of the chunk's voxels (x, y, z, Fortran order; 1..n, numbered
    by first appearance in global-index order) and the chunk's `ChunkExits`.
    """
    values, kind = as_map(box)
    offset = tuple(int(v) for v in box_offset)
    dataset = chunk.dataset_shape
    end = tuple(o + s for o, s in zip(offset, values.shape[:3]))
    if any(o < 0 for o in offset) or any(e > d for e, d in zip(end, dataset)):
        raise ValueError(f"the box at {offset} of shape {values.shape[:3]} leaves the dataset")
    _check_box(values.shape, offset, chunk.bounds(*SUPERVOXEL_HALO[kind]))
    c0 = tuple(o - b for o, b in zip(chunk.offset, offset))
    nx, ny, nz = chunk.shape
    flat_box = values.ravel(order="F")  # a view: as_map returns Fortran order
    bxn, byn, bzn = values.shape[:3]
    if kind == "boundary":
        passed = _boundary_pass(flat_box, bxn, byn, *c0, nx, ny, nz, *offset, *dataset)
    else:
        passed = _affinity_pass(flat_box, bxn, byn, bzn, *c0, nx, ny, nz, *offset, *dataset)
    ptr, flat, ex_src, ex_tgt, j_src, j_tgt, r_src, r_dst, face = passed
    r_src, r_dst = _drain_local_plateaus(ptr, flat, j_src, r_src, r_dst)
    labels, root = _label_chunk(ptr, flat, nx, ny, nz, *chunk.offset, dataset[0], dataset[1])
    best = _min_per_label(labels[r_src], r_dst, root.size)
    rim_labels = np.flatnonzero(best >= 0)
    rim = best[rim_labels]

    def to_global(local: np.ndarray) -> np.ndarray:
        return _local_to_global(local, nx, ny, *chunk.offset, dataset[0], dataset[1])

    exits = ChunkExits(
        n_labels=int(root.size),
        root_index=root,
        exit_label=labels[ex_src],
        exit_target=ex_tgt,
        plateau_label=labels[j_src],
        plateau_target=j_tgt,
        rim_label=(rim_labels + 1).astype(np.uint32),
        rim_target=to_global(rim),
        rim_target_label=labels[rim],
        face_index=to_global(face),
        face_label=labels[face],
        face_flat=flat[face].astype(bool),
    )
    return labels.reshape((nz, ny, nx)).T, exits


def resolve_supervoxels(exits: Sequence[ChunkExits]) -> list[np.ndarray]:
    """The reduce: per chunk, a uint64 table local label -> supervoxel id (entry 0 is 0).

    Takes the `ChunkExits` of every chunk of the dataset (any order; the tables come back in
    the same order). Flat sets linked across faces are united, flat sets with a rim drain
    through their rim voxel of lowest global index, exits are followed across chunks, and each
    basin gets 1 + the lowest global index of the flat voxels it bottoms out in.
    """
    exits = list(exits)
    sizes = np.array([e.n_labels for e in exits], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])
    total = int(base[-1])

    def nodes(attr: str) -> np.ndarray:
        parts = [
            base[k] + getattr(e, attr).astype(np.int64) - 1 for k, e in enumerate(exits)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def cat(attr: str, dtype: type) -> np.ndarray:
        parts = [getattr(e, attr).astype(dtype, copy=False) for e in exits]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    face_index = cat("face_index", np.uint64)
    face_node = nodes("face_label")
    face_flat = cat("face_flat", bool)
    order = np.argsort(face_index, kind="stable")
    face_index, face_node, face_flat = face_index[order], face_node[order], face_flat[order]
    if face_index.size > 1 and np.any(face_index[1:] == face_index[:-1]):
        raise ValueError("two chunks report the same face voxel: the chunks overlap")

    def lookup(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(face_index, targets)
        ok = pos < face_index.size
        ok[ok] = face_index[pos[ok]] == targets[ok]
        return np.minimum(pos, max(face_index.size - 1, 0)), ok

    exit_next = np.arange(total, dtype=np.int64)
    exit_pos, found = lookup(cat("exit_target", np.uint64))
    if not found.all():
        raise ValueError(
            "an exit points to a voxel no chunk reported: the chunks do not tile the dataset"
        )
    exit_next[nodes("exit_label")] = face_node[exit_pos]
    # a plateau link joins two flat sets if its target is flat, else its target is a rim voxel
    plateau_target = cat("plateau_target", np.uint64)
    plateau_pos, found = lookup(plateau_target)
    plateau_src = nodes("plateau_label")[found]
    plateau_dst = face_node[plateau_pos[found]]
    plateau_flat = face_flat[plateau_pos[found]]
    rim_src = np.concatenate([nodes("rim_label"), plateau_src[~plateau_flat]])
    rim_index = np.concatenate([cat("rim_target", np.uint64), plateau_target[found][~plateau_flat]])
    rim_dst = np.concatenate([nodes("rim_target_label"), plateau_dst[~plateau_flat]])
    ids = _resolve(
        exit_next,
        plateau_src[plateau_flat],
        plateau_dst[plateau_flat],
        rim_src,
        rim_index,
        rim_dst,
        cat("root_index", np.uint64),
    )
    if total and np.any(ids == 0):
        raise ValueError("a basin never bottoms out: the chunks' exits are inconsistent")
    zero = np.zeros(1, np.uint64)
    return [np.concatenate([zero, ids[base[k] : base[k + 1]]]) for k in range(len(exits))]


@njit(cache=True)
def _gather(table, labels):
    out = np.empty(labels.size, np.uint64)
    for i in range(labels.size):
        out[i] = table[labels[i]]
    return out


def relabel(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Supervoxel ids (uint64, same shape and order as `labels`) from local labels and a table."""
    labels = np.asarray(labels)
    table = np.ascontiguousarray(table, dtype=np.uint64)
    if labels.size and int(labels.max()) >= table.size:
        raise ValueError(f"label {int(labels.max())} is not in a table of {table.size} entries")
    order = "F" if labels.flags.f_contiguous and not labels.flags.c_contiguous else "C"
    flat = np.ravel(labels, order=order)
    return _gather(table, flat).reshape(labels.shape, order=order)


def supervoxels(boundary_or_affinity: np.ndarray) -> np.ndarray:
    """Supervoxel ids (uint64, x, y, z) of a whole map in one go: the reference for chunks."""
    values, _ = as_map(boundary_or_affinity)
    chunk = Chunk((0, 0, 0), values.shape[:3], values.shape[:3])
    labels, exits = supervoxel_chunk(values, (0, 0, 0), chunk)
    return relabel(labels, resolve_supervoxels([exits])[0])
