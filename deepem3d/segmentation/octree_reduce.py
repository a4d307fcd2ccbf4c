"""The supervoxel reduce over a tree of the blocks, equal to `resolve_supervoxels` bit for bit.

`resolve_supervoxels` reads every block's `ChunkExits` at once: it unites flat sets linked across
faces, drains each flat set with a rim through its rim voxel of lowest index, follows exits to a
flat set without a rim, and names the basin 1 + that set's lowest flat voxel. Here each node of
a tree over the blocks does the same with what its children left it, and decides only what
its own blocks settle:

- an exit or a plateau link is resolved once the node holds the voxel it names (the face tables
  of the node's blocks: which basin a face voxel is in, and whether it is flat);
- a flat set is *complete* once none of its members has a plateau link left to resolve (links
  are recorded by the flat voxel's own block, so a set that reaches outside the node has one);
  only then are its lowest flat voxel and its lowest rim final, as in the global run;
- a basin's id is known once its chain of exits and drains ends at a complete flat set without
  a rim. Everything else is handed to the parent: incomplete flat sets (one node each, with
  their pending links, lowest root and best rim so far), basins whose exit leaves the node, and
  the face voxels on the node's outer faces, each pointing at what it resolves to so far.

The root holds no pending link or exit, so every basin gets its id. The way down hands each child
the ids of what it handed up; a block ends with its table local label -> supervoxel id.

Everything is packed in arrays (a node is a key, `block << 32 | local label`, and a few numbers;
a resolution is a kind, `ID` or `NODE`, and a value) and the chains are followed by one compiled
loop. A node holds its children's unresolved nodes (about 0.17 per face voxel) and reads their
face tables one child at a time, twice (lookups, then its outer faces); its memory model is
`stages.segment_costs.REDUCE_BYTES_PER_FACE_VOXEL`'s. Nothing here reads or writes storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from deepem3d.segmentation.supervoxels import NO_ROOT, ChunkExits, find_root

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from deepem3d.segmentation.octree import Octree

__all__ = ["PARTS", "Faces", "ReduceResidual", "Resolved", "down", "faces_from_arrays",
           "reduce_arrays", "reduce_leaf", "reduce_node", "reduce_octree", "residual_from_arrays",
           "resolved_from_arrays"]

#: resolution kinds: none yet (a link or exit whose voxel the node does not hold), a supervoxel
#: id, or a node (its key) handed to the parent
NONE, ID, NODE = 0, 1, 2
NO_RIM = np.uint64(2**64 - 1)
_U64 = np.uint64
_EMPTY_U64 = np.zeros(0, np.uint64)


@dataclass
class Faces:
    """Face voxels as arrays sorted by voxel index: what each one's basin resolves to (`kind`
    ID or NODE, value in `where`) and whether it is flat."""

    index: np.ndarray
    kind: np.ndarray
    where: np.ndarray
    flat: np.ndarray

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Per target voxel index, its row here, or -1."""
        targets = np.asarray(targets, np.uint64)
        at = np.searchsorted(self.index, targets)
        ok = at < self.index.size
        ok[ok] = self.index[at[ok]] == targets[ok]
        return np.where(ok, at, -1)

    def __len__(self) -> int:
        return int(self.index.size)


#: no face voxels (a node read for its keys and resolutions only)
NO_FACES = Faces(_EMPTY_U64, np.zeros(0, np.uint8), _EMPTY_U64, np.zeros(0, bool))


@dataclass
class ReduceResidual:
    """What an octree node hands its parent, as arrays:

    - its unresolved nodes, sorted by `key`: `flat` sets (`lowest` flat voxel, best `rim_*`
      so far: voxel index, kind and value) or basins whose `exit` (a voxel index) leaves it;
    - the pending plateau links of its flat sets (`link_key` -> `link_target` voxel);
    - the face voxels on its outer faces (`faces`, or a function that reads them: a node
      reads each child's table twice, one child at a time, and holds none of them whole);
    - a leaf also hands its `known` basins (`known_key` -> `known_id`): flat sets inside the
      block with no link and no rim, named at once (most of a block's basins)."""

    key: np.ndarray
    flat: np.ndarray
    lowest: np.ndarray
    exit: np.ndarray
    rim_index: np.ndarray
    rim_kind: np.ndarray
    rim_where: np.ndarray
    link_key: np.ndarray
    link_target: np.ndarray
    faces: Faces | Callable[[], Faces]
    known_key: np.ndarray = field(default_factory=lambda: _EMPTY_U64)
    known_id: np.ndarray = field(default_factory=lambda: _EMPTY_U64)

    def __len__(self) -> int:
        return int(self.key.size)

    def face_table(self) -> Faces:
        return self.faces() if callable(self.faces) else self.faces


