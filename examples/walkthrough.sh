#!/usr/bin/env bash
# A single-node walkthrough on synthetic data: synth -> train -> cluster -> evaluate.
#
#   bash examples/walkthrough.sh [WORKDIR]          # about 4 minutes on 2 CPU cores
#
# Sizes come from the environment, so that the project's tests can run it in
# seconds: HYPSEG_EXAMPLE_N (volumes), HYPSEG_EXAMPLE_SIZE (voxels per side),
# HYPSEG_EXAMPLE_SPLIT (train/val/test), HYPSEG_EXAMPLE_STEPS (training steps;
# default: 2 minutes of training), HYPSEG_EXAMPLE_TRAIN_OPTS (more train
# options, e.g. a smaller model), HYPSEG_EXAMPLE_KS (levels), HYPSEG_EXAMPLE_PATCH_SIZE
# (patch side for the embeddings), HYPSEG_EXAMPLE_THREADS.
set -euo pipefail

HYPSEG=${HYPSEG:-hypseg}                          # the command, e.g. "python -m hypsegcli"
# one executable (its path may hold spaces), or else words split at blanks
if [[ -x "$HYPSEG" ]]; then hypseg=("$HYPSEG"); else read -ra hypseg <<< "$HYPSEG"; fi
WORK=${1:-${HYPSEG_EXAMPLE_DIR:-hypseg-walkthrough}}
N=${HYPSEG_EXAMPLE_N:-16}
SIZE=${HYPSEG_EXAMPLE_SIZE:-50}
SPLIT=${HYPSEG_EXAMPLE_SPLIT:-12/2/2}
STEPS=${HYPSEG_EXAMPLE_STEPS:-}
TRAIN_OPTS=${HYPSEG_EXAMPLE_TRAIN_OPTS:-}
KS=${HYPSEG_EXAMPLE_KS:-"2 4 8"}
PATCH=${HYPSEG_EXAMPLE_PATCH_SIZE:-5}
THREADS=${HYPSEG_EXAMPLE_THREADS:-}

length=(--max-minutes 2)
if [[ -n "$STEPS" ]]; then length=(--steps "$STEPS"); fi
threads=()
if [[ -n "$THREADS" ]]; then threads=(--threads "$THREADS"); fi
k_args=(--patch-size "$PATCH")
for k in $KS; do k_args+=(--k "$k"); done

echo "== 1/5 synthetic volumes with 3-level ground truth in $WORK/data" >&2
"${hypseg[@]}" synth "$WORK/data" --n "$N" --size "$SIZE" --split "$SPLIT" --seed 0

echo "== 2/5 train the hyperbolic VAE on $WORK/data/train/images" >&2
# shellcheck disable=SC2086  # TRAIN_OPTS holds several options
# (--overwrite: running the walkthrough again starts the model over)
"${hypseg[@]}" train "$WORK/data/train/images" -o "$WORK/model.pt" --overwrite "${length[@]}" ${threads[@]+"${threads[@]}"} $TRAIN_OPTS

echo "== 3/5 the plan: what clustering the test volumes will cost" >&2
"${hypseg[@]}" cluster "$WORK/data/test/images" -m "$WORK/model.pt" "${k_args[@]}" -o "$WORK/seg" \
    ${threads[@]+"${threads[@]}"} --dry-run

echo "== 4/5 segment the test volumes at every level into $WORK/seg" >&2
"${hypseg[@]}" cluster "$WORK/data/test/images" -m "$WORK/model.pt" "${k_args[@]}" -o "$WORK/seg" \
    ${threads[@]+"${threads[@]}"}

echo "== 5/5 score them against the ground truth ($WORK/scores.csv)" >&2
"${hypseg[@]}" evaluate "$WORK/seg" "$WORK/data/test/labels" --csv "$WORK/scores.csv"

echo "done: model $WORK/model.pt, segmentations $WORK/seg, scores $WORK/scores.csv," \
    "run records $WORK/seg/hypseg-runs.jsonl" >&2
