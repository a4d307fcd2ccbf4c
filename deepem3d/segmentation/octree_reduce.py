"""The supervoxel reduce over an octree of the blocks, equal to `resolve_supervoxels` bit for bit.

`resolve_supervoxels` reads every block's `ChunkExits` at once: it unites flat sets linked across
faces, drains each flat set with a rim through its rim voxel of lowest index, follows exits to a
flat set without a rim, and names the basin 1 + that set's lowest flat voxel. Here each node of
an octree over the blocks does the same with what its children left it, and decides only what
its own blocks settle:

- an exit or a plateau link is resolved once the node holds the voxel it names (the face tables
  of the node's blocks: which local basin a face voxel is in, and whether it is flat);
- a flat set is *complete* once none of its members has a plateau link left to resolve (links
  are recorded by the flat voxel's own block, so a set that reaches outside the node has one);
  only then are its lowest flat voxel and its lowest rim final, as in the global run;
- a basin's id is known once its chain of exits and drains ends at a complete flat set without
  a rim. Everything else is handed to the parent: incomplete flat sets (one node each, with
  their pending links, lowest root and best rim so far), basins whose exit leaves the node, and
  the face voxels on the node's outer faces, each pointing at what it resolves to so far.

The root holds no pending link or exit, so every basin gets its id. The way down hands each child
the ids of what it handed up; a block ends with its table local label -> supervoxel id.
Memory per node follows the area of its faces. Nothing here reads or writes storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from deepem3d.segmentation.supervoxels import NO_ROOT, ChunkExits

__all__ = ["ReduceResidual", "reduce_leaf", "reduce_node"]

#: a resolution: ("id", supervoxel id) or ("node", the key of a node handed to the parent)
Resolution = tuple[str, int]
_NONE = int(NO_ROOT)


@dataclass
class ReduceNode:
    """A node of the reduce graph: a flat set not yet complete (`flat`), or a basin whose exit
    (`exit`, a voxel index) leaves the octree node that holds it."""

    flat: bool
    lowest: int = _NONE  # the set's lowest flat voxel index (flat nodes)
    links: list[int] = field(default_factory=list)  # plateau links to voxels not yet held
    rim: tuple[int, Resolution] | None = None  # lowest rim so far: (index, where it drains)
    exit: int = -1  # the voxel the basin's descent leaves to (non-flat nodes)


@dataclass
class Faces:
    """Face voxels as arrays sorted by voxel index: what each one's basin resolves to (`kind`
    1: an id, 2: a node key, in `where`) and whether it is flat."""

    index: np.ndarray
    kind: np.ndarray
    where: np.ndarray
    flat: np.ndarray

    @classmethod
    def join(cls, parts: Sequence[Faces]) -> Faces:
        cat = [np.concatenate([getattr(p, f) for p in parts]) for f in
               ("index", "kind", "where", "flat")]
        order = np.argsort(cat[0], kind="stable")
        return cls(*(a[order] for a in cat))

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Per target voxel index, its row here, or -1."""
        targets = np.asarray(targets, np.uint64)
        at = np.searchsorted(self.index, targets)
        ok = at < self.index.size
        ok[ok] = self.index[at[ok]] == targets[ok]
        return np.where(ok, at, -1)

    def entry(self, row: int) -> tuple[Resolution, bool]:
        return (_NAME[int(self.kind[row])], int(self.where[row])), bool(self.flat[row])

    def __len__(self) -> int:
        return int(self.index.size)


@dataclass
class ReduceResidual:
    """What an octree node hands its parent: its unresolved nodes by key, and the face voxels
    on its outer faces: voxel index -> (what that voxel's basin resolves to, flat). A leaf also
    hands its `known` basins (key -> id): flat sets inside the block with no link and no rim,
    named at once (most of a block's basins; no node is made for them)."""

    nodes: dict[int, ReduceNode]
    faces: Faces
    known: dict[int, int] = field(default_factory=dict)


