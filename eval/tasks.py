"""Exact-match accuracy on the generated tasks' test splits (and easy-VQA), with a retention sweep.

    python eval/tasks.py --model runs/mix_tiny/final                          # every task, no reduction
    python eval/tasks.py --model M --ratios 1 0.25 0.11                       # training-free sweep
    python eval/tasks.py --model M --pipeline configs/pipeline/deft.yaml --ratios 1 0.25
    python eval/tasks.py --model M --tasks video_shapes audio_words --tasks-dir data/tasks --limit 200
    python eval/tasks.py --model runs/mix_tiny_deft25/final --ratios 0.25 \
        --reference eval/results/mix_tiny_h100.json                           # vs the no-reduction model

Tasks: ``video_shapes``, ``audio_words``, ``passkey`` (the default set, with ``easyvqa``), ``scenes`` and
``video_small`` read ``<tasks-dir>/<task>/<split>.json`` (written by ``python -m llava_deft.tasks --out
<tasks-dir>``, the last two with ``--only scenes video_small``); ``easyvqa`` is the bundled dataset.
Answers are generated greedily and compared after ``strip().lower()`` (``eval.common.exact_match``),
overall and per question type (a record's ``question_type``; the audio task's is the last part of its
id). ``--ratios`` sets the retention ratio of every reducer of the pipeline (``--pipeline`` replaces
the model's; learned stages keep their trained weights) for every modality at once, so one sweep
measures the same reducer on images, video frames, audio and passages; each row also gives its
accuracy as a share of the same task's accuracy at ratio 1 (no reduction).

``--reference`` compares with another model instead: a JSON this script wrote earlier (typically the
no-reduction model's run, on the same split). Each row then also gives ``of_reference``, its accuracy
as a share of the reference's ratio-1 accuracy on the same task (None where the reference has no
ratio-1 row for the task or scored 0 there), e.g. a model trained with DeFT at retention 0.25 against
the model trained without reduction.

Writes ``<out>/<name>.json`` (run metadata, one row per task and ratio; per-sample predictions with
``--save-predictions``), ``<name>.md`` (a summary and one table per task) and ``<name>.png`` (accuracy
against retention, one line per task). The last line printed is ``tasks <split>: <task> NN.N%, ...``
for the first ratio; with ``--reference`` the line before it gives each task's % of reference at
each ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.errors import ReferenceResultError  # noqa: E402
from llava_deft.evaluation.data import BUILTIN_TASKS as EVAL_TASKS  # noqa: E402
from llava_deft.evaluation.data import TaskSplit, load_task, question_type, task_json  # noqa: E402,F401  (used by eval/*.py)
from llava_deft.evaluation.loop import predict, score  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from llava_deft.provenance import describe_training, read_training_record  # noqa: E402
from llava_deft.tasks import DEFAULT_TASKS, DEFAULT_TASKS_DIR  # noqa: E402

DEFAULT_EVAL_TASKS = (*DEFAULT_TASKS, "easyvqa")
"""Tasks scored without ``--tasks``: the mixed recipe's (configs/train/mix_tiny.yaml)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (save_pretrained / training export)")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of `python -m llava_deft.tasks --out`")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_EVAL_TASKS), choices=EVAL_TASKS,
                   help=f"tasks to score (default: {' '.join(DEFAULT_EVAL_TASKS)})")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--pipeline", help="replace the model's reduction pipeline (YAML); trained stage weights are kept")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="retention ratios to sweep (1 = no reduction)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (video decoding)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="eval/results", help="output folder")
    p.add_argument("--name", default=None, help="output file stem (default tasks_<split>)")
    p.add_argument("--save-predictions", action="store_true", help="keep every sample's prediction in the JSON")
    p.add_argument("--reference", default=None,
                   help="a JSON this script wrote earlier (e.g. the no-reduction model's run): each row also "
                        "gives its accuracy as a share of that run's ratio-1 accuracy on the task")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data and scoring
# The loop, the datasets and the scorer are the library's (llava_deft.evaluation), shared by every eval script.


def add_relative(rows: list[dict]) -> None:
    """Each row's ``relative``: its accuracy over the same task's accuracy at ratio 1 (None without one)."""
    base = {r["task"]: r["accuracy"]["all"] for r in rows if r["retention"] == 1.0}
    for r in rows:
        b = base.get(r["task"])
        r["relative"] = None if not b else r["accuracy"]["all"] / b  # undefined when r=1 is missing or scored 0


def _is_result_row(row: Any) -> bool:
    """A row as :func:`main` writes it, as far as the comparison reads it."""
    if not isinstance(row, dict) or not isinstance(row.get("accuracy"), dict):
        return False
    return (isinstance(row.get("task"), str) and isinstance(row.get("retention"), (int, float))
            and isinstance(row["accuracy"].get("all"), (int, float)))


