#!/usr/bin/env bash
# Train the shipped `isbi2012-small` weights: ISBI 2012 sections 0..14 for training, 15..19 for
# validation (model selection), never 20..29 (held out; training reflects at the split).
# Then export the final last.pt (float16, no optimizer state) into the package, choose h on
# the validation sections and score the held-out ones.
# Usage: bash scripts/train_isbi2012.sh [RUN_DIR] [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/isbi2012-small}
ITERATIONS=${2:-6000}
H5=../shared/data/isbi2012/isbi2012_neuron3d.h5
.venv/bin/deepem3d train --image "$H5:/raw" --labels "$H5:/labels/neuron_ids" \
  --train-sections 0:15 --val-sections 15:20 --resolution 4,4,50 \
  --preset small --in-sections 5 --batch-size 4 --patch 128 --iterations "$ITERATIONS" \
  --val-every 500 --seed 0 --out "$RUN" --resume
.venv/bin/python -c "
from deepem3d.models.checkpoint import export_checkpoint
export_checkpoint('$RUN/last.pt', 'deepem3d/models/pretrained/isbi2012-small.pt')
"
.venv/bin/python scripts/evaluate_isbi2012.py --model isbi2012-small --sections 15:20 --tta 16
.venv/bin/python scripts/evaluate_isbi2012.py --model isbi2012-small --tta 16 --thresholds 0.1