@dataclass
class Resolved:
    """A node's resolutions, sorted by key: every node its children handed it (and a leaf's
    known basins) -> ID (a supervoxel id) or NODE (the key of a node it handed up)."""

    key: np.ndarray
    kind: np.ndarray
    where: np.ndarray

    def of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kind, where) of each key; ValueError if one is missing."""
        rows = _rows(self.key, keys, "a key the node never resolved")
        return self.kind[rows], self.where[rows]


def _rows(sorted_keys: np.ndarray, keys: np.ndarray, what: str) -> np.ndarray:
    keys = np.asarray(keys, np.uint64)
    at = np.searchsorted(sorted_keys, keys)
    ok = at < sorted_keys.size
    ok[ok] = sorted_keys[at[ok]] == keys[ok]
    if not ok.all():
        raise ValueError(f"the reduce met {what}: the chunks' exits are inconsistent")
    return at


def reduce_leaf(exits: ChunkExits, block: int) -> ReduceResidual:
    """A block's exits as a leaf: one node per local label, key `block << 32 | label`."""
    base = _U64(int(block) << 32)
    n = exits.n_labels
    # flat labels with no link and no rim are whole basins of this block: named now
    busy = np.zeros(n + 1, bool)
    for labels in (exits.exit_label, exits.plateau_label, exits.rim_label):
        busy[np.asarray(labels, np.int64)] = True
    busy[0] = False
    roots = np.asarray(exits.root_index, np.uint64)
    simple = np.flatnonzero(~busy[1:]) + 1
    id_of = np.zeros(n + 1, np.uint64)
    id_of[simple] = roots[simple - 1] + _U64(1)

    def resolution(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(labels, np.int64)
        ids = id_of[labels]
        return (np.where(ids > 0, ID, NODE).astype(np.uint8),
                np.where(ids > 0, ids, base + labels.astype(np.uint64)))

    labels = np.flatnonzero(busy)  # ascending, so the keys are sorted
    exit_of = np.full(n + 1, -1, np.int64)
    exit_of[np.asarray(exits.exit_label, np.int64)] = np.asarray(exits.exit_target, np.int64)
    flat = exit_of[labels] < 0
    rim_index = np.full(n + 1, NO_RIM, np.uint64)
    rim_kind = np.zeros(n + 1, np.uint8)
    rim_where = np.zeros(n + 1, np.uint64)
    rim_label = np.asarray(exits.rim_label, np.int64)
    rim_index[rim_label] = np.asarray(exits.rim_target, np.uint64)
    rim_kind[rim_label], rim_where[rim_label] = resolution(exits.rim_target_label)
    link_label = np.asarray(exits.plateau_label, np.int64)
    keep = exit_of[link_label] < 0  # a basin that drains out has no use for its links
    face_kind, face_where = resolution(exits.face_label)
    order = np.argsort(np.asarray(exits.face_index, np.uint64), kind="stable")
    return ReduceResidual(
        key=base + labels.astype(np.uint64), flat=flat,
        lowest=np.where(flat, roots[labels - 1], NO_ROOT).astype(np.uint64),
        exit=exit_of[labels], rim_index=rim_index[labels], rim_kind=rim_kind[labels],
        rim_where=rim_where[labels],
        link_key=base + link_label[keep].astype(np.uint64),
        link_target=np.asarray(exits.plateau_target, np.uint64)[keep],
        faces=Faces(np.asarray(exits.face_index, np.uint64)[order], face_kind[order],
                    face_where[order], np.asarray(exits.face_flat, bool)[order]),
        known_key=base + simple.astype(np.uint64), known_id=id_of[simple])


def _on_outer_face(index: np.ndarray, low: Sequence[int], high: Sequence[int],
                   dataset: Sequence[int]) -> np.ndarray:
    """Which voxels lie on a face of the box [low, high) that is inside the dataset."""
    index = np.asarray(index, np.int64)
    coords = (index % dataset[0], (index // dataset[0]) % dataset[1],
              index // (dataset[0] * dataset[1]))
    out = np.zeros(index.size, bool)
    for c, v in enumerate(coords):
        out |= ((v == low[c]) & (low[c] > 0)) | ((v == high[c] - 1) & (high[c] < dataset[c]))
    return out


def _take(children: Sequence[ReduceResidual], name: str, dtype) -> np.ndarray:
    """A field of every child, concatenated; the children's own arrays are dropped (emptied),
    so that a node task holds each field once."""
    parts = []
    for child in children:
        parts.append(np.asarray(getattr(child, name), dtype))
        setattr(child, name, np.zeros(0, dtype))
    out = np.concatenate(parts) if parts else np.zeros(0, dtype)
    del parts
    return out


def _look_up(children: Sequence[ReduceResidual], targets: np.ndarray):
    """Where each target voxel's basin resolves to, in the child faces that hold it: kind
    (NONE where no child holds it), value, flatness. One child's table at a time."""
    kind = np.zeros(targets.size, np.uint8)
    where = np.zeros(targets.size, np.uint64)
    flat = np.zeros(targets.size, bool)
    for child in children:
        faces = child.face_table()
        rows = faces.find(targets)
        hit = rows >= 0
        kind[hit] = faces.kind[rows[hit]]
        where[hit] = faces.where[rows[hit]]
        flat[hit] = faces.flat[rows[hit]]
    return kind, where, flat


def _dense(keys: np.ndarray, kind: np.ndarray, where: np.ndarray) -> np.ndarray:
    """NODE values as rows of `keys` (ID values unchanged)."""
    out = where.astype(np.int64).copy()
    node = kind == NODE
    out[node] = _rows(keys, where[node], "a node no child handed up")
    return out


def reduce_node(
    children: Sequence[ReduceResidual],
    low: Sequence[int],
    high: Sequence[int],
    dataset: Sequence[int],
) -> tuple[Resolved, ReduceResidual]:
    """One octree node over the voxel box [low, high) of a dataset: the resolution of every
    node its children handed it, and its own residual. At the root (the box is the dataset)
    every resolution is an ID. The children's node arrays are consumed (emptied) as they are
    read; their face tables are read twice, one child at a time."""
    key = _take(children, "key", np.uint64)
    order = np.argsort(key, kind="stable")
    key = key[order]

    def field(name: str, dtype: DTypeLike) -> np.ndarray:
        return _take(children, name, dtype)[order]

    flat = field("flat", bool)
    lowest = field("lowest", np.uint64)  # becomes each set's, at its root row
    exit_voxel = field("exit", np.int64)
    rim_index = field("rim_index", np.uint64)  # the rims too
    rim_kind = field("rim_kind", np.uint8)
    rim_where = _dense(key, rim_kind, field("rim_where", np.uint64))
    del order
    link_key = _take(children, "link_key", np.uint64)
    link_target = _take(children, "link_target", np.uint64)
    leaves = np.flatnonzero(~flat)  # one pass over the children's faces for both kinds
    kind, where, link_flat = _look_up(children, np.concatenate([
        exit_voxel[leaves].astype(np.uint64), link_target]))
    exit_kind = np.zeros(key.size, np.uint8)
    exit_kind[leaves] = kind[:leaves.size]
    exit_where = np.zeros(key.size, np.int64)
    exit_where[leaves] = _dense(key, kind[:leaves.size], where[:leaves.size])
    link_kind, link_flat = kind[leaves.size:], link_flat[leaves.size:]
    link_where = _dense(key, link_kind, where[leaves.size:])
    del kind, where, leaves
    link_node = _rows(key, link_key, "a link of no node")
    del link_key
    status, res_kind, res_where, root, pending = _resolve_nodes(
        flat, lowest, exit_kind, exit_where, rim_index, rim_kind, rim_where,
        link_node, link_kind, link_where, link_flat, link_target)
    if status == 1:
        raise ValueError("a plateau link reaches a flat set that was complete")
    if status == 2:
        raise ValueError("a basin never bottoms out: the chunks' exits are inconsistent")
    del exit_kind, exit_where, link_kind, link_where, link_flat

    def as_keys(kind: np.ndarray, where: np.ndarray) -> np.ndarray:
        out = where.astype(np.uint64)
        node = kind == NODE
        out[node] = key[where[node]]
        return out

    known_key = _take(children, "known_key", np.uint64)
    if known_key.size:  # a leaf's: merged in key order
        all_keys = np.concatenate([key, known_key])
        order = np.argsort(all_keys, kind="stable")
        resolved = Resolved(
            all_keys[order],
            np.concatenate([res_kind, np.full(known_key.size, ID, np.uint8)])[order],
            np.concatenate([as_keys(res_kind, res_where),
                            _take(children, "known_id", np.uint64)])[order])
    else:
        resolved = Resolved(key, res_kind, as_keys(res_kind, res_where))
    # the residual: incomplete sets (at their root), exits that leave, and the outer faces
    rows = np.arange(key.size)
    up = (res_kind == NODE) & (res_where == rows) & (root == rows)
    del rows
    up_flat = flat[up]
    s_rim_kind = rim_kind[up]
    s_rim_where = rim_where[up]
    followed = s_rim_kind == NODE  # a rim pointing at a node: what this node made of it
    s_rim_kind[followed] = res_kind[s_rim_where[followed]]
    s_rim_where[followed] = res_where[s_rim_where[followed]]
    live = pending & up[root[link_node]]
    residual = ReduceResidual(
        key=key[up], flat=up_flat, lowest=np.where(up_flat, lowest[up], NO_ROOT),
        exit=np.where(up_flat, -1, exit_voxel[up]),
        rim_index=np.where(up_flat, rim_index[up], NO_RIM),
        rim_kind=np.where(up_flat, s_rim_kind, NONE).astype(np.uint8),
        rim_where=np.where(up_flat, as_keys(s_rim_kind, s_rim_where), 0).astype(np.uint64),
        link_key=key[root[link_node[live]]], link_target=link_target[live],
        faces=NO_FACES)
    del flat, lowest, exit_voxel, rim_index, rim_kind, rim_where, root, link_node, pending
    residual.faces = _outer_faces(children, key, res_kind, res_where, as_keys, low, high,
                                  dataset)
    return resolved, residual


def _outer_faces(children, key, res_kind, res_where, as_keys, low, high, dataset) -> Faces:
    """The children's face voxels on this node's outer faces, pointing at what this node
    resolved their basins to, sorted by voxel index (merged a field at a time)."""
    parts: dict[str, list[np.ndarray]] = {"index": [], "kind": [], "where": [], "flat": []}
    for child in children:
        f = child.face_table()
        keep = _on_outer_face(f.index, low, high, dataset)
        kind, where = f.kind[keep], f.where[keep]
        node = np.flatnonzero(kind == NODE)
        if node.size:
            at = np.searchsorted(key, where[node])
            ok = at < key.size
            ok[ok] = key[at[ok]] == where[node[ok]]
            node, at = node[ok], at[ok]  # a node this one never held points where it did
            kind[node] = res_kind[at]
            where[node] = as_keys(res_kind[at], res_where[at])
        for name, part in (("index", f.index[keep]), ("kind", kind), ("where", where),
                           ("flat", f.flat[keep])):
            parts[name].append(part)
        del f, keep, kind, where
    if not children:
        return NO_FACES
    order = np.argsort(np.concatenate(parts["index"]), kind="stable")
    out = {}
    for name in ("index", "kind", "where", "flat"):
        out[name] = np.concatenate(parts.pop(name))[order]
    return Faces(**out)


@njit(cache=True)
def _resolve_nodes(flat, lowest, exit_kind, exit_where, rim_index, rim_kind, rim_where,
                   link_node, link_kind, link_where, link_flat, link_target):
    """The node's decisions on dense rows (node values are rows, id values ids). `lowest` and
    the `rim_*` arrays become, at each flat set's root row (its smallest), the set's. Returns
    (status: 0 ok, 1 a link into a complete set, 2 a chain without end; the resolution's
    kind and value per row; each row's set root, itself if not flat; per link, whether it is
    still pending)."""
    n = flat.size
    root = np.arange(n)  # union-find parents, then each row's set root
    count = np.zeros(n, np.int32)  # pending links per row, then per set
    pending = np.zeros(link_node.size, np.bool_)
    res_kind = np.zeros(n, np.uint8)
    res_where = np.zeros(n, np.int64)
    # flat sets: union over the links now held; links to non-flat voxels are rims
    for j in range(link_node.size):
        i = link_node[j]
        if not flat[i]:
            continue
        if link_kind[j] == NONE:
            pending[j] = True
            count[i] += 1
            continue
        if link_flat[j]:
            other = link_where[j]
            if link_kind[j] != NODE or not flat[other]:
                return 1, res_kind, res_where, root, pending
            a = find_root(root, i)
            b = find_root(root, other)
            if a != b:
                root[max(a, b)] = min(a, b)
        elif link_target[j] < rim_index[i]:
            rim_index[i] = link_target[j]
            rim_kind[i] = link_kind[j]
            rim_where[i] = link_where[j]
    # each set at its smallest row (processed before its other members): lowest root, best
    # rim (the first row's on a tie), pending links
    for i in range(n):
        if not flat[i]:
            continue
        r = find_root(root, i)
        root[i] = r
        if r == i:
            continue
        if lowest[i] < lowest[r]:
            lowest[r] = lowest[i]
        count[r] += count[i]
        if rim_kind[i] != NONE and rim_index[i] < rim_index[r]:
            rim_index[r] = rim_index[i]
            rim_kind[r] = rim_kind[i]
            rim_where[r] = rim_where[i]
    chain = np.empty(n, np.int64)
    for start in range(n):
        if res_kind[start] != NONE:
            continue
        m = 0
        i = start
        kind = NONE
        value = 0
        while True:
            if res_kind[i] != NONE:
                kind = res_kind[i]
                value = res_where[i]
                break
            if m == n:
                return 2, res_kind, res_where, root, pending
            chain[m] = i
            m += 1
            if flat[i]:
                r = root[i]
                if count[r] > 0:  # incomplete: the set goes up as one node
                    kind, value = NODE, r
                    break
                if rim_kind[r] == NONE:
                    kind, value = ID, np.int64(lowest[r] + np.uint64(1))
                    break
                if rim_kind[r] == ID:
                    kind, value = ID, rim_where[r]
                    break
                i = rim_where[r]
            else:
                if exit_kind[i] == NONE:
                    kind, value = NODE, i
                    break
                if exit_kind[i] == ID:
                    kind, value = ID, exit_where[i]
                    break
                i = exit_where[i]
        for c in range(m):
            res_kind[chain[c]] = kind
            res_where[chain[c]] = value
    return 0, res_kind, res_where, root, pending


def down(resolved: Resolved, above: tuple[np.ndarray, np.ndarray], keys: np.ndarray
         ) -> np.ndarray:
    """The way down at one node: the ids of `keys` (its children's nodes), from the node's
    resolutions and its parent's ids for the nodes it handed up (`above`: keys sorted, ids)."""
    kind, where = resolved.of(keys)
    ids = where.copy()
    node = kind == NODE
    if node.any():
        ids[node] = above[1][_rows(above[0], where[node], "a node its parent never named")]
    return ids


def reduce_octree(octree: Octree, blocks: Sequence[tuple[int, int, int]],
                  exits: Sequence[ChunkExits], block_shape: Sequence[int],
                  dataset: Sequence[int]) -> list[np.ndarray]:
    """`resolve_supervoxels`, node by node over `octree` (deepem3d.segmentation.octree.Octree)
    of the blocks (grid coordinates, one `ChunkExits` each): per block, its table local label
    -> supervoxel id (entry 0 is 0)."""
    index = {tuple(b): k for k, b in enumerate(blocks)}
    shape = np.asarray(block_shape, np.int64)
    results: dict[tuple[int, tuple], tuple[Resolved, ReduceResidual, list]] = {}
    for level in range(octree.height + 1):
        for node in octree.nodes(level):
            if level == 0:
                if node not in index:
                    continue
                children = [reduce_leaf(exits[index[node]], index[node])]
            else:
                children = [results[level - 1, c][1] for c in octree.children(level, node)
                            if (level - 1, c) in results]
                if not children:
                    continue
            lo, hi = octree.bounds(level, node)
            low = lo * shape
            high = np.minimum(hi * shape, np.asarray(dataset, np.int64))
            handed = [np.concatenate([c.key, c.known_key]) for c in children]  # before use
            stored = reduce_arrays(*reduce_node(children, low.tolist(), high.tolist(), dataset))
            # read back as the tasks read what they store
            resolved = resolved_from_arrays(stored["resolved"])
            residual = residual_from_arrays(stored["nodes"], faces_from_arrays(stored["faces"]))
            results[level, node] = (resolved, residual, handed)
    tables: list[np.ndarray] = [np.zeros(1, np.uint64)] * len(blocks)
    slices = {(octree.height, octree.nodes(octree.height)[0]): (_EMPTY_U64, _EMPTY_U64)}
    for level in range(octree.height, -1, -1):
        for node in octree.nodes(level):
            if (level, node) not in results:
                continue
            resolved, _, handed = results.pop((level, node))
            above = slices.pop((level, node))
            if level == 0:
                k = index[node]
                keys = handed[0]
                table = np.zeros(exits[k].n_labels + 1, np.uint64)
                table[(keys & _U64(0xFFFFFFFF)).astype(np.int64)] = down(resolved, above, keys)
                tables[k] = table
                continue
            kids = [c for c in octree.children(level, node) if (level - 1, c) in results]
            for child, keys in zip(kids, handed):
                slices[level - 1, child] = _sorted_pairs(keys, down(resolved, above, keys))
    return tables


def _sorted_pairs(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return keys[order], ids[order]


# --------------------------------------------------------------------------- as arrays, for tasks

_RESIDUAL = [f.name for f in fields(ReduceResidual) if f.name not in ("faces", "known_key",
                                                                         "known_id")]
_FACES = [f.name for f in fields(Faces)]
_TYPES = {"key": np.uint64, "flat": bool, "lowest": np.uint64, "exit": np.int64,
          "rim_index": np.uint64, "rim_kind": np.uint8, "rim_where": np.uint64,
          "link_key": np.uint64, "link_target": np.uint64, "index": np.uint64,
          "kind": np.uint8, "where": np.uint64}


#: the files a reduce node task stores, apart because their readers differ: its unresolved
#: nodes (read by its parent), its outer faces (the bulk: read by its parent, a child at a time)
#: and its resolutions (read by its own way down)
PARTS = ("nodes", "faces", "resolved")


def reduce_arrays(resolved: Resolved, residual: ReduceResidual
                  ) -> dict[str, dict[str, np.ndarray]]:
    """A reduce node's results as plain arrays, per file of `PARTS` (what its task stores)."""
    nodes = {name: getattr(residual, name) for name in _RESIDUAL}
    faces = residual.face_table()
    nodes["face_count"] = np.asarray(len(faces), np.int64)
    return {"nodes": nodes,
            "faces": {f"face_{name}": getattr(faces, name) for name in _FACES},
            "resolved": {f.name: getattr(resolved, f.name) for f in fields(Resolved)}}


def faces_from_arrays(arrays: dict[str, np.ndarray]) -> Faces:
    """A stored `faces` part as a table."""
    return Faces(*(np.asarray(arrays[f"face_{n}"]).astype(_TYPES[n], copy=False)
                   for n in _FACES))


def residual_from_arrays(nodes: dict[str, np.ndarray],
                         faces: Faces | Callable[[], Faces]) -> ReduceResidual:
    """A stored `nodes` part as a residual, with its faces (a table, or a function that
    reads one when the parent needs it)."""
    return ReduceResidual(*(np.asarray(nodes[n]).astype(_TYPES[n], copy=False)
                            for n in _RESIDUAL), faces=faces)


def resolved_from_arrays(arrays: dict[str, np.ndarray]) -> Resolved:
    """A stored `resolved` part."""
    return Resolved(*(np.asarray(arrays[f.name]).astype(_TYPES[f.name], copy=False)
                      for f in fields(Resolved)))
