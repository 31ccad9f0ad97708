#!/usr/bin/env bash
# On the lent GPU machine (benchmarks/device/README.md): runs SRA-CL evidence sweeps side by side
# for at most SECONDS, then tabulates them and packs the results into $OUT/results.tgz.
#   bash benchmarks/device/run_jobs.sh SECONDS JOB [JOB ...]
# Jobs (each a launch/sweep.py sweep, with its own number of runs at once):
#   toys_compare      SASRec vs SASRec + SRA-CL on Toys, 3 seeds            (.kit/toys)
#   ml100k_compare    the same on ml-100k, user_mode=user                   (.kit/ml100k)
#   ml100k_items      the same on ml-100k, user_mode=items                  (.kit/ml100k)
#   beauty_missing    the 3 Beauty ablation runs session 6 did not finish   (.kit/beauty)
#   beauty_gru4rec    GRU4Rec vs GRU4Rec + SRA-CL on Beauty, 3 seeds        (.kit/beauty)
#   beauty_bert4rec   BERT4Rec vs BERT4Rec + SRA-CL on Beauty, 3 seeds      (.kit/beauty)
#   JOB@alone         a compare job's backbone-alone arm only (its seeds), in JOB's folder
#   beauty_faithful   the faithful user mode on Beauty: one text per training prefix encoded
#                     here (timed), then SRA-CL x 3 seeds on those tables   (.kit/minilm and
#                     .kit/beauty/data on the first call; the tables stay in $DEVICE_RUNS)
# Runs live in $DEVICE_RUNS/<job> (default /root/device_runs) and resume from their checkpoints:
# when SECONDS run out every run gets SIGTERM, checkpoints and stops, and the same call again
# (on the still-warm machine) goes on. Finished runs are skipped.
# PAR_SCALE=N multiplies each job's runs-at-once (default 1), PARALLEL=N sets it for every job;
# SWEEP_EXTRA adds flags to every run
# (e.g. SWEEP_EXTRA="--config.train.num_steps=4" for a dry run on a CPU).
# SEM_ROOT=D restores each slim kit's tables into D/<dataset>/sem_<mode> (a copy) instead of in
# place, so that .kit stays small enough to travel (the CPU campaign sets it).
# ARCHIVE_DIR=D also copies each job's tables and its runs' small files (results, configs,
# metrics, compressed per-user ranks; no checkpoints) into D/<job> (launch/sweep.py --archive),
# and first restores the runs D/<job> holds as finished (--restore_finished_from), so a sweep
# relaunched on a new machine does not train them again.
# The whole script is one { ... } block that ends in exit: bash parses it before running any of
# it, so editing or checking out this file while a long run is in it cannot derail that run.
{
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUDGET=$1; shift
OUT="${OUT:-/tmp/device_out}"
RUNS="${DEVICE_RUNS:-/root/device_runs}"
PAR_SCALE="${PAR_SCALE:-1}"
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)

[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import ml_collections, scann, bm25s" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# job -> dataset, semantic mode, config, runs at once, extra sweep flags. JOB@alone (a compare
# job) runs that job's backbone-alone arm only, in JOB's folder: 3 short runs that fit in one
# session on the CPU, where the SRA-CL runs take several.
spec() {
  if [ "${1%@alone}" != "$1" ]; then
    local ds mode config par only
    read -r ds mode config par only <<< "$(spec_of "${1%@alone}")"
    case "$config" in *compare*) ;; *) return 1 ;; esac
    # Every seed of the arm, whichever seeds the config's sweep lists (a pattern: always quoted).
    echo "$ds $mode $config $par --only=alpha=0.0_beta=0.0_seed=*"
  else
    spec_of "$1"
  fi
}
spec_of() {
  case "$1" in
    toys_compare)    echo "toys items configs/sracl/toys.py:items,compare 6" ;;
    ml100k_compare)  echo "ml100k user configs/sracl/ml100k.py:compare 6" ;;
    ml100k_items)    echo "ml100k items configs/sracl/ml100k.py:items,compare 6" ;;
    beauty_missing)  echo "beauty items configs/sracl/beauty.py:items,ablation 3 \
--only=synthesizer=mean_seed=2024,synthesizer=mean_seed=2026,neighbours=random_seed=2025" ;;
    beauty_gru4rec)  echo "beauty items configs/sracl/beauty.py:items,gru4rec,compare 6" ;;
    beauty_bert4rec) echo "beauty items configs/sracl/beauty.py:items,bert4rec,compare 6" ;;
    beauty_faithful) echo "beauty prefix configs/sracl/beauty.py:seeds 3" ;;
    *) return 1 ;;
  esac
}

for job in "$@"; do
  spec "$job" > /dev/null || { echo "unknown job $job" >&2; exit 2; }
done
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$OUT/machine.txt"

