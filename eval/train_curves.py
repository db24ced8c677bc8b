"""Training-loss curves of several runs side by side: does a recipe or model variant learn, and how fast?

Each run is ``NAME=PATH``, PATH a run folder (its ``train_log.jsonl``) or the JSONL file itself, as the
training entry writes it (one ``{"stage", "step", "loss", "lr", "samples_per_s"}`` object per logged step).

    python eval/train_curves.py --name scenes_base_variants_h200 \
        --runs recipe=runs/explore/a_recipe llm4x256=runs/explore/b_llm4x256 \
        --steps 200 400 800 1200 1600 --measured-on "NVIDIA H200" --commit c0b793b \
        --command "bash .carry/gpu/explore.sh"

Writes ``<out>/<name>.json`` (metadata + every curve), ``<name>.md`` (loss at ``--steps``, the last
logged step, throughput) and ``<name>.png`` (loss against step, with a moving mean over ``--smooth``
logged points). ``--measured-on`` / ``--commit`` name where the logs were made when that is not this
machine (logs copied back from a GPU); by default they are this machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import run_metadata, save_figure, write_json  # noqa: E402


class TrainLogError(ValueError):
    """A ``--runs`` entry that is malformed, missing or holds no logged loss."""


def parse_run(item: str) -> tuple[str, Path]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise TrainLogError(f"--runs entry {item!r} must be NAME=PATH (a run folder or its train_log.jsonl)")
    p = Path(path)
    if p.is_dir():
        p = p / "train_log.jsonl"
    if not p.is_file():
        raise TrainLogError(f"--runs {name}: no training log at {p}; give the run folder the training entry wrote")
    return name, p


LOG_KEYS = ("stage", "step", "loss", "lr", "samples_per_s")


def read_log(path: Path, keys: tuple[str, ...] | None = LOG_KEYS) -> list[dict]:
    """The logged points of ``path`` (by stage, then step), each with ``keys`` (None: every key); a line that
    is not a JSON object with 'step' and 'loss' is an error."""
    points = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainLogError(f"{path}:{n}: not JSON ({e.msg}); is this a train_log.jsonl?") from None
        if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
            raise TrainLogError(f"{path}:{n}: a log line needs 'step' and 'loss'; got {line[:80]!r}")
        points.append(rec if keys is None else {k: rec[k] for k in keys if k in rec})
    if not points:
        raise TrainLogError(f"{path} holds no logged step")
    return sorted(points, key=lambda r: (r.get("stage", 0), r["step"]))


def global_steps(points: list[dict]) -> list[int]:
    """Steps counted across stages (a stage's steps follow the previous stage's last one)."""
    out, offset, stage, last = [], 0, None, 0
    for p in points:
        s = p.get("stage", 0)
        if stage is not None and s != stage:
            offset += last
        stage, last = s, p["step"]
        out.append(offset + p["step"])
    return out


def loss_at(steps: list[int], losses: list[float], step: int) -> float | None:
    """The loss logged at ``step`` or, failing that, at the last logged step before it (None: before the first)."""
    best = None
    for s, v in zip(steps, losses):
        if s > step:
            break
        best = v
    return best


def moving_mean(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def summarise(runs: dict[str, list[dict]], at: list[int]) -> list[dict]:
    rows = []
    for name, points in runs.items():
        steps = global_steps(points)
        losses = [float(p["loss"]) for p in points]
        tput = [p["samples_per_s"] for p in points if "samples_per_s" in p]
        rows.append({
            "run": name, "last_step": steps[-1], "last_loss": losses[-1], "min_loss": min(losses),
            "loss_at": {str(s): loss_at(steps, losses, s) for s in at},
            "samples_per_s": tput[-1] if tput else None,
        })
    return rows


def markdown(meta: dict, rows: list[dict], at: list[int], command: str | None) -> str:
    lines = [f"# Training loss by step: {meta['name']}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [f"Logs made {meta['date']} on {meta['device']}, commit {meta['commit']}. "
              "Each cell: the training loss logged at that step (or the last logged one before it; "
              "'—' where the run had not reached it).", ""]
    head = ["run", *[f"step {s}" for s in at], "last step", "loss there", "min loss", "samples/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], *[("—" if (v := r["loss_at"][str(s)]) is None or s > r["last_step"] else f"{v:.3f}")
                             for s in at],
                 str(r["last_step"]), f"{r['last_loss']:.3f}", f"{r['min_loss']:.3f}",
                 "—" if r["samples_per_s"] is None else f"{r['samples_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path, title: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in runs.items():
        ax.plot(global_steps(points), moving_mean([float(p["loss"]) for p in points], smooth), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss (moving mean of {smooth} logged points)" if smooth > 1 else "training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=PATH (run folder or train_log.jsonl)")
    ap.add_argument("--name", required=True, help="output file stem")
    ap.add_argument("--out", default="eval/results")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800, 1600, 3200],
                    help="steps at which the table gives the loss")
    ap.add_argument("--smooth", type=int, default=1, help="moving-mean window of the plot, in logged points")
    ap.add_argument("--title", default=None)
    ap.add_argument("--measured-on", default=None, help="device the logs came from (default: this machine's)")
    ap.add_argument("--commit", default=None, help="commit the runs were trained at (default: this checkout's)")
    ap.add_argument("--date", default=None, help="when the runs were trained (default: now)")
    ap.add_argument("--command", default=None, help="the command that made the logs, for the record")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error(f"--smooth must be >= 1; got {args.smooth}")
    if any(s <= 0 for s in args.steps):
        ap.error(f"--steps must be positive; got {args.steps}")
    try:
        pairs = [parse_run(r) for r in args.runs]
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise TrainLogError(f"--runs names must be distinct; got {names}")
        runs = {n: read_log(p) for n, p in pairs}
    except TrainLogError as e:
        ap.error(str(e))
    meta = run_metadata("cpu")
    if args.measured_on:  # the logs came from elsewhere: this machine's library versions say nothing of them
        meta.pop("torch", None), meta.pop("transformers", None)
    meta.update({k: v for k, v in (("device", args.measured_on), ("commit", args.commit), ("date", args.date)) if v})
    meta["name"] = args.name
    at = sorted(set(args.steps))
    rows = summarise(runs, at)
    out = Path(args.out)
    doc = {"meta": meta, "command": args.command, "runs": {n: {"log": str(p)} for n, p in pairs},
           "summary": rows, "curves": runs}
    write_json(out / f"{args.name}.json", doc)
    (out / f"{args.name}.md").write_text(markdown(meta, rows, at, args.command))
    plot(runs, out / f"{args.name}.png", args.title or args.name, args.smooth)
    print(markdown(meta, rows, at, args.command))
    return doc


if __name__ == "__main__":
    main()
