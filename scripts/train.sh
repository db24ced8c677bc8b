#!/usr/bin/env bash
# DeepSpeed training, LLaVA style. Single node:   NUM_GPUS=8 bash scripts/train.sh [flags...]
# Multi-node: HOSTFILE=hostfile bash scripts/train.sh [flags...]  (DeepSpeed's --hostfile format)
# Flags go to llava_deft.train, e.g.
#   bash scripts/train.sh --config configs/train/easyvqa_tiny.yaml --deepspeed configs/deepspeed/zero3.json \
#        --output_dir runs/x --learning_rate 2e-5 stages.0.epochs=3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --module llava_deft.train "$@"
fi
exec deepspeed --num_gpus "${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}" --module llava_deft.train "$@"
