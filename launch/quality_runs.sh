#!/usr/bin/env bash
# Runs the quality protocol of a config for its three seeds, one after another, each in its own
# workdir under $RUNS (default ~/runs).  Resumable: relaunch the same command after an interruption
# and each run continues from its last checkpoint (finished runs are skipped).
#   bash launch/quality_runs.sh configs/sasrec/beauty.py sasrec_beauty
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="$1"; NAME="$2"; shift 2
RUNS="${RUNS:-$HOME/runs}"
for SEED in 2024 2025 2026; do
  WD="$RUNS/${NAME}_seed${SEED}"
  if [ -f "$WD/results.json" ]; then echo "skip $WD (results.json exists)"; continue; fi
  python launch/train.py --config "$CONFIG" --workdir "$WD" --config.seed=$SEED \
    --config.train.progress=false "$@"
  # A run stopped by SIGTERM/SIGINT checkpoints and exits 0 without results.json: stop here too,
  # rather than starting the next seed.
  if [ ! -f "$WD/results.json" ]; then echo "stopped before $WD finished; relaunch to resume"; exit 0; fi
done
