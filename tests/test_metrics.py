"""deepem3d.segmentation.metrics against the SNEMI3D script, waterz, scikit-image and hand sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sparse
import waterz
from skimage.metrics import adapted_rand_error, variation_of_information

from deepem3d.sample import load_sample
from deepem3d.segmentation.metrics import (
    Contingency,
    accumulate,
    contingency,
    evaluate,
    scores,
)

SPLIT_ID = 5000


def snemi3d_script(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """The SNEMI3D challenge's adapted_rand, line for line (segA = truth, segB = prediction)."""
    segA = np.ravel(gt).astype(np.int64)  # noqa: N806 (the script's names)
    segB = np.ravel(seg).astype(np.int64)  # noqa: N806
    n = segA.size
    n_labels_A = np.amax(segA) + 1  # noqa: N806
    n_labels_B = np.amax(segB) + 1  # noqa: N806
    ones_data = np.ones(n)
    p_ij = sparse.csr_matrix((ones_data, (segA[:], segB[:])), shape=(n_labels_A, n_labels_B))
    a = p_ij[1:n_labels_A, :]
    b = p_ij[1:n_labels_A, 1:n_labels_B]
    c = p_ij[1:n_labels_A, 0].todense()
    d = b.multiply(b)
    a_i = np.array(a.sum(1))
    b_i = np.array(b.sum(0))
    sumA = np.sum(a_i * a_i)  # noqa: N806
    sumB = np.sum(b_i * b_i) + (np.sum(c) / n)  # noqa: N806
    sumAB = np.sum(d) + (np.sum(c) / n)  # noqa: N806
    precision = sumAB / sumB
    recall = sumAB / sumA
    f_score = 2.0 * precision * recall / (precision + recall)
    return 1.0 - f_score, precision, recall


def waterz_scores(seg: np.ndarray, gt: np.ndarray) -> dict:
    """waterz.evaluate wants C-contiguous 3D uint64 arrays, (segmentation, gt)."""
    return waterz.evaluate(
        np.ascontiguousarray(seg, dtype=np.uint64), np.ascontiguousarray(gt, dtype=np.uint64)
    )


def pair_counting_rand(table: Contingency) -> tuple[float, float, float]:
    """skimage's variant from our table: pairs of distinct voxels (x^2 - x), gt 0 ignored,
    predicted 0 a label; returned in skimage's (swapped) order: are, gt-normalised, seg-normalised.
    """
    counts = table.counts.astype(float)
    n = counts.sum()
    gt_sizes = np.array([counts[table.gt == g].sum() for g in np.unique(table.gt)])
    seg_sizes = np.array([counts[table.seg == s].sum() for s in np.unique(table.seg)])
    both = counts @ counts - n
    gt_pairs = gt_sizes @ gt_sizes - n
    seg_pairs = seg_sizes @ seg_sizes - n
    return 1 - 2 * both / (gt_pairs + seg_pairs), both / gt_pairs, both / seg_pairs


def random_pair(seed: int, shape=(12, 20, 24), gt_labels=6, seg_labels=9, seg_zero=True):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, gt_labels, shape).astype(np.uint64)
    seg = rng.integers(0 if seg_zero else 1, seg_labels, shape).astype(np.uint64)
    return seg, gt


