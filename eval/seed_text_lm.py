"""A GPT-2-shaped compressible LM on the default corpus (issue 18): train it, add progressive compression,
and compare perplexity with and without the compression at the compression it achieves.

Three steps, each through the project's own entry points with the seeds' flags:

1. ``python -m llava_deft.train --base_model_name gpt2_small`` (the GPT-2 family through our layer loop,
   shrunk by ``--layers/--width/--heads``; the tiny tokenizer's vocabulary) trains a plain causal LM on
   Debian's ``fortunes`` corpus in blocks of ``--block`` tokens, under DeepSpeed (ZeRO-2, one rank);
2. ``--base_model_name <step 1>/final --use_progressive_compression --freeze_base`` adds a
   ``progressive_compression`` stage (text merges: ``tokens: all``) before each of ``--compression-layers``
   and trains only the stages' parameters (threshold modulator, residual gates, contrastive head) for
   ``--compress-steps``, the contrastive loss included;
3. ``llava-deft evaluate --model_dir <step 2>/final``: on the corpus' test split, perplexity and
   next-token accuracy of the compressed model against the same weights without the stages (the
   uncompressed model of step 1: the base is frozen), on the positions the compressed model predicts;
   the tokens each stage keeps; KV-cache bytes. ``eval/compression_curves.py`` plots the thresholds,
   per-layer compression ratios and losses over step 2.

Writes ``<out>.json`` / ``<out>.md`` and ``<out>_curves.{json,png}`` with device, date and commit.

    python eval/seed_text_lm.py                         # CPU: a few minutes
    python eval/seed_text_lm.py --device cuda --layers 12 --width 768 --heads 12 --block 512 \\
        --base-steps 2000 --compress-steps 500 --batch 16 --out eval/results/seed_text_lm_h200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.common import run_metadata, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=128, help="tokens per training / test block")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--compress-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3, help="step 1's learning rate")
    p.add_argument("--compress-lr", type=float, default=1e-3)
    p.add_argument("--compression-layers", type=int, nargs="+", default=None,
                   help="default: the seeds' relative depths 1/4, 1/2, 3/4")
    p.add_argument("--similarity-threshold", type=float, default=None,
                   help="the deepest (aggressive) floor; default the stage's")
    p.add_argument("--eval-blocks", type=int, default=200, help="test blocks evaluated")
    p.add_argument("--runs", default="runs/seed_text_lm", help="run folders")
    p.add_argument("--reuse-base", action="store_true", help="keep <runs>/base/final from an earlier run (step 1 skipped)")
    p.add_argument("--compressed-name", default="compressed", help="step 2's run folder name under --runs")
    p.add_argument("--out", default=None, help="output stem (default eval/results/seed_text_lm_<device>)")
    return p.parse_args(argv)


def train(args, *flags: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "llava_deft.train", *flags]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = Path(args.runs)
    shape = [f"model.llm.config.n_layer={args.layers}", f"model.llm.config.n_embd={args.width}",
             f"model.llm.config.n_head={args.heads}", f"model.llm.config.n_positions={args.block}",
             "model.llm.config.vocab_size=1200", "model.llm.config.bos_token_id=1", "model.llm.config.eos_token_id=2",
             f"data.block_tokens={args.block}"]
    common = ["--max_length", str(args.block), "--batch_size", str(args.batch), "log_steps=10", "save_steps=100000",
              f"bf16={'true' if args.device == 'cuda' else 'false'}", f"num_workers={2 if args.device == 'cuda' else 0}"]
    if not (args.reuse_base and (runs / "base" / "final" / "config.json").is_file()):
        train(args, "--base_model_name", "gpt2_small", "--learning_rate", str(args.lr), *common, *shape,
              f"stages.0.max_steps={args.base_steps}", f"output_dir={runs / 'base'}")
    compress = ["--use_progressive_compression", "--freeze_base", "--learning_rate", str(args.compress_lr)]
    if args.compression_layers:
        compress += ["--compression_layers", *map(str, args.compression_layers)]
    if args.similarity_threshold is not None:
        compress += ["--similarity_threshold", str(args.similarity_threshold)]
    train(args, "--base_model_name", str(runs / "base" / "final"), *compress, *common,
          f"data.block_tokens={args.block}", f"stages.0.max_steps={args.compress_steps}", f"output_dir={runs / args.compressed_name}")

    import torch

    from llava_deft.evaluation.text_lm import evaluate_text_lm, format_report

    device = "cuda" if args.device == "cuda" else "cpu"
    report = evaluate_text_lm(runs / args.compressed_name / "final", block_tokens=args.block, max_blocks=args.eval_blocks,
                              batch_size=args.batch, device=device)
    meta = run_metadata(torch.device(device))
    stem = Path(args.out) if args.out else ROOT / "eval" / "results" / f"seed_text_lm_{'cpu' if device == 'cpu' else 'gpu'}"
    subprocess.run([sys.executable, str(ROOT / "eval" / "compression_curves.py"), "--run", str(runs / args.compressed_name),
                    "--name", stem.name + "_curves", "--out", str(stem.parent),
                    "--title", "progressive compression, frozen GPT-2-shaped base"], check=True, cwd=ROOT)
    base_log = [json.loads(line) for line in (runs / "base" / "train_log.jsonl").read_text().splitlines() if line.strip()]
    result = {**meta, "script": "eval/seed_text_lm.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "shape": {"layers": args.layers, "width": args.width, "heads": args.heads, "block": args.block},
              "base_final_loss": base_log[-1].get("loss"), "report": report}
    write_json(stem.with_suffix(".json"), result)
    p = report["perplexity"]
    lines = ["# A GPT-2-shaped compressible LM on Debian's fortunes corpus (eval/seed_text_lm.py)", "",
             f"{meta['date']}, {meta['device']}, commit {meta['commit']}; command `python eval/seed_text_lm.py "
             f"{' '.join(result['argv'])}`", "",
             f"Base: GPT-2 layout, {args.layers} layers, width {args.width}, {args.heads} heads, trained {args.base_steps} "
             f"steps of {args.batch} x {args.block} tokens (final training loss {result['base_final_loss']:.3f}); then "
             f"progressive_compression (tokens: all) trained {args.compress_steps} steps with the base frozen.", "",
             format_report(report), "",
             f"Perplexity ratio compressed / uncompressed on the shared positions: {p['compressed'] / p['uncompressed']:.4f} "
             f"at a compression ratio of {report['compression']['ratio']:.3f} (tokens the last layers see / prompt tokens).",
             "", f"Curves: `{stem.name}_curves.png`.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
