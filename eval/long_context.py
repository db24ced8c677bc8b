"""Long-context retrieval under KV-cache policies: pass-key and multi-needle passages of 2K-8K tokens.

The task where eviction matters (llava_deft/tasks/passkey.py): a passage of exactly L tiny-tokenizer
tokens hides ``needles`` labelled pass keys at uniform random depths and the question asks for one
("What is the pass key of the red phone?"), so keeping only the most recent tokens cannot answer it
unless the asked needle happens to sit at the end. For every (L, needles) bin the model answers the
same questions with:

- ``full``: no cache policy (every token cached);
- ``model``: the LLM stages the model was saved with (e.g. the ``pair_compress`` of
  ``configs/train/passkey_long_pair.yaml``), with the tokens its layer stages hand on (``tokens_in`` /
  ``tokens_out`` of the bin's last batch) in the row: with ``full`` beside it, the compressed model
  against the same frozen base without its stages;
- ``tova``, ``h2o``, ``streaming_llm``, ``snapkv`` keeping ``ceil(fraction * L)`` slots per layer and KV
  head (1/8 of the passage by default; the prompt's ~30 template tokens make it slightly less than 1/8
  of the full cache).

Answers are greedy and scored by exact match (``eval/tasks.py``'s loop and scorer). Reported per bin and
overall: accuracy, % of the full cache's accuracy, and accuracy by the asked needle's depth (fifths of
the passage); checks: TOVA keeps >= ``--target`` of the full cache's accuracy and beats StreamingLLM and
H2O at the same budget; ``model`` keeps >= ``--target`` of ``full``. Test passages are generated once into ``--data-dir`` (deterministic: seed, L,
needles and n fix the bytes).

    python eval/long_context.py --model runs/passkey_long/final          # GPU: ~1 minute
    python eval/long_context.py --model runs/passkey_long_pair/final --policies full model --lengths 4096 8192
    python eval/long_context.py --model M --lengths 2048 --n 20 --device cpu --out /tmp/lc   # smoke

Writes ``<out>/<name>.json`` (metadata, one row per bin and policy, per-question predictions),
``<name>.md`` and ``<name>.png`` (accuracy against passage length, one line per policy, one panel per
needle count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import exact_match, run_metadata, save_figure, write_json  # noqa: E402
from eval.tasks import TaskSplit, predict, score  # noqa: E402
from llava_deft.data import LlavaJsonDataset  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from llava_deft.provenance import read_training_record  # noqa: E402
from llava_deft.tasks.passkey import generate_split  # noqa: E402
from pipeline import build_pipeline  # noqa: E402

POLICIES = ("full", "tova", "h2o", "streaming_llm", "snapkv")
OWN = "model"  # the model's own saved LLM stages
EAGER = "tova_eager"  # TOVA again without CUDA graphs (GPU runs): the graph replay must not change answers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model folder (e.g. runs/passkey_long/final)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="passage lengths (tokens)")
    p.add_argument("--needles", type=int, nargs="+", default=[1, 4], help="needle counts")
    p.add_argument("--n", type=int, default=200, help="questions per (length, needles) bin")
    p.add_argument("--fraction", type=float, default=0.125, help="cache budget as a share of the passage")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=(*POLICIES, OWN),
                   help=f"cache policies to compare; '{OWN}' = the LLM stages the model was saved with")
    p.add_argument("--target", type=float, default=0.99,
                   help="TOVA's (and the model's own stages') required share of the full cache's accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default="data/long_context", help="where the test passages are generated")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="output stem (default long_context_<device>)")
    return p.parse_args(argv)


def bin_split(data_dir: Path, length: int, needles: int, n: int, seed: int) -> Path:
    """``<data_dir>/L<length>_k<needles>_n<n>_s<seed>/test.json``, generated once."""
    folder = data_dir / f"L{length}_k{needles}_n{n}_s{seed}"
    path = folder / "test.json"
    if not path.is_file():
        generate_split(folder, "test", n, min_tokens=length, max_tokens=length, seed=seed, needles=needles)
    return path


def policy_stages(name: str, budget: int, dim: int):
    if name == "full":
        return torch.nn.ModuleList()
    return build_pipeline({"llm": [{"name": name, "cache_max_size": budget}]}, dim).llm


def depth_bin(depth: float) -> str:
    k = min(4, int(depth * 5))
    return f"{20 * k}-{20 * (k + 1)}%"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not 0 < args.fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    device = torch.device(args.device)
    training = read_training_record(args.model)
    model = LlavaDeftForCausalLM.from_pretrained(args.model).to(device).eval()
    limit = model.config.max_length
    too_long = [L for L in args.lengths if L + 64 > limit]
    if too_long:
        raise SystemExit(f"model '{args.model}' takes prompts of at most max_length={limit} tokens; lengths {too_long} "
                         f"do not fit (train a long-context model: configs/train/passkey_long.yaml)")
    own = model.pipeline.llm
    if OWN in args.policies and not len(own):
        raise SystemExit(f"--policies {OWN}: model '{args.model}' was saved without LLM stages (its pipeline has no llm: list)")
    data_dir = Path(args.data_dir)
    if device.type == "cuda" and "tova" in args.policies:
        args.policies = [*args.policies, EAGER]
    rows, predictions = [], {}
    for needles in args.needles:
        for length in args.lengths:
            path = bin_split(data_dir, length, needles, args.n, args.seed)
            records = {r["id"]: r for r in json.loads(path.read_text())}
            ds = TaskSplit("passkey", LlavaJsonDataset(path, path.parent, options=model.processors.media))
            budget = math.ceil(args.fraction * length)
            for policy in args.policies:
                model.pipeline.llm = own if policy == OWN else policy_stages(policy.removesuffix("_eager"), budget,
                                                                             model.llm.hidden_size).to(device)
                t0 = time.perf_counter()
                preds = predict(model, ds, args.batch_size, args.max_new_tokens, device,
                                f"L={length} k={needles} {policy}", cuda_graph=False if policy == EAGER else None)
                by_depth: dict[str, list[int]] = defaultdict(list)
                for p in preds:
                    by_depth[depth_bin(records[p["id"]]["depth"])].append(int(exact_match(p["prediction"], p["reference"])))
                row = {"length": length, "needles": needles, "policy": policy,
                       "cache_max_size": None if policy == "full" else budget, **score(preds),
                       "by_depth": {k: sum(v) / len(v) for k, v in sorted(by_depth.items())},
                       "seconds": time.perf_counter() - t0}
                if policy == OWN:  # what the layers after each layer stage saw (the bin's last batch)
                    row["stages"] = [{"name": type(s).__name__, "layer": s.layer, **{k: v if isinstance(v, (int, float)) else float(v)
                                                                       for k, v in s.last_stats.items()}}
                                     for s in own if getattr(s, "last_stats", None) and hasattr(s, "layer")]
                rows.append(row)
                predictions[f"{length}/{needles}/{policy}"] = preds
                print(f"L={length} needles={needles} {policy:>13}: {100 * row['accuracy']['all']:.1f}%", flush=True)
    model.pipeline.llm = own
    summary = summarize(rows, args)
    meta = {**run_metadata(device), "training": training}
    stem = args.name or f"long_context_{'cpu' if device.type == 'cpu' else _tag(meta['device'])}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", {**meta, "model": str(args.model), "args": vars(args), "summary": summary,
                                      "results": rows, "predictions": predictions})
    md = markdown(rows, summary, meta, args)
    (out / f"{stem}.md").write_text(md)
    plot(rows, args, out / f"{stem}.png", meta)
    print(md)
    return rows


def _tag(device: str) -> str:
    return "h200" if "H200" in device else device.split()[-1].lower()


def summarize(rows: list[dict], args) -> dict:
    """Overall accuracy per policy (every bin pooled), shares of full, and the acceptance checks."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        pooled[r["policy"]].append((r["accuracy"]["all"], r["counts"]["all"]))
    overall = {p: sum(a * n for a, n in v) / sum(n for _, n in v) for p, v in pooled.items()}
    out = {"overall": overall}
    if "full" in overall and overall["full"] > 0:
        out["share_of_full"] = {p: a / overall["full"] for p, a in overall.items()}
    checks = {}
    if "tova" in overall and "share_of_full" in out:
        checks[f"tova >= {args.target:g} x full"] = out["share_of_full"]["tova"] >= args.target
    if OWN in overall and "share_of_full" in out:
        checks[f"{OWN} >= {args.target:g} x full"] = out["share_of_full"][OWN] >= args.target
    for other in ("streaming_llm", "h2o"):
        if "tova" in overall and other in overall:
            checks[f"tova > {other}"] = overall["tova"] > overall[other]
    out["checks"] = checks
    return out


