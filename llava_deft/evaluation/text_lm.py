"""``llava-deft evaluate --model_dir DIR``: a text LM with in-LLM compression against the same weights
without it -- perplexity, next-token accuracy, compression ratio per stage, KV-cache memory (issue 18).

The test split of a text corpus (``fortunes`` by default: Debian's package; or any text file) in blocks of
``block_tokens`` ids runs through the model twice per batch: with its saved LLM stages (recorded: what
each layer stage kept, merged and dropped) and with none (or through ``baseline_dir``'s model: the
uncompressed LM it was trained from). Both are scored on the SAME positions: those
whose logits the compressed run produced (a column a stage merged away or dropped predicts nothing;
``LLMStages.present``) and whose target is a real token; the uncompressed run is also scored on every
position. Reported:

- ``perplexity``: exp(mean next-token cross-entropy), compressed / uncompressed on the shared positions,
  uncompressed on all positions;
- ``accuracy``: top-1 next-token accuracy on the shared positions (the task accuracy of an LM);
- ``compression``: per layer stage, real tokens in and out summed over the split, and their ratio; the
  tokens the last layer sees against the prompt's;
- ``kv_bytes``: the key/value cache a prefill leaves, summed over the split, with and without the stages
  (measured from the caches), and their ratio; on CUDA the peak memory of each pass.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import build_collator
from ..data.text_corpus import TextCorpusDataset
from ..model.llm.runtime import LLMStages
from ..model.splice import IGNORE_INDEX


def _cache_bytes(cache) -> int:
    if hasattr(cache, "stats"):
        return sum(s["bytes"] for s in cache.stats())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate_text_lm(model_dir: str | Path, data: str = "fortunes", split: str = "test", block_tokens: int | None = None,
                     max_blocks: int | None = None, batch_size: int = 8, device: str | None = None,
                     progress: bool = True, baseline_dir: str | Path | None = None) -> dict:
    """Evaluate a saved text LM (see the module docstring); returns the report as a dict. ``baseline_dir``:
    the uncompressed pass runs that model (e.g. the LM the compressed one was trained from, same tokenizer)
    instead of ``model_dir``'s weights without stages."""
    from tqdm.auto import tqdm

    from ..model import LlavaDeftForCausalLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = LlavaDeftForCausalLM.from_pretrained(model_dir).to(dev).eval()
    stages = list(model.pipeline.llm)
    base = model
    if baseline_dir is not None:
        base = LlavaDeftForCausalLM.from_pretrained(baseline_dir).to(dev).eval()
        if base.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            raise ValueError(f"baseline '{baseline_dir}' has another tokenizer than '{model_dir}': their perplexities "
                             f"would not compare")
    block = block_tokens or model.config.max_length
    ds = TextCorpusDataset(data, model.tokenizer, block, split=split, limit=max_blocks)
    collate = build_collator(model.processors)
    runner = LLMStages(model.llm, stages, record=True) if stages else None
    nll = {"compressed": 0.0, "uncompressed": 0.0, "uncompressed_all": 0.0}
    correct = {"compressed": 0, "uncompressed": 0}
    counts = {"shared": 0, "all": 0}
    kv = {"compressed": 0, "uncompressed": 0}
    peak = {"compressed": 0, "uncompressed": 0}
    per_stage: dict[int, dict] = {}
    seconds = {"compressed": 0.0, "uncompressed": 0.0}
    for start in tqdm(range(0, len(ds), batch_size), desc="evaluate", disable=not progress):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        own = model.llm.embed(ids)
        embeds = {"compressed": own, "uncompressed": own if base is model else base.llm.embed(ids)}
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        target = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), IGNORE_INDEX)  # (B, L-1) next tokens
        outputs = {}
        for name, lm, run in (("compressed", model.llm, runner), ("uncompressed", base.llm, None)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            logits, cache = lm(embeds[name], mask, pos, None, use_cache=True, stages=run if run is not None else [])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(dev))
            seconds[name] += time.perf_counter() - t0
            kv[name] += _cache_bytes(cache)
            outputs[name] = logits[:, :-1].float()
            del cache
        present = runner.present[:, :-1] if runner is not None and runner.present is not None else torch.ones_like(target, dtype=torch.bool)
        real = target != IGNORE_INDEX
        shared = real & present
        for name in ("compressed", "uncompressed"):
            ce = F.cross_entropy(outputs[name].flatten(0, 1), target.clamp(min=0).flatten(), reduction="none").view_as(target)
            nll[name] += float(ce[shared].sum())
            correct[name] += int((outputs[name].argmax(-1) == target)[shared].sum())
            if name == "uncompressed":
                nll["uncompressed_all"] += float(ce[real].sum())
        counts["shared"] += int(shared.sum())
        counts["all"] += int(real.sum())
        if runner is not None:
            for t in runner.trace:
                row = per_stage.setdefault(t.position, {"stage": t.stage.stage_name, "layer": t.stage.layer,
                                                        "tokens_in": 0, "tokens_out": 0})
                row["tokens_in"] += int(t.mask_in.sum())
                row["tokens_out"] += int(t.mask.sum())
    shared_n, all_n = max(1, counts["shared"]), max(1, counts["all"])
    stage_rows = [dict(r, ratio=r["tokens_out"] / max(1, r["tokens_in"])) for _, r in sorted(per_stage.items())]
    prompt_tokens = counts["all"] + len(ds)  # real tokens of every block (targets + each block's first)
    report = {
        "model_dir": str(model_dir), "baseline_dir": None if baseline_dir is None else str(baseline_dir), "data": data, "split": split, "block_tokens": block, "blocks": len(ds),
        "device": str(dev), "stages": [s.stage_name for s in stages],
        "positions": {"shared": counts["shared"], "all": counts["all"]},
        "perplexity": {"compressed": math.exp(nll["compressed"] / shared_n),
                       "uncompressed": math.exp(nll["uncompressed"] / shared_n),
                       "uncompressed_all_positions": math.exp(nll["uncompressed_all"] / all_n)},
        "accuracy": {"compressed": correct["compressed"] / shared_n, "uncompressed": correct["uncompressed"] / shared_n},
        "compression": {"stages": stage_rows,
                        "last_layer_tokens": stage_rows[-1]["tokens_out"] if stage_rows else prompt_tokens,
                        "prompt_tokens": prompt_tokens},
        "kv_bytes": {**kv, "ratio": kv["compressed"] / max(1, kv["uncompressed"])},
        "seconds": seconds,
    }
    report["compression"]["ratio"] = report["compression"]["last_layer_tokens"] / max(1, prompt_tokens)
    if dev.type == "cuda":
        report["peak_bytes"] = peak
    return report


