#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project with its test extras plus the data-only
# RecBole wheel (it carries ml-100k; recbole itself is never imported).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
python -m pip install -q --no-deps recbole==1.2.1
