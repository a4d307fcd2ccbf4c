"""Held-out scores of a model on ISBI 2012 sections 20..29 (the project's held-out protocol):
the held-out sections as their own volume (reflected at their own z bounds), predicted with
the sliding-window predictor of `deepem3d infer` (deepem3d.models.sliding.predict_volume, so a
chunked run gives the same map), segmented in one piece with deepem3d's segmentation, scored
against /labels/neuron_ids[20:30] with the SNEMI3D adapted Rand error and VOI; plus pixel
precision / recall of the map (p > 0.5) against the training target of the model's head
(DeepEM3D's boundary target, or the nearest-neighbour affinities).

    python scripts/evaluate_isbi2012.py [--model isbi2012-small-affinity-x3] [--tta 16]
        [--method mean --thresholds 0.3,0.5,0.7] [--sigma 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from deepem3d.axes import xyzc_from_czyx, zyx_from_xyz
from deepem3d.models.checkpoint import DEFAULT_MODEL, expand_models, load_model
from deepem3d.models.sliding import (
    ModelPredictor,
    PatchGeometry,
    abutting_tiles,
    predict_volume,
    quantize,
)
from deepem3d.models.targets import affinity_target, boundary_target
from deepem3d.sample import load_sample
from deepem3d.segmentation.metrics import evaluate
from deepem3d.segmentation.pipeline import segment

HELD_OUT = "20:30"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="checkpoint path or shipped name (default: the shipped default, "
                        f"{DEFAULT_MODEL}); repeat to combine models as `deepem3d infer` does")
    parser.add_argument("--tta", type=int, default=16)
    parser.add_argument("--method", default=None, choices=["watershed", "mean"],
                        help="default: watershed for a boundary model, mean for affinities")
    parser.add_argument("--thresholds", default=None,
                        help="default: 0.05,0.1,0.19,0.3 (watershed), 0.5,0.55,...,0.7 (mean)")
    parser.add_argument("--sigma", type=float, default=None,
                        help="in-plane Gaussian on the uint8 map before segmenting, as "
                        "`deepem3d segment --sigma` (0: none; default 1 for a boundary model, "
                        "5 for affinities)")
    parser.add_argument("--dust-size", type=int, default=0,
                        help="merge segments below N voxels, as `deepem3d segment --dust-size`")
    parser.add_argument("--sections", default=HELD_OUT,
                        help="START:END; 20:30 is the held-out set, 15:20 the validation set "
                        "(choose thresholds there)")
    parser.add_argument("--geometry", choices=["tiles", "patches"], default="tiles",
                        help="tiles: `deepem3d infer`'s default (one abutting tile per section "
                        "here, the receptive field as margin); patches: the former 512 px "
                        "patches, 384 px output, 64 px overlap")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start_z, end_z = (int(v) for v in args.sections.split(":"))
    image, ids = load_sample()
    image, ids = image[start_z:end_z], ids[start_z:end_z].astype(np.uint64)
    names = args.model or [DEFAULT_MODEL]
    loaded = [load_model(name) for name in expand_models(names)]
    model, meta = loaded[0]
    head = model.head
    if any(m.head != head for m, _ in loaded):
        raise SystemExit("combined models must share one head")
    method = args.method or ("watershed" if head == "boundary" else "mean")
    dust = args.dust_size
    sigma = args.sigma if args.sigma is not None else (1.0 if head == "boundary" else 5.0)
    start = time.time()
    predictors = [ModelPredictor(m) for m, _ in loaded]
    if args.geometry == "tiles":
        context = max(max(m.context[:2]) for m, _ in loaded)
        geometry = abutting_tiles(max(image.shape[1:]), context, batch=1)
    else:
        geometry = PatchGeometry(size=512, output=384, overlap=64)
    probabilities = predict_volume(predictors, image, geometry, tta=args.tta)
    seconds = time.time() - start

    if head == "boundary":
        target = boundary_target(ids.astype(np.int64)).astype(bool)[None]
        predicted = probabilities > 0.5
    else:  # edges the ground truth cuts, against affinity < 0.5
        target = affinity_target(ids.astype(np.int64)) < 0.5
        predicted = probabilities < 0.5
    precision = float((predicted & target).sum() / max(predicted.sum(), 1))
    recall = float((predicted & target).sum() / max(target.sum(), 1))

    # the uint8 layer `deepem3d infer` would write, as x, y, z, c
    values = np.ascontiguousarray(xyzc_from_czyx(quantize(probabilities)))
    default = "0.05,0.1,0.19,0.3" if method == "watershed" else "0.5,0.55,0.6,0.65,0.7"
    thresholds = [float(t) for t in (args.thresholds or default).split(",")]
    # smoothing inside `segment`: on the uint8 map, as `deepem3d segment --sigma` does
    segs = segment(values, method, thresholds, dust_size=dust, sigma=sigma)
    rows = []
    for t, seg in zip(thresholds, segs):
        scores = evaluate(np.ascontiguousarray(zyx_from_xyz(seg)), ids)
        rows.append({"threshold": t, "segments": int(np.count_nonzero(np.unique(seg))), **scores})
    result = {
        "model": meta.get("model"), "sections": args.sections, "tta": args.tta,
        "geometry": geometry.to_dict(),
        "predict_seconds": round(seconds, 1),
        "head": head, "map_precision": precision, "map_recall": recall,
        "method": method, "sigma": sigma, "dust": dust, "scores": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"sections {args.sections}; model {' + '.join(names)} "
          f"({head} head), "
          f"tta {args.tta}, predicted in {seconds:.1f} s; {head} precision {precision:.3f}, "
          f"recall {recall:.3f} "
          f"({'p(boundary)' if head == 'boundary' else '1 - affinity'} > 0.5 vs the "
          "training target)")
    print(f"{method} (sigma {sigma}, dust {dust})")
    print(f"{'threshold':>9} {'segments':>8} {'ARE':>7} {'VOI':>7} {'split':>7} {'merge':>7}")
    for r in rows:
        print(f"{r['threshold']:>9.3f} {r['segments']:>8} {r['adapted_rand_error']:>7.4f} "
              f"{r['voi']:>7.3f} {r['voi_split']:>7.3f} {r['voi_merge']:>7.3f}")


if __name__ == "__main__":
    main()
