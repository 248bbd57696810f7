#!/usr/bin/env bash
# Run the quick reproduction suite (85 min on 2 CPU cores on 2026-11-24) and copy its small outputs
# (report, plots, CSV/JSON; no checkpoints) to docs/results/reproduce-quick/.
# Re-running continues an interrupted suite: finished sub-runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/reproduce-quick}
M=${MIMLAB:-.venv/bin/mimlab}
DEST=docs/results/reproduce-quick
mkdir -p "$DEST/cka" "$DEST/psnr"
rc=0
$M reproduce --suite quick --data "$DATA" --out "$OUT" 2>&1 | tee "$DEST/console.log" || rc=$?
cp "$OUT"/report.md "$OUT"/summary.json "$OUT"/*.png "$DEST"/
cp "$OUT"/cka/cka.csv "$OUT"/cka/*.png "$DEST/cka/"
for d in "$OUT"/psnr/*/; do
  m=$(basename "$d"); mkdir -p "$DEST/psnr/$m"; cp "$d"/grid.png "$d"/psnr.json "$DEST/psnr/$m/"
done
exit $rc
