"""Prefill timing of our DecoderLM layer loop against the HF model's own forward.

A Llama-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) with
random weights, bf16, batch 8 x 640 tokens. Both paths run the same HF modules; the question is
whether owning the loop costs anything. The two are timed interleaved (alternating which goes
first), after warm-up, with CUDA events; we report median and IQR per path, the ratio ours/HF, peak
memory, and check that the logits agree.

GPU (writes eval/results/bench_layer_loop_<device>.json):
    python eval/bench_layer_loop.py
CPU smoke test (seconds; writes nothing unless --out is given):
    python eval/bench_layer_loop.py --device cpu --layers 2 --hidden 256 --heads 4 \
        --intermediate 512 --vocab 1000 --batch 2 --seq 64 --iters 3 --warmup 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python eval/bench_layer_loop.py` finds llava_deft
    sys.path.insert(0, str(ROOT))

from llava_deft.model.llm import DecoderLM, build_llm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, as Llama-2-7B)")
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=640)
    p.add_argument(
        "--left-pad", type=int, default=0, help="left-pad every other row by this many tokens (exercises the mask)"
    )
    p.add_argument("--use-cache", action="store_true", help="fill a DynamicCache in both paths (default: off)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default on CUDA: eval/results/...)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if not 0 <= args.left_pad < args.seq:
        p.error("--left-pad must be in [0, --seq)")
    return args


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def git(*cmd: str) -> str | None:
    """Output of a git command in the repo, or None where there is no git checkout (e.g. a copied tree)."""
    out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Milliseconds for one call (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_memory(fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, float] | None:
    """Peak allocated memory of one call: total and above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "peak_above_weights_mib": (peak - before) / 2**20}


def summarize(ms: list[float]) -> dict[str, float | list[float]]:
    q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": med, "iqr_ms": q3 - q1, "q1_ms": q1, "q3_ms": q3, "all_ms": ms}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for the smoke mode")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    spec = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": max(4096, args.seq),
        "vocab_size": args.vocab,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(args.seed)
    with torch.device(device):  # random init directly on the device
        hf = build_llm(spec, torch_dtype=dtype, attn_implementation=args.attn).eval()
    lm = DecoderLM(hf).eval()

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=device)
    mask[1::2, : args.left_pad] = 0
    # HF's forward without position_ids uses arange; give ours the same positions
    pos = torch.arange(args.seq, device=device).expand(args.batch, -1)  # (B, L)

    def run_hf() -> torch.Tensor:
        return hf(input_ids=ids, attention_mask=mask, use_cache=args.use_cache).logits

    def run_ours() -> torch.Tensor:
        return lm(lm.embed(ids), mask, pos, use_cache=args.use_cache)[0]

    paths = {"hf": run_hf, "ours": run_ours}
    times: dict[str, list[float]] = {"hf": [], "ours": []}
    with torch.inference_mode():
        ref, ours = run_hf(), run_ours()
        real = mask.bool()
        diff = (ours[real].float() - ref[real].float()).abs()
        agree = (ours[real].argmax(-1) == ref[real].argmax(-1)).float().mean().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        logits_match = bool(torch.allclose(ours[real].float(), ref[real].float(), atol=tol, rtol=tol))
        check = {"max_abs_diff": diff.max().item(), "argmax_agreement": agree, "match": logits_match, "tol": tol}
        del ref, ours, diff

        for _ in range(args.warmup):
            for fn in paths.values():
                fn()
        sync(device)
        for it in range(args.iters):
            order = ("hf", "ours") if it % 2 == 0 else ("ours", "hf")
            for name in order:
                times[name].append(time_once(paths[name], device))
        memory = {name: peak_memory(fn, device) for name, fn in paths.items()}

    stats = {name: summarize(ms) for name, ms in times.items()}
    result = {
        "benchmark": "bench_layer_loop",
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": (commit := git("rev-parse", "HEAD")),
        # a copied tree may sit in a commit-less repo: dirtiness only means something with a commit
        "git_dirty": None if commit is None else bool(git("status", "--porcelain")),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
        "model": {**spec, "dtype": str(dtype).removeprefix("torch."), "attn_implementation": args.attn},
        "inputs": {"batch": args.batch, "seq": args.seq, "left_pad": args.left_pad, "use_cache": args.use_cache},
        "timing": {"warmup": args.warmup, "iters": args.iters, "interleaved": True, **stats},
        "ratio_ours_over_hf": stats["ours"]["median_ms"] / stats["hf"]["median_ms"],
        "memory": memory,
        "logits_check": check,
    }

    versions = f"torch {torch.__version__} | transformers {transformers.__version__}"
    print(f"{result['device']} | {versions} | {result['model']['dtype']}")
    print(f"llama L={args.layers} D={args.hidden} H={args.heads} | batch {args.batch} x {args.seq} tokens | prefill")
    print(f"{'path':<6} {'median ms':>10} {'IQR ms':>9} {'peak MiB':>10}")
    for name in ("hf", "ours"):
        mem = memory[name]["peak_mib"] if memory[name] else float("nan")
        print(f"{name:<6} {stats[name]['median_ms']:>10.2f} {stats[name]['iqr_ms']:>9.2f} {mem:>10.0f}")
    print(f"ratio ours/hf (median): {result['ratio_ours_over_hf']:.3f}")
    print(f"logits: max |diff| {check['max_abs_diff']:.3g}, argmax agreement {agree:.4f}, match={logits_match}")

    out = args.out
    if out is None and device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "_", result["device"].lower()).strip("_")
        out = ROOT / "eval" / "results" / f"bench_layer_loop_{slug}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if not logits_match:
        raise SystemExit("our logits differ from HF's beyond tolerance")
    return result


if __name__ == "__main__":
    main()
