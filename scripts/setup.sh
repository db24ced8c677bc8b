#!/usr/bin/env bash
# Create ./.venv (Python >= 3.11) and install llava-deft with its test tools, once.
# Sourced by demo.sh and test.sh; re-running is a no-op when the install is current.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
stamp=.venv/.llava-deft-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing llava-deft and its dependencies into .venv (first run only)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