def markdown(rows: list[dict], summary: dict, meta: dict, args) -> str:
    policies = [p for p in args.policies]
    lines = [
        "# Long-context retrieval under KV-cache policies (eval/long_context.py)", "",
        f"{meta['date']}, {meta['device']}, commit {meta['commit']}, model `{args.model}`"
        + (f" ({meta['training'].get('command', '')})" if meta.get("training") else ""), "",
        f"{args.n} questions per bin; cache policies keep ceil({args.fraction:g} x L) slots per layer and KV head; "
        "exact-match accuracy (%), in brackets % of the full cache's.", "",
        "| L | needles | budget | " + " | ".join(policies) + " |",
        "|---|---|---|" + "---|" * len(policies),
    ]
    by = {(r["length"], r["needles"], r["policy"]): r for r in rows}
    for needles in args.needles:
        for length in args.lengths:
            full = by.get((length, needles, "full"))
            cells = []
            for p in policies:
                r = by[(length, needles, p)]
                acc = r["accuracy"]["all"]
                rel = f" ({100 * acc / full['accuracy']['all']:.0f})" if full and p != "full" and full["accuracy"]["all"] else ""
                cells.append(f"{100 * acc:.1f}{rel}")
            lines.append(f"| {length} | {needles} | {math.ceil(args.fraction * length)} | " + " | ".join(cells) + " |")
    ov = summary["overall"]
    share = summary.get("share_of_full", {})
    lines += ["", "| overall | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies),
              "| accuracy | " + " | ".join(f"{100 * ov[p]:.1f}" for p in policies) + " |"]
    if share:
        lines.append("| % of full | " + " | ".join(f"{100 * share[p]:.1f}" for p in policies) + " |")
    lines += ["", "## Accuracy by the asked needle's depth (all bins pooled)", "",
              "| policy | " + " | ".join(f"{20 * k}-{20 * (k + 1)}%" for k in range(5)) + " |", "|---|" + "---|" * 5]
    for p in policies:
        acc: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["policy"] == p:
                for k, v in r["by_depth"].items():
                    acc[k].append(v)
        lines.append(f"| {p} | " + " | ".join(
            f"{100 * sum(acc[k]) / len(acc[k]):.1f}" if acc.get(k) else "" for k in (f"{20 * i}-{20 * (i + 1)}%" for i in range(5))) + " |")
    staged = [r for r in rows if r.get("stages")]
    if staged:
        lines += ["", "## Tokens after the model's layer stages (each bin's last batch)", "",
                  "| L | needles | stage | layer | tokens in | tokens out | fewer |", "|---|---|---|---|---|---|---|"]
        for r in staged:
            for s in r["stages"]:
                if "tokens_in" in s and "tokens_out" in s:
                    lines.append(f"| {r['length']} | {r['needles']} | {s['name']} | {s['layer']} | {s['tokens_in']:.0f} | "
                                 f"{s['tokens_out']:.0f} | {100 * (1 - s['tokens_out'] / s['tokens_in']):.1f} % |")
    if summary["checks"]:
        lines += ["", "## Checks", ""] + [f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in summary["checks"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.needles), figsize=(5 * len(args.needles), 4), squeeze=False)
    for ax, needles in zip(axes[0], args.needles):
        for p in args.policies:
            pts = sorted((r["length"], r["accuracy"]["all"]) for r in rows if r["policy"] == p and r["needles"] == needles)
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], "o-", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("passage tokens")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{needles} needle{'s' if needles > 1 else ''}, budget {args.fraction:g} x L")
        ax.legend()
    fig.suptitle(f"{meta['device']}, commit {meta['commit']}")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
