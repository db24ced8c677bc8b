"""FastV inside the LLM: accuracy against the share of media tokens dropped after layer K, per task.

For each ``--layers`` K and ``--drop-ratios`` R the model answers a task's test questions with
``fastv`` (pipeline/stages/fastv.py) in its pipeline's ``llm:`` list: after decoder layer K-1 the media
tokens the last prompt token attends to least are dropped (R of each prompt's media), layers K.. see
the rest. R = 0 is the model without FastV. The model's own pre-LLM stages stay as they are.

    python eval/fastv.py --model runs/easyvqa_demo/final --tasks easyvqa --limit 2000
    python eval/fastv.py --model runs/video_tiny/final --tasks video_shapes --tasks-dir data/tasks

Writes ``<out>/<name>.json`` (metadata, one row per task, K and R), ``<name>.md`` and ``<name>.png``
(accuracy against R, one line per task and K).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import run_metadata, save_figure, write_json  # noqa: E402
from eval.tasks import EVAL_TASKS, load_task, predict, score, task_json  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from llava_deft.provenance import read_training_record  # noqa: E402
from llava_deft.tasks import DEFAULT_TASKS_DIR  # noqa: E402
from pipeline import build_pipeline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", nargs="+", default=["easyvqa"], choices=EVAL_TASKS)
    p.add_argument("--tasks-dir", default=str(DEFAULT_TASKS_DIR))
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--layers", type=int, nargs="+", default=[2], help="FastV's K (the stage runs after layer K-1)")
    p.add_argument("--drop-ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--scoring", nargs="+", default=["attention", "random"], choices=["attention", "random"],
                   help="FastV's attention scores, and the random drop of the same count (the baseline)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (video decoding)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="output stem (default fastv_<tasks>_<device>)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    tasks_dir = Path(args.tasks_dir)
    for task in args.tasks:
        if task != "easyvqa":
            task_json(tasks_dir, task, args.split)
    bad = [r for r in args.drop_ratios if not 0 <= r <= 1]
    if bad:
        raise SystemExit(f"--drop-ratios must be in [0, 1], got {bad}")
    device = torch.device(args.device)
    training = read_training_record(args.model)
    model = LlavaDeftForCausalLM.from_pretrained(args.model).to(device).eval()
    too_deep = [k for k in args.layers if not 1 <= k < model.llm.num_layers]
    if too_deep:
        raise SystemExit(f"--layers {too_deep}: FastV's K must be in 1..{model.llm.num_layers - 1} for this "
                         f"{model.llm.num_layers}-layer LLM")
    own = model.pipeline.llm
    rows = []
    for task in args.tasks:
        ds = load_task(model, task, tasks_dir, args.split, args.limit)
        for k in args.layers:
            for scoring in args.scoring:
                for r in args.drop_ratios:
                    if r == 0 and scoring != args.scoring[0]:
                        continue  # R = 0 drops nothing: one row per K
                    cfg = {"llm": [{"name": "fastv", "layer": k, "drop_ratio": r, "scoring": scoring}]}
                    model.pipeline.llm = build_pipeline(cfg, model.llm.hidden_size).llm.to(device)
                    t0 = time.perf_counter()
                    preds = predict(model, ds, args.batch_size, args.max_new_tokens, device, f"{task} K={k} {scoring} R={r:g}",
                                    args.workers)
                    row = {"task": task, "layer": k, "scoring": scoring, "drop_ratio": r, **score(preds),
                           "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    print(f"{task} K={k} {scoring} R={r:g}: {100 * row['accuracy']['all']:.1f}%", flush=True)
    model.pipeline.llm = own
    for row in rows:  # share of the same task's accuracy without FastV (R = 0 at the same K)
        base = next((b for b in rows if b["task"] == row["task"] and b["layer"] == row["layer"] and b["drop_ratio"] == 0), None)
        acc0 = base["accuracy"]["all"] if base else None
        row["of_no_fastv"] = row["accuracy"]["all"] / acc0 if acc0 else None
    meta = {**run_metadata(device), "training": training}
    stem = args.name or f"fastv_{'_'.join(args.tasks)}_{'cpu' if device.type == 'cpu' else 'gpu'}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", {**meta, "model": str(args.model), "args": vars(args), "results": rows})
    md = markdown(rows, meta, args)
    (out / f"{stem}.md").write_text(md)
    plot(rows, out / f"{stem}.png", meta)
    print(md)
    return rows


def markdown(rows: list[dict], meta: dict, args) -> str:
    lines = [
        "# FastV inside the LLM: accuracy against the media share dropped after layer K (eval/fastv.py)", "",
        f"{meta['date']}, {meta['device']}, commit {meta['commit']}, model `{args.model}`"
        + (f" ({meta['training'].get('command', '')})" if meta.get("training") else ""),
        f"split {args.split}" + (f", first {args.limit} questions" if args.limit else ""), "",
        "| task | K | scoring | drop ratio R | media tokens / sample (input) | accuracy (%) | % of R=0 | questions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "" if r["of_no_fastv"] is None else f"{100 * r['of_no_fastv']:.1f}"
        scoring = "(none)" if r["drop_ratio"] == 0 else r["scoring"]
        lines.append(f"| {r['task']} | {r['layer']} | {scoring} | {r['drop_ratio']:g} | {r['media_tokens_per_sample']:.1f} | "
                     f"{100 * r['accuracy']['all']:.1f} | {rel} | {r['counts']['all']} |")
    lines += ["", "Media tokens per sample are what the prompt gives the LLM's first layers; FastV keeps "
              "ceil((1 - R) x) of them from layer K on, chosen by the attention the last prompt token pays them "
              "(attention) or uniformly at random (random, the baseline).", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(r["task"] for r in rows):
        for k in dict.fromkeys(r["layer"] for r in rows if r["task"] == task):
            for scoring in dict.fromkeys(r["scoring"] for r in rows):
                pts = sorted((r["drop_ratio"], r["accuracy"]["all"]) for r in rows if r["task"] == task and r["layer"] == k
                             and (r["scoring"] == scoring or r["drop_ratio"] == 0))
                ax.plot([x for x, _ in pts], [100 * y for _, y in pts], "o-" if scoring == "attention" else "x--",
                        label=f"{task}, K={k}, {scoring}")
    ax.set_xlabel("share of media tokens dropped after layer K")
    ax.set_ylabel("exact match (%)")
    ax.legend()
    ax.set_title(f"FastV, {meta['device']}, {meta['commit']}")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