def reduce_leaf(exits: ChunkExits, block: int) -> ReduceResidual:
    """A block's exits as a leaf: one node per local label, key `block << 32 | label`."""
    base = int(block) << 32
    n = exits.n_labels
    # flat labels with no link and no rim are whole basins of this block: named now
    busy = np.zeros(n + 1, bool)
    for labels in (exits.exit_label, exits.plateau_label, exits.rim_label):
        busy[np.asarray(labels, np.int64)] = True
    simple = np.flatnonzero(~busy[1:]) + 1
    ids = np.asarray(exits.root_index, np.uint64)[simple - 1] + np.uint64(1)
    known = dict(zip((simple + base).tolist(), ids.tolist()))
    id_of = np.zeros(n + 1, np.uint64)
    id_of[simple] = ids

    def resolution(label: int) -> Resolution:
        value = int(id_of[label])
        return ("id", value) if value else ("node", base | label)

    nodes: dict[int, ReduceNode] = {}
    leaving = dict(zip(exits.exit_label.tolist(), exits.exit_target.tolist()))
    roots = exits.root_index.tolist()
    for label in (np.flatnonzero(busy[1:]) + 1).tolist():
        if label in leaving:
            nodes[base | label] = ReduceNode(False, exit=int(leaving[label]))
        else:
            nodes[base | label] = ReduceNode(True, lowest=int(roots[label - 1]))
    for label, target in zip(exits.plateau_label.tolist(), exits.plateau_target.tolist()):
        nodes[base | label].links.append(int(target))
    for label, index, dst in zip(exits.rim_label.tolist(), exits.rim_target.tolist(),
                                 exits.rim_target_label.tolist()):
        _offer_rim(nodes[base | label], int(index), resolution(int(dst)))
    labels = np.asarray(exits.face_label, np.int64)
    face_ids = id_of[labels]
    faces = Faces.join([Faces(np.asarray(exits.face_index, np.uint64),
                              np.where(face_ids > 0, 1, 2).astype(np.uint8),
                              np.where(face_ids > 0, face_ids,
                                       np.uint64(base) + labels.astype(np.uint64)),
                              np.asarray(exits.face_flat, bool))])
    return ReduceResidual(nodes, faces, known)


def _offer_rim(node: ReduceNode, index: int, dst: Resolution) -> None:
    if node.rim is None or index < node.rim[0]:
        node.rim = (index, dst)


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


