"""Decoding speed and KV memory of cache policies against the full cache; FastV's prefill against its ideal.

A Llama-7B-shaped LLM (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) with random
weights in bf16 decodes from a batch of 8 prompts of 8,192 tokens. Rows:

- ``full``: the stage-free loop with transformers' ``DynamicCache`` (what a user gets without stages);
- ``tova`` / ``h2o`` / ``streaming_llm`` / ``snapkv`` at ``--fraction`` of the prompt (1/8: 1,024 slots
  per layer and KV head), each eager and, where the policy allows it, with the steady decoding step
  captured in a CUDA graph (``generate_from_embeds(cuda_graph=True)``).

Per-step time = (time of generate with ``1 + steps`` new tokens - time with 1) / steps, so the prefill
cancels; each generate is synchronised (it reads EOS flags every step, as users' calls do). Memory:
``torch.cuda.max_memory_allocated`` over the call minus what was allocated before it (the weights),
and the bytes the cache holds at the end. The stated overhead of a policy's peak is what the full
row's peak holds beyond its KV cache (prefill activations, logits) plus one layer's full-prompt KV (a
layer's cache exists whole for a moment before its prefill eviction). The bandwidth ideal of the
speed-up is (weights + full KV) / (weights + kept KV): the bytes one step must read.

FastV: prefill of ``--fastv-text`` text + ``--fastv-media`` media tokens per row (batch 8) with
``fastv`` at layer K dropping ``drop_ratio`` of the media, against the stage-free prefill, and against
the ideal: the same model fed that many tokens from layer K on with no scoring (a fixed drop).

GPU (writes eval/results/bench_decode_<device>.{json,md,png}):
    python eval/bench_decode.py
CPU smoke test (seconds):
    python eval/bench_decode.py --device cpu --layers 4 --hidden 128 --heads 4 --intermediate 256 \\
        --vocab 500 --batch 2 --context 256 --steps 4 --fastv-media 128 --fastv-text 16 --out /tmp/bench_decode
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python eval/bench_decode.py` from anywhere
    sys.path.insert(0, str(ROOT))

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.model.llm import DecoderLM, build_llm  # noqa: E402
from llava_deft.model.llm.decoder import generate_from_embeds  # noqa: E402
from pipeline import build_pipeline  # noqa: E402
from pipeline.llm import TEXT_KIND, LayerStage  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POLICIES = ("tova", "h2o", "streaming_llm", "snapkv")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Device, dtype and the Llama shape (default Llama-2-7B) of the benchmark LLMs."""
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default --heads (Llama-2-7B has no GQA)")
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)


def llama_spec(args: argparse.Namespace, max_positions: int) -> dict:
    """The random-init Llama config of ``add_model_args``' flags."""
    return {"model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads or args.heads,
            "intermediate_size": args.intermediate, "vocab_size": args.vocab, "max_position_embeddings": max_positions}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=8192, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=64, help="decoding steps timed")
    p.add_argument("--repeats", type=int, default=2, help="timed generate pairs per row (median)")
    p.add_argument("--fraction", type=float, default=0.125, help="cache budget as a share of --context")
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--fastv-media", type=int, default=4096)
    p.add_argument("--fastv-text", type=int, default=64)
    p.add_argument("--fastv-layer", type=int, default=2)
    p.add_argument("--fastv-drop", type=float, default=0.5)
    p.add_argument("--fastv-iters", type=int, default=5)
    p.add_argument("--profile", nargs="*", default=None, metavar="ROW",
                   help="instead of the benchmark: profile 8 decoding steps of these rows (e.g. full tova) with "
                        "torch.profiler and print the top operators by device and host time")
    p.add_argument("--out", default=None, help="output stem (default eval/results/bench_decode_<device>)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    if hasattr(cache, "stats"):
        return sum(s["bytes"] for s in cache.stats())
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)


