"""Does a reducer keep the evidence? Needle recall of a pipeline on pass-key passages, and where the
feedback target points.

Pass-key (llava_deft/tasks/passkey.py) is the one task whose evidence is known token by token: the filler
has no digits, so the tokens of a passage that hold a digit are exactly the key's. For each test passage
and each retention ratio this script reports

- **kept recall**: the share of the key's tokens that the pipeline (eval mode, as at inference) keeps,
  and the share of passages whose key is kept whole (every digit token);
- **target recall** (pipelines with ``fgcs``): DeFT's feedback target, computed in one training-mode
  forward/backward at retention 1.0 with the answer as the label: the share of the key's tokens among the
  target's top ``ceil(ratio * n)``, for each ``feedback_signal`` (``l1``, ``dot``, ``grad_norm``; the same
  gradient), and the share of passages whose key is whole among them. If the target points at the key
  but the kept recall is low, the scorer did not learn the target; if the target does not, the signal
  is wrong.

    python eval/needle_recall.py --model runs/sweeps/passkey/base#s0/final --pipeline configs/pipeline/deft_q.yaml
    python eval/needle_recall.py --model M --n 64 --device cpu --out /tmp/nr                  # smoke

Writes ``<out>/<name>.json`` (metadata, one row per ratio) and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.data import build_collator  # noqa: E402
from llava_deft.data.passkey import PasskeyDataset  # noqa: E402
from llava_deft.evaluation.sweep import resolve_pipeline  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from pipeline.stages.fgcs import FEEDBACK_SIGNALS, feedback_importance  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model folder (e.g. runs/sweeps/passkey/base#s0/final)")
    p.add_argument("--pipeline", default=None, help="pipeline YAML (default: the model's own)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.11])
    p.add_argument("--n", type=int, default=256, help="test passages")
    p.add_argument("--min-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="needle_recall")
    return p.parse_args(argv)


def digit_token_table(tokenizer) -> torch.Tensor:
    """(V,) bool: token id -> its text holds a digit (the key's tokens; the filler has none)."""
    vocab = len(tokenizer)
    table = torch.zeros(vocab, dtype=torch.bool)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab)))):
        table[i] = tok is not None and any(c.isdigit() for c in tok)
    return table


