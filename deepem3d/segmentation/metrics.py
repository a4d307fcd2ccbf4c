"""Scores of a segmentation against ground truth: SNEMI3D adapted Rand error and VOI.

Everything is computed from a contingency table, the counts of (gt id, seg id) pairs over the
voxels where gt != 0. Tables of disjoint blocks add up, so a volume too large to hold is scored
slab by slab: build one table per block, `accumulate` them, then call `scores` once. The result
is the same as scoring the whole array at once (the counts are integers, so order does not
matter).

Definitions, and how they relate to the usual reference implementations:

- **Adapted Rand error** is the SNEMI3D challenge's own script, reproduced literally: gt 0 is
  ignored; predicted-0 voxels inside gt objects still count in the gt object sizes and add
  sum(c)/n to both the predicted-pair sum and the agreeing-pair sum, where c counts them and n is
  the number of voxels compared, gt 0 included (so that term depends on how much background the
  bounds hold). With no predicted 0 inside gt objects, precision and recall
  equal waterz's `rand_merge` and `rand_split`. scikit-image's `adapted_rand_error` counts pairs
  of distinct voxels (x^2 - x instead of x^2) and returns precision and recall swapped
  (https://github.com/scikit-image/scikit-image/issues/6485), so it is close to these numbers
  on large objects but not equal.
- **Variation of information** is measured in bits (log base 2), as waterz.evaluate and
  skimage.metrics.variation_of_information report it, over the voxels where gt != 0, with the
  predicted ids taken as they are (0 is one label like any other). split = H(seg | gt), the
  false splits; merge = H(gt | seg), the false merges. These equal waterz's `voi_split` and
  `voi_merge` and skimage's `variation_of_information(gt, seg, ignore_labels=(0,))`, which
  returns [split, merge].

Arguments come in waterz's order, (seg, gt); skimage's functions take (gt, seg).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import fastremap
import numpy as np

__all__ = ["Contingency", "accumulate", "contingency", "evaluate", "scores"]

_EMPTY_IDS = np.zeros(0, dtype=np.uint64)
_EMPTY_COUNTS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Contingency:
    """Counts of (gt, seg) id pairs over the voxels where gt != 0.

    `gt`, `seg` (uint64) and `counts` (int64) are parallel 1D arrays, one entry per distinct pair,
    sorted by gt then seg. `voxels` is the number of voxels scanned, gt 0 included: the SNEMI3D
    script divides by it. Build one with `contingency`; combine blocks with `merge`/`accumulate`.
    """

    gt: np.ndarray
    seg: np.ndarray
    counts: np.ndarray
    voxels: int

    @classmethod
    def empty(cls) -> Contingency:
        """The table of no voxels: the starting value of an accumulation."""
        return cls(_EMPTY_IDS, _EMPTY_IDS, _EMPTY_COUNTS, 0)

    @property
    def labelled_voxels(self) -> int:
        """How many voxels have gt != 0, the ones the scores are about."""
        return int(self.counts.sum())

    def merge(self, *others: Contingency) -> Contingency:
        """This table plus the tables of other, disjoint blocks."""
        return accumulate((self, *others))


def contingency(seg: np.ndarray, gt: np.ndarray) -> Contingency:
    """The contingency table of one block (arrays of any shape, the same for both)."""
    seg = np.asarray(seg)
    gt = np.asarray(gt)
    if seg.shape != gt.shape:
        raise ValueError(f"seg and gt differ in shape: {seg.shape} and {gt.shape}")
    _check_labels(seg, "seg")
    _check_labels(gt, "gt")
    mask = gt != 0
    g = gt[mask].astype(np.uint64, copy=False)
    s = seg[mask].astype(np.uint64, copy=False)
    if g.size == 0:
        return Contingency(_EMPTY_IDS, _EMPTY_IDS, _EMPTY_COUNTS, int(gt.size))

    # Compact both id sets, then count the pairs as one integer key (gt-major keeps the sort).
    g_ids, g_index = fastremap.unique(g, return_inverse=True)
    s_ids, s_index = fastremap.unique(s, return_inverse=True)
    if g_ids.size * s_ids.size >= 2**64:  # cannot happen below 2**32 voxels; stay exact anyway
        pg, ps, pc = _aggregate(g, s, np.ones(g.size, dtype=np.int64))
        return Contingency(pg, ps, pc, int(gt.size))
    width = np.uint64(s_ids.size)
    keys = g_index.astype(np.uint64, copy=False) * width + s_index.astype(np.uint64, copy=False)
    keys, counts = fastremap.unique(keys, return_counts=True)
    return Contingency(
        g_ids[keys // width], s_ids[keys % width], counts.astype(np.int64), int(gt.size)
    )


def accumulate(tables: Iterable[Contingency]) -> Contingency:
    """The table of the union of disjoint blocks: pair counts and voxel counts add up."""
    tables = list(tables)
    if not tables:
        return Contingency.empty()
    voxels = sum(int(t.voxels) for t in tables)
    g, s, c = _aggregate(
        np.concatenate([t.gt for t in tables]).astype(np.uint64, copy=False),
        np.concatenate([t.seg for t in tables]).astype(np.uint64, copy=False),
        np.concatenate([t.counts for t in tables]).astype(np.int64, copy=False),
    )
    return Contingency(g, s, c, voxels)


def scores(table: Contingency) -> dict[str, float]:
    """Adapted Rand error (SNEMI3D), its precision and recall, and VOI split/merge in bits.

    Raises ValueError when the table holds no voxel with gt != 0: there is nothing to score.
    """
    if table.counts.size == 0:
        raise ValueError("no voxel has gt != 0: there is nothing to score")
    counts = table.counts.astype(np.float64)  # the SNEMI3D script sums float64 too
    n = float(table.voxels)
    total = counts.sum()

    # gt object sizes (predicted 0 included); entries are sorted by gt
    starts = np.flatnonzero(np.r_[True, table.gt[1:] != table.gt[:-1]])
    gt_sizes = np.add.reduceat(counts, starts)
    gt_size_of_entry = np.repeat(gt_sizes, np.diff(np.r_[starts, counts.size]))

    # predicted object sizes within gt != 0, 0 included as a label
    seg_ids, seg_index = fastremap.unique(table.seg, return_inverse=True)
    seg_sizes = np.bincount(seg_index.astype(np.intp), weights=counts, minlength=seg_ids.size)
    seg_size_of_entry = seg_sizes[seg_index]

    # SNEMI3D: a = p_ij[1:, :], b = p_ij[1:, 1:], c = p_ij[1:, 0], d = b * b
    predicted_zero = table.seg == 0
    c_over_n = float(counts[predicted_zero].sum()) / n
    b_sizes = seg_sizes[seg_ids != 0]
    sum_a = float(np.sum(gt_sizes * gt_sizes))
    sum_b = float(np.sum(b_sizes * b_sizes)) + c_over_n
    sum_ab = float(np.sum(counts[~predicted_zero] ** 2)) + c_over_n
    precision = sum_ab / sum_b
    recall = sum_ab / sum_a
    f_score = 2.0 * precision * recall / (precision + recall)

    # conditional entropies straight from the counts, every term >= 0 (no H(s,t) - H(t)
    # cancellation): an exact match gives exactly 0
    voi_split = float(np.sum(counts * np.log2(gt_size_of_entry / counts)) / total)
    voi_merge = float(np.sum(counts * np.log2(seg_size_of_entry / counts)) / total)

    return {
        "adapted_rand_error": float(1.0 - f_score),
        "rand_precision": float(precision),
        "rand_recall": float(recall),
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
    }


def evaluate(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """`scores` of one whole array pair: the convenience form of contingency + scores."""
    return scores(contingency(seg, gt))


def _check_labels(array: np.ndarray, name: str) -> None:
    """Ids must be non-negative integers: they index the SNEMI3D script's table."""
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, not {array.dtype}")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise ValueError(f"{name} holds negative ids; ids must be >= 0")


def _aggregate(
    gt: np.ndarray, seg: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the counts of equal (gt, seg) pairs; the result is sorted by gt then seg."""
    if gt.size == 0:
        return _EMPTY_IDS, _EMPTY_IDS, _EMPTY_COUNTS
    order = np.lexsort((seg, gt))
    gt, seg, counts = gt[order], seg[order], counts[order]
    starts = np.flatnonzero(np.r_[True, (gt[1:] != gt[:-1]) | (seg[1:] != seg[:-1])])
    return gt[starts], seg[starts], np.add.reduceat(counts, starts)
