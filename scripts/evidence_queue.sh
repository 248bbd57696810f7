#!/usr/bin/env bash
# Protocol v2's stages in their order, each resumable (finished sub-runs are skipped), so that a
# session starts the evidence work with one command and leaves it running in the background:
#
#   nohup scripts/evidence_queue.sh > runs/evidence-queue.log 2>&1 &
#
# Stops at the first stage that fails (its one-line error is in the log). Result files land in
# docs/results/standard/v2/ (commit them after each sub-run); run directories in runs/standard/.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES="${STAGES:-core contrastive smalldata rmae augment cmae_variants sampling bench1000 ftbudget-mae}"
for stage in $STAGES; do
  echo "[queue] $(date -u +%FT%TZ) stage $stage"
  mimlab reproduce --suite evidence --stage "$stage"
done
echo "[queue] $(date -u +%FT%TZ) all stages done"
