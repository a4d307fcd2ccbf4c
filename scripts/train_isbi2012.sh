#!/usr/bin/env bash
# Train shipped ISBI 2012 weights: sections 0..14 for training, 15..19 for validation (model
# selection), never 20..29 (held out; training reflects at the split). Then export a checkpoint
# (float16, no optimizer state) into the package, score the validation sections (choose the
# segmentation settings there) and the held-out ones.
# Usage: bash scripts/train_isbi2012.sh [RUN_DIR] [ITERATIONS] [HEAD] [CHECKPOINT]
#   HEAD boundary (default): isbi2012-small, DeepEM3D's boundary map, h-minima watershed
#   HEAD affinity: isbi2012-small-affinity, nearest-neighbour affinities, mean agglomeration
#   CHECKPOINT last (default) or best (lowest validation adapted Rand error of the run)
# The run resumes from RUN_DIR/last.pt when there is one; a larger ITERATIONS extends it (the
# poly schedule is recomputed for the new total). INIT (a checkpoint or shipped name), SEED and
# LR in the environment start a fine-tuning run from INIT's weights instead. H5 names the ISBI
# 2012 volume (/raw, /labels/neuron_ids; default: isbi2012/isbi2012_neuron3d.h5 under
# $DEEPEM3D_DATA, else under a shared/data folder beside the repository). The shipped weights:
#   bash scripts/train_isbi2012.sh runs/isbi2012-small                       # 6,000, last
#   bash scripts/train_isbi2012.sh runs/isbi2012-small-affinity 10000 affinity
#   bash scripts/train_isbi2012.sh runs/isbi2012-small-affinity 25000 affinity best
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/isbi2012-small}
HEAD=${3:-boundary}
CHECKPOINT=${4:-last}
NAME=isbi2012-small; DEFAULT_ITERATIONS=6000; VAL_EVERY=500; THRESHOLDS=0.1; SIGMA=1; DUST=0
if [ "$HEAD" = affinity ]; then
  NAME=isbi2012-small-affinity; DEFAULT_ITERATIONS=25000; VAL_EVERY=1000; THRESHOLDS=0.55
  SIGMA=5
fi
ITERATIONS=${2:-$DEFAULT_ITERATIONS}
SEED=${SEED:-0}
LR=${LR:-0.01}
INIT_ARGS=()
if [ -n "${INIT:-}" ]; then INIT_ARGS=(--init "$INIT"); fi
H5=${H5:-${DEEPEM3D_DATA:-../shared/data}/isbi2012/isbi2012_neuron3d.h5}
.venv/bin/deepem3d train --image "$H5:/raw" --labels "$H5:/labels/neuron_ids" \
  --train-sections 0:15 --val-sections 15:20 --resolution 4,4,50 \
  --preset small --head "$HEAD" --in-sections 5 --batch-size 4 --patch-size 128 \
  --iterations "$ITERATIONS" --val-every "$VAL_EVERY" --seed "$SEED" --lr "$LR" --threads 1 \
  --out "$RUN" --resume "${INIT_ARGS[@]}"
.venv/bin/python -c "
from deepem3d.models.checkpoint import export_checkpoint
export_checkpoint('$RUN/$CHECKPOINT.pt', 'deepem3d/models/pretrained/$NAME.pt')
"
.venv/bin/python scripts/evaluate_isbi2012.py --model "$NAME" --sections 15:20 --tta 16 \
  --sigma "$SIGMA" --dust-size "$DUST"
.venv/bin/python scripts/evaluate_isbi2012.py --model "$NAME" --tta 16 --sigma "$SIGMA" \
  --dust-size "$DUST" --thresholds "$THRESHOLDS"
