"""Reducer speed against the ideal: time to first token, decoding time per token, peak memory and the
reducer's own overhead, for every registered reducer at every ratio, at batch 1 and 8 (issue 16).

Shapes (random weights, bf16 on a GPU): ``llava15_7b`` is LLaVA-1.5-7B's (CLIP ViT-L/14 at 336 px from
timm, 576 tokens per image from its penultimate layer, ``mlp2x_gelu``, a Llama-7B: hidden 4096, 32 layers,
32 heads, intermediate 11008, vocab 32000); ``qwen2_7b`` swaps in a Qwen2-7B (hidden 3584, 28 layers, 28
query heads over 4 KV heads, intermediate 18944, vocab 152064). Each batch row is one 336 px image and a
short question, through this project's own API (collator, ``LlavaDeftForCausalLM.generate``).

Rows, per shape and batch size:

- ``none``: no reduction (every image token reaches the LLM);
- each reducer (every registered pre-LLM stage with a ``retention_ratio``, alone, plus ``deft`` =
  ``configs/pipeline/deft.yaml`` and ``deft_q`` = ``configs/pipeline/deft_q.yaml``) at each ratio;
- the **ideal** of each ratio: the same model with no reducer whose LLM is fed the reduced count
  (the first ``static_budget(576, ratio)`` image tokens are passed on, nothing is scored): what the
  reduction can save at best. ``% of ideal`` = ideal TTFT / the reducer's TTFT (100 % when the reducer
  costs nothing), and ``speed-up`` = TTFT without reduction / TTFT with it.

Timings: time to first token = median wall time (and interquartile range) of ``generate(max_new_tokens=1)``
on a collated batch on the device (vision tower, projector, pipeline, prefill, first token), synchronised,
timed round-robin: each round calls every row once, after warm-up rounds, so a drift of the device or the
host touches every row alike (the first H100 run timed row after row and its batch-1 medians scattered);
decoding per token = (median time of ``generate(1 + steps)`` - TTFT) / steps, with EOS made unreachable
so every row decodes ``steps`` tokens; peak memory = ``torch.cuda.max_memory_allocated`` during the
``1 + steps`` call minus what was allocated before it (the weights); reducer overhead = median time of
the pipeline alone on the encoded image tokens.

    python eval/bench_reducers.py                                     # GPU: both shapes, batch 1 and 8
    python eval/bench_reducers.py --shapes llava15_7b --batch-sizes 8 --reducers deft random --ratios 0.11
    python eval/bench_reducers.py --smoke --out /tmp/bench_reducers   # CPU, tiny model, seconds

Writes ``<out>/<name>.json`` (metadata, one row per shape x batch x reducer x ratio), ``<name>.md`` and
``<name>.png`` (time to first token against media tokens per image, the ideal dashed, one panel per shape
and batch size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python eval/bench_reducers.py` from anywhere
    sys.path.insert(0, str(ROOT))

from eval.common import run_metadata, save_figure, write_json  # noqa: E402
from llava_deft.data import build_collator  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from llava_deft.provenance import save_gzipped_trace  # noqa: E402
from pipeline import Pipeline, TokenBatch, build_pipeline, get_stage, list_stages, static_budget  # noqa: E402

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
QWEN2_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 4096}
VIT_L_336 = {"backend": "timm", "name": "vit_large_patch14_clip_336", "kwargs": {}, "feature_layer": -2}
SHAPES = {
    "llava15_7b": {"vision": VIT_L_336, "projector": {"type": "mlp2x_gelu"}, "llm": {"config": LLAMA_7B}, "max_length": 2048},
    "qwen2_7b": {"vision": VIT_L_336, "projector": {"type": "mlp2x_gelu"}, "llm": {"config": QWEN2_7B}, "max_length": 2048},
    "tiny": {},  # the tiny default (CPU smoke)
}
PIPELINES = {"deft": ROOT / "configs/pipeline/deft.yaml", "deft_q": ROOT / "configs/pipeline/deft_q.yaml"}
NONE, IDEAL = "none", "ideal"
QUESTION = "What is in the picture?"


def reducer_names() -> list[str]:
    """Every registered pre-LLM stage that reduces (has a ``retention_ratio``), then the DeFT pipelines."""
    alone = [n for n in list_stages("tokens") if "retention_ratio" in get_stage(n).Config.model_fields]
    return alone + list(PIPELINES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llava15_7b", "qwen2_7b"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reducers", nargs="+", default=None, help="default: every registered reducer, deft and deft_q")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.482, 0.25, 0.11])
    p.add_argument("--steps", type=int, default=64, help="decoded tokens for the per-token time")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--eager", action="store_true",
                   help="generate with cuda_graph=False (every kernel launched from Python) instead of the default, "
                        "where the vision tower, the pipeline, the prefill and each decoding step replay from CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="generate(compile=True): the LLM's prefill and decoding step fused by torch.compile (inductor) "
                        "inside the CUDA graphs; the warm-up calls compile")
    p.add_argument("--profile", default=None, metavar="REDUCER@RATIO",
                   help="also profile 3 time-to-first-token calls of this row (e.g. deft@0.11) at each shape's first "
                        "batch size with torch.profiler: <name>_profile.txt, host and device time per range and op")
    p.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 1 repeat: checks the script runs")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="default bench_reducers_<device>")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.device = ["tiny"], args.device or "cpu"
        args.batch_sizes = [b for b in args.batch_sizes if b <= 2] or [1]
        args.steps, args.repeats, args.warmup = min(args.steps, 4), 1, 0
    names = reducer_names()
    args.reducers = args.reducers or names
    unknown = sorted(set(args.reducers) - set(names))
    if unknown:
        p.error(f"unknown reducers {unknown}; registered: {names}")
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        p.error(f"ratios must be in (0, 1), got {bad}")
    return args


class FedReducedCount(Pipeline):
    """The ideal of a reducer: no stage, the first ``static_budget(N, ratio)`` tokens of every row passed on."""

    def __init__(self, ratio: float, dim: int):
        super().__init__([], dim=dim)
        self.ratio = ratio

    def forward(self, batch: TokenBatch) -> TokenBatch:
        k = static_budget(batch.tokens.shape[1], self.ratio)
        return batch.replace(tokens=batch.tokens[:, :k], mask=batch.mask[:, :k], index=batch.index[:, :k], scores=None,
                             features=None, encoder_attention=None)


def pipeline_for(name: str, ratio: float | None, dim: int) -> Pipeline:
    if name == NONE:
        return build_pipeline({"stages": []}, dim=dim)
    if name == IDEAL:
        return FedReducedCount(ratio, dim)
    pipe = build_pipeline(PIPELINES[name] if name in PIPELINES else [{"name": name}], dim=dim)
    pipe.set_retention(ratio)
    return pipe


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LlavaDeftForCausalLM:
    """The shape's model with random weights, built on ``device``; EOS unreachable (every row decodes fully)."""
    with torch.device(device):
        model = LlavaDeftForCausalLM(SHAPES[shape])
    model = model.to(dtype).eval()
    eos = model.tokenizer.eos_token_id

    def never_eos(_module, _inputs, logits):  # one masked write per step, the same for every row measured
        logits[..., eos] = torch.finfo(logits.dtype).min
        return logits

    model.llm.hf.get_output_embeddings().register_forward_hook(never_eos)
    return model


