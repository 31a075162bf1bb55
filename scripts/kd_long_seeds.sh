#!/usr/bin/env bash
# Issue 13's honest comparison on the shipped student's long schedule, for more seeds: the student with the
# teacher, the same student without it, and the teacher alone, all on the teacher's split (stratified, split seed
# 0: the split the shipped file and its teacher were trained on), so that every number is on the same 778 photos.
#
#   INIT=OLD/cnn_flowers.pth bash scripts/kd_long_seeds.sh      # OLD: weights/cnn_flowers.pth at commit 710f541
#
# Seed 0 of each is the shipped run (docs/results.md, "Shipped CNN: the distilled student"). Runs go seed by seed
# (both students of a seed before the next seed, the teachers last), so an interrupted sweep still holds whole
# pairs; rerunning the command skips finished runs and resumes an interrupted one from its last epoch.
set -euo pipefail
INIT=${INIT:?set INIT to the file the students start from (weights/cnn_flowers.pth at commit 710f541)}
TEACHER=${TEACHER:-runs/kd-teacher-lite0-160}
DATA=${DATA:-../shared/data/flowers}
RUNS=${RUNS:-runs}
SEEDS=${SEEDS:-1 2}
PYTHON=${PYTHON:-python}

STUDENT="--init-from $INIT --arch convnextv2_atto --size 128 --epochs 10 --lr 5e-4 --resize-to 224 --resize-epochs 3
         --final-lr-div 2 --ema-decay 0.99 --split stratified --split-seed 0"
TEACHER_RUN="--arch tf_efficientnet_lite0 --size 160 --freeze-epochs 1 --epochs 3 --split stratified --split-seed 0"

# shellcheck source=scripts/train_or_resume.sh
source "$(dirname "$0")/train_or_resume.sh"

for seed in $SEEDS; do
    # shellcheck disable=SC2086  # the option strings split into words on purpose
    train cnn "kd-long-teacher-seed$seed" --data "$DATA" $STUDENT --seed "$seed" --teacher "$TEACHER" --teacher-size 160
    # shellcheck disable=SC2086
    train cnn "kd-long-noteacher-seed$seed" --data "$DATA" $STUDENT --seed "$seed"
done
for seed in $SEEDS; do
    # shellcheck disable=SC2086
    train teacher "kd-teacher-lite0-160-seed$seed" --data "$DATA" $TEACHER_RUN --seed "$seed"
done
