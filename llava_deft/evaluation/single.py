"""One model on one dataset at one or more retention ratios: the rows, a markdown table and a plot.

    rows = evaluate_model("runs/x/final", EvalData(task="scenes"), pipeline="configs/pipeline/deft_q.yaml",
                          ratios=[1.0, 0.25, 0.11])
    print(markdown(rows))

``llava-deft eval`` calls this; the sweep uses the same loop (:mod:`.loop`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from .data import EvalData, load_dataset
from .loop import predict, score, time_to_first_token

__all__ = ["evaluate_model", "markdown", "plot", "write_outputs"]


def evaluate_model(model_dir: str | Path, data: EvalData, pipeline: str | None = None, ratios: list[float] | None = None,
                   batch_size: int = 64, max_new_tokens: int = 8, device: str | None = None, ttft_batch: int = 1,
                   ttft_repeats: int = 5, progress: bool = True) -> list[dict]:
    """One row per ratio: accuracy overall and by question type, media tokens per item, the per-question
    record ``correct`` and (``ttft_batch`` > 0) the median time to first token in ms."""
    from ..model import LlavaDeftForCausalLM

    ratios = list(ratios or [1.0])
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise InvalidArgumentError(f"retention ratios must be in (0, 1], got {bad}")
    data.check("test")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = LlavaDeftForCausalLM.from_pretrained(model_dir, pipeline=pipeline).to(dev).eval()
    reducers = [s for s in model.pipeline.stages if hasattr(s, "retention_ratio")]
    if any(r != 1.0 for r in ratios) and not reducers:
        raise InvalidArgumentError(
            f"ratios {ratios} need a reducer but the pipeline of '{model_dir}' ({model.pipeline.names or 'none'}) has "
            f"none; give a pipeline such as configs/pipeline/deft.yaml")
    dataset = load_dataset(data, model, "test")
    rows = []
    for r in ratios:
        if reducers:
            model.pipeline.set_retention(r)
        t0 = time.perf_counter()
        res = score(predict(model, dataset, batch_size, max_new_tokens, dev, desc=f"{data.label} r={r:g}", progress=progress))
        row = {"data": data.label, "ratio": r, "pipeline": model.pipeline.names, **res,
               "seconds": time.perf_counter() - t0}
        row["ttft_ms"] = time_to_first_token(model, dataset, ttft_batch, dev, repeats=ttft_repeats) if ttft_batch else None
        row["ttft_batch"] = ttft_batch or None
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """A table: ratio, accuracy overall and by question type, tokens per item, TTFT."""
    types = sorted({k for r in rows for k in r["accuracy"] if k != "all"})
    head = "| ratio | all | " + " | ".join(types) + " | tokens/item | TTFT ms | questions |"
    lines = [head, "|" + "---|" * (5 + len(types))]
    for r in rows:
        per = [f"{100 * r['accuracy'][t]:.1f}" if t in r["accuracy"] else "—" for t in types]
        ttft = "—" if r.get("ttft_ms") is None else f"{r['ttft_ms']:.1f}"
        lines.append(f"| {r['ratio']:g} | {100 * r['accuracy']['all']:.1f} | " + " | ".join(per)
                     + f" | {r['tokens_per_item']:.1f} | {ttft} | {r['counts']['all']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against media tokens per item and against TTFT (where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("tokens_per_item", "media tokens per item")]
    if all(r.get("ttft_ms") is not None for r in rows):
        keys.append(("ttft_ms", "time to first token (ms)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        pts = sorted(rows, key=lambda r: r[key])
        ax.plot([r[key] for r in pts], [100 * r["accuracy"]["all"] for r in pts], "o-")
        for r in pts:
            ax.annotate(f"r={r['ratio']:g}", (r[key], 100 * r["accuracy"]["all"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("exact-match accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[dict], out: str | Path, name: str, meta: dict) -> dict[str, Path]:
    """``<out>/<name>.json`` (meta + rows), ``.md`` and ``.png``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    head = (f"# {meta.get('data')}: {meta.get('model')} ({meta.get('device')}, {meta.get('date')}, "
            f"commit {meta.get('commit')})\n\n")
    paths["md"].write_text(head + markdown(rows) + "\n")
    plot(rows, paths["png"], f"{meta.get('data')}: {Path(str(meta.get('model'))).name}")
    return paths
