#!/usr/bin/env bash
# The GPU runs the open issues wait for, one group per call (each fits a 10-minute limit on one H100/H200):
#
#   bash scripts/gpu_checks.sh WHEELDIR OUT speed    # issue 16: CUDA tests (captured, compiled, no host sync),
#                                                    #   batch 1/8 TTFT + decoding, then the compiled path
#   bash scripts/gpu_checks.sh WHEELDIR OUT long     # issue 17: the long-context curriculum, the pair recipe,
#                                                    #   eval/long_context.py (full vs the model's own stages)
#   bash scripts/gpu_checks.sh WHEELDIR OUT pair     # issue 17: eval/bench_pair_compress.py at 8K / 32K
#   bash scripts/gpu_checks.sh WHEELDIR OUT reducers # issue 16: the full eval/bench_reducers.py run
#   bash scripts/gpu_checks.sh WHEELDIR OUT mfu      # issue 16: training MFU of the ~1B recipe with a profile of
#                                                    #   its steps, and at batch 32
#   bash scripts/gpu_checks.sh WHEELDIR OUT scenes   # issue 15: the scenes base with and without captions
#                                                    #   (configs/train/scenes_{deft,captions}.yaml side by side)
#
# WHEELDIR: wheels for the node's Python (see scripts/offline_gpu_env.sh); OUT: a folder for logs and results
# (a device's $OUT). Run from the repository root; LLAVA_DEFT_COMMIT names the commit when the copy has no
# git metadata. Each group writes <OUT>/<group>.log and its results (JSON, markdown, PNG) under
# <OUT>/<group>/ as each step finishes (so a call cut short still returns the steps it finished).
set -uo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash scripts/gpu_checks.sh WHEELDIR OUT speed|long|pair|reducers|mfu|scenes" >&2
  exit 2
fi
WHEELS=$1 OUT=$2 GROUP=$3
mkdir -p "$OUT"
source scripts/offline_gpu_env.sh "$WHEELS" >/dev/null 2>&1 || { echo "gpu_checks: the wheels of $WHEELS did not install" >&2; exit 1; }
export PYTHONWARNINGS=ignore
log=$OUT/$GROUP.log
res=$OUT/$GROUP
mkdir -p "$res"
step() { echo "=== $(date -u +%T) $*" | tee -a "$log"; }
quiet() { grep -v "it/s\]\|s/it\]"; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$log"
case "$GROUP" in
  speed)
    step tests
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_static_decode_cuda.py tests/test_llm_stages_cuda.py \
      tests/test_graphs.py tests/test_divprune_triton.py -k "not whole_model or deft" 2>&1 | tail -15 >> "$log"
    timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_contract.py -k synchronise 2>&1 | tail -4 >> "$log"
    step "bench (CUDA graphs)"
    timeout 140 python3 eval/bench_reducers.py --shapes llava15_7b --batch-sizes 1 8 --reducers deft --ratios 0.11 \
      --repeats 5 --steps 32 --out "$res" --name bench_graph 2>&1 | quiet | tail -25 >> "$log"
    step "bench divprune (the Triton greedy loop)"
    timeout 80 python3 eval/bench_reducers.py --shapes llava15_7b --batch-sizes 1 8 --reducers divprune --ratios 0.482 \
      --repeats 5 --steps 8 --out "$res" --name bench_divprune 2>&1 | quiet | tail -12 >> "$log"
    step "bench (CUDA graphs + torch.compile)"
    timeout 240 python3 eval/bench_reducers.py --shapes llava15_7b --batch-sizes 1 --reducers deft --ratios 0.11 \
      --repeats 5 --steps 32 --compile --profile deft@0.11 --out "$res" --name bench_compile 2>&1 | quiet | tail -30 >> "$log"
    ;;
  long)
    step "train: short passages"
    timeout 180 python3 -m llava_deft.train --config configs/train/passkey_long_a.yaml log_steps=100 >> "$log" 2>&1
    step "train: 2K-8K passages"
    timeout 190 python3 -m llava_deft.train --config configs/train/passkey_long.yaml log_steps=100 >> "$log" 2>&1
    step "train: pair compression (base frozen)"
    timeout 120 python3 -m llava_deft.train --config configs/train/passkey_long_pair.yaml log_steps=100 >> "$log" 2>&1
    step eval
    timeout 60 python3 eval/long_context.py --model runs/passkey_long_pair/final --policies full model \
      --lengths 4096 8192 --n 100 --batch-size 25 --out "$res" --name pair_compress_long_context >> "$log" 2>&1
    ;;
  pair)
    step bench_pair_compress
    timeout 560 python3 eval/bench_pair_compress.py --iters 2 --repeats 1 --out "$res" --name bench_pair_compress 2>&1 \
      | quiet | tail -30 >> "$log"
    ;;
  reducers)
    step bench_reducers
    timeout 570 python3 eval/bench_reducers.py --shapes llava15_7b --batch-sizes 1 8 --repeats 5 --out "$res" \
      --name bench_reducers 2>&1 | quiet | tail -60 >> "$log"
    ;;
  mfu)
    step "MFU: the ~1B recipe (batch 8), then 5 steps under torch.profiler"
    timeout 300 python3 eval/bench_train_mfu.py --profile 5 --out "$res" --name train_mfu 2>&1 | quiet | tail -12 >> "$log"
    step "MFU: batch 32"
    timeout 240 python3 eval/bench_train_mfu.py --steps 40 --out "$res" --name train_mfu_b32 per_device_batch_size=32 2>&1 \
      | quiet | tail -8 >> "$log"
    head -60 "$res/train_mfu_profile.txt" >> "$log" 2>&1
    ;;
  scenes)
    step data
    python3 -m llava_deft.tasks --out data/tasks --only scenes 2>&1 | tail -2 >> "$log"
    step "train: scenes_deft (questions only) and scenes_captions (questions + captions), at once"
    for r in scenes_deft scenes_captions; do
      timeout 420 python3 -m llava_deft.train --config configs/train/$r.yaml log_steps=100 save_steps=100000 \
        output_dir=runs/$r > "$OUT/train_$r.log" 2>&1 &
    done
    wait
    for r in scenes_deft scenes_captions; do
      grep -a "\[train\]" "$OUT/train_$r.log" | tail -3 >> "$log"
      cp runs/$r/train_log.jsonl "$res/train_log_$r.jsonl" 2>> "$log"
      tail -1 runs/$r/train_log.jsonl >> "$log"
    done
    step eval
    for r in scenes_deft scenes_captions; do
      timeout 60 python3 eval/tasks.py --model runs/$r/final --tasks scenes --out "$res" --name scenes_recipe_$r 2>&1 \
        | quiet | tail -12 >> "$log"
    done
    ;;
  *)
    echo "gpu_checks: unknown group '$GROUP' (speed, long, pair, reducers, mfu, scenes)" >&2
    exit 2
    ;;
esac
step done
tail -80 "$log"
