#!/usr/bin/env bash
# Train + evaluate several easy-VQA recipes side by side (one process each; meant for a GPU box).
#   bash eval/recipe_sweep.sh configs/sweeps/easyvqa_tiny_h100.txt [OUT_DIR] [LIMIT]
# Each non-comment line of the sweep file is `NAME key=value key=value ...` (overrides of
# configs/train/easyvqa_tiny.yaml). Writes OUT_DIR/sweep.md: one row per recipe with the accuracy
# table row of eval/easyvqa.py on the first LIMIT test questions (default 3000).
set -u
SWEEP=$1; OUT=${2:-runs/sweep}; LIMIT=${3:-3000}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
run() {
  local name=$1; shift
  timeout ${TRAIN_TIMEOUT:-900} $PY -m llava_deft.train --config configs/train/easyvqa_tiny.yaml --output_dir "$OUT/$name" \
      bf16=false log_steps=25 "$@" > "$OUT/$name.train.log" 2>&1 \
    && timeout ${EVAL_TIMEOUT:-600} $PY eval/easyvqa.py --model "$OUT/$name/final" --limit "$LIMIT" --out "$OUT/$name/eval" > "$OUT/$name.eval.log" 2>&1
  local row; row=$(grep '^| 1 ' "$OUT/$name/eval/"*.md 2>/dev/null || echo "| failed (see $OUT/$name.*.log) |")
  echo "| $name | $* $row" >> "$OUT/rows.txt"
}
: > "$OUT/rows.txt"
while read -r name rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  eval "set -- $rest"
  run "$name" "$@" &
done < "$SWEEP"
wait
{
  echo "# easy-VQA recipe sweep ($(date -u '+%Y-%m-%d %H:%M UTC'), $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), first $LIMIT test questions)"
  echo
  echo "| recipe | overrides | retention | tokens / image | all | color | shape | yes/no |"
  echo "|---|---|---|---|---|---|---|---|"
  sort "$OUT/rows.txt"
} > "$OUT/sweep.md"
cat "$OUT/sweep.md"