def passage_key_mask(text_ids: torch.Tensor, text_lengths: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """(P, L) bool: the key's tokens of each passage (padding excluded)."""
    valid = torch.arange(text_ids.shape[1], device=text_ids.device) < text_lengths.to(text_ids.device)[:, None]
    return digit.to(text_ids.device)[text_ids] & valid


def kept_positions(model, items: list[dict], device) -> list[torch.Tensor]:
    """Per passage (one per item), the original positions the pipeline keeps, as ``generate``'s own report
    gives them (``return_info``: one prefill, eval mode, as at inference)."""
    batch = build_collator(model.processors, generation=True)(items)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    _, info = model.generate(**batch, max_new_tokens=1, return_info=True)
    return [torch.tensor(media[0].kept, dtype=torch.long) for media in info.media]


def feedback_gradient(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The task loss's gradient and the values of the pipeline's tokens ``(P, N, D)`` x2 where ``fgcs`` taps
    them, at retention 1.0 in one training-mode forward/backward (the labels are the answers); None without
    an ``fgcs`` stage with feedback."""
    fgcs = next((s for s in model.pipeline.stages if s.stage_name == "fgcs"), None)
    if fgcs is None or fgcs.feedback_weight == 0:
        return None
    saved = [(s, s.retention_ratio) for s in model.pipeline.stages if hasattr(s, "retention_ratio")]
    model.pipeline.set_retention(1.0)
    model.train()
    fgcs.keep_feedback_grad = True
    try:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return fgcs.last_feedback["grad"], fgcs.last_feedback["tokens"]
    finally:
        fgcs.keep_feedback_grad = False
        fgcs.last_feedback = {}
        model.eval()
        model.zero_grad(set_to_none=True)
        for s, r in saved:
            s.retention_ratio = r


def measure(model, dataset, ratios: list[float], batch_size: int, device) -> list[dict]:
    """One row per ratio: kept recall, keys kept whole and, per feedback signal, the target's recall."""
    collate = build_collator(model.processors)
    digit = digit_token_table(model.tokenizer)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda items: (collate(items), items))
    zero = {"key_tokens": 0, "kept": 0, "whole": 0, "passages": 0}
    acc = {r: {**zero, **{f"{s}_{w}": 0 for s in FEEDBACK_SIGNALS for w in ("hits", "whole")}} for r in ratios}
    has_target = True
    for batch, items in tqdm(loader, desc="needle recall", dynamic_ncols=True):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        key = passage_key_mask(batch["text_ids"], batch["text_lengths"], digit)  # (P, L)
        lengths = batch["text_lengths"].to(device)
        grad = feedback_gradient(model, batch)
        has_target = has_target and grad is not None
        targets = {} if grad is None else {s: feedback_importance(*grad, s) for s in FEEDBACK_SIGNALS}  # (P, N) each
        for r in ratios:
            model.pipeline.set_retention(r)
            kept = kept_positions(model, items, device)
            a = acc[r]
            for p, pos in enumerate(kept):
                k_idx = key[p].nonzero().flatten()
                hit = torch.isin(k_idx, pos.to(device))
                a["key_tokens"] += int(k_idx.numel())
                a["kept"] += int(hit.sum())
                a["whole"] += int(bool(hit.all()))
                a["passages"] += 1
                n = int(lengths[p])
                for s, imp in targets.items():
                    in_top = torch.isin(k_idx, imp[p, :n].topk(math.ceil(r * n)).indices)
                    a[f"{s}_hits"] += int(in_top.sum())
                    a[f"{s}_whole"] += int(bool(in_top.all()))
    rows = []
    for r in ratios:
        a = acc[r]
        keys, passages = max(a["key_tokens"], 1), max(a["passages"], 1)
        rows.append({
            "ratio": r, "passages": a["passages"], "key_tokens": a["key_tokens"],
            "kept_recall": a["kept"] / keys, "key_kept_whole": a["whole"] / passages,
            "target_recall": {s: a[f"{s}_hits"] / keys for s in FEEDBACK_SIGNALS} if has_target else None,
            "target_whole": {s: a[f"{s}_whole"] / passages for s in FEEDBACK_SIGNALS} if has_target else None,
        })
    return rows


def markdown(rows: list[dict], meta: dict, args, signal: str | None) -> str:
    lines = [f"# Needle recall: {args.pipeline or 'the model pipeline'} on {args.model}", "",
             f"{rows[0]['passages']} pass-key test passages of {args.min_tokens}-{args.max_tokens} tokens; "
             f"{meta.get('device')}, {meta.get('date')}, commit {meta.get('commit')}. The pipeline's fgcs trains "
             f"with feedback_signal {signal!r}. Target columns: key tokens among the top ceil(ratio * n) of "
             f"that signal's feedback target (whole keys in parentheses).", "",
             "| ratio | key tokens kept | key kept whole | " + " | ".join(f"target: {s}" for s in FEEDBACK_SIGNALS) + " |",
             "|---|---|---|" + "---|" * len(FEEDBACK_SIGNALS)]
    for row in rows:
        t = ["—"] * len(FEEDBACK_SIGNALS) if row["target_recall"] is None else [
            f"{100 * row['target_recall'][s]:.1f} % ({100 * row['target_whole'][s]:.1f} %)" for s in FEEDBACK_SIGNALS]
        lines.append(f"| {row['ratio']:g} | {100 * row['kept_recall']:.1f} % | {100 * row['key_kept_whole']:.1f} % | "
                     + " | ".join(t) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = resolve_pipeline(args.pipeline, 1.0) if args.pipeline else None
    model = LlavaDeftForCausalLM.from_pretrained(args.model, pipeline=pipe).to(device).eval()
    if not any(hasattr(s, "retention_ratio") for s in model.pipeline.stages):
        raise SystemExit(f"the pipeline {model.pipeline.names} has no reducer; give --pipeline")
    dataset = Subset(PasskeyDataset(args.n, split="test", min_tokens=args.min_tokens, max_tokens=args.max_tokens),
                     range(args.n))
    rows = measure(model, dataset, args.ratios, args.batch_size, device)
    meta = run_metadata(device)
    out = Path(args.out)
    write_json(out / f"{args.name}.json", {"meta": meta, "command": " ".join(sys.argv), "model": args.model,
                                           "pipeline": args.pipeline, "rows": rows})
    fgcs = next((s for s in model.pipeline.stages if s.stage_name == "fgcs"), None)
    md = markdown(rows, meta, args, getattr(fgcs, "feedback_signal", None))
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