def make_batch(model, batch_size: int, device) -> dict:
    h, w = model.vision.image_size
    rng = np.random.default_rng(0)
    items = [{"id": f"bench-{i}", "messages": [{"role": "user", "content": f"<image>\n{QUESTION}"}],
              "images": [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]} for i in range(batch_size)]
    batch = build_collator(model.processors, generation=True)(items)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0)


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    times = [timed_ms(fn, device) for _ in range(warmup + repeats)][warmup:]
    return statistics.median(times)


def quartiles(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``times``."""
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[1], q[2] - q[0]


def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory bandwidth (GB/s) of a device-to-device copy of ``gib`` GiB (bytes read + bytes written per second,
    best of ``repeats``): the rate a decoding step reads the weights at, at best."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(timed_ms(lambda: dst.copy_(src), device) for _ in range(repeats + 1))
    return 2 * n / (best / 1000) / 1e9


def decode_floor(model, device: torch.device) -> dict:
    """The decoding floor of batch 1: every LLM weight read once per token at the measured copy bandwidth."""
    weights = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    bandwidth = copy_bandwidth_gbs(device, gib=1.0 if device.type == "cuda" else 0.05)
    return {"llm_weight_bytes": weights, "copy_bandwidth_gbs": bandwidth, "floor_ms_per_token": weights / bandwidth / 1e6}


def measure(model, batch: dict, device, steps: int, repeats: int, warmup: int, **gen) -> dict:
    """One row's decoding ms per token, peak memory (MB, CUDA only), reducer overhead and tokens per image
    (the time to first token is timed afterwards, round-robin over the rows: :func:`time_to_first_token`)."""
    # two untimed calls: the first warms up, the second captures (graphs are replayed from the third)
    ttft = median_ms(lambda: model.generate(**batch, max_new_tokens=1, **gen), device, max(1, repeats // 2), 2)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        out, media = model.generate(**batch, max_new_tokens=1 + steps, return_media_tokens=True, **gen)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    if out.shape[1] != 1 + steps:
        raise RuntimeError(f"generation stopped after {out.shape[1]} of {1 + steps} tokens; the decode time would be wrong")
    full = median_ms(lambda: model.generate(**batch, max_new_tokens=1 + steps, **gen), device, max(1, repeats // 2), 1)
    with torch.no_grad():
        tokens = model.encode_images(batch["pixel_values"])  # one image per row: pipeline rows = samples
        if model.needs_query():  # question-aware stages read each row's prompt, as in generate
            ids, mask = batch["input_ids"], batch["attention_mask"]
            tokens = tokens.with_query(*model.prompt_query(ids, mask, model.llm.embed(ids)))
        overhead = median_ms(lambda: model.pipeline(tokens), device, repeats, warmup)
    return {"decode_ms_per_token": (full - ttft) / steps, "peak_mem_mb": peak, "overhead_ms": overhead,
            "tokens_per_image": float(media.float().mean())}


def time_to_first_token(model, batch: dict, pipes: list, device, repeats: int, warmup: int,
                        **gen) -> list[tuple[float, float]]:
    """(median, IQR) ms of ``generate(max_new_tokens=1)`` with each pipeline, timed round-robin (one call of
    each per round, ``warmup`` rounds untimed), so slow drifts of the device or host touch every row alike."""
    times: list[list[float]] = [[] for _ in pipes]
    for rnd in range(warmup + repeats):
        for i, pipe in enumerate(pipes):
            model.pipeline = pipe
            t = timed_ms(lambda: model.generate(**batch, max_new_tokens=1, **gen), device)
            if rnd >= warmup:
                times[i].append(t)
    return [quartiles(t) for t in times]


def profile_ttft(model, batch: dict, pipe, device, calls: int = 3, trace: Path | None = None, **gen) -> str:
    """torch.profiler tables (host and device time per ``record_function`` range and op, top 45 by host time,
    then top 30 by device time) of ``calls`` time-to-first-token calls with ``pipe``, after two warm-up calls
    (and captures); ``trace``: also the timeline, gzipped Chrome trace JSON (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    model.pipeline = pipe
    for _ in range(2):
        model.generate(**batch, max_new_tokens=1, **gen)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            model.generate(**batch, max_new_tokens=1, **gen)
        _sync(device)
    if trace is not None:
        save_gzipped_trace(prof, trace)
    table = prof.key_averages()
    by_host = table.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=60)
    if device.type != "cuda":
        return by_host
    return by_host + "\n\nBy device time:\n\n" + table.table(sort_by="self_cuda_time_total", row_limit=30,
                                                              max_name_column_width=60)


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = []
    gen = ({"cuda_graph": False} if args.eager else {}) | ({"compile": True} if args.compile else {})
    for shape in args.shapes:
        model = build_model(shape, device, dtype)
        args.floors[shape] = decode_floor(model, device)
        dim = model.llm.hidden_size
        plan = [(NONE, None)] + [(n, r) for r in args.ratios for n in (IDEAL, *args.reducers)]
        for b in args.batch_sizes:
            batch = make_batch(model, b, device)
            done = []  # (row, pipeline) of the rows that ran
            for name, ratio in tqdm(plan, desc=f"{shape} batch {b}", dynamic_ncols=True):
                pipe = pipeline_for(name, ratio, dim).to(device=device, dtype=dtype).eval()
                model.pipeline = pipe
                row = {"shape": shape, "batch": b, "reducer": name, "ratio": ratio}
                try:
                    row.update(measure(model, batch, device, args.steps, args.repeats, args.warmup, **gen))
                    done.append((row, pipe))
                except (RuntimeError, ValueError) as e:  # one reducer failing must not lose the others' rows
                    if name in (NONE, IDEAL):
                        raise
                    tqdm.write(f"[bench] {shape} batch {b} {name}@{ratio}: {type(e).__name__}: {e}")
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
            ttfts = time_to_first_token(model, batch, [p for _, p in done], device, args.repeats, args.warmup, **gen)
            if args.profile and b == args.batch_sizes[0]:
                want = args.profile.split("@")
                pipe = next(p for r, p in done if r["reducer"] == want[0] and
                            (len(want) == 1 or r["ratio"] == float(want[1])))
                trace = Path(args.out) / f"{args.name or 'bench_reducers'}_{shape}_b{b}_trace.json.gz"
                trace.parent.mkdir(parents=True, exist_ok=True)
                args.profiles.append(f"## {shape}, batch {b}, {args.profile}\n\n"
                                     + profile_ttft(model, batch, pipe, device, trace=trace, **gen))
            for (row, _), (median, iqr) in zip(done, ttfts):
                row["ttft_ms"], row["ttft_iqr_ms"] = median, iqr
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speed-up over no reduction, the ideal's speed-up and % of the ideal (ideal TTFT / TTFT), per row."""
    for r in rows:
        if "error" in r:
            continue
        none = next(x for x in rows if (x["shape"], x["batch"], x["reducer"]) == (r["shape"], r["batch"], NONE))
        ideal = next((x for x in rows if (x["shape"], x["batch"], x["reducer"], x["ratio"]) ==
                      (r["shape"], r["batch"], IDEAL, r["ratio"])), None)
        r["speedup"] = none["ttft_ms"] / r["ttft_ms"]
        r["ideal_speedup"] = None if ideal is None else none["ttft_ms"] / ideal["ttft_ms"]
        r["pct_of_ideal"] = None if ideal is None else 100 * ideal["ttft_ms"] / r["ttft_ms"]
    return rows


def markdown(rows: list[dict], meta: dict, args) -> str:
    lines = [f"# Reducer speed against the ideal ({meta['device']})", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}; "
             f"{'eager (cuda_graph=False)' if args.eager else 'CUDA graphs (the default)'}"
             f"{', torch.compile (inductor)' if args.compile else ''}; "
             f"`python eval/bench_reducers.py {' '.join(sys.argv[1:])}`", "",
             "TTFT: median ms of generate(max_new_tokens=1) (vision, projector, pipeline, prefill); decode: ms per "
             f"token over {args.steps} tokens; ideal: the LLM fed the reduced count, nothing scored; % of ideal = "
             "ideal TTFT / TTFT; overhead: the pipeline alone.", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows if r["shape"] == shape):
            floor = args.floors.get(shape)
            lines += [f"## {shape}, batch {b}", ""]
            if floor:
                lines += [f"Decoding floor: the LLM's {floor['llm_weight_bytes'] / 2**30:.2f} GiB of weights read once per "
                          f"token at the measured copy bandwidth ({floor['copy_bandwidth_gbs']:.0f} GB/s) = "
                          f"{floor['floor_ms_per_token']:.2f} ms per token.", ""]
            lines += [
                      "| reducer | ratio | tokens/image | TTFT ms (IQR) | speed-up | ideal speed-up | % of ideal | decode ms/token | peak MB | overhead ms |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                if (r["shape"], r["batch"]) != (shape, b):
                    continue
                if "error" in r:
                    lines.append(f"| {r['reducer']} | {r['ratio']:g} | failed: {r['error'][:120]} |||||||")
                    continue
                f = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
                ratio = "—" if r["ratio"] is None else f"{r['ratio']:g}"
                lines.append(f"| {r['reducer']} | {ratio} | "
                             f"{r['tokens_per_image']:.1f} | {f(r['ttft_ms'])} ({f(r['ttft_iqr_ms'])}) | {f(r['speedup'])}x | "
                             f"{f(r['ideal_speedup'])}{'' if r['ideal_speedup'] is None else 'x'} | {f(r['pct_of_ideal'], 1)} | "
                             f"{f(r['decode_ms_per_token'])} | {f(r['peak_mem_mb'], 0)} | {f(r['overhead_ms'])} |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (shape, b) in zip(axes[0], panels):
        mine = [r for r in rows if (r["shape"], r["batch"]) == (shape, b) and "error" not in r]
        for i, name in enumerate(dict.fromkeys(r["reducer"] for r in mine if r["reducer"] != NONE)):
            line = sorted((r for r in mine if r["reducer"] == name), key=lambda r: r["tokens_per_image"])
            ax.plot([r["tokens_per_image"] for r in line], [r["ttft_ms"] for r in line], "--" if name == IDEAL else "-o",
                    color="k" if name == IDEAL else f"C{i % 10}", label=name, markersize=3)
        none = next(r for r in mine if r["reducer"] == NONE)
        ax.axhline(none["ttft_ms"], color="gray", lw=0.8, label="no reduction")
        ax.set(title=f"{shape}, batch {b}", xlabel="media tokens per image", ylabel="time to first token (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.profiles, args.floors = [], {}
    rows = run(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = run_metadata(device)
    name = args.name or f"bench_reducers_{'cpu' if device.type == 'cpu' else 'gpu'}"
    out = Path(args.out)
    write_json(out / f"{name}.json", {"meta": meta, "command": " ".join(sys.argv), "steps": args.steps,
                                      "cuda_graph": not args.eager, "compile": args.compile,
                                      "decode_floors": args.floors,
                                      "repeats": args.repeats, "rows": rows})
    md = markdown(rows, meta, args)
    (out / f"{name}.md").write_text(md)
    plot(rows, out / f"{name}.png")
    if args.profiles:
        (out / f"{name}_profile.txt").write_text("\n\n".join(args.profiles))
    print(md)
    return rows


if __name__ == "__main__":
    main()
