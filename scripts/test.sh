#!/usr/bin/env bash
# The test suite (CPU, about 10 minutes on 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore
.venv/bin/python -m pytest -q "$@"
