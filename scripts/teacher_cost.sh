#!/usr/bin/env bash
# Cost of the teacher in MaskDistill pretraining on this machine: images/s of whole
# training runs (1,024 CIFAR-10 images, 1 epoch, batch 64, tiny ViT) with the EfficientNet-Lite0
# teacher live at 224 px and 64 px, with the feature cache (build, then reuse), and MAE / SimMIM
# (no teacher) at the same budget.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/teacher-cost}
M=${MIMLAB:-.venv/bin/mimlab}
export MIMLAB_CACHE=${MIMLAB_CACHE:-$OUT/cache}
C="--data $DATA --out $OUT model.preset=tiny data.limit=1024 optim.epochs=1 optim.batch_size=64 run.progress=false"
FIXED="data.crop_scale=[1,1] data.hflip=false"
$M pretrain $C --name mae method.name=mae $FIXED
$M pretrain $C --name simmim method.name=simmim $FIXED
$M pretrain $C --name md-live-224 method.name=maskdistill method.teacher_size=224 $FIXED
$M pretrain $C --name md-live-64 method.name=maskdistill method.teacher_size=64 $FIXED
$M pretrain $C --name md-cache-build method.name=maskdistill method.teacher_size=224 method.cache_teacher=true $FIXED
$M pretrain $C --name md-cache-reuse method.name=maskdistill method.teacher_size=224 method.cache_teacher=true $FIXED
for r in mae simmim md-live-224 md-live-64 md-cache-build md-cache-reuse; do
  python3 -c "import json;d=json.load(open('$OUT/$r/results.json'));print('$r', d['images_per_s'], d['seconds'], d.get('teacher_cache_built',''))"
done
