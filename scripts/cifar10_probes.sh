#!/usr/bin/env bash
# First CIFAR-10 result, step 3 of 3: frozen-feature protocols: MAE-pretrained vs random init, 10k seeded CIFAR-10 train
# images (no augmentation), all 10,000 test images. Two at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/cifar10-mae-vs-scratch}
M=${MIMLAB:-.venv/bin/mimlab}
CK="$OUT/mae-pretrain/checkpoints/last.pt"
C="data.limit=10000 data.num_workers=1 run.progress=false"
export OMP_NUM_THREADS=1
$M knn --data "$DATA" --out "$OUT" --name knn-mae --pretrained "$CK" $C > "$OUT/knn-mae.log" 2>&1 &
$M knn --data "$DATA" --out "$OUT" --name knn-random model.preset=tiny $C > "$OUT/knn-random.log" 2>&1 &
wait
$M linprobe --data "$DATA" --out "$OUT" --name linprobe-mae --pretrained "$CK" $C > "$OUT/linprobe-mae.log" 2>&1 &
$M linprobe --data "$DATA" --out "$OUT" --name linprobe-random model.preset=tiny $C > "$OUT/linprobe-random.log" 2>&1 &
wait
for r in knn-mae knn-random linprobe-mae linprobe-random; do
  echo "$r: $(python3 -c "import json;d=json.load(open('$OUT/$r/results.json'));print(round(d['top1'],2), d.get('best_lr',''))")"
done