def load_reference(path: str | Path, split: str, limit: int | None) -> dict:
    """The ``--reference`` run: a JSON written earlier by this script, with its ``results`` rows.

    :class:`ReferenceResultError` naming the file when it is missing, not JSON, not a result of this
    script, or was evaluated on another split; a printed warning (the comparison still runs) when its
    ``--limit`` differs from this run's.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ReferenceResultError(f"--reference '{path}' {what}; give the <out>/<name>.json that eval/tasks.py "
                                   f"wrote for the reference (e.g. no-reduction) model")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferenceResultError(f"--reference '{path}' is not a readable JSON file ({e})") from e
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(_is_result_row(r) for r in rows) or "split" not in data:
        raise ReferenceResultError(
            f"--reference '{path}' is not an eval/tasks.py result: it needs a 'split' and a non-empty 'results' "
            f"list of rows with 'task', 'retention' and 'accuracy' {{'all': ...}}"
        )
    if data["split"] != split:
        raise ReferenceResultError(
            f"--reference '{path}' was evaluated on the {data['split']!r} split and this run on {split!r}; "
            f"accuracies on different questions are not comparable (use --split {data['split']} or another reference)"
        )
    if data.get("limit") != limit:
        print(f"[tasks] warning: --reference '{path}' was evaluated with --limit {data.get('limit')} and this run "
              f"with --limit {limit}: the two accuracies come from different numbers of questions", file=sys.stderr)
    return data


def reference_summary(path: str | Path, reference: dict) -> dict:
    """What this run keeps of a reference run (its JSON metadata's ``reference``): where it came from, and
    each task's overall accuracy and question count at ratio 1 (tasks without a ratio-1 row are absent)."""
    base: dict[str, dict] = {}
    for r in reference["results"]:
        if r["retention"] == 1.0:
            base.setdefault(r["task"], r)
    return {
        "path": str(path), **{k: reference.get(k) for k in ("model", "commit", "date", "limit")},
        "accuracy": {t: r["accuracy"]["all"] for t, r in base.items()},
        "questions": {t: r.get("counts", {}).get("all") for t, r in base.items()},
    }


def add_of_reference(rows: list[dict], ref_acc: dict[str, float]) -> None:
    """Each row's ``of_reference``: its accuracy over the reference's ratio-1 accuracy on the same task
    (None without one, or when the reference scored 0)."""
    for r in rows:
        b = ref_acc.get(r["task"])
        r["of_reference"] = None if not b else r["accuracy"]["all"] / b


# ------------------------------------------------------------------------------------------ report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(rows: list[dict], meta: dict, model: str, pipeline: list[str], split: str,
             reference: dict | None = None) -> str:
    """The report; ``reference`` (the JSON metadata's ``reference`` entry) adds the reference's ratio-1
    accuracy and "% of reference" columns."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ratios = list(dict.fromkeys(r["retention"] for r in rows))
    by = {(r["task"], r["retention"]): r for r in rows}
    ref_head = ref_rule = ""
    header = [f"{meta['date']}, {meta['device']}, commit {meta['commit']}, model `{model}`, pipeline {pipeline or 'none'}"]
    if trained := describe_training(meta.get("training")):
        header.append(trained)
    if reference is not None:
        header.append(f"% of reference: accuracy over the ratio-1 accuracy of model `{reference['model']}` "
                      f"(commit {reference['commit']}, {reference['date']}; `{reference['path']}`)")
        ref_head = " reference r=1 | " + " | ".join(f"r={x:g} % of reference" for x in ratios) + " |"
        ref_rule = "---|" * (1 + len(ratios))
    lines = [
        f"# Generated tasks ({split} split): exact-match accuracy (%)", "",
        *(x for h in header for x in (h, "")),
        "| task | " + " | ".join(f"r={x:g}" for x in ratios) + " |" + ref_head,
        "|---|" + "---|" * len(ratios) + ref_rule,
    ]
    for t in tasks:
        cells = []
        for x in ratios:
            r = by.get((t, x))
            rel = "" if r is None or r["relative"] is None or x == 1.0 else f" ({_pct(r['relative'])} % of r=1)"
            cells.append("–" if r is None else f"{_pct(r['accuracy']['all'])}{rel}")
        if reference is not None:
            cells.append(_pct(reference["accuracy"].get(t)))
            cells += ["–" if by.get((t, x)) is None else _pct(by[t, x]["of_reference"]) for x in ratios]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    for t in tasks:
        trows = [r for r in rows if r["task"] == t]
        types = sorted({k for r in trows for k in r["accuracy"]} - {"all"})
        ref_col = " % of reference |" if reference is not None else ""
        lines += ["", f"## {t} ({trows[0]['counts']['all']} questions)", "",
                  f"| retention | media tokens / sample | all | % of r=1 |{ref_col} " + " | ".join(types) + " |",
                  "|" + "---|" * (4 + (reference is not None) + len(types))]
        for r in trows:
            accs = " | ".join(_pct(r["accuracy"].get(k)) for k in types)
            of_ref = f" {_pct(r['of_reference'])} |" if reference is not None else ""
            lines.append(f"| {r['retention']:g} | {r['media_tokens_per_sample']:.1f} | {_pct(r['accuracy']['all'])} | "
                         f"{_pct(r['relative'])} |{of_ref} {accs} |")
    return "\n".join(lines) + "\n"


def reference_line(rows: list[dict], reference: dict) -> str:
    """``% of reference (<model>): <task> r=<ratio> NN.N% ..., ...``: each task's % of reference at each ratio."""
    def cell(r: dict) -> str:
        return f"r={r['retention']:g} " + ("–" if r["of_reference"] is None else f"{_pct(r['of_reference'])}%")

    tasks = dict.fromkeys(r["task"] for r in rows)
    return f"% of reference ({reference['model']}): " + ", ".join(
        f"{t} " + " ".join(cell(r) for r in rows if r["task"] == t) for t in tasks)


