"""Pair compression (issue 17) on long prompts: prefill time, decoding time and peak memory against the
uncompressed model and against two ideals.

A Llama-7B-shaped LLM (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) with random
weights in bf16 reads one prompt of ``--contexts`` tokens (8K and 32K by default) and generates
``--steps`` tokens greedily. Rows, per context length:

- ``none``: no stage (the uncompressed model), decoding eagerly with transformers' dynamic cache, as
  every row here does (a layer stage's cache is the staged one, which the static captured decoder does
  not hold yet), so the rows compare like with like; ``none captured`` (CUDA) is the same model through
  the static cache and CUDA graphs, what a user gets without stages, for reference;
- ``pair r=<r>``: the ``pair_compress`` stage before decoder layer ``--layer`` (seed 002's defaults:
  layer 10, window 100, memory floor 100) at each ``--ratios`` r (0.8 is the seed's; 0.2 is the
  pass-key recipe's): layers ``layer..`` see ``window + n + k`` tokens instead of ``window + 2n``
  (``n`` merged pairs, ``k = selection_count`` of them expanded again);
- ``ideal@layer r=<r>``: the same token count from layer ``--layer`` on, with nothing computed to choose
  it (a stage that keeps the last that-many tokens): what the compressed model would cost if merging,
  scoring and expansion were free -- the ideal of this design, whose first layers see every token;
- ``ideal fed r=<r>``: the model fed that reduced count from layer 0 (the issue's ideal: "the same
  model fed the reduced count"); no in-LLM compression can reach it, since layers before ``--layer``
  see the whole prompt.

Prefill = ``DecoderLM`` forward with a cache and ``logits_to_keep=1`` (median of ``--iters`` after a
warm-up). Decoding per token = (generate of 1 + N tokens - generate of 1) / N, N = ``--steps``, median
over ``--repeats``; each generate is synchronised. Peak memory = ``torch.cuda.max_memory_allocated``
over a ``1 + N``-token generate minus what was allocated before (the weights and the prompt); KV held =
the cache's bytes at its end. Speed-ups are ratios to ``none`` from the same run.

GPU (writes eval/results/bench_pair_compress_<device>.{json,md,png}):
    python eval/bench_pair_compress.py
CPU smoke test (seconds):
    python eval/bench_pair_compress.py --device cpu --layers 4 --layer 2 --hidden 64 --heads 4 \\
        --intermediate 128 --vocab 300 --contexts 300 --window 16 --memory-floor 8 --steps 3 --out /tmp/bpc
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python eval/bench_pair_compress.py` from anywhere
    sys.path.insert(0, str(ROOT))

from eval.bench_decode import DTYPES, add_model_args, llama_spec, sync, timed_generate  # noqa: E402  (the cache policies' timing)
from eval.common import run_metadata, save_figure, write_json  # noqa: E402
from llava_deft.model.llm import DecoderLM, build_llm  # noqa: E402
from pipeline import build_pipeline  # noqa: E402
from pipeline.llm import LayerStage  # noqa: E402
from pipeline.pair_compress import selection_count  # noqa: E402

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768], help="prompt lengths (tokens)")
    p.add_argument("--layer", type=int, default=10, help="pair_compress runs before this decoder layer (0-based)")
    p.add_argument("--window", type=int, default=100, help="T_w: the last tokens left as they are")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.2], help="r: share of merged pairs expanded")
    p.add_argument("--memory-floor", type=int, default=100, help="M of the selection count")
    p.add_argument("--steps", type=int, default=64, help="decoding steps timed")
    p.add_argument("--iters", type=int, default=3, help="timed prefills per row (median, after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="timed generate pairs per row (median)")
    p.add_argument("--out", default=None, help="output stem (default eval/results/bench_pair_compress_<device>)")
    return p.parse_args(argv)


class KeepLast(LayerStage):
    """The ideal of an in-LLM reducer: from its layer on, keep each row's last ``keep`` tokens, choosing
    nothing (no merge, no scoring, no expansion); the same token count as the stage it stands for."""

    stage_name = "keep_last"

    def __init__(self, layer: int, keep: int):
        super().__init__(layer)
        self.keep = keep

    def reduce(self, state, attention):
        rank = state.mask.long().flip(1).cumsum(1).flip(1)  # (B, L) 1 at each row's last real token
        return state.take(state.mask & (rank <= self.keep))


def compressed_length(context: int, window: int, ratio: float, floor: int) -> int:
    """Tokens the layers after the stage see for one full row of ``context`` tokens (its reduce(), counted)."""
    memory = max(context - window, 0)
    n = memory // 2
    if n == 0 or ratio >= 1.0:
        return context
    k = min(selection_count(context - n, window, ratio, floor), n)
    return context - n + k


def inputs(lm: DecoderLM, length: int, vocab: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
    with torch.no_grad():
        embeds = lm.embed(ids)
    mask = torch.ones(1, length, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device).unsqueeze(0)
    return embeds, mask, pos


def time_prefill(lm, embeds, mask, pos, stages, iters, device) -> list[float]:
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            sync(device)
            t0 = time.perf_counter()
            lm(embeds, mask, pos, None, use_cache=True, logits_to_keep=1, stages=stages)
            sync(device)
            if i:  # the first is warm-up
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(lm, embeds, mask, pos, stages, args, device, captured=False) -> dict:
    prefill = time_prefill(lm, embeds, mask, pos, stages, args.iters, device)
    one, full = [], []
    for _ in range(args.repeats):
        s1, _, _, _ = timed_generate(lm, embeds, mask, pos, 1, stages, captured, device)
        sn, peak, held, out = timed_generate(lm, embeds, mask, pos, 1 + args.steps, stages, captured, device)
        one.append(s1)
        full.append(sn)
    step = [(f - o) * 1e3 / args.steps for f, o in zip(full, one)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"prefill_ms": statistics.median(prefill), "prefill_ms_all": prefill,
            "decode_ms_per_token": statistics.median(step), "decode_ms_all": step,
            "peak_mib": peak / 2**20, "kv_mib": held / 2**20, "tokens": out[0].tolist()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if not 0 < args.layer < args.layers:
        raise SystemExit(f"--layer {args.layer} must be in 1..{args.layers - 1} (the stage runs between layers)")
    torch.manual_seed(0)
    spec = llama_spec(args, max(args.contexts) + args.steps + 16)
    with torch.device(device):
        hf = build_llm(spec, torch_dtype=dtype).eval()
    lm = DecoderLM(hf)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())

    rows = []
    for context in args.contexts:
        embeds, mask, pos = inputs(lm, context, args.vocab, device)
        base = measure(lm, embeds, mask, pos, None, args, device)
        rows.append({"context": context, "row": "none", "ratio": None, "tokens_after_layer": context, **base})
        print(f"{context:>6} none: prefill {base['prefill_ms']:.1f} ms, decode {base['decode_ms_per_token']:.2f} ms/token, "
              f"peak +{base['peak_mib']:.0f} MiB", flush=True)
        if device.type == "cuda":  # what a user gets without stages: static cache, captured decoding
            cap = measure(lm, embeds, mask, pos, None, args, device, captured=True)
            rows.append({"context": context, "row": "none captured", "ratio": None, "tokens_after_layer": context, **cap})
            lm.release_static()
        for ratio in args.ratios:
            kept = compressed_length(context, args.window, ratio, args.memory_floor)
            pair = build_pipeline({"llm": [{"name": "pair_compress", "layer": args.layer, "window": args.window,
                                            "ratio": ratio, "memory_floor": args.memory_floor,
                                            "num_heads": args.heads}]}, args.hidden).llm
            pair = [stage.to(device=device, dtype=dtype).eval() for stage in pair]
            variants = [("pair", pair, (embeds, mask, pos)), ("ideal@layer", [KeepLast(args.layer, kept)], (embeds, mask, pos)),
                        ("ideal fed", None, (embeds[:, -kept:], mask[:, -kept:], pos[:, :kept]))]
            for label, stages, (e, m, p) in variants:
                row = measure(lm, e, m, p, stages, args, device)
                if label == "pair":
                    tokens_out = pair[0].last_stats["tokens_out"]
                    if tokens_out != kept:
                        raise RuntimeError(f"pair_compress kept {tokens_out} tokens, the count formula says {kept}")
                rows.append({"context": context, "row": f"{label} r={ratio:g}", "ratio": ratio, "tokens_after_layer": kept, **row})
                print(f"{context:>6} {label} r={ratio:g}: {kept} tokens after layer {args.layer}, prefill "
                      f"{row['prefill_ms']:.1f} ms, decode {row['decode_ms_per_token']:.2f} ms/token, peak +{row['peak_mib']:.0f} MiB",
                      flush=True)
        del embeds
    for row in rows:
        none = next(r for r in rows if r["context"] == row["context"] and r["row"] == "none")
        row["fewer_tokens_after_layer"] = 1 - row["tokens_after_layer"] / row["context"]
        row["prefill_speedup"] = none["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = none["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["peak_share"] = row["peak_mib"] / none["peak_mib"] if none["peak_mib"] else None
        row["kv_share"] = row["kv_mib"] / none["kv_mib"] if none["kv_mib"] else None
    for row in rows:
        if row["row"].startswith("pair"):
            ideal = next(r for r in rows if r["context"] == row["context"] and r["row"] == f"ideal@layer r={row['ratio']:g}")
            row["prefill_share_of_ideal"] = row["prefill_speedup"] / ideal["prefill_speedup"]
            row["decode_share_of_ideal"] = row["decode_speedup"] / ideal["decode_speedup"]
    for row in rows:
        row.pop("tokens")  # random weights: the generated ids say nothing; they only checked the calls ran

    result = {**run_metadata(device), "script": "eval/bench_pair_compress.py",
              "argv": sys.argv[1:] if argv is None else list(argv), "model": spec,
              "dtype": str(dtype).replace("torch.", ""), "weights_mib": weight_bytes / 2**20, "layer": args.layer,
              "window": args.window, "memory_floor": args.memory_floor, "steps": args.steps, "rows": rows}
    tag = "h200" if "H200" in result["device"] else ("cpu" if device.type == "cpu" else result["device"].split()[-1].lower())
    stem = Path(args.out) if args.out else ROOT / "eval" / "results" / f"bench_pair_compress_{tag}"
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(report(result))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")
    return result


def report(r: dict) -> str:
    m = r["model"]
    lines = [
        "# Pair compression on long prompts: prefill, decoding, memory (eval/bench_pair_compress.py)", "",
        f"{r['date']}, {r['device']}, commit {r['commit']}, torch {r['torch']}, transformers {r['transformers']}", "",
        f"Llama-shaped random-weight LLM: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, {r['dtype']}, weights "
        f"{r['weights_mib']:.0f} MiB; batch 1. `pair_compress` before layer {r['layer']}, window {r['window']}, "
        f"memory floor {r['memory_floor']}; {r['steps']} decoding steps timed. Speed-ups against `none` of the same "
        "context in this run; 'of ideal' = the pair row's speed-up / the ideal@layer row's.", "",
        "| context | row | tokens after layer | fewer | prefill ms | speed-up | of ideal | decode ms/token | speed-up | of ideal | peak MiB | KV MiB | KV share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        pi = f"{100 * row['prefill_share_of_ideal']:.0f} %" if "prefill_share_of_ideal" in row else ""
        di = f"{100 * row['decode_share_of_ideal']:.0f} %" if "decode_share_of_ideal" in row else ""
        kv = "" if row["kv_share"] is None else f"{row['kv_share']:.3f}"
        lines.append(f"| {row['context']} | {row['row']} | {row['tokens_after_layer']} | {100 * row['fewer_tokens_after_layer']:.0f} % | "
                     f"{row['prefill_ms']:.1f} | {row['prefill_speedup']:.2f}x | {pi} | {row['decode_ms_per_token']:.2f} | "
                     f"{row['decode_speedup']:.2f}x | {di} | {row['peak_mib']:.0f} | {row['kv_mib']:.0f} | {kv} |")
    lines += ["", "ideal@layer: the same count from the stage's layer on with nothing computed to choose it; ideal fed: "
              "the model fed that count from layer 0 (unreachable for an in-LLM stage, whose earlier layers see "
              "every token). Peak = max allocated over a generate minus the weights and prompt held before it.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({row["context"] for row in r["rows"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("prefill_ms", "decode_ms_per_token", "peak_mib"),
                              ("prefill (ms)", "decoding (ms / token)", "peak memory over the call (MiB)")):
        names = [row["row"] for row in r["rows"] if row["context"] == contexts[0]]
        width = 0.8 / len(contexts)
        for j, c in enumerate(contexts):
            vals = [next(row[key] for row in r["rows"] if row["context"] == c and row["row"] == n) for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"{c} tokens")
        ax.set_xticks([i + width * (len(contexts) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"pair_compress, {r['device']}, commit {r['commit']}")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
