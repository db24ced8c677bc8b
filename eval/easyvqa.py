"""Exact-match accuracy on easy-VQA (or any LLaVA-format JSON), with a retention sweep.

    python eval/easyvqa.py --model runs/easyvqa_tiny/final                       # full test split
    python eval/easyvqa.py --model M --pipeline configs/pipeline/fgcs.yaml --retention 1 0.482 0.25 0.11
    python eval/easyvqa.py --model M --data-path test.json --image-folder imgs/  # LLaVA JSON

Answers are generated greedily and compared after ``strip().lower()``.  Writes
``<out>/<name>.json`` and ``<name>.md`` (and ``<name>.png`` for a sweep of more than one ratio).
The last line printed is ``easy-VQA <split> accuracy: NN.N%`` for the first ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.provenance import describe_training, read_training_record  # noqa: E402
from llava_deft.data import EasyVQADataset, LlavaJsonDataset  # noqa: E402
from llava_deft.evaluation.loop import predict, score  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (save_pretrained / training export)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data-path", help="LLaVA-format JSON instead of the bundled easy-VQA")
    p.add_argument("--image-folder", help="folder the JSON's image paths are relative to")
    p.add_argument("--pipeline", help="replace the model's reduction pipeline (YAML); trained stage weights are kept")
    p.add_argument("--retention", type=float, nargs="+", default=None, help="retention ratios to sweep")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="eval/results", help="output folder")
    p.add_argument("--name", default=None, help="output file stem (default easyvqa_<split>)")
    return p.parse_args(argv)


def evaluate(model: LlavaDeftForCausalLM, dataset, batch_size: int, max_new_tokens: int, device, desc: str) -> dict:
    """Greedy answers for every item (the library's loop): exact match overall and per question type,
    visual tokens per image, the per-question record and the wall time."""
    t0 = time.perf_counter()
    res = score(predict(model, dataset, batch_size, max_new_tokens, device, desc=desc))
    return {"accuracy": res["accuracy"], "counts": res["counts"], "tokens_per_image": res["tokens_per_item"],
            "correct": res["correct"], "seconds": time.perf_counter() - t0}


def markdown_table(rows: list[dict], types: list[str]) -> str:
    head = "| retention | tokens / image | " + " | ".join(["all", *types]) + " |"
    sep = "|" + "---|" * (3 + len(types))
    lines = [head, sep]
    for r in rows:
        accs = " | ".join(f"{100 * r['accuracy'].get(t, float('nan')):.1f}" for t in ["all", *types])
        lines.append(f"| {r['retention']:.3g} | {r['tokens_per_image']:.1f} | {accs} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["tokens_per_image"] for r in rows]
    ys = [100 * r["accuracy"]["all"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['retention']:.3g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    training = read_training_record(args.model)  # a corrupt record fails before the model loads
    model = LlavaDeftForCausalLM.from_pretrained(args.model, pipeline=args.pipeline).to(device).eval()
    if args.data_path:
        if not args.image_folder:
            raise SystemExit("--data-path needs --image-folder")
        dataset = LlavaJsonDataset(args.data_path, args.image_folder, options=model.processors.media)
        label = Path(args.data_path).stem
    else:
        dataset = EasyVQADataset(args.split)
        label = f"easy-VQA {args.split}"
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    ratios = args.retention or [None]
    if any(r is not None for r in ratios) and not model.pipeline.stages:
        raise SystemExit(
            f"--retention needs a reduction pipeline but model '{args.model}' has none; "
            f"add --pipeline configs/pipeline/fgcs.yaml (or random.yaml, pool.yaml)"
        )
    rows = []
    for r in ratios:
        if r is not None:
            model.pipeline.set_retention(r)
        res = evaluate(model, dataset, args.batch_size, args.max_new_tokens, device, desc=f"{label} r={r or 1}")
        rows.append({"retention": 1.0 if r is None else r, **res})
    types = sorted(k for k in rows[0]["accuracy"] if k != "all")
    table = markdown_table(rows, types)
    meta = {**run_metadata(device), "training": training}
    stem = args.name or ("easyvqa_" + args.split if not args.data_path else Path(args.data_path).stem)
    out = Path(args.out)
    write_json(out / f"{stem}.json", {**meta, "model": str(args.model), "pipeline": model.pipeline.names, "dataset": label, "results": rows})
    trained = describe_training(meta["training"])
    md = (f"# {label}: exact-match accuracy (%)\n\n{meta['date']}, {meta['device']}, commit {meta['commit']}, model `{args.model}`, "
          f"pipeline {model.pipeline.names or 'none'}\n\n" + (f"{trained}\n\n" if trained else "") + f"{table}\n")
    (out / f"{stem}.md").write_text(md)
    if len(rows) > 1:
        plot(rows, out / f"{stem}.png", f"{label}: accuracy vs kept tokens")
    print(table)
    print(f"{label} accuracy: {100 * rows[0]['accuracy']['all']:.1f}%")
    return rows


if __name__ == "__main__":
    main()
