#!/usr/bin/env bash
# The README demo: train the tiny default on easy-VQA on CPU (DeepSpeed, one process), evaluate
# on the full test split (9,673 questions), print the accuracy table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=ignore
OUT=${OUT_DIR:-runs/easyvqa_tiny}
rm -rf "$OUT"
.venv/bin/python -m llava_deft.train --config configs/train/easyvqa_tiny.yaml --output_dir "$OUT"
.venv/bin/python eval/easyvqa.py --model "$OUT/final" --out "$OUT/eval"
