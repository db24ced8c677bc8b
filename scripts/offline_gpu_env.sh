#!/usr/bin/env bash
# Run llava-deft from its source tree on a GPU node that has torch, transformers and timm but no package
# index (an offline cluster node): install the other dependencies from a folder of wheels and set the
# environment. Source it from the repository root:
#
#   source scripts/offline_gpu_env.sh WHEELDIR [--mps]
#   python3 -m llava_deft.cli sweep run configs/sweeps/passkey.yaml ...     # or .venv/bin/llava-deft
#
# WHEELDIR holds wheels for the node's Python (deepspeed, open_clip_torch, decord, easy-vqa, pydantic and
# its dependencies, hjson, ftfy, wcwidth, soundfile, cffi, pycparser, soxr); they go to /tmp/llava-deft-site.
# --mps starts the CUDA MPS control daemon (many small training runs on one GPU overlap their kernels:
# `llava-deft sweep`); leave it off when timing one process (eval/bench_*.py).
# LLAVA_DEFT_COMMIT: set it to the commit the tree holds when the node's copy has no (or stale) git
# metadata, so result rows name the right commit.
if [ -z "${1:-}" ] || [ ! -d "$1" ]; then
  echo "usage: source scripts/offline_gpu_env.sh WHEELDIR [--mps] (WHEELDIR: a folder of .whl files)" >&2
  return 2 2>/dev/null || exit 2
fi
WHEELS=$1
SITE=/tmp/llava-deft-site
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl; then
  echo "offline_gpu_env: installing the wheels of $WHEELS failed (one version of each package, for this Python)" >&2
  return 1 2>/dev/null || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # DeepSpeed's FusedAdam build cannot parse '9.0a'
export PYTHONUNBUFFERED=1
if [ "${2:-}" = "--mps" ]; then
  nvidia-cuda-mps-control -d >/dev/null 2>&1 || true   # output redirected: the daemon keeps the pipe open otherwise
fi
# the commands the README writes with .venv/bin/ work here too (never over a real virtual environment)
if [ ! -e .venv ]; then
  mkdir -p .venv/bin
  ln -s "$(command -v python3)" .venv/bin/python
  printf '#!/bin/sh\nexec python3 -m llava_deft.cli "$@"\n' > .venv/bin/llava-deft
  chmod +x .venv/bin/llava-deft
fi
