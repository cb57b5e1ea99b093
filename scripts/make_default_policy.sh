#!/usr/bin/env bash
# Reproduce the shipped policy (m2vla_core/m2vla_core/assets/policies/default/) from scratch:
# record expert demonstrations at 448 px -> frozen-backbone features (+ the named objects' x, y in
# the state) -> train MoL+MSM (gripper features, relative actions, L1 loss) -> ONNX export -> fit
# the object localiser that reads those x, y from the camera -> install. Usage: scripts/make_default_policy.sh [WORK_DIR]
# (default /tmp/m2vla_default_policy; about 2 h on 2 CPU cores, most of it recording at 448 px).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/m2vla_default_policy}
M2VLA=.venv/bin/m2vla
EPISODES=${EPISODES:-160}   # per task, seeds 0..EPISODES-1 (evaluation uses seeds >= 1000)
STEPS=${STEPS:-12000}
LAYOUTS=${LAYOUTS:-1000}  # first frames per task the localiser is fitted on (seeds 0..LAYOUTS-1, below eval's 1000)
DEST=m2vla_core/m2vla_core/assets/policies/default

# Two recorders at once (one per core); the frames are rendered at 448 px, the localiser's input
# size (the head's backbone downsizes them to its 224 px).
HALF=$((EPISODES / 2))
pids=()
for offset in 0 "$HALF"; do
  OMP_NUM_THREADS=1 $M2VLA record --out "$WORK/data_$offset" --tasks all --episodes-per-task "$HALF" \
    --seed-offset "$offset" --noise 0.02 --image-size 448 --overwrite --no-progress &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # a failed recording stops the script (set -e)
$M2VLA features --data "$WORK/data_0" --out "$WORK/features" --cache "$WORK/cache" --privileged-state --no-progress
$M2VLA features --data "$WORK/data_$HALF" --out "$WORK/features" --cache "$WORK/cache" --privileged-state --append \
  --no-progress
$M2VLA train --data "$WORK/features" --out "$WORK/ckpt" --config mol+msm --steps "$STEPS" --seed 0 \
  --position-noise-cm 0.8 --gripper-features panda --relative-actions on --action-loss l1 --no-progress
$M2VLA export "$WORK/ckpt"
$M2VLA localiser --out "$WORK/ckpt" --episodes-per-task "$LAYOUTS" --restarts 0,1 --context 3 --no-progress
mkdir -p "$DEST"
cp "$WORK/ckpt"/{config.json,model.safetensors,model.onnx,localiser.json,localiser.safetensors,localiser_fit.json} "$DEST/"
echo "installed $DEST; evaluate with: $M2VLA eval --episodes 20 --seed-offset 1000 --json results/eval_default.json"
