#!/usr/bin/env bash
# Sets up ./.venv and trains + evaluates SASRec on the embedded default, MovieLens-100K
# (from the RecBole wheel), printing a progress bar and the final HR/NDCG/MRR table.
# CONFIG picks another config (e.g. CONFIG=configs/sasrec/ml100k.py:tiny for a 1-2 minute run);
# extra arguments are passed to launch/train.py (e.g. --config.train.num_epochs=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
. .venv/bin/activate
CONFIG="${CONFIG:-configs/sasrec/ml100k.py}"
WORKDIR="${WORKDIR:-$HOME/runs/sasrec_ml100k_demo}"
# exec: a SIGTERM or SIGINT to this script (timeout, a scheduler) reaches the trainer itself,
# which checkpoints and exits 0; the same command resumes.
exec python launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "$@"
