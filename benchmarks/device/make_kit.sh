#!/usr/bin/env bash
# Builds the git-ignored kit that the lent GPU machine needs for the SRA-CL evidence runs
# (benchmarks/device/README.md), on this machine, in the project venv:
#   .whl/                      Python 3.12 wheels the device image lacks: ml-collections, scann, bm25s,
#                              tensorboardX (optional since writers.py: without it only metrics.jsonl)
#   .kit/<dataset>/data        its files (a copy of ../shared/data, or ml-100k's atomic files)
#   .kit/<dataset>/sem_<mode>  its semantic tables, slim (kit.py), each checked after the build
# Each .kit/<dataset> stays under the device's 64 MiB per call with .whl beside it.
#   bash benchmarks/device/make_kit.sh            # beauty, toys, ml100k (~15 min idle)
#   bash benchmarks/device/make_kit.sh minilm     # float16 MiniLM for the faithful-mode job
#   bash benchmarks/device/make_kit.sh toys       # one dataset
# Semantic stages run through launch/embed.py into $KIT_RUNS/<dataset>_<mode> (default ~/runs/kit):
# a second build reuses them.
# The whole script is one { ... } block that ends in exit: bash parses it before running any of
# it, so editing or checking out this file while a long run is in it cannot derail that run.
{
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SHARED="${SHARED:-$ROOT/../shared/data}"
KIT_RUNS="${KIT_RUNS:-$HOME/runs/kit}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
for d in .whl .kit; do
  grep -qx "/$d/" .gitignore || { echo "/$d/ must be git-ignored" >&2; exit 1; }
done
DATASETS=("$@")
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=(beauty toys ml100k)

mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  ml-collections==1.1.0 scann==1.4.2 bm25s==0.3.16 tensorboardX==2.6.5

build() {  # build DATASET MODE CONFIG DATA_PATH
  local ds=$1 mode=$2 config=$3 data=$4 src dst
  src="$KIT_RUNS/${ds}_${mode}"
  dst=".kit/$ds/sem_$mode"
  local args=(--config "$config" --config.data.path="$data" --config.train.progress=false)
  [ "$mode" = items ] || args+=(--config.sracl.semantic.user_mode="$mode")
  python launch/embed.py "${args[@]}" --workdir "$src"
  rm -rf "$dst"
  python benchmarks/device/kit.py --action=slim --src "$src/semantic" --dst "$dst"
  # The check the device runs: rebuild the left-out prefix embeddings and compare bit for bit.
  python benchmarks/device/kit.py --action=restore --dst "$dst" "${args[@]}"
  rm -f "$dst/prefix_embeddings.npy"
}

for ds in "${DATASETS[@]}"; do
  mkdir -p ".kit/$ds"
  rm -rf ".kit/$ds/data" ".kit/$ds/model.safetensors"
  case "$ds" in
    beauty|toys)
      cp -r "$SHARED/amazon-$ds-text" ".kit/$ds/data"
      build "$ds" items "configs/sracl/$ds.py:items" ".kit/$ds/data" ;;
    ml100k)
      src=$(python -c "from seqrec_jax.data.readers import default_ml100k_dir as d; print(d())")
      mkdir -p ".kit/$ds/data"
      cp "$src"/ml-100k.inter "$src"/ml-100k.item "$src"/ml-100k.user ".kit/$ds/data/"
      build "$ds" items "configs/sracl/ml100k.py:items" ".kit/$ds/data"
      build "$ds" user "configs/sracl/ml100k.py" ".kit/$ds/data" ;;
    minilm)
      # The faithful user mode's encoder for the device: all-MiniLM-L6-v2 with float16 weights
      # (44 MiB instead of 87; the model computes in float32 either way).
      python - ".kit/$ds" <<'PY'
import os, shutil, sys
import numpy as np
from safetensors.numpy import load_file, save_file
from sracl_jax.semantic import text_encoder
src, dst = text_encoder.default_minilm_dir(), sys.argv[1]
for root, _, files in os.walk(src):
  for name in files:
    if name != "model.safetensors" and not name.startswith("."):
      rel = os.path.relpath(os.path.join(root, name), src)
      os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
      shutil.copy2(os.path.join(root, name), os.path.join(dst, rel))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()},
          os.path.join(dst, "model.safetensors"))
PY
      ;;
    *) echo "unknown dataset $ds (beauty, toys, ml100k, minilm)" >&2; exit 2 ;;
  esac
done
du -sh .whl .kit/* | sed 's/^/kit: /'
exit
}
