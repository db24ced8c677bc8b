"""Recursive compression over training: thresholds, per-layer compression ratio and losses (issue 18).

Reads a run's ``train_log.jsonl`` (the training entry writes, at every logged step with a recursive-
compression stage in the pipeline, ``"compression": {stage key: {"tokens_in", "tokens_out",
"compression_ratio", "threshold", "mean_cluster_size", ...}}`` and, with ``parachute.enabled``,
``"parachute_raise"``) and each stage folder's ``parachute.json`` (the parachute's changes).

    python eval/compression_curves.py --run runs/x --name recursive_x

Writes ``<out>/<name>.json`` (per stage key: steps, thresholds, compression ratios, mean cluster sizes;
the losses; the parachute's raise and events) and ``<name>.png`` (three panels against the training step:
loss, threshold per stage, compression ratio per stage; parachute changes as vertical lines).
Stage keys are registry names, with ``@layer`` for stages inside the LLM (one curve per layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import save_figure, write_json  # noqa: E402
from eval.train_curves import TrainLogError, global_steps, read_log  # noqa: E402


def read_compression_log(run: Path) -> dict:
    """The curves of run folder (or ``train_log.jsonl``) ``run``; ``TrainLogError`` naming the file when it
    is missing, malformed or has no compression statistics."""
    path = run / "train_log.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise TrainLogError(f"no training log at {path}; give the run folder the training entry wrote")
    points = read_log(path, keys=None)
    if not any("compression" in p for p in points):
        raise TrainLogError(f"{path} has no 'compression' statistics: the run's pipeline had no recursive-compression "
                            "stage (recursive_compression, recursive_compression_llm, progressive_compression)")
    steps = global_steps(points)
    stages: dict[str, dict[str, list]] = {}
    for step, p in zip(steps, points):
        for key, stats in p.get("compression", {}).items():
            curve = stages.setdefault(key, {"step": [], "threshold": [], "compression_ratio": [], "mean_cluster_size": []})
            curve["step"].append(step)
            for name in ("threshold", "compression_ratio", "mean_cluster_size"):
                curve[name].append(stats.get(name))
    out = {"loss": {"step": steps, "loss": [p["loss"] for p in points]}, "stages": stages,
           "parachute_raise": {"step": [s for s, p in zip(steps, points) if "parachute_raise" in p],
                               "raise": [p["parachute_raise"] for p in points if "parachute_raise" in p]},
           "parachute_events": []}
    folder = path.parent
    for record in sorted(folder.glob("stage*/parachute.json")):
        out["parachute_events"] += [{**e, "stage_folder": record.parent.name} for e in json.loads(record.read_text())["events"]]
    return out


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(curves["loss"]["step"], curves["loss"]["loss"], color="black")
    axes[0].set_ylabel("training loss")
    for key, c in curves["stages"].items():
        axes[1].plot(c["step"], c["threshold"], label=key)
        axes[2].plot(c["step"], c["compression_ratio"], label=key)
    axes[1].set_ylabel("similarity threshold (mean over rows)")
    axes[2].set_ylabel("clusters / mergeable tokens")
    axes[2].set_xlabel("logged step (events: stage-local steps)")
    for e in curves["parachute_events"]:
        for ax in axes:
            ax.axvline(e["step"], color="red" if e["reason"] == "spike" else "green", alpha=0.3, lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[0].set_title(title)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run folder (or its train_log.jsonl)")
    ap.add_argument("--name", required=True, help="output file stem")
    ap.add_argument("--out", default="eval/results")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        curves = read_compression_log(Path(args.run))
    except TrainLogError as e:
        ap.error(str(e))
    out = Path(args.out)
    write_json(out / f"{args.name}.json", {"name": args.name, "run": str(args.run), **curves})
    plot(curves, out / f"{args.name}.png", args.title or f"recursive compression: {args.name}")
    print(f"wrote {out / args.name}.json and .png ({len(curves['stages'])} stage curves, "
          f"{len(curves['parachute_events'])} parachute events)")
    return curves


if __name__ == "__main__":
    main()