def structured_pair(seg_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of gt with a boundary of 0; the prediction splits one, merges two, shifts a border."""
    z, y, x = np.meshgrid(np.arange(10), np.arange(32), np.arange(32), indexing="ij")
    gt = (1 + (y // 16) * 2 + (x // 16) + 4 * (z // 5)).astype(np.uint64)
    gt[(y % 16 == 0) | (x % 16 == 0)] = 0
    seg = gt.copy()
    seg[seg == 2] = 1  # merge 1 and 2
    seg[(seg == 3) & (x > 8)] = 100  # split 3
    seg[(gt == 5) & (y < 4)] = 6  # shift a border
    seg[gt == 0] = 7  # the boundary joins a neighbour (ignored: gt is 0 there)
    if seg_zero:
        seg[(gt == 8) & (z == 9)] = 0  # predicted background inside a gt object
    return seg, gt


# ---------------------------------------------------------------------------------------------
# the SNEMI3D definition, by hand and against the script itself


def test_hand_computed_snemi3d_with_predicted_zero() -> None:
    gt = np.array([0, 1, 1, 1, 1, 2, 2, 2], dtype=np.uint64)
    seg = np.array([3, 0, 4, 4, 5, 5, 5, 0], dtype=np.uint64)
    # n = 8 (gt-0 voxel included). Rows gt 1: {seg 0: 1, 4: 2, 5: 1}; gt 2: {5: 2, 0: 1}.
    # a_i = (4, 3)            -> sumA  = 16 + 9 = 25
    # b_j = (seg 4: 2, 5: 3)  -> sum b^2 = 4 + 9 = 13 (seg 3 lies only on gt 0: not in b)
    # c = (1, 1), sum(c)/n = 2/8 = 0.25
    # d = 2^2 + 1^2 + 2^2 = 9 -> sumAB = 9.25; sumB = 13.25
    # precision = 9.25 / 13.25 = 37/53, recall = 9.25 / 25 = 0.37
    # F = 2 sumAB / (sumA + sumB) = 18.5 / 38.25, ARE = 19.75 / 38.25 = 79/153
    # VOI over the 7 voxels with gt != 0, seg 0 one label (sizes 0: 2, 4: 2, 5: 3):
    # split = (1/7)(1 log2 4 + 2 log2 2 + 1 log2 4 + 2 log2 1.5 + 1 log2 3)
    #       = (6 + 2 log2 1.5 + log2 3) / 7
    # merge = (1/7)(1 log2 2 + 1 log2 2 + 2 log2 1 + 1 log2 3 + 2 log2 1.5)
    #       = (2 + log2 3 + 2 log2 1.5) / 7
    result = evaluate(seg, gt)
    assert result["rand_precision"] == pytest.approx(37 / 53, rel=1e-14)
    assert result["rand_recall"] == pytest.approx(0.37, rel=1e-14)
    assert result["adapted_rand_error"] == pytest.approx(79 / 153, rel=1e-14)
    split = (6 + 2 * math.log2(1.5) + math.log2(3)) / 7
    merge = (2 + math.log2(3) + 2 * math.log2(1.5)) / 7
    assert result["voi_split"] == pytest.approx(split, rel=1e-14)
    assert result["voi_merge"] == pytest.approx(merge, rel=1e-14)
    assert result["voi"] == pytest.approx(split + merge, rel=1e-14)
    assert snemi3d_script(seg, gt) == pytest.approx((79 / 153, 37 / 53, 0.37), rel=1e-14)

    # waterz agrees on VOI but treats predicted 0 as an ordinary label in Rand:
    # rand_split = sum p^2 / sum a^2 = (1 + 4 + 1 + 4 + 1) / 25 = 0.44, not 0.37
    w = waterz_scores(seg.reshape(1, 1, 8), gt.reshape(1, 1, 8))
    assert w["voi_split"] == pytest.approx(split, rel=1e-12)
    assert w["voi_merge"] == pytest.approx(merge, rel=1e-12)
    assert w["rand_split"] == pytest.approx(0.44)


def test_hand_computed_all_predicted_zero() -> None:
    # gt = one object of 3 voxels plus one 0 voxel, prediction all 0: b is empty, c = (3,), n = 4
    # sumA = 9, sumB = sumAB = 3/4 -> precision 1, recall 1/12, ARE = 1 - 2(1/12)/(13/12) = 11/13
    gt = np.array([0, 1, 1, 1], dtype=np.uint64)
    seg = np.zeros(4, dtype=np.uint64)
    result = evaluate(seg, gt)
    assert result["rand_precision"] == 1.0
    assert result["rand_recall"] == pytest.approx(1 / 12, rel=1e-14)
    assert result["adapted_rand_error"] == pytest.approx(11 / 13, rel=1e-14)
    assert result["voi_split"] == 0.0 and result["voi_merge"] == 0.0  # one label each side


@pytest.mark.parametrize("seed", range(5))
def test_matches_snemi3d_script_on_random_labels(seed: int) -> None:
    seg, gt = random_pair(seed, seg_zero=True)
    result = evaluate(seg, gt)
    are, precision, recall = snemi3d_script(seg, gt)
    assert result["adapted_rand_error"] == pytest.approx(are, rel=1e-12)
    assert result["rand_precision"] == pytest.approx(precision, rel=1e-12)
    assert result["rand_recall"] == pytest.approx(recall, rel=1e-12)


@pytest.mark.parametrize("seg_zero", [False, True])
def test_matches_snemi3d_script_on_boxes(seg_zero: bool) -> None:
    seg, gt = structured_pair(seg_zero)
    result = evaluate(seg, gt)
    expected = snemi3d_script(seg, gt)
    got = (result["adapted_rand_error"], result["rand_precision"], result["rand_recall"])
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0 < result["adapted_rand_error"] < 1


def test_perfect_match_up_to_relabelling_scores_zero() -> None:
    _, gt = structured_pair()
    ids = np.unique(gt)
    seg = gt.copy()
    seg[gt != 0] = (np.searchsorted(ids, gt[gt != 0]) * 7919 + 12345).astype(np.uint64)
    seg[gt == 0] = 3  # anything on gt 0 is ignored
    result = evaluate(seg, gt)
    assert result == {
        "adapted_rand_error": 0.0,
        "rand_precision": 1.0,
        "rand_recall": 1.0,
        "voi_split": 0.0,
        "voi_merge": 0.0,
        "voi": 0.0,
    }


def test_split_lowers_recall_and_merge_lowers_precision() -> None:
    _, gt = structured_pair()
    split = gt.copy()
    split[(gt == 3) & (np.arange(32) > 8)] = 100
    merged = gt.copy()
    merged[merged == 2] = 1
    s, m = evaluate(split, gt), evaluate(merged, gt)
    assert s["rand_precision"] == 1.0 and s["rand_recall"] < 1.0
    assert s["voi_merge"] == 0.0 and s["voi_split"] > 0.0
    assert m["rand_recall"] == 1.0 and m["rand_precision"] < 1.0
    assert m["voi_split"] == 0.0 and m["voi_merge"] > 0.0


# ---------------------------------------------------------------------------------------------
# waterz and scikit-image, where their definitions agree with ours


@pytest.mark.parametrize("seed", range(4))
def test_matches_waterz_without_predicted_zero(seed: int) -> None:
    # waterz ignores gt 0 and keeps predicted 0 as a label; with no predicted 0 inside gt
    # objects SNEMI3D's c is empty and the definitions coincide.
    seg, gt = random_pair(seed, seg_zero=False)
    result, w = evaluate(seg, gt), waterz_scores(seg, gt)
    assert result["rand_precision"] == pytest.approx(w["rand_merge"], rel=1e-12)
    assert result["rand_recall"] == pytest.approx(w["rand_split"], rel=1e-12)
    assert result["voi_split"] == pytest.approx(w["voi_split"], rel=1e-9, abs=1e-12)
    assert result["voi_merge"] == pytest.approx(w["voi_merge"], rel=1e-9, abs=1e-12)


def test_matches_waterz_on_boxes() -> None:
    seg, gt = structured_pair(seg_zero=False)
    result, w = evaluate(seg, gt), waterz_scores(seg, gt)
    assert result["rand_precision"] == pytest.approx(w["rand_merge"], rel=1e-12)
    assert result["rand_recall"] == pytest.approx(w["rand_split"], rel=1e-12)
    assert result["voi_split"] == pytest.approx(w["voi_split"], rel=1e-9, abs=1e-12)
    assert result["voi_merge"] == pytest.approx(w["voi_merge"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_voi_matches_waterz_and_skimage_even_with_predicted_zero(seed: int) -> None:
    # All three take VOI in bits over gt != 0 with predicted 0 as a label.
    # skimage.metrics.variation_of_information(gt, seg) returns [H(seg|gt), H(gt|seg)]
    # = [split, merge].
    seg, gt = random_pair(seed, seg_zero=True)
    result, w = evaluate(seg, gt), waterz_scores(seg, gt)
    split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
    assert result["voi_split"] == pytest.approx(w["voi_split"], rel=1e-9)
    assert result["voi_merge"] == pytest.approx(w["voi_merge"], rel=1e-9)
    assert result["voi_split"] == pytest.approx(split, rel=1e-9)
    assert result["voi_merge"] == pytest.approx(merge, rel=1e-9)


@pytest.mark.parametrize("seg_zero", [False, True])
def test_skimage_rand_is_the_pair_counting_variant_of_our_table(seg_zero: bool) -> None:
    # skimage.metrics.adapted_rand_error(gt, seg) counts pairs of distinct voxels (x^2 - x, not
    # SNEMI3D's x^2), treats predicted 0 as a label, and returns (are, precision, recall) with
    # precision normalised by the gt pairs and recall by the predicted pairs: the reverse of
    # SNEMI3D's names (https://github.com/scikit-image/scikit-image/issues/6485). Its numbers
    # follow from our table exactly.
    seg, gt = structured_pair(seg_zero)
    table = contingency(seg, gt)
    assert adapted_rand_error(gt, seg, ignore_labels=(0,)) == pytest.approx(
        pair_counting_rand(table), rel=1e-12
    )
    # ... and on objects this large the two definitions are close, names swapped
    if not seg_zero:
        ours = evaluate(seg, gt)
        are, sk_precision, sk_recall = adapted_rand_error(gt, seg, ignore_labels=(0,))
        assert ours["adapted_rand_error"] == pytest.approx(are, abs=2e-3)
        assert ours["rand_recall"] == pytest.approx(sk_precision, abs=2e-3)
        assert ours["rand_precision"] == pytest.approx(sk_recall, abs=2e-3)


def test_skimage_precision_and_recall_are_swapped() -> None:
    # one gt object split in two halves: no false merge, so SNEMI3D precision is 1
    gt = np.ones((1, 2, 4), dtype=np.uint64)
    seg = np.array([[[1, 1, 2, 2], [1, 1, 2, 2]]], dtype=np.uint64)
    ours = evaluate(seg, gt)
    assert ours["rand_precision"] == 1.0 and ours["rand_recall"] == pytest.approx(0.5)
    _, sk_precision, sk_recall = adapted_rand_error(gt, seg, ignore_labels=(0,))
    assert sk_recall == 1.0 and sk_precision < 1.0


# ---------------------------------------------------------------------------------------------
# the contingency table: accumulation over blocks, validation


def assert_same_table(a: Contingency, b: Contingency) -> None:
    np.testing.assert_array_equal(a.gt, b.gt)
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.gt.dtype == a.seg.dtype == np.uint64 and a.counts.dtype == np.int64
    assert a.voxels == b.voxels


def test_table_is_sorted_unique_pairs_without_gt_zero() -> None:
    seg, gt = random_pair(7, seg_zero=True)
    table = contingency(seg, gt)
    assert (table.gt != 0).all() and (table.counts > 0).all()
    keys = list(zip(table.gt.tolist(), table.seg.tolist()))
    assert keys == sorted(set(keys))
    assert table.voxels == gt.size
    assert table.labelled_voxels == int((gt != 0).sum())
    for g, s, c in zip(table.gt[:10], table.seg[:10], table.counts[:10]):
        assert c == int(((gt == g) & (seg == s)).sum())


def test_accumulating_z_slabs_equals_whole_array() -> None:
    seg, gt = random_pair(3, shape=(17, 20, 24), seg_zero=True)
    whole = contingency(seg, gt)
    slabs = [contingency(seg[z : z + 4], gt[z : z + 4]) for z in range(0, 17, 4)]
    total = accumulate(slabs)
    assert_same_table(total, whole)
    assert scores(total) == scores(whole)
    # incremental merging, in any order, gives the same table
    running = Contingency.empty()
    for slab in reversed(slabs):
        running = running.merge(slab)
    assert_same_table(running, whole)
    assert_same_table(slabs[0].merge(*slabs[1:]), whole)


def test_accumulating_irregular_blocks_equals_whole_array() -> None:
    seg, gt = structured_pair(seg_zero=True)
    whole = contingency(seg, gt)
    blocks = []
    for z0, z1 in ((0, 3), (3, 10)):
        for y0, y1 in ((0, 5), (5, 21), (21, 32)):
            for x0, x1 in ((0, 13), (13, 32)):
                blocks.append(contingency(seg[z0:z1, y0:y1, x0:x1], gt[z0:z1, y0:y1, x0:x1]))
    total = accumulate(blocks)
    assert_same_table(total, whole)
    assert scores(total) == scores(whole)


def test_blocks_with_only_gt_zero_still_count_their_voxels() -> None:
    seg, gt = structured_pair(seg_zero=True)
    empty_block = contingency(np.ones((2, 3, 4), np.uint64), np.zeros((2, 3, 4), np.uint64))
    assert empty_block.counts.size == 0 and empty_block.voxels == 24
    assert accumulate([contingency(seg, gt), empty_block]).voxels == gt.size + 24
    assert accumulate([]).voxels == 0
    with pytest.raises(ValueError, match="nothing to score"):
        scores(empty_block)


def test_dtypes_and_validation() -> None:
    seg, gt = random_pair(1, seg_zero=True)
    reference = evaluate(seg, gt)
    assert evaluate(seg.astype(np.uint16), gt.astype(np.int32)) == reference
    big = seg.copy()
    big[big == 5] = 2**64 - 1  # any uint64 id works
    # same table up to the order of ids, so the float sums may differ in the last bit
    assert evaluate(big, gt) == pytest.approx(reference, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        contingency(seg[:-1], gt)
    with pytest.raises(ValueError, match="integer"):
        contingency(seg.astype(np.float32), gt)
    with pytest.raises(ValueError, match="negative"):
        contingency(seg.astype(np.int64) - 1, gt)


# ---------------------------------------------------------------------------------------------
# real data: the embedded ISBI 2012 sample's neuron ids (z, y, x uint16, 0 = boundary)


@pytest.fixture(scope="module")
def isbi_gt() -> np.ndarray:
    _, ids = load_sample()
    return ids.astype(np.uint64)


def test_isbi_against_itself_is_perfect(isbi_gt: np.ndarray) -> None:
    result = evaluate(isbi_gt, isbi_gt)
    assert result["adapted_rand_error"] == 0.0
    assert result["voi"] == 0.0


def perturb(gt: np.ndarray) -> np.ndarray:
    """Merge the two largest objects, split the third at its median x, permute every id.

    Ids stay small: the SNEMI3D script and skimage size their tables by the largest id."""
    ids, sizes = np.unique(gt[gt != 0], return_counts=True)
    a, b, c = ids[np.argsort(sizes)[::-1][:3]]
    seg = gt.copy()
    seg[seg == b] = a
    zz, yy, xx = np.nonzero(gt == c)
    cut = int(np.median(xx))
    seg[zz[xx > cut], yy[xx > cut], xx[xx > cut]] = SPLIT_ID
    rng = np.random.default_rng(0)
    lut = {int(i): int(j) for i, j in zip(ids, rng.permutation(ids.size) + 1000)}
    lut[SPLIT_ID] = SPLIT_ID
    lut[0] = 0
    uniq, inverse = np.unique(seg, return_inverse=True)
    return np.array([lut[int(u)] for u in uniq], dtype=np.uint64)[inverse].reshape(seg.shape)


def test_isbi_perturbed_matches_waterz_and_skimage(isbi_gt: np.ndarray) -> None:
    seg = perturb(isbi_gt)
    seg[isbi_gt == 0] = 7  # no predicted 0 where gt != 0; anything on gt 0 is ignored
    result = evaluate(seg, isbi_gt)
    assert 0.01 < result["adapted_rand_error"] < 0.5
    assert result["voi_split"] > 0 and result["voi_merge"] > 0
    w = waterz_scores(seg, isbi_gt)
    assert result["rand_precision"] == pytest.approx(w["rand_merge"], rel=1e-12)
    assert result["rand_recall"] == pytest.approx(w["rand_split"], rel=1e-12)
    assert result["voi_split"] == pytest.approx(w["voi_split"], rel=1e-9)
    assert result["voi_merge"] == pytest.approx(w["voi_merge"], rel=1e-9)
    split, merge = variation_of_information(isbi_gt, seg, ignore_labels=(0,))
    assert (result["voi_split"], result["voi_merge"]) == pytest.approx((split, merge), rel=1e-9)
    are, _, _ = adapted_rand_error(isbi_gt, seg, ignore_labels=(0,))
    assert result["adapted_rand_error"] == pytest.approx(are, abs=1e-5)  # large objects


def test_isbi_predicted_zero_matches_snemi3d_script_and_slabs(isbi_gt: np.ndarray) -> None:
    seg = perturb(isbi_gt)
    seg[10:20, 100:300, 100:300] = 0  # predicted background over many gt objects
    result = evaluate(seg, isbi_gt)
    are, precision, recall = snemi3d_script(seg, isbi_gt)
    assert result["adapted_rand_error"] == pytest.approx(are, rel=1e-12)
    assert result["rand_precision"] == pytest.approx(precision, rel=1e-12)
    assert result["rand_recall"] == pytest.approx(recall, rel=1e-12)
    slabs = accumulate(contingency(seg[z : z + 7], isbi_gt[z : z + 7]) for z in range(0, 30, 7))
    assert scores(slabs) == result
