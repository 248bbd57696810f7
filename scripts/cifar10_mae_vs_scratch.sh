#!/usr/bin/env bash
# First CIFAR-10 result, step 1 of 3: MAE pretraining of the tiny ViT (patch 4, 32 px,
# depth 12, width 192) on all 50k CIFAR-10 training images, scheduled for 3 epochs.
# The reported run was stopped after epoch 1 (its checkpoints/last.pt, 390 steps) for lack of
# CPU time; to reproduce that exactly add run.stop_at_step=390 (the schedule stays 3 epochs).
# Steps 2 and 3: scripts/cifar10_finetune.sh, scripts/cifar10_probes.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/cifar10-mae-vs-scratch}
M=${MIMLAB:-.venv/bin/mimlab}
$M pretrain --data "$DATA" --out "$OUT" --name mae-pretrain model.preset=tiny \
  optim.epochs=3 optim.batch_size=128 optim.base_lr=1.5e-3 optim.warmup_epochs=0.5 \
  run.log_every=20 run.progress=false "$@"
