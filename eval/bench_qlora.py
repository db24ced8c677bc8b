"""LoRA against QLoRA on a GPU: peak memory, step time and loss of N training steps.

A Llama-shaped LLM (default 0.89B parameters: hidden 2048, 16 layers, 16 heads, 8 KV heads,
intermediate 5632, vocab 32000, untied head; random init, bf16) inside our ``DecoderLM`` (the layer loop
``LlavaDeftForCausalLM`` runs its LLM through), adapters on every linear layer but the head injected by
``llava_deft.train.lora.add_lora`` (what a recipe's ``lora:`` section does; r 128, alpha 256, dropout
0.05 by default), AdamW on the adapters only, the same random token batches for both modes (batch 4 x
512 tokens, next-token loss). ``lora`` keeps the base weights in bf16; ``qlora`` (``lora.bits: 4``)
holds them in NF4 with double quantisation (bitsandbytes) and computes in bf16. Per mode: weights
memory after set-up, peak memory (``torch.cuda.max_memory_allocated`` over set-up and steps), step
time (median of the steps after the first, which pays the warm-up; each step synchronised) and every
step's loss. No DeepSpeed: plain torch steps, so the numbers are the adapters' and the base weights'.

GPU (writes eval/results/qlora_<name>.{json,md}; name default: the device, e.g. ``h200``):
    python eval/bench_qlora.py
    python eval/bench_qlora.py --hidden 4096 --layers 32 --heads 32 --kv-heads 32 --intermediate 11008 --name 7b_h200
CPU smoke test (seconds; tiny sizes, LoRA only, QLoRA reported as not run):
    python eval/bench_qlora.py --smoke --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python eval/bench_qlora.py` finds llava_deft
    sys.path.insert(0, str(ROOT))

from eval.common import device_name, run_metadata, write_json  # noqa: E402
from llava_deft.config.train import LoraSpec  # noqa: E402
from llava_deft.model.llm import DecoderLM, build_llm  # noqa: E402
from llava_deft.train.lora import add_lora, parameter_counts, qlora_problems  # noqa: E402

MODES = ("lora", "qlora")
SMOKE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 256, "batch": 2,
         "seq": 32, "steps": 3, "r": 8, "alpha": 16.0}
"""``--smoke``'s sizes (CPU, seconds)."""
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="training steps per mode (default 5)")
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--alpha", type=float, default=256.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--smoke", action="store_true", help=f"CPU, tiny sizes {SMOKE}, LoRA only")
    p.add_argument("--name", default=None, help="results are eval/results/qlora_<name>.{json,md} (default: the device)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke for the CPU check)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def build_lm(args: argparse.Namespace, dtype: torch.dtype) -> DecoderLM:
    torch.manual_seed(args.seed)
    hf = build_llm({
        "model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.intermediate, "max_position_embeddings": max(2048, args.seq),
        "tie_word_embeddings": False,
    }, vocab_size=args.vocab, torch_dtype=dtype)
    return DecoderLM(hf)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor]) -> dict:
    """Build the LLM, add the mode's adapters, train ``len(batches)`` steps; memory, times, losses."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = build_lm(args, dtype)
    spec = LoraSpec(r=args.r, alpha=args.alpha, dropout=args.dropout, bits=4 if mode == "qlora" else None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    add_lora(lm, spec, compute_dtype=dtype, device=device)
    lm.to(device)
    params = [p for p in lm.parameters() if p.requires_grad]
    for p in params:  # adapters in the compute dtype, as DeepSpeed's bf16 cast leaves them
        p.data = p.data.to(dtype)
    trainable, total = parameter_counts(lm)
    sync(device)
    weights = torch.cuda.memory_allocated(device) / GIB if cuda else None
    opt = torch.optim.AdamW(params, lr=args.lr, fused=cuda)
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)  # (B, L)
    losses, times = [], []
    lm.train()
    for ids in batches:
        ids = ids.to(device)
        sync(device)
        t0 = time.perf_counter()
        logits, _ = lm(lm.embed(ids), None, positions)  # (B, L, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out = {
        "base_weights": "nf4 (bitsandbytes, double quantisation)" if mode == "qlora" else str(dtype).removeprefix("torch."),
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "weights_gib": weights,
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        "step_s": times, "step_s_median": statistics.median(times[1:] or times), "losses": losses,
    }
    del lm, opt, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def default_name(device: torch.device, smoke: bool) -> str:
    if smoke:
        return "smoke_cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    return slug.removeprefix("nvidia_")


def report(res: dict) -> str:
    c = res["config"]
    lines = [
        f"# LoRA vs QLoRA: {res['device']}",
        "",
        f"`{res['command']}` — commit {res['commit']}, {res['date']}, torch {res['torch']}, transformers "
        f"{res['transformers']}, peft {res['peft']}, bitsandbytes {res['bitsandbytes']}.",
        "",
        f"Llama-shaped LLM in our `DecoderLM`: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads "
        f"({c['kv_heads']} KV), intermediate {c['intermediate']}, vocab {c['vocab']}, random init; LoRA r {c['r']}, "
        f"alpha {c['alpha']:g}, dropout {c['dropout']:g} on every linear layer but the head; AdamW lr {c['lr']:g} "
        f"on the adapters; {c['steps']} steps of batch {c['batch']} x {c['seq']} random tokens (the same for both).",
        "",
        "| mode | base weights | trainable / total params | weights (GiB) | peak (GiB) | step (ms, median after the first) | loss first → last |",
        "|---|---|---|---|---|---|---|",
    ]
    gib = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for mode, r in res["modes"].items():
        if "not_run" in r:
            lines.append(f"| {mode} | {r['not_run']} | | | | | |")
            continue
        lines.append(
            f"| {mode} | {r['base_weights']} | {r['trainable_params'] / 1e6:.1f}M / {r['total_params'] / 1e6:.1f}M "
            f"({100 * r['trainable_share']:.2f}%) | {gib(r['weights_gib'])} | {gib(r['peak_gib'])} | "
            f"{1e3 * r['step_s_median']:.1f} | {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
    ran = {m: r for m, r in res["modes"].items() if "losses" in r}
    lines += ["", "Loss per step (ln vocab = {:.4f}):".format(math.log(c["vocab"])), "",
              "| step | " + " | ".join(ran) + " |", "|---|" + "---|" * len(ran)]
    for s in range(c["steps"]):
        lines.append(f"| {s + 1} | " + " | ".join(f"{r['losses'][s]:.4f}" for r in ran.values()) + " |")
    return "\n".join(lines) + "\n"


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    modes = {}
    for mode in args.modes:
        problems = qlora_problems() if mode == "qlora" else []
        if args.smoke and mode == "qlora":
            problems = problems or ["--smoke runs on the CPU"]
        if problems:
            modes[mode] = {"not_run": f"not run: needs CUDA + bitsandbytes ({'; '.join(problems)})"}
            print(f"[bench_qlora] {mode}: {modes[mode]['not_run']}")
            continue
        modes[mode] = run_mode(mode, args, device, batches)
        r = modes[mode]
        print(f"[bench_qlora] {mode}: peak {r['peak_gib']} GiB, step {1e3 * r['step_s_median']:.1f} ms, losses {r['losses']}")
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq", "steps", "r", "alpha", "dropout", "lr", "seed")
    res = {
        **run_metadata(device),
        "command": " ".join(["python", "eval/bench_qlora.py", *(sys.argv[1:] if argv is None else argv)]),
        "peft": installed("peft"), "bitsandbytes": installed("bitsandbytes"),
        "config": {k: getattr(args, k) for k in keys}, "modes": modes,
    }
    name = args.name or default_name(device, args.smoke)
    write_json(args.out_dir / f"qlora_{name}.json", res)
    (args.out_dir / f"qlora_{name}.md").write_text(report(res))
    print(f"[bench_qlora] wrote {args.out_dir / f'qlora_{name}'}.{{json,md}}")
    return res


if __name__ == "__main__":
    main()
