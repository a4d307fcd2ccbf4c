"""Held-out scores of a model on ISBI 2012 sections 20..29 (the protocol of shared/data/README):
the held-out sections as their own volume (reflected at their own z bounds), predicted with
the whole-array predictor, segmented in one piece with deepem3d's segmentation, scored against
/labels/neuron_ids[20:30] with the SNEMI3D adapted Rand error and VOI; plus pixel boundary
precision / recall against DeepEM3D's boundary target.

    python scripts/evaluate_isbi2012.py [--model isbi2012-small] [--tta 16]
        [--method watershed --thresholds 0.1,0.19,0.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from deepem3d.axes import xyz_from_zyx, zyx_from_xyz
from deepem3d.models.checkpoint import load_model
from deepem3d.models.predict import predict_sections
from deepem3d.models.targets import boundary_target
from deepem3d.sample import load_sample
from deepem3d.segmentation.metrics import evaluate
from deepem3d.segmentation.pipeline import segment

HELD_OUT = "20:30"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint path or shipped name")
    parser.add_argument("--tta", type=int, default=16)
    parser.add_argument("--method", default="watershed", choices=["watershed", "mean"])
    parser.add_argument("--thresholds", default="0.05,0.1,0.19,0.3")
    parser.add_argument("--sigma", type=float, default=1.0,
                        help="in-plane Gaussian on the boundary map before segmenting (0: none)")
    parser.add_argument("--dust", type=int, default=0, help="merge segments below N voxels")
    parser.add_argument("--sections", default=HELD_OUT,
                        help="START:END; 20:30 is the held-out set, 15:20 the validation set "
                        "(choose thresholds there)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start_z, end_z = (int(v) for v in args.sections.split(":"))
    image, ids = load_sample()
    image, ids = image[start_z:end_z], ids[start_z:end_z].astype(np.uint64)
    model, meta = load_model(args.model)
    start = time.time()
    boundary = predict_sections(model, image, tta=args.tta, margin=64)
    seconds = time.time() - start

    target = boundary_target(ids.astype(np.int64)).astype(bool)
    predicted = boundary > 0.5
    precision = float((predicted & target).sum() / max(predicted.sum(), 1))
    recall = float((predicted & target).sum() / max(target.sum(), 1))

    if args.sigma > 0:
        boundary = gaussian_filter(boundary, sigma=(0, args.sigma, args.sigma))
    quantised = np.round(255 * np.clip(boundary, 0, 1)).astype(np.uint8)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    segs = segment(np.ascontiguousarray(xyz_from_zyx(quantised)), args.method, thresholds,
                   dust_size=args.dust)
    rows = []
    for t, seg in zip(thresholds, segs):
        scores = evaluate(np.ascontiguousarray(zyx_from_xyz(seg)), ids)
        rows.append({"threshold": t, "segments": int(len(np.unique(seg))), **scores})
    result = {
        "model": meta.get("model"), "sections": args.sections, "tta": args.tta,
        "predict_seconds": round(seconds, 1),
        "boundary_precision": precision, "boundary_recall": recall,
        "method": args.method, "sigma": args.sigma, "dust": args.dust, "scores": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"sections {args.sections}; model {meta['model']}, tta {args.tta}, predicted in "
          f"{seconds:.1f} s; boundary precision {precision:.3f}, recall {recall:.3f} "
          "(p > 0.5 vs the DeepEM3D target)")
    print(f"{args.method} (sigma {args.sigma}, dust {args.dust})")
    print(f"{'threshold':>9} {'segments':>8} {'ARE':>7} {'VOI':>7} {'split':>7} {'merge':>7}")
    for r in rows:
        print(f"{r['threshold']:>9.3f} {r['segments']:>8} {r['adapted_rand_error']:>7.4f} "
              f"{r['voi']:>7.3f} {r['voi_split']:>7.3f} {r['voi_merge']:>7.3f}")


if __name__ == "__main__":
    main()
