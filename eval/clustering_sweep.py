"""Clustering (``recursive_compression``) at the token ratios it achieves, beside ratio-driven reducers at the
same ratios (issue 18): training-free, on a model trained without reduction.

``recursive_compression`` has no retention ratio: how many tokens it keeps follows from its similarity
threshold and the data. For every ``--thresholds`` value (fixed floor, ``adaptive_threshold: false``: an
untrained modulator would move it at random; no residual gate), the model answers the test questions
with the stage before the LLM, and the row reports its accuracy, % of the no-reduction accuracy and the
media tokens it kept per item (its achieved ratio = that / the model's tokens per item). Each
``--reducers`` pipeline (registered names with a ``retention_ratio``: random, pool, tome, ...) is then
evaluated at each achieved ratio, so clustering is compared at equal token counts. The check of issue 18:
some threshold keeps >= ``--target`` % of the base at <= ``--max-share`` of the tokens.

    python eval/clustering_sweep.py --model runs/easyvqa_tiny/final --task easyvqa --limit 2000
    python eval/clustering_sweep.py --model M --task video_shapes --thresholds 0.9 0.8
    python eval/clustering_sweep.py --model M --test passkey/test.json --layer 2    # inside the LLM

``--layer N`` runs ``recursive_compression_llm`` after decoder layer ``N - 1`` instead (on the hidden states
of the media tokens, similarity mixed with their attention profiles by ``--attention-weight``); its share
of tokens is what the layers from ``N`` on see (the stage's own ``tokens_out / tokens_in`` over the test
set), and the baseline at each achieved share is FastV at the same layer dropping the rest (``--reducers``
default ``fastv`` there).

Writes ``<out>/<name>.{json,md,png}`` (accuracy against tokens kept, one line per method) with device,
date and commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.common import run_metadata, save_figure, write_json  # noqa: E402
from llava_deft.evaluation.data import EvalData  # noqa: E402
from llava_deft.evaluation.single import evaluate_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model trained without reduction (e.g. the demo's runs/easyvqa_tiny/final)")
    p.add_argument("--task", default="easyvqa", help="a built-in task (easyvqa or a generated one)")
    p.add_argument("--test", default=None, help="or a LLaVA-JSON test file")
    p.add_argument("--limit", type=int, default=None, help="first N test questions (after --skip)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N test questions (report on a part not used to choose settings)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    p.add_argument("--reducers", nargs="*", default=None,
                   help="baselines at the achieved shares (default random pool tome; with --layer: fastv)")
    p.add_argument("--layer", type=int, default=None,
                   help="cluster inside the LLM, after decoder layer LAYER-1 (recursive_compression_llm), not before it")
    p.add_argument("--stage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another option of the clustering stage (YAML value), e.g. within_frames=true; repeatable")
    p.add_argument("--attention-weight", type=float, default=0.3,
                   help="with --layer: share of the attention-profile similarity (0: hidden states alone)")
    p.add_argument("--target", type=float, default=99.0, help="%% of the base accuracy clustering must keep")
    p.add_argument("--max-share", type=float, default=0.5, help="... with at most this share of the tokens")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="output stem (default clustering_<task>_<device>)")
    args = p.parse_args(argv)
    if args.reducers is None:
        args.reducers = ["fastv"] if args.layer is not None else ["random", "pool", "tome"]
    if args.layer is not None and args.layer < 1:
        p.error(f"--layer must be >= 1 (the stage runs after decoder layer LAYER-1), got {args.layer}")
    return args


def _pipeline_file(folder: Path, name: str, stages: list[dict], llm: list[dict] | None = None) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, **({"llm": llm} if llm else {})}))
    return str(path)


def _clustering(args, folder: Path, t: float) -> str:
    options = {"similarity_threshold": t, "adaptive_threshold": False, "use_residuals": False}
    for item in args.stage_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--stage-option {item!r}: write KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if args.layer is None:
        return _pipeline_file(folder, f"rc_{t:g}", [{"name": "recursive_compression", **options}])
    stage = {"name": "recursive_compression_llm", "layer": args.layer, "attention_weight": args.attention_weight, **options}
    return _pipeline_file(folder, f"rc_{t:g}", [], [stage])


def _share(args, result: dict, full_tokens: float) -> float:
    """The share of media tokens the clustering row let through (before the LLM, or past its layer)."""
    if args.layer is None:
        return result["tokens_per_item"] / full_tokens
    share = result.get("llm_token_share", {}).get(f"recursive_compression_llm@{args.layer}")
    if share is None:
        raise RuntimeError("recursive_compression_llm recorded no token counts; is the model's LLM deep enough "
                           f"for --layer {args.layer}?")
    return share


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = EvalData(task=None if args.test else args.task, test=args.test, limit=args.limit, skip=args.skip)
    common = dict(batch_size=args.batch_size, device=args.device, ttft_batch=0)
    tmp = Path(tempfile.mkdtemp(prefix="clustering_sweep_"))
    base = evaluate_model(args.model, data, pipeline=_pipeline_file(tmp, "none", []), **common)[0]
    full_tokens = base["tokens_per_item"]
    rows = [{"method": "none", "setting": None, "accuracy": base["accuracy"]["all"], "tokens_per_item": full_tokens}]
    print(f"none: {100 * rows[0]['accuracy']:.2f} % at {full_tokens:.1f} tokens/item", flush=True)
    method = "recursive_compression" if args.layer is None else f"recursive_compression_llm@{args.layer}"
    for t in args.thresholds:
        r = evaluate_model(args.model, data, pipeline=_clustering(args, tmp, t), **common)[0]
        share = _share(args, r, full_tokens)
        rows.append({"method": method, "setting": t, "accuracy": r["accuracy"]["all"],
                     "tokens_per_item": share * full_tokens})
        print(f"{method} @ {t:g}: {100 * r['accuracy']['all']:.2f} % at {share * full_tokens:.1f} tokens/item", flush=True)
    achieved = sorted({round(row["tokens_per_item"] / full_tokens, 4) for row in rows if row["method"] != "none"})
    for name in args.reducers:
        for share in achieved:
            if not 0 < share < 1:
                continue
            if args.layer is None:
                r = evaluate_model(args.model, data, pipeline=_pipeline_file(tmp, name, [{"name": name}]), ratios=[share],
                                   **common)[0]
                tokens = r["tokens_per_item"]
            else:  # an LLM stage dropping the rest at the same layer (fastv's drop_ratio); its share is nominal
                stage = {"name": name, "layer": args.layer, "drop_ratio": round(1 - share, 4)}
                r = evaluate_model(args.model, data, pipeline=_pipeline_file(tmp, name, [], [stage]), **common)[0]
                tokens = share * full_tokens
            rows.append({"method": name, "setting": share, "accuracy": r["accuracy"]["all"], "tokens_per_item": tokens})
            print(f"{name} @ {share:g}: {100 * r['accuracy']['all']:.2f} % at {tokens:.1f} tokens/item", flush=True)
    for row in rows:
        row["share_of_tokens"] = row["tokens_per_item"] / full_tokens
        row["percent_of_base"] = 100 * row["accuracy"] / rows[0]["accuracy"] if rows[0]["accuracy"] else None
    passing = [r for r in rows if r["method"] == method and r["share_of_tokens"] <= args.max_share
               and r["percent_of_base"] is not None and r["percent_of_base"] >= args.target]
    check = {"target_percent": args.target, "max_share": args.max_share, "passed": bool(passing),
             "best": max((r for r in rows if r["method"] == method and r["share_of_tokens"] <= args.max_share),
                         key=lambda r: r["accuracy"], default=None)}
    meta = run_metadata(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    result = {**meta, "script": "eval/clustering_sweep.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "model": args.model, "data": data.label, "rows": rows, "check": check}
    tag = "cpu" if "CPU" in meta["device"] else ("h200" if "H200" in meta["device"] else "gpu")
    name = args.name or f"clustering_{data.label}_{tag}"
    out = Path(args.out)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result, args))
    plot(result, out / f"{name}.png")
    print(markdown(result, args))
    return result


def markdown(r: dict, args) -> str:
    lines = [f"# Clustering at its achieved token ratios, training-free ({r['data']}; eval/clustering_sweep.py)", "",
             f"{r['date']}, {r['device']}, commit {r['commit']}, model `{r['model']}`; command "
             f"`python eval/clustering_sweep.py {' '.join(r['argv'])}`", "",
             ("recursive_compression before the LLM" if args.layer is None else
              f"recursive_compression_llm after decoder layer {args.layer - 1} (attention_weight {args.attention_weight:g}; "
              f"tokens per item: media tokens the layers from {args.layer} on see)")
             + ": fixed floor (adaptive_threshold false), no residual gate; the other reducers at "
             "the token shares clustering reached.", "",
             "| method | threshold / retention | tokens per item | share of tokens | accuracy (%) | % of none |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        setting = "" if row["setting"] is None else f"{row['setting']:g}"
        pct = "" if row["percent_of_base"] is None else f"{row['percent_of_base']:.1f}"
        lines.append(f"| {row['method']} | {setting} | {row['tokens_per_item']:.2f} | {row['share_of_tokens']:.3f} | "
                     f"{100 * row['accuracy']:.2f} | {pct} |")
    c = r["check"]
    best = c["best"]
    lines += ["", f"Check: clustering keeps >= {c['target_percent']:g} % of the no-reduction accuracy with <= "
              f"{c['max_share']:g} of the tokens: **{'PASS' if c['passed'] else 'FAIL'}**"
              + (f" (best at <= {c['max_share']:g}: threshold {best['setting']:g}, {best['share_of_tokens']:.3f} of the "
                 f"tokens, {_pct(best['percent_of_base'])} of none)" if best else " (no threshold reached that share)"), ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a (the base scored 0)" if value is None else f"{value:.1f} %"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row["method"] for row in r["rows"] if row["method"] != "none"):
        pts = sorted((row["share_of_tokens"], 100 * row["accuracy"]) for row in r["rows"] if row["method"] == method)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=method)
    ax.axhline(100 * r["rows"][0]["accuracy"], color="k", ls="--", lw=1, label="none")
    ax.set_xlabel("share of media tokens kept")
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"{r['data']}: clustering at its achieved ratios")
    ax.legend()
    fig.suptitle(f"{r['device']}, commit {r['commit']}", fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
