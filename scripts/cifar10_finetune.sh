#!/usr/bin/env bash
# First CIFAR-10 result, step 2 of 3: fine-tune comparison (after cifar10_mae_vs_scratch.sh):
# MAE-pretrained vs random init, identical budget: 10k seeded CIFAR-10 train images, 3 epochs,
# batch 128, evaluated on all 10,000 test images. Both run side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/cifar10-mae-vs-scratch}
M=${MIMLAB:-.venv/bin/mimlab}
CK="$OUT/mae-pretrain/checkpoints/last.pt"
FT="data.limit=10000 optim.epochs=3 optim.batch_size=128 optim.base_lr=1e-3 optim.warmup_epochs=0.5 \
  finetune.mixup=0 finetune.cutmix=0 finetune.label_smoothing=0.1 model.drop_path=0.1 \
  data.num_workers=1 run.progress=false run.log_every=10"
export OMP_NUM_THREADS=1
$M finetune --data "$DATA" --out "$OUT" --name ft-mae --pretrained "$CK" $FT optim.layer_decay=0.75 > "$OUT/ft-mae.log" 2>&1 &
$M finetune --data "$DATA" --out "$OUT" --name ft-scratch model.preset=tiny $FT optim.layer_decay=1.0 > "$OUT/ft-scratch.log" 2>&1 &
wait
for r in ft-mae ft-scratch; do
  echo "$r: $(python3 -c "import json;d=json.load(open('$OUT/$r/results.json'));print(d['top1'], d['seconds'])")"
done
