#!/usr/bin/env bash
# Reproduce the shipped policy (m2vla_core/m2vla_core/assets/policies/default/) from scratch:
# record expert demonstrations -> frozen-backbone features -> train MoL+MSM -> ONNX export -> install.
# Usage: scripts/make_default_policy.sh [WORK_DIR]   (default /tmp/m2vla_default_policy; ~1 h on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/m2vla_default_policy}
M2VLA=.venv/bin/m2vla
EPISODES=${EPISODES:-80}   # per task, seeds 0..EPISODES-1 (evaluation uses seeds >= 1000)
STEPS=${STEPS:-1500}   # validation loss is lowest near 1500-1800 steps; longer runs overfit (docs/results.md)
DEST=m2vla_core/m2vla_core/assets/policies/default

$M2VLA record --out "$WORK/data" --tasks all --episodes-per-task "$EPISODES" --noise 0.02 --overwrite --no-progress
$M2VLA features --data "$WORK/data" --out "$WORK/features" --cache "$WORK/cache" --no-progress
$M2VLA train --data "$WORK/features" --out "$WORK/ckpt" --config mol+msm --steps "$STEPS" --seed 0 --no-progress
$M2VLA export "$WORK/ckpt"
mkdir -p "$DEST"
cp "$WORK/ckpt/config.json" "$WORK/ckpt/model.safetensors" "$WORK/ckpt/model.onnx" "$DEST/"
echo "installed $DEST; evaluate with: $M2VLA eval --episodes 20 --workers 2 --json results/eval_default.json"
