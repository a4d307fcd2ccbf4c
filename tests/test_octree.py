"""The octree agglomeration equals the global one bit for bit (`segment_chunked == segment`).

test_seg_chunked.py runs the ISBI sample and the synthetic maps through one block, blocks that
do not divide the volume, thin z blocks and a deep octree of tiny blocks. Here: dust and
smoothing together; maps built to stress the freezing rules (ties across block faces, a hub
region touching every face, plateaus spanning several blocks, segments that stay frozen up to
the root); random maps and blocks (scripts/octree_fuzz.py's draw), 200 seeds; and what the
octree holds per node.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepem3d.segmentation import octree as octree_module
from deepem3d.segmentation.octree import BlockFaces, Octree, octree_segments
from deepem3d.segmentation.pipeline import chunk_stages
from deepem3d.segmentation.region_graph import merge_graphs
from deepem3d.segmentation.synthetic import affinity_map, boundary_map
from scripts.octree_fuzz import check
from tests.conftest import check_invariance, isbi_labels

NOT_DIVIDING = (13, 7, 3)
THIN_Z = (30, 50, 1)
TINY = (4, 4, 2)


@pytest.mark.parametrize("mode", ["merge", "zero"])
def test_isbi_map_with_dust_and_smoothing_octree_equals_whole(mode: str) -> None:
    b = boundary_map(isbi_labels(), noise=0.1, seed=1)
    check_invariance(b, [NOT_DIVIDING, TINY], dust_size=20, dust_mode=mode)
    check_invariance(affinity_map(b), [THIN_Z], dust_size=50, dust_mode=mode, sigma=1.0)


def _stress_maps() -> dict[str, np.ndarray]:
    """Maps whose segments cross many block faces (blocks of 4 x 4 x 2 voxels)."""
    shape = (16, 16, 8)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    # equal values on both sides of every face: the same score and saddle met in many blocks
    ties = np.where(((x // 2) + (y // 2) + z) % 2 == 0, 60, 180).astype(np.uint8)
    # a low cross through the whole volume touching every block face, small bowls around it
    hub = (20 + 25 * ((x * 7 + y * 3 + z * 5) % 9)).astype(np.uint8)
    hub[(x == 8) | (y == 8) | (z == 4)] = 5
    # flat plateaus of 6 x 6 x 4 voxels over several blocks, walls of one value
    plateaus = np.full(shape, 30, np.uint8)
    plateaus[(x % 6 == 0) | (y % 6 == 0) | (z % 4 == 0)] = 200
    # long segments through the centre, where only the root has both halves
    rods = np.full(shape, 220, np.uint8)
    rods[(x % 3 == 1) & (z % 2 == 0)] = 10
    rods[(y % 5 == 2) & (z % 2 == 1)] = 12
    rng = np.random.default_rng(7)
    noisy = np.clip(rods.astype(int) + rng.integers(-8, 9, shape), 0, 255).astype(np.uint8)
    return {"ties": ties, "hub": hub, "plateaus": plateaus, "rods": rods, "noisy-rods": noisy}


@pytest.mark.parametrize("binary_above", [None, 0])
@pytest.mark.parametrize("name", list(_stress_maps()))
def test_stress_map_octree_equals_whole(name: str, binary_above, monkeypatch) -> None:
    """Eight children per node (these sizes) and two (BINARY_ABOVE 0). Blocks one voxel
    wide (every voxel on a face; 1,024 blocks, a third of the suite's octree time) with eight
    children only: two children over 512 blocks of 2 x 2 x 1 make as deep a tree."""
    if binary_above is not None:
        monkeypatch.setattr(octree_module, "BINARY_ABOVE", binary_above)
    thin = (1, 2, 1) if binary_above is None else (2, 2, 1)
    m = _stress_maps()[name]
    for maps in (m, affinity_map(m)):
        check_invariance(maps, [(4, 4, 2), thin, (5, 3, 3)])
        check_invariance(maps, [(4, 4, 2), (2, 2, 2)], dust_size=10)


def test_random_maps_and_blocks_200_seeds() -> None:
    failed = [m for s in range(200) if (m := check(s))]
    assert not failed, "\n".join(failed)


def test_the_nodes_decide_most_merges_below_the_root() -> None:
    """Tiny blocks: regions become final at every level, and no node holds the whole graph."""
    m = affinity_map(boundary_map(isbi_labels(), noise=0.1, seed=0))
    shape = (16, 16, 5)
    chunks, labels, tables, graphs = chunk_stages(m, shape)
    blocks = [tuple(o // s for o, s in zip(c.offset, shape)) for c in chunks]
    faces = [BlockFaces.of(lab, table) for lab, table in zip(labels, tables)]
    tree = Octree.of([math.ceil(d / s) for d, s in zip(m.shape[:3], shape)], shape)
    whole = merge_graphs(graphs).nbytes
    slices, largest = octree_segments(tree, blocks, graphs, faces, "mean", 0.5)
    home = {}
    for block in slices:
        home.update(zip(block.segments.tolist(), block.home_level.tolist()))
    homes = np.bincount(list(home.values()), minlength=tree.height + 1)
    assert homes[0] > homes[-1] and np.all(homes > 0), homes
    assert max(largest) < whole / 4, (largest, whole)


def test_octree_shapes() -> None:
    """Balanced halving from the root, up to 2 x 2 x 2 children where the nodes are at most
    BINARY_ABOVE voxels a side and two above; thin blocks pair along z first; every node's
    children partition its blocks."""
    thin = Octree.of((16, 16, 16), (512, 512, 64))
    assert thin.factors[:3] == ((1, 1, 2),) * 3 and thin.factors[3] == (2, 2, 2)
    assert all(sum(f) == 4 for f in thin.factors[5:])  # 4096 px nodes and up: two children
    flat = Octree.of((4, 4, 1), (64, 64, 64))
    assert flat.factors == ((2, 2, 1), (2, 2, 1))
    assert Octree.of((4, 4, 1), (64, 64, 64), binary_above=0).height == 4
    assert Octree.of((1, 1, 1), (8, 8, 8)).height == 0
    ten = Octree.of((20, 1, 1), (8, 8, 8), binary_above=0)  # halves: 10 + 10, not 16 + 4
    assert list(ten.cuts(ten.height - 1, 0)) == [0, 10, 20]
    for limit in (None, 0, 20):
        odd = Octree.of((3, 5, 2), (10, 10, 10), binary_above=limit)
        assert odd.shape(odd.height) == (1, 1, 1)
        for level in range(1, odd.height + 1):
            seen = []
            for node in odd.nodes(level):
                kids = odd.children(level, node)
                assert 1 <= len(kids) <= (8 if limit is None else 2 if limit == 0 else 8)
                low, high = odd.bounds(level, node)
                for kid in kids:
                    k_low, k_high = odd.bounds(level - 1, kid)
                    assert np.all(k_low >= low) and np.all(k_high <= high)
                seen += kids
            assert sorted(seen) == sorted(odd.nodes(level - 1))  # each child has one parent
        blocks = np.array([(x, y, z) for x in range(3) for y in range(5) for z in range(2)])
        for level in range(odd.height + 1):
            for block, node in zip(blocks, odd.node_of(level, blocks)):
                low, high = odd.bounds(level, tuple(node))
                assert np.all(low <= block) and np.all(block < high)