def plot(rows: list[dict], path: Path, title: str, reference: dict[str, float] | None = None) -> None:
    """Accuracy against retention, one line per task; ``reference`` (task -> ratio-1 accuracy of the
    reference run) adds a dashed level in the task's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task in dict.fromkeys(r["task"] for r in rows):
        pts = sorted((r["retention"], 100 * r["accuracy"]["all"]) for r in rows if r["task"] == task)
        (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=task)
        if reference and task in reference:
            ax.axhline(100 * reference[task], ls="--", lw=1, color=line.get_color())
    ax.set_xlabel("retention ratio (share of media tokens kept)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    tasks_dir = Path(args.tasks_dir)
    for task in args.tasks:  # every missing folder is reported before the model is loaded
        if task != "easyvqa":
            task_json(tasks_dir, task, args.split)
    ref_meta = None
    if args.reference:  # a bad reference fails before the model is loaded, too
        ref_meta = reference_summary(args.reference, load_reference(args.reference, args.split, args.limit))
        if missing := [t for t in args.tasks if t not in ref_meta["accuracy"]]:
            print(f"[tasks] warning: --reference '{args.reference}' has no ratio-1 row for {', '.join(missing)}: "
                  f"no % of reference there", file=sys.stderr)
    training = read_training_record(args.model)  # a corrupt record fails before the model loads, too
    device = torch.device(args.device)
    model = LlavaDeftForCausalLM.from_pretrained(args.model, pipeline=args.pipeline).to(device).eval()
    if "audio_words" in args.tasks and model.audio is None:
        raise SystemExit(
            f"model '{args.model}' has no audio encoder (audio.enabled: false) and cannot answer audio_words; "
            f"leave it out with --tasks {' '.join(t for t in args.tasks if t != 'audio_words')}"
        )
    ratios = args.ratios or [1.0]
    if any(r != 1.0 for r in ratios) and not any(hasattr(s, "retention_ratio") for s in model.pipeline.stages):
        raise SystemExit(
            f"--ratios needs a reducer but the pipeline of '{args.model}' ({model.pipeline.names or 'none'}) has "
            f"none; add --pipeline configs/pipeline/deft.yaml (or fgcs.yaml, random.yaml, pool.yaml)"
        )
    datasets = {t: load_task(model, t, tasks_dir, args.split, args.limit) for t in args.tasks}
    rows = []
    for r in ratios:
        if any(hasattr(s, "retention_ratio") for s in model.pipeline.stages):
            model.pipeline.set_retention(r)
        for task, ds in datasets.items():
            t0 = time.perf_counter()
            preds = predict(model, ds, args.batch_size, args.max_new_tokens, device, f"{task} r={r:g}", args.workers)
            row = {"task": task, "retention": r, **score(preds), "seconds": time.perf_counter() - t0}
            if args.save_predictions:
                row["predictions"] = preds
            rows.append(row)
    add_relative(rows)
    if ref_meta is not None:
        add_of_reference(rows, ref_meta["accuracy"])
        if ref_meta["limit"] == args.limit:  # else load_reference warned already
            for r in rows:  # same split and limit but other questions, e.g. another --tasks-dir
                n_ref = ref_meta["questions"].get(r["task"])
                if r["retention"] == ratios[0] and n_ref is not None and n_ref != r["counts"]["all"]:
                    print(f"[tasks] warning: {r['task']}: --reference '{args.reference}' scored {n_ref} questions "
                          f"and this run {r['counts']['all']}", file=sys.stderr)

    meta = {**run_metadata(device), "training": training}
    stem = args.name or f"tasks_{args.split}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", {
        **meta, "model": str(args.model), "pipeline": model.pipeline.names, "pipeline_config": args.pipeline,
        "tasks_dir": str(tasks_dir), "split": args.split, "limit": args.limit, "ratios": ratios,
        "reference": ref_meta, "results": rows,
    })
    md = markdown(rows, meta, str(args.model), model.pipeline.names, args.split, ref_meta)
    (out / f"{stem}.md").write_text(md)
    plot(rows, out / f"{stem}.png", f"{args.split} split: accuracy vs retention" + (" (dashed: reference)" if ref_meta else ""),
         ref_meta and ref_meta["accuracy"])
    print(md)
    if ref_meta is not None:
        print(reference_line(rows, ref_meta))
    first = [r for r in rows if r["retention"] == ratios[0]]
    print(f"tasks {args.split}: " + ", ".join(f"{r['task']} {100 * r['accuracy']['all']:.1f}%" for r in first))
    return rows


if __name__ == "__main__":
    main()