def reduce_node(
    children: Sequence[ReduceResidual],
    low: Sequence[int],
    high: Sequence[int],
    dataset: Sequence[int],
) -> tuple[dict[int, Resolution], ReduceResidual]:
    """One octree node over the voxel box [low, high) of a dataset: the resolution of every
    node its children handed it, and its own residual. At the root (the box is the dataset)
    every resolution is an id."""
    nodes: dict[int, ReduceNode] = {}
    resolved: dict[int, Resolution] = {}
    for child in children:
        nodes.update(child.nodes)
        resolved.update((k, ("id", v)) for k, v in child.known.items())
    faces = Faces.join([c.faces for c in children])
    # where every exit and link lands, if this node holds the voxel
    exit_keys = [k for k, n in nodes.items() if not n.flat]
    exit_row = dict(zip(exit_keys, faces.find([nodes[k].exit for k in exit_keys]).tolist()))
    # flat sets: union over the links now held; links to non-flat voxels are rims
    parent = {k: k for k, n in nodes.items() if n.flat}

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key, node in nodes.items():
        if not node.flat or not node.links:
            continue
        pending = []
        for target, row in zip(node.links, faces.find(node.links).tolist()):
            if row < 0:
                pending.append(target)
                continue
            (kind, where), flat = faces.entry(row)
            if flat:
                if kind != "node" or where not in parent:
                    raise ValueError("a plateau link reaches a flat set that was complete")
                a, b = find(key), find(where)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                _offer_rim(node, target, (kind, where))
        node.links = pending
    # each set as one node at its smallest key: lowest root, best rim, pending links
    sets: dict[int, ReduceNode] = {}
    for key, node in nodes.items():
        if node.flat:
            root = find(key)
            s = sets.setdefault(root, ReduceNode(True))
            s.lowest = min(s.lowest, node.lowest)
            s.links += node.links
            if node.rim is not None:
                _offer_rim(s, *node.rim)
    def resolve(key: int) -> Resolution:
        chain = []
        res: Resolution
        while True:
            if key in resolved:
                res = resolved[key]
                break
            node = nodes[key]
            chain.append(key)
            if node.flat:
                s = sets[find(key)]
                if s.links:  # incomplete: the set goes up as one node
                    res = ("node", find(key))
                    break
                if s.rim is None:
                    res = ("id", s.lowest + 1)
                    break
                kind, where = s.rim[1]
                if kind == "id":
                    res = (kind, where)
                    break
                key = where
            else:
                row = exit_row[key]
                if row < 0:
                    res = ("node", key)
                    break
                kind, where = faces.entry(row)[0]
                if kind == "id":
                    res = (kind, where)
                    break
                key = where
            if len(chain) > len(nodes):
                raise ValueError("a basin never bottoms out: the chunks' exits are inconsistent")
        for k in chain:
            resolved[k] = res
        return res

    for key in nodes:
        resolve(key)
    # the residual: incomplete sets, exits that leave, and the outer faces
    up: dict[int, ReduceNode] = {}
    for key, node in nodes.items():
        kind, where = resolved[key]
        if kind != "node" or where != (find(key) if node.flat else key):
            continue
        if node.flat:
            s = sets[where]
            rim = None if s.rim is None else (s.rim[0], _follow(s.rim[1], resolved))
            up[where] = ReduceNode(True, lowest=s.lowest, links=list(s.links), rim=rim)
        else:
            up[key] = ReduceNode(False, exit=node.exit)
    keep = _on_outer_face(faces.index, low, high, dataset)
    outer = Faces(faces.index[keep], faces.kind[keep].copy(), faces.where[keep].copy(),
                  faces.flat[keep])
    pointing = np.flatnonzero(outer.kind == 2)
    if pointing.size:  # what they point at, as this node resolved it
        targets, inverse = np.unique(outer.where[pointing], return_inverse=True)
        follow = [resolved.get(int(t), ("node", int(t))) for t in targets.tolist()]
        outer.kind[pointing] = np.asarray([_KIND[f[0]] for f in follow], np.uint8)[inverse]
        outer.where[pointing] = np.asarray([f[1] for f in follow], np.uint64)[inverse]
    return resolved, ReduceResidual(up, outer)


def _follow(res: Resolution, resolved: dict[int, Resolution]) -> Resolution:
    """A resolution in terms of this node's results."""
    kind, where = res
    return resolved.get(where, res) if kind == "node" else res


def down(resolved: dict[int, Resolution], above: dict[int, int], keys) -> dict[int, int]:
    """The way down at one node: the ids of `keys` (its children's nodes), from the node's
    resolutions and its parent's ids for the nodes it handed up (`above`)."""
    out = {}
    for key in keys:
        kind, where = resolved[key]
        out[key] = where if kind == "id" else above[where]
    return out


def reduce_octree(octree, blocks: Sequence[tuple[int, int, int]],
                  exits: Sequence[ChunkExits], block_shape: Sequence[int],
                  dataset: Sequence[int]) -> list[np.ndarray]:
    """`resolve_supervoxels`, node by node over `octree` (deepem3d.segmentation.octree.Octree)
    of the blocks (grid coordinates, one `ChunkExits` each): per block, its table local label
    -> supervoxel id (entry 0 is 0)."""
    index = {tuple(b): k for k, b in enumerate(blocks)}
    shape = np.asarray(block_shape, np.int64)
    results: dict[tuple[int, tuple], tuple[dict, ReduceResidual, list]] = {}
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
            resolved, residual = reduce_from_arrays(reduce_arrays(*reduce_node(
                children, low.tolist(), high.tolist(), dataset)))  # stored as the tasks store
            results[level, node] = (resolved, residual,
                                    [[*c.nodes, *c.known] for c in children])
    tables: list[np.ndarray] = [np.zeros(1, np.uint64)] * len(blocks)
    slices = {(octree.height, octree.nodes(octree.height)[0]): {}}
    for level in range(octree.height, -1, -1):
        for node in octree.nodes(level):
            if (level, node) not in results:
                continue
            resolved, _, child_keys = results.pop((level, node))
            above = slices.pop((level, node))
            if level == 0:
                k = index[node]
                ids = down(resolved, above, child_keys[0])
                table = np.zeros(exits[k].n_labels + 1, np.uint64)
                for key, value in ids.items():
                    table[key & 0xFFFFFFFF] = value
                tables[k] = table
                continue
            kids = [c for c in octree.children(level, node) if (level - 1, c) in results]
            for child, keys in zip(kids, child_keys):
                slices[level - 1, child] = down(resolved, above, keys)
    return tables


