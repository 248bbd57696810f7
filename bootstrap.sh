#!/usr/bin/env bash
# One entry point for a fresh machine: creates/reuses the git-ignored virtual
# environment .venv, installs mimlab with everything it needs at the exact versions of
# constraints.txt (only when pyproject.toml or constraints.txt changed since the last
# install; pip's output goes to .venv/install.log), then runs a job.
#
#   ./bootstrap.sh demo [mimlab demo options]   # pretrain + evaluate, writes runs/demo-*
#   ./bootstrap.sh test [pytest options]        # ruff, mypy on the core, the suite with the docs build (= .ci/run)
#   ./bootstrap.sh install                      # only install
#   ./bootstrap.sh mimlab <any mimlab command>  # run the CLI inside the venv
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv" >&2
  "$PY" -m venv .venv
fi
STAMP=.venv/.mimlab-installed
LOG=.venv/install.log
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[bootstrap] installing mimlab and its dependencies into .venv at the versions of" \
       "constraints.txt (log: $LOG; the first run takes a few minutes)" >&2
  start=$SECONDS
  if ! {
    .venv/bin/python -m pip install --progress-bar off --upgrade pip || true
    .venv/bin/python -m pip install --progress-bar off -c constraints.txt -e ".[test,clip,bench,docs]"
  } >"$LOG" 2>&1; then
    echo "[bootstrap] install failed; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
  echo "[bootstrap] installed in $((SECONDS - start)) s" >&2
fi
job="${1:-demo}"; shift || true
case "$job" in
  install) echo "[bootstrap] ok: $(.venv/bin/python -c 'import torch, timm, mimlab; print("torch", torch.__version__, "timm", timm.__version__, "mimlab", mimlab.__version__)')" ;;
  demo)    exec .venv/bin/mimlab demo "$@" ;;
  test)    # lint and format check first (configured in pyproject.toml), then the suite
           .venv/bin/ruff check mimlab tests benchmarks docs/hooks
           .venv/bin/ruff format --check mimlab tests benchmarks docs/hooks
           .venv/bin/mypy   # the torch-free core ([tool.mypy] files in pyproject.toml)
           exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" ;;
  mimlab)  exec .venv/bin/mimlab "$@" ;;
  *) echo "usage: ./bootstrap.sh {demo|test|install|mimlab} [args...]" >&2; exit 2 ;;
esac
