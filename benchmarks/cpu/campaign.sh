#!/usr/bin/env bash
# Issue #3's evidence sweeps on this CPU, one run at a time, across sessions (BENCHMARKS.md §6).
#   bash benchmarks/cpu/campaign.sh [JOB ...]     run (or resume) the jobs in order
#   bash benchmarks/cpu/campaign.sh --status      finished runs per job and the run in progress
#   bash benchmarks/cpu/campaign.sh --pause       SIGSTOP the running campaign and its runs (to
#   bash benchmarks/cpu/campaign.sh --continue    free the CPU for a CI check), then SIGCONT
# Default jobs, in order (session 18, when a new machine had lost session 17's runs in progress:
# first the backbone-alone arms, whose runs fit in a session, then the SRA-CL runs, which take
# several): beauty_bert4rec@alone beauty_gru4rec@alone ml100k_compare@alone beauty_bert4rec
# beauty_gru4rec beauty_missing ml100k_compare beauty_faithful (toys_compare is done)
# (benchmarks/device/run_jobs.sh defines them: the same configs, kit and commands as on a GPU).
# Runs live in $CPU_RUNS/<job> (default /work/runs), outside the checkout, and resume from their
# last checkpoint when the same command is launched again; finished runs are skipped. A session
# starts it in the background so that it outlives the shell that launched it:
#   (setsid nohup bash benchmarks/cpu/campaign.sh > /work/runs/campaign.log 2>&1 &)
# A missing kit (.kit/<dataset>) is built first with benchmarks/device/make_kit.sh; its tables are
# restored into $CPU_RUNS/kit, so that .kit stays slim enough to travel to a lent GPU.
# Each job's tables and its runs' small files (no checkpoints) are archived in
# benchmarks/results/runs/cpu/<job> when its sweep ends, ready to commit.
# The whole script is one { ... } block that ends in exit: bash parses it before running any of
# it, so editing or checking out this file while a long run is in it cannot derail that run.
{
set -uo pipefail
cd "$(dirname "$0")/../.."
RUNS="${CPU_RUNS:-/work/runs}"
DEFAULT_JOBS=(beauty_bert4rec@alone beauty_gru4rec@alone ml100k_compare@alone beauty_bert4rec
              beauty_gru4rec beauty_missing ml100k_compare beauty_faithful)
mkdir -p "$RUNS"

if [ "${1:-}" = "--status" ]; then
  shift
  seen=" "
  for job in "${@:-${DEFAULT_JOBS[@]}}"; do
    job=${job%@alone}
    case "$seen" in *" $job "*) continue ;; esac  # JOB@alone and JOB share one folder
    seen="$seen$job "
    [ -d "$RUNS/$job" ] || { echo "$job: not started"; continue; }
    done_runs=$(ls "$RUNS/$job"/*/results.json 2> /dev/null | wc -l)
    echo "$job: $done_runs runs finished"
    for run in "$RUNS/$job"/*/; do
      [ -f "$run/results.json" ] && continue
      [ -f "$run/metrics.jsonl" ] || continue
      python3 - "$run" << 'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], "metrics.jsonl")) if l.strip()]
valid = [r for r in rows if r.get("split") == "valid"]
if valid:
  key = json.load(open(os.path.join(sys.argv[1], "config.json")))["train"]["early_stop_metric"]
  best = max(valid, key=lambda r: r.get(key, 0))
  print(f"  in progress: {os.path.basename(sys.argv[1].rstrip('/'))}: {len(valid)} evaluations, "
        f"last step {valid[-1]['step']}, best valid {key} {best[key]:.5f} at step {best['step']}")
  # Early stopping needs `patience` evaluations without a gain; the latest two checkpoints
  # (one per evaluation) give the time per step: their recorded training seconds, which leave
  # out the time the run was stopped between sessions (their files' mtimes as a fallback).
  patience = json.load(open(os.path.join(sys.argv[1], "config.json")))["train"]["patience"]
  left = patience - sum(1 for r in valid if r["step"] > best["step"])
  ckpt = os.path.join(sys.argv[1], "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []
  if patience > 0 and len(steps) >= 2 and len(valid) >= 2:
    def seconds(step):
      try:
        with open(os.path.join(ckpt, str(step), "meta", "metadata")) as f:
          return float(json.load(f)["train_seconds"])
      except (OSError, ValueError, KeyError, TypeError):
        return None
    spent = [seconds(s) for s in steps[-2:]]
    if None in spent:
      spent = [os.path.getmtime(os.path.join(ckpt, str(s))) for s in steps[-2:]]
    per_step = (spent[1] - spent[0]) / (steps[-1] - steps[-2])
    per_eval = per_step * (valid[-1]["step"] - valid[-2]["step"])
    print(f"    {per_eval / 60:.1f} min per evaluation; at least {left} more evaluations "
          f"(~{left * per_eval / 3600:.1f} h) before early stopping, more while it improves")
EOF
    done
  done
  exit 0
fi

# The running campaign's process tree (its runs are in other process groups: `timeout` makes one).
tree() { local p; for p in "$@"; do echo "$p"; tree $(ps -o pid= --ppid "$p"); done; }
if [ "${1:-}" = "--pause" ] || [ "${1:-}" = "--continue" ]; then
  pid=$(cat "$RUNS/campaign.pid" 2> /dev/null)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2> /dev/null; then
    echo "no campaign is running (no live pid in $RUNS/campaign.pid)" >&2; exit 1
  fi
  sig=STOP; [ "$1" = "--continue" ] && sig=CONT
  pids=$(tree "$pid")
  kill -s "$sig" $pids && echo "SIG$sig sent to the campaign's $(echo $pids | wc -w) processes"
  exit
fi

echo $$ > "$RUNS/campaign.pid"
[ -f .venv/bin/activate ] || bash launch/setup_venv.sh || exit 1
source .venv/bin/activate
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
for job in "${@:-${DEFAULT_JOBS[@]}}"; do
  case "$job" in
    toys_*) ds=toys ;;
    ml100k_*) ds=ml100k ;;
    beauty_*) ds=beauty ;;
    *) echo "unknown job $job" >&2; exit 2 ;;
  esac
  if [ ! -d ".kit/$ds/data" ]; then
    echo "$(date -u +%FT%TZ) building the $ds kit"
    bash benchmarks/device/make_kit.sh "$ds" || exit 1
  fi
  if [ "$job" = beauty_faithful ] && [ ! -f .kit/minilm/model.safetensors ]; then
    echo "$(date -u +%FT%TZ) building the minilm kit"
    bash benchmarks/device/make_kit.sh minilm || exit 1
  fi
  echo "$(date -u +%FT%TZ) $job: starting (or resuming) in $RUNS/${job%@alone}"
  # No deadline: a run ends by early stopping, or when the session kills it (then it resumes).
  OUT="$RUNS/out_$job" DEVICE_RUNS="$RUNS" PARALLEL=1 ARCHIVE_DIR=benchmarks/results/runs/cpu \
    SEM_ROOT="$RUNS/kit" \
    bash benchmarks/device/run_jobs.sh 100000000 "$job"
  n_runs=$(ls "$RUNS/${job%@alone}"/*/results.json 2> /dev/null | wc -l)
  echo "$(date -u +%FT%TZ) $job: $n_runs runs finished"
done
exit
}