def format_report(r: dict) -> str:
    p, a, kv = r["perplexity"], r["accuracy"], r["kv_bytes"]
    base = f" against {r['baseline_dir']}" if r.get("baseline_dir") else " against its weights without stages"
    lines = [f"model {r['model_dir']}{base} on {r['data']} ({r['split']}, {r['blocks']} blocks of {r['block_tokens']} tokens), "
             f"stages {r['stages'] or 'none'}, {r['device']}",
             "| | compressed | uncompressed |", "|---|---|---|",
             f"| perplexity ({r['positions']['shared']} shared positions) | {p['compressed']:.3f} | {p['uncompressed']:.3f} |",
             f"| next-token accuracy | {100 * a['compressed']:.2f} % | {100 * a['uncompressed']:.2f} % |",
             f"| KV cache after prefill (MiB, all blocks) | {kv['compressed'] / 2**20:.2f} | {kv['uncompressed'] / 2**20:.2f} |",
             f"| perplexity, every position | | {p['uncompressed_all_positions']:.3f} |"]
    if r["compression"]["stages"]:
        lines += ["", "| stage | layer | tokens in | tokens out | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['layer']} | {s['tokens_in']} | {s['tokens_out']} | {s['ratio']:.3f} |"
                  for s in r["compression"]["stages"]]
    lines.append(f"\ncompression ratio (tokens the last layers see / prompt tokens): {r['compression']['ratio']:.3f}; "
                 f"KV memory ratio: {kv['ratio']:.3f}")
    return "\n".join(lines)