# --------------------------------------------------------------------------- as arrays, for tasks

_KIND = {"id": 1, "node": 2}
_NAME = {1: "id", 2: "node"}


def _res_arrays(prefix: str, items: list[tuple[int, Resolution]]) -> dict[str, np.ndarray]:
    return {f"{prefix}_key": np.asarray([k for k, _ in items], np.uint64),
            f"{prefix}_kind": np.asarray([_KIND[r[0]] for _, r in items], np.uint8),
            f"{prefix}_where": np.asarray([r[1] for _, r in items], np.uint64)}


def _res_from(arrays: dict[str, np.ndarray], prefix: str) -> list[tuple[int, Resolution]]:
    keys = np.asarray(arrays[f"{prefix}_key"]).astype(np.uint64).tolist()
    kinds = np.asarray(arrays[f"{prefix}_kind"]).astype(np.uint8).tolist()
    where = np.asarray(arrays[f"{prefix}_where"]).astype(np.uint64).tolist()
    return [(k, (_NAME[c], w)) for k, c, w in zip(keys, kinds, where)]


def reduce_arrays(resolved: dict[int, Resolution], residual: ReduceResidual
                  ) -> dict[str, np.ndarray]:
    """A reduce node's resolutions and residual as plain arrays (what its task stores)."""
    nodes = sorted(residual.nodes.items())
    rims = [(k, n.rim[1]) for k, n in nodes if n.rim is not None]
    out = {
        "node_key": np.asarray([k for k, _ in nodes], np.uint64),
        "node_flat": np.asarray([n.flat for _, n in nodes], bool),
        "node_lowest": np.asarray([n.lowest for _, n in nodes], np.uint64),
        "node_exit": np.asarray([n.exit for _, n in nodes], np.int64),
        "rim_index": np.asarray([n.rim[0] for _, n in nodes if n.rim is not None], np.uint64),
        "link_key": np.asarray([k for k, n in nodes for _ in n.links], np.uint64),
        "link_target": np.asarray([t for _, n in nodes for t in n.links], np.uint64),
        "face_index": residual.faces.index, "face_kind": residual.faces.kind,
        "face_where": residual.faces.where, "face_flat": residual.faces.flat,
    }
    out.update(_res_arrays("rim", rims))
    out.update(_res_arrays("resolved", sorted(resolved.items())))
    return out


def reduce_from_arrays(arrays: dict[str, np.ndarray]
                       ) -> tuple[dict[int, Resolution], ReduceResidual]:
    """The inverse of `reduce_arrays`."""
    def col(name: str, dtype) -> list:
        return np.asarray(arrays[name]).astype(dtype).tolist()

    nodes = {k: ReduceNode(f, lowest=low, exit=e) for k, f, low, e in zip(
        col("node_key", np.uint64), col("node_flat", bool), col("node_lowest", np.uint64),
        col("node_exit", np.int64))}
    for (k, res), index in zip(_res_from(arrays, "rim"), col("rim_index", np.uint64)):
        nodes[k].rim = (index, res)
    for k, t in zip(col("link_key", np.uint64), col("link_target", np.uint64)):
        nodes[k].links.append(t)
    faces = Faces(np.asarray(arrays["face_index"]).astype(np.uint64),
                  np.asarray(arrays["face_kind"]).astype(np.uint8),
                  np.asarray(arrays["face_where"]).astype(np.uint64),
                  np.asarray(arrays["face_flat"]).astype(bool))
    return dict(_res_from(arrays, "resolved")), ReduceResidual(nodes, faces)
