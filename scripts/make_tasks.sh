#!/usr/bin/env bash
# Every generated task (video QA, audio QA, pass-key) in one folder, deterministically (cached: a
# task whose meta.json matches is not regenerated). Arguments go to `python -m llava_deft.tasks`.
#   bash scripts/make_tasks.sh                                # data/tasks, preset full (the GPU recipe)
#   bash scripts/make_tasks.sh --out data/tasks_small --preset small
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ " $* " != *" --out "* ]]; then set -- --out data/tasks "$@"; fi
exec "$PY" -m llava_deft.tasks "$@"