def timed_generate(lm, embeds, mask, pos, new_tokens, stages, graph, device):
    """(seconds, peak bytes over the call, cache bytes at the end, tokens)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out, cache = generate_from_embeds(lm, embeds, mask, pos, new_tokens, eos_token_id=-1, pad_token_id=0,
                                      stages=stages, return_cache=True, cuda_graph=graph)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    held = cache_bytes(cache)
    del cache
    return seconds, peak, held, out


class FixedDrop(LayerStage):
    """The FastV ideal: drop the same number of media tokens (every other one) with no attention probe."""

    stage_name = "fixed_drop"

    def __init__(self, layer: int, drop_ratio: float):
        super().__init__(layer)
        self.drop_ratio = drop_ratio

    def reduce(self, state, attention):
        media = state.media
        rank = media.long().cumsum(1) - 1
        n = media.sum(1, keepdim=True)
        n_drop = n - torch.ceil(n.double() * (1 - self.drop_ratio) - 1e-9).long()
        drop = media & (rank < n_drop)  # the first n_drop media tokens: same count as fastv keeps
        return state.take(state.mask & ~drop)


def time_prefill(lm, embeds, mask, pos, kinds, stages, iters, device) -> list[float]:
    times = []
    for i in range(iters + 1):
        sync(device)
        t0 = time.perf_counter()
        lm(embeds, mask, pos, None, use_cache=True, logits_to_keep=1, stages=stages, token_kinds=kinds)
        sync(device)
        if i:  # the first is warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    spec = llama_spec(args, args.context + 2 * args.steps + 16)
    with torch.device(device):
        hf = build_llm(spec, torch_dtype=dtype).eval()
    lm = DecoderLM(hf)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    b, L = args.batch, args.context
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, args.vocab, (b, L), generator=gen).to(device)
    with torch.no_grad():
        embeds = lm.embed(ids)
    mask = torch.ones(b, L, dtype=torch.long, device=device)
    pos = torch.arange(L, device=device).expand(b, L).contiguous()
    budget = max(1, int(round(args.fraction * L)))

    if args.profile is not None:
        return profile(args, lm, embeds, mask, pos, budget, device)

    rows = []
    configs = [("full", None, False)]
    for name in args.policies:
        configs.append((name, name, False))
        if not args.no_graph and device.type == "cuda" and name != "snapkv":
            configs.append((f"{name}+graph", name, True))
    reference_tokens = None
    eager_tokens: dict = {}
    for label, name, graph in configs:
        stages = None if name is None else build_pipeline({"llm": [{"name": name, "cache_max_size": budget}]}, args.hidden).llm
        one, full, double = [], [], []
        try:
            for _ in range(args.repeats):
                s1, _, _, _ = timed_generate(lm, embeds, mask, pos, 1, stages, graph, device)
                sn, peak, held, out = timed_generate(lm, embeds, mask, pos, 1 + args.steps, stages, graph, device)
                s2, _, _, _ = timed_generate(lm, embeds, mask, pos, 1 + 2 * args.steps, stages, graph, device)
                one.append(s1)
                full.append(sn)
                double.append(s2)
        except Exception as e:  # one failing row must not lose the others' measurements
            import traceback

            traceback.print_exc()
            rows.append({"row": label, "policy": name or "none", "cuda_graph": graph, "error": f"{type(e).__name__}: {e}"})
            continue
        step_ms = [(f - o) * 1e3 / args.steps for f, o in zip(full, one)]  # the first N steps (warm-up, capture)
        steady_ms = [(d - f) * 1e3 / args.steps for d, f in zip(double, full)]  # the next N steps
        if reference_tokens is None:
            reference_tokens = out
        if not graph:
            eager_tokens[name] = out
        row = {"row": label, "policy": name or "none", "cuda_graph": graph, "cache_max_size": None if name is None else budget,
               "step_ms": statistics.median(step_ms), "step_ms_all": step_ms,
               "steady_step_ms": statistics.median(steady_ms), "steady_step_ms_all": steady_ms,
               "prefill_ms": statistics.median(one) * 1e3, "peak_mib": peak / 2**20, "kv_mib": held / 2**20,
               "token_agreement_with_full": float((out == reference_tokens).float().mean()),
               "token_agreement_with_eager": float((out == eager_tokens[name]).float().mean()) if name in eager_tokens else None}
        rows.append(row)
        print(f"{label:>20}: {row['step_ms']:.2f} ms/step ({row['steady_step_ms']:.2f} steady), peak +{row['peak_mib']:.0f} MiB, KV {row['kv_mib']:.0f} MiB", flush=True)
        del stages
        if device.type == "cuda":
            torch.cuda.empty_cache()

    failed = [row for row in rows if "error" in row]
    rows = [row for row in rows if "error" not in row]
    full_row = rows[0]
    kv_full = full_row["kv_mib"]
    one_layer_kv = kv_full / args.layers
    # a policy's prefill holds the layer being prefilled whole until its eviction, beside the kept copy
    overhead = full_row["peak_mib"] - kv_full + one_layer_kv * (1 + args.fraction)
    for row in rows:
        row["speedup"] = full_row["step_ms"] / row["step_ms"]
        row["steady_speedup"] = full_row["steady_step_ms"] / row["steady_step_ms"]
        row["non_kv_peak_mib"] = row["peak_mib"] - row["kv_mib"]
        kept = row["kv_mib"]
        row["bandwidth_ideal_speedup"] = (weight_bytes / 2**20 + kv_full) / (weight_bytes / 2**20 + kept)
        row["kv_share_of_full"] = kept / kv_full if kv_full else None
        row["peak_bound_mib"] = kv_full * args.fraction + overhead
        row["peak_within_bound"] = row["row"] == "full" or row["peak_mib"] <= row["peak_bound_mib"]

    # ---------------------------------------------------------------- FastV prefill
    t_pre = args.fastv_text // 2
    lf = args.fastv_text + args.fastv_media
    fids = torch.randint(0, args.vocab, (b, lf), generator=gen).to(device)
    with torch.no_grad():
        fembeds = lm.embed(fids)
    fmask = torch.ones(b, lf, dtype=torch.long, device=device)
    fpos = torch.arange(lf, device=device).expand(b, lf).contiguous()
    kinds = torch.full((b, lf), TEXT_KIND, dtype=torch.long, device=device)
    kinds[:, t_pre:t_pre + args.fastv_media] = 0  # image tokens between two text spans
    fastv = build_pipeline({"llm": [{"name": "fastv", "layer": args.fastv_layer, "drop_ratio": args.fastv_drop}]}, args.hidden).llm
    ideal = [FixedDrop(args.fastv_layer, args.fastv_drop)]
    with torch.no_grad():
        t_none = time_prefill(lm, fembeds, fmask, fpos, kinds, None, args.fastv_iters, device)
        t_fastv = time_prefill(lm, fembeds, fmask, fpos, kinds, fastv, args.fastv_iters, device)
        t_ideal = time_prefill(lm, fembeds, fmask, fpos, kinds, ideal, args.fastv_iters, device)
    kept_media = math.ceil(args.fastv_media * (1 - args.fastv_drop))
    fastv_row = {
        "batch": b, "text_tokens": args.fastv_text, "media_tokens": args.fastv_media, "layer": args.fastv_layer,
        "drop_ratio": args.fastv_drop, "tokens_after_layer": args.fastv_text + kept_media,
        "prefill_ms": {"none": statistics.median(t_none), "fastv": statistics.median(t_fastv), "ideal": statistics.median(t_ideal)},
        "prefill_ms_all": {"none": t_none, "fastv": t_fastv, "ideal": t_ideal},
    }
    fastv_row["speedup"] = fastv_row["prefill_ms"]["none"] / fastv_row["prefill_ms"]["fastv"]
    fastv_row["ideal_speedup"] = fastv_row["prefill_ms"]["none"] / fastv_row["prefill_ms"]["ideal"]
    fastv_row["share_of_ideal"] = fastv_row["speedup"] / fastv_row["ideal_speedup"]
    print(f"fastv prefill: {fastv_row['speedup']:.2f}x (ideal {fastv_row['ideal_speedup']:.2f}x)", flush=True)

    result = {
        **run_metadata(device), "script": "eval/bench_decode.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "model": spec, "dtype": str(dtype).replace("torch.", ""), "weights_mib": weight_bytes / 2**20,
        "batch": b, "context": L, "steps": args.steps, "fraction": args.fraction, "budget": budget,
        "stated_overhead_mib": overhead,
        "overhead_rule": "the full row's peak minus its KV (prefill activations, logits), plus one layer's full-prompt KV "
                         "and its kept copy (a layer's whole cache lives until its prefill eviction gathers what stays)",
        "rows": rows, "failed_rows": failed, "fastv": fastv_row,
    }
    if failed:
        print(f"FAILED rows: {[(r['row'], r['error']) for r in failed]}")
    tag = "h200" if "H200" in result["device"] else ("cpu" if device.type == "cpu" else result["device"].split()[-1].lower())
    stem = Path(args.out) if args.out else ROOT / "eval" / "results" / f"bench_decode_{tag}"
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(report(result))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")
    return result


def profile(args, lm, embeds, mask, pos, budget, device) -> dict:
    """Print where 8 eager decoding steps (after the prefill) spend device and host time, per row."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from transformers import DynamicCache

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in args.profile or ["full", "tova"]:
        stages = None if name == "full" else build_pipeline({"llm": [{"name": name, "cache_max_size": budget}]}, args.hidden).llm
        runner = lm.bind_stages(stages)
        with torch.no_grad():
            cache = runner.new_cache() if runner is not None else DynamicCache(config=lm.config)
            logits, cache = lm(embeds, mask, pos, cache, use_cache=True, logits_to_keep=1, stages=runner)
            am, nxt, at = mask, logits[:, -1].argmax(-1), pos[:, -1:] + 1
            ones = torch.ones_like(am[:, :1])

            def step():
                nonlocal am, nxt, at, cache
                am = torch.cat([am, ones], 1)
                out, cache = lm(lm.embed(nxt[:, None]), am, at, cache, use_cache=True, logits_to_keep=1, stages=runner)
                nxt, at = out[:, -1].argmax(-1), at + 1

            step()
            sync(device)
            with torch_profile(activities=activities) as prof:
                for _ in range(8):
                    step()
                sync(device)
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"==== {name}: 8 eager decoding steps, top operators by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=50))
        del cache
    return {}