deadline=$(( T0 + BUDGET - 45 ))  # 45 s kept for tabulating and packing

# One job: its semantic tables (a slim copy's prefix embeddings rebuilt and checked bit for bit, or
# the faithful per-prefix texts encoded here), then its sweep until the deadline.
run_job() {
  local job=$1 dir=${1%@alone} ds mode config par only sem
  read -r ds mode config par only <<< "$(spec "$job")"
  local data="$ROOT/.kit/$ds/data"
  local args=(--config="$config" --workdir="$RUNS/$dir"
              --parallel="${PARALLEL:-$(( par * PAR_SCALE ))}"
              --override=--config.data.path="$data"
              --override=--config.sracl.semantic.user_mode="$mode")
  if [ "$mode" = prefix ]; then
    # The paper's user mode: one MiniLM text per training prefix (.kit/minilm: float16 weights).
    sem="$RUNS/${job}_semantic"
    args+=(--override=--config.sracl.semantic.encoder="$ROOT/.kit/minilm")
    if [ ! -f "$sem/semantic/stats.json" ]; then
      local t=$(date +%s)
      timeout -s TERM $(( deadline - t )) python3 launch/embed.py --config="$config" \
        --config.data.path="$data" --config.sracl.semantic.encoder="$ROOT/.kit/minilm" \
        --config.train.progress=false --workdir="$sem" > "$RUNS/${job}_embed.log" 2>&1 || return 1
      echo "$job: semantic stage (per-prefix texts) took $(( $(date +%s) - t )) s" \
        >> "$OUT/commands.txt"
    fi
    sem="$sem/semantic"
  else
    sem="${SEM_ROOT:-$ROOT/.kit}/$ds/sem_$mode"
    if [ ! -f "$sem/prefix_embeddings.npy" ]; then
      if [ "$sem" != "$ROOT/.kit/$ds/sem_$mode" ]; then
        rm -rf "$sem" && mkdir -p "$sem" && cp -rp "$ROOT/.kit/$ds/sem_$mode"/. "$sem"/ || return 1
      fi
      python3 benchmarks/device/kit.py --action=restore --dst "$sem" --config "$config" \
        --config.data.path="$data" --config.sracl.semantic.user_mode="$mode" \
        > "$RUNS/${job}_restore.log" 2>&1 || return 1
    fi
  fi
  args+=(--override=--config.sracl.semantic_dir="$sem")
  # Runs the committed archive holds as finished are copied back first (a new machine skips them).
  [ -n "${ARCHIVE_DIR:-}" ] && args+=(--restore_finished_from="$ARCHIVE_DIR/$dir")
  [ -n "${only:-}" ] && args+=("$only")
  for x in ${SWEEP_EXTRA:-}; do args+=(--override="$x"); done
  echo "$job: python launch/sweep.py ${args[*]}" >> "$OUT/commands.txt"
  # Each call's log starts afresh (the summary below greps it); earlier calls' logs of the same
  # job are kept, appended in order, in $RUNS/log_history/<job>.log.
  if [ -s "$RUNS/$job.log" ]; then
    mkdir -p "$RUNS/log_history" && cat "$RUNS/$job.log" >> "$RUNS/log_history/$job.log"
  fi
  echo "$(date -u +%FT%TZ) $job: launch/sweep.py ${args[*]}" > "$RUNS/$job.log"
  timeout -s TERM -k 120 $(( deadline - $(date +%s) )) python3 launch/sweep.py "${args[@]}" \
    >> "$RUNS/$job.log" 2>&1
}

pids=()
for job in "$@"; do
  run_job "$job" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

for job in "$@"; do
  read -r ds mode config _ only <<< "$(spec "$job")"
  dir=${job%@alone}
  python3 launch/sweep.py --config="$config" --workdir="$RUNS/$dir" --tabulate_only \
    ${only:+"$only"} ${ARCHIVE_DIR:+--archive="$ARCHIVE_DIR/$dir"} > /dev/null 2>&1
  n_done=$(ls "$RUNS/$dir"/*/results.json 2>/dev/null | wc -l)
  echo "== $job: $n_done runs finished"
  [ -f "$RUNS/$dir/sweep_seeds.md" ] && cat "$RUNS/$dir/sweep_seeds.md"
  grep -h "runs not started\|failed\|Traceback\|Error" "$RUNS/$job"*.log | tail -3
done | tee "$OUT/summary.txt"
(cd "$RUNS" && tar czf "$OUT/results.tgz" --exclude='checkpoints' --exclude='*.npy' \
  --exclude='semantic' -- *.log */sweep* */*/results.json */*/config.json */*/train.log \
  */*/eval_ranks.npz \
  2>/dev/null)
echo "packed $(du -h "$OUT/results.tgz" | cut -f1) after $(( $(date +%s) - T0 )) s"
exit
}
