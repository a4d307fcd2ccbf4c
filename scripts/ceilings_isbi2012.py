"""What a perfect network would score on ISBI 2012 held-out sections 20..29 with deepem3d's
segmentation: DeepEM3D's boundary target made from the ground truth, through the h-minima
watershed (several in-plane sigmas), and the ground truth's nearest-neighbour affinities through
mean-affinity agglomeration. The gap between the two is the price of the boundary head at
50 nm sections, whatever the training.

    python scripts/ceilings_isbi2012.py
"""

from __future__ import annotations

import numpy as np

from deepem3d.axes import xyz_from_zyx, xyzc_from_czyx, zyx_from_xyz
from deepem3d.models.targets import affinity_target, boundary_target
from deepem3d.sample import load_sample
from deepem3d.segmentation.metrics import evaluate
from deepem3d.segmentation.pipeline import segment


def score(seg_xyz: np.ndarray, ids: np.ndarray) -> str:
    r = evaluate(np.ascontiguousarray(zyx_from_xyz(seg_xyz)), ids)
    return (f"ARE {r['adapted_rand_error']:.4f}, VOI split {r['voi_split']:.3f} / merge "
            f"{r['voi_merge']:.3f}")


def main() -> None:
    _, ids = load_sample()
    ids = ids[20:30].astype(np.uint64)
    boundary = np.ascontiguousarray(xyz_from_zyx(255 * boundary_target(ids.astype(np.int64))))
    for sigma in (0, 1, 2, 3):
        for h in (0.05, 0.19):
            seg = segment(boundary, "watershed", h, sigma=sigma)
            print(f"perfect boundary map, sigma {sigma}, watershed h {h}: {score(seg, ids)}")
    affinities = (255 * affinity_target(ids.astype(np.int64))).astype(np.uint8)
    seg = segment(np.ascontiguousarray(xyzc_from_czyx(affinities)), "mean", 0.5)
    print(f"perfect affinities, mean 0.5: {score(seg, ids)}")


if __name__ == "__main__":
    main()
