#!/usr/bin/env bash
# First real result (issue #2): MAE-pretrained vs randomly initialised fine-tuning on CIFAR-10,
# same fine-tune budget, evaluated on all 10,000 test images. About an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/issue2}
M=${MIMLAB:-.venv/bin/mimlab}
# 1) MAE pretraining: tiny ViT (patch 4, 32 px, depth 12, width 192), all 50k train images
$M pretrain --data "$DATA" --out "$OUT" --name mae-pretrain model.preset=tiny \
  optim.epochs=3 optim.batch_size=128 optim.base_lr=1.5e-3 optim.warmup_epochs=0.5 \
  run.log_every=20 run.progress=false
CK="$OUT/mae-pretrain/checkpoints/last.pt"
# 2) identical fine-tune budget: 10k labelled train images (seeded subset), 4 epochs
FT="data.limit=10000 optim.epochs=4 optim.batch_size=128 optim.base_lr=1e-3 optim.warmup_epochs=0.5 \
  finetune.mixup=0 finetune.cutmix=0 finetune.label_smoothing=0.1 model.drop_path=0.1 run.progress=false run.log_every=20"
$M finetune --data "$DATA" --out "$OUT" --name ft-mae --pretrained "$CK" $FT optim.layer_decay=0.75
$M finetune --data "$DATA" --out "$OUT" --name ft-scratch model.preset=tiny $FT optim.layer_decay=1.0
# 3) frozen-feature protocols on the same 10k subset (cheap extras)
$M knn --data "$DATA" --out "$OUT" --name knn-mae --pretrained "$CK" data.limit=10000 run.progress=false
$M knn --data "$DATA" --out "$OUT" --name knn-random model.preset=tiny data.limit=10000 run.progress=false
$M linprobe --data "$DATA" --out "$OUT" --name linprobe-mae --pretrained "$CK" data.limit=10000 run.progress=false
$M linprobe --data "$DATA" --out "$OUT" --name linprobe-random model.preset=tiny data.limit=10000 run.progress=false
for r in ft-mae ft-scratch knn-mae knn-random linprobe-mae linprobe-random; do
  echo "$r: $(python3 -c "import json;d=json.load(open('$OUT/$r/results.json'));print(d['top1'])")"
done
