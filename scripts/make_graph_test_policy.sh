#!/usr/bin/env bash
# The policy the full-graph tests use to check that the ROS graph completes tasks
# (tests/fixtures/policies/one_layout): a MoL+MSM head trained on ONE layout per task (seed 3),
# demonstrated 12 times with different noise. It solves those layouts and nothing else; it is
# not a policy for users (that is the shipped one, scripts/make_default_policy.sh). What it
# gives the tests: a head known to succeed in `m2vla eval` on these seeds, so a graph that
# fails them has lost something between the sim and the head (timing, ordering, conversions).
# About 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/m2vla_graph_test_policy}
M2VLA=.venv/bin/m2vla
TASKS=reach_above,pick_lift,push_to_zone,place_on_zone
SEED=3
DEST=tests/fixtures/policies/one_layout
$M2VLA record --out "$WORK/data" --tasks "$TASKS" --episodes-per-task 1 --seed-offset "$SEED" --repeats 12 \
  --noise 0.02 --overwrite --no-progress
$M2VLA features --data "$WORK/data" --out "$WORK/features" --cache "$WORK/cache" --no-progress
$M2VLA train --data "$WORK/features" --out "$WORK/ckpt" --config scripts/graph_test_policy.run.json --no-progress
$M2VLA export "$WORK/ckpt"
$M2VLA eval --policy "$WORK/ckpt" --tasks "$TASKS" --episodes 1 --seed-offset "$SEED" --workers 2 --no-gif \
  --no-progress --json "$WORK/eval.json"
mkdir -p "$DEST"
cp "$WORK/ckpt/config.json" "$WORK/ckpt/model.safetensors" "$WORK/ckpt/model.onnx" "$DEST/"
echo "installed $DEST"