def report(r: dict) -> str:
    m = r["model"]
    lines = [
        "# Decoding with cache policies: speed and KV memory (eval/bench_decode.py)", "",
        f"{r['date']}, {r['device']}, commit {r['commit']}, torch {r['torch']}, transformers {r['transformers']}", "",
        f"Llama-shaped random-weight LLM: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, {r['dtype']}; weights "
        f"{r['weights_mib']:.0f} MiB. Batch {r['batch']} x {r['context']} prompt tokens, {r['steps']} timed decoding "
        f"steps; policies keep {r['budget']} slots per layer and KV head ({r['fraction']:g} of the prompt).", "",
        "| row | ms / step (first N) | speed-up | ms / step (steady) | speed-up | bandwidth ideal | KV held (MiB) | KV / full | peak delta (MiB) | peak bound (MiB) | tokens = eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        share = "" if row["kv_share_of_full"] is None else f"{row['kv_share_of_full']:.4f}"
        bound = "" if row["row"] == "full" else f"{row['peak_bound_mib']:.0f} ({'ok' if row['peak_within_bound'] else 'OVER'})"
        same = "" if not row["cuda_graph"] or row["token_agreement_with_eager"] is None else f"{row['token_agreement_with_eager']:.3f}"
        lines.append(f"| {row['row']} | {row['step_ms']:.2f} | {row['speedup']:.2f}x | {row['steady_step_ms']:.2f} | "
                     f"{row['steady_speedup']:.2f}x | {row['bandwidth_ideal_speedup']:.2f}x | "
                     f"{row['kv_mib']:.0f} | {share} | {row['peak_mib']:.0f} | {bound} | {same} |")
    f = r["fastv"]
    lines += [
        "", f"Peak bound = {r['fraction']:g} x full KV + stated overhead {r['stated_overhead_mib']:.0f} MiB ({r['overhead_rule']}).",
        f"'first N' = (generate of 1 + N tokens - generate of 1) / N, N = {r['steps']}: includes a graph row's eager warm-up "
        "step and its capture; 'steady' = the next N steps. The full row decodes with transformers' DynamicCache, which "
        "copies the whole cache at every step (torch.cat); the bandwidth ideal is (weights + full KV) / (weights + kept KV), "
        "the bytes a step must read. 'tokens = eager': share of a graph row's tokens equal to the same policy's eager row.",
        "", "## FastV prefill", "",
        f"Batch {f['batch']}, {f['text_tokens']} text + {f['media_tokens']} media tokens per row, layer K={f['layer']}, "
        f"drop {f['drop_ratio']:g} of the media: {f['tokens_after_layer']} tokens per row from layer K on.", "",
        "| prefill | ms (median) | speed-up |", "|---|---|---|",
        f"| no stage | {f['prefill_ms']['none']:.1f} | 1.00x |",
        f"| fastv | {f['prefill_ms']['fastv']:.1f} | {f['speedup']:.2f}x |",
        f"| ideal (fixed drop, no scoring) | {f['prefill_ms']['ideal']:.1f} | {f['ideal_speedup']:.2f}x |",
        "", f"FastV reaches {100 * f['share_of_ideal']:.1f} % of the ideal speed-up.", "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["row"] for row in r["rows"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    a1.bar(names, [row["step_ms"] for row in r["rows"]], color="tab:blue")
    a1.set_ylabel("ms per decoding step")
    a1.set_title(f"batch {r['batch']} x {r['context']} tokens, budget {r['budget']}")
    a2.bar(names, [row["kv_mib"] for row in r["rows"]], color="tab:orange", label="KV held")
    a2.plot(names, [row["peak_mib"] for row in r["rows"]], "ko", label="peak delta")
    a2.set_ylabel("MiB")
    a2.legend()
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{r['device']}, commit {r['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
