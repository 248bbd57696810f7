#!/usr/bin/env bash
# CamVid semantic segmentation on a CPU: MAE pretrained on CamVid's own 367 training images
# against random init, 3 fine-tuning seeds each, mIoU on the 233 test images (11 classes).
# 1. a 160x120 copy of the training images (the resolution the camvid_cpu recipe trains at);
# 2. MAE pretraining of the recipe's mini ViT (patch 8, width 128, depth 6) on it, 96-px crops,
#    264 steps of 64 (12 epochs of the images repeated 4x);
# 3. `mimlab segment --recipe camvid_cpu` (linear head, 300 steps of 8) from it and from
#    random init, seeds 0 1 2; 4. mean mIoU and a 95 % t interval over the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/camvid}
OUT=${OUT:-runs/camvid-segment}
M=${MIMLAB:-.venv/bin/mimlab}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p "$OUT/camvid160/train"
$PY - "$DATA/images/train" "$OUT/camvid160/train" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
src, out = Path(sys.argv[1]), Path(sys.argv[2])
for p in sorted(src.glob("*.jpg")):
    if not (out / (p.stem + ".png")).exists():
        Image.open(p).convert("RGB").resize((160, 120), Image.BILINEAR).save(out / (p.stem + ".png"))
PYEOF
if [ ! -f "$OUT/mae-pretrain/checkpoints/last.pt" ] || [ ! -f "$OUT/mae-pretrain/results.json" ]; then
  $M pretrain --data "$OUT/camvid160/train" data.kind=folder data.train_split= \
    --out "$OUT" --name mae-pretrain model.preset=mini model.patch_size=8 model.img_size=96 \
    optim.batch_size=64 optim.base_lr=1.5e-3 data.repeat=4 optim.epochs=12 \
    optim.warmup_epochs=1 data.num_workers=1 run.log_every=20 run.progress=false
fi
for s in $SEEDS; do
  for init in mae random; do
    [ -f "$OUT/seg-$init-s$s/results.json" ] && continue
    pre=()
    [ "$init" = mae ] && pre=(--pretrained "$OUT/mae-pretrain/checkpoints/last.pt")
    $M segment --recipe camvid_cpu --data "$DATA" --out "$OUT" --name "seg-$init-s$s" \
      "${pre[@]}" run.seed=$s run.progress=false run.log_every=20 > /dev/null
  done
done
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from mimlab.core.stats import t975
out = Path(sys.argv[1])
for init in ("mae", "random"):
    rs = [json.loads(p.read_text()) for p in sorted(out.glob(f"seg-{init}-s*/results.json"))]
    v = [r["miou"] for r in rs]
    n = len(v)
    m = sum(v) / n
    sd = (sum((x - m) ** 2 for x in v) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    h = t975(n - 1) * sd / n ** 0.5 if n > 1 else float("nan")
    secs = [r["seconds"] for r in rs]
    print(f"{init}: mIoU {m:.2f} +- {h:.2f} (95 % t interval, n={n}; runs {v}); "
          f"pixel acc {[r['pixel_acc'] for r in rs]}; train s {secs}; "
          f"eval s {[r['eval_seconds'] for r in rs]}")
PYEOF
