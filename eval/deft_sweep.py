"""Reducer x retention-ratio sweep on easy-VQA, training-free and trained, in one resumable run.

    python eval/deft_sweep.py --name deft_sweep_h100                    # the whole default sweep
    python eval/deft_sweep.py --only deft@0.11 random --name deft_sweep_h100   # part of it
    python eval/deft_sweep.py --report-only --name deft_sweep_h100      # table + plot from the JSON

The no-reduction model ("base") is trained once with the ``--base`` reducer's pipeline at retention
1.0 (all tokens reach the LLM; a learned scorer still trains). Then

- training_free: the base checkpoint is loaded with each reducer's pipeline at each ratio (stages
  whose names and shapes match keep the base's trained weights) and evaluated;
- trained: each reducer x ratio is trained with that pipeline in the loop (same recipe) and evaluated.

Pipelines with an ``rtd`` stage are also evaluated in each ``--rtd-modes`` mode at ``--rtd-ratio``.
Training runs are subprocesses (``python -m llava_deft.train``), ``--parallel`` at a time, each
logging to ``<runs>/<run>.log``; a run with ``final/config.json`` is not trained again, an
interrupted one resumes from its last DeepSpeed checkpoint. Rows accumulate in ``<out>/<name>.json``
(merged by protocol, reducer, ratio and rtd mode; each row keeps its own device, date and commit);
a row already there for the same checkpoint, pipeline, ``--limit``, ``--steps`` and ``--override``
is not evaluated again (``--reeval`` forces it). A finished run is never retrained, whatever
``--steps``/``--override`` say (each row records the recipe its run was trained with): delete its
folder to retrain it. ``<name>.md`` holds one table per protocol and the acceptance checks,
``<name>.png`` accuracy against visual tokens per image. The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval.common import run_metadata, write_json  # noqa: E402
from pipeline import get_stage, list_stages, validate_config  # noqa: E402
from pipeline.stages.rtd import MODES as RTD_MODES  # noqa: E402

# Share of the base's accuracy (%) the --base reducer (rtd mode "fast") must keep at each ratio;
# a check is made only for ratios that are in the sweep.
THRESHOLDS: dict[float, float] = {0.482: 99.5, 0.25: 99.0, 0.11: 97.0}

PROTOCOLS = ("training_free", "trained")
PROTOCOL_TITLES = {
    "training_free": "Training-free (the base checkpoint, reducer inserted at evaluation)",
    "trained": "Trained (reducer in the training loop, same recipe)",
}
DEFAULT_REDUCERS = [
    "deft=configs/pipeline/deft.yaml",
    "deft_nofb=configs/pipeline/deft_nofb.yaml",
    "random=configs/pipeline/random.yaml",
    "pool=configs/pipeline/pool.yaml",
]
BASE = "base"  # name of the no-reduction run and of its rows' protocol
LOG_TAIL_LINES = 25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-config", default="configs/train/easyvqa_deft.yaml", help="training recipe of every run")
    p.add_argument("--reducers", nargs="+", default=DEFAULT_REDUCERS, metavar="NAME=YAML", help="reducer pipelines")
    p.add_argument("--base", default="deft", help="reducer whose pipeline at retention 1.0 trains the no-reduction base")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.482, 0.25, 0.11], help="retention ratios")
    p.add_argument("--rtd-modes", nargs="+", default=list(RTD_MODES), choices=RTD_MODES, help="rtd modes evaluated at --rtd-ratio")
    p.add_argument("--rtd-ratio", type=float, default=0.11, help="ratio at which pipelines with an rtd stage are evaluated in every mode")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--runs", default="runs/deft_sweep", help="folder of the training runs")
    p.add_argument("--out", default="eval/results", help="folder of <name>.json/.md/.png")
    p.add_argument("--name", default="deft_sweep", help="output file stem")
    p.add_argument("--parallel", type=int, default=13 if cuda else 1, help="training runs at once")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers of each training run")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test questions only")
    p.add_argument("--steps", type=int, default=None, help="max_steps of every training stage (default: the recipe's epochs)")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides of every training run (e.g. save_steps=200)")
    p.add_argument("--only", nargs="+", default=None, metavar="REDUCER[@RATIO]", help="run only these (and 'base'); the rest of the JSON is kept")
    p.add_argument("--report-only", action="store_true", help="write the report and plot from the JSON, run nothing")
    p.add_argument("--reeval", action="store_true", help="evaluate rows again even if the JSON has them for the same checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="evaluation device (training runs pick their own)")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args


# ---------------------------------------------------------------------------------- pure parts
def ratio_tag(ratio: float) -> str:
    """0.482 -> '0.482', 1.0 -> '1' (run folder names, row labels)."""
    return format(ratio, "g")


def parse_reducers(items: list[str]) -> dict[str, Path]:
    """``["deft=configs/pipeline/deft.yaml", ...]`` -> ``{"deft": Path(...)}`` (order kept)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reducers entry {item!r} is not NAME=YAML (e.g. random=configs/pipeline/random.yaml)")
        if name == BASE or "@" in name or "/" in name:
            raise ValueError(f"reducer name {name!r} is reserved or has '@' or '/'; choose another")
        if name in out:
            raise ValueError(f"reducer {name!r} is given twice in --reducers")
        out[name] = Path(path)
    return out


def parse_only(items: list[str] | None, reducers: list[str], ratios: list[float]) -> dict[str, set[float]] | None:
    """``--only`` -> ``{name: ratios}`` (``"base"`` maps to ``{1.0}``); None selects everything.

    Items are ``base``, ``REDUCER`` (every ratio) or ``REDUCER@RATIO``.
    """
    if items is None:
        return None
    sel: dict[str, set[float]] = {}
    for item in items:
        name, sep, tag = item.partition("@")
        if name == BASE and not sep:
            sel[BASE] = {1.0}
            continue
        if name not in reducers:
            raise ValueError(f"unknown reducer {name!r} in --only {item!r}; available: {[BASE, *reducers]}")
        if not sep:
            sel.setdefault(name, set()).update(ratios)
            continue
        try:
            r = float(tag)
        except ValueError:
            raise ValueError(f"--only {item!r}: {tag!r} is not a ratio") from None
        match = [x for x in ratios if math.isclose(x, r, rel_tol=0, abs_tol=1e-9)]
        if not match:
            raise ValueError(f"--only {item!r}: ratio {tag} is not in --ratios {ratios}")
        sel.setdefault(name, set()).add(match[0])
    return sel


def selected(sel: dict[str, set[float]] | None, name: str, ratio: float) -> bool:
    return sel is None or ratio in sel.get(name, set())


def resolve_pipeline(path: str | Path, ratio: float) -> dict:
    """The pipeline YAML at ``path`` with every stage that has a ``retention_ratio`` set to ``ratio``.

    Stages are looked up in the registry, so a stage that leaves ``retention_ratio`` at its default
    is set too. Returns the validated config as plain data (every option explicit).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config '{path}' does not exist")
    if not 0 < ratio <= 1:
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio}")
    data = yaml.safe_load(path.read_text()) or {}
    stages = data if isinstance(data, list) else data.get("stages", []) if isinstance(data, dict) else []
    found = False
    for stage in stages:
        name = stage.get("name") if isinstance(stage, dict) else None
        if name in list_stages() and "retention_ratio" in get_stage(name).Config.model_fields:
            stage["retention_ratio"] = float(ratio)
            found = True
    cfg = validate_config(data).model_dump()  # raises PipelineConfigError listing every error
    if not found:
        names = [s["name"] for s in cfg["stages"]]
        raise ValueError(f"pipeline '{path}' (stages {names}) has no stage with a retention_ratio; a reducer needs one")
    return cfg


def configured_rtd_mode(pipeline_cfg: dict) -> str | None:
    """The mode of the pipeline's rtd stage, None when it has none."""
    return next((s.get("mode", "fast") for s in pipeline_cfg["stages"] if s["name"] == "rtd"), None)


def row_key(row: dict) -> tuple:
    return (row["protocol"], row["reducer"], round(float(row["ratio"]), 9), row.get("rtd_mode"))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of ``old`` not replaced by a row of ``new`` with the same key, then ``new``'s (order kept)."""
    keys = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in keys] + list(new)


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {"commands": [], "rows": []}
    doc = json.loads(path.read_text())
    doc.setdefault("commands", [])
    doc.setdefault("rows", [])
    return doc


def save_rows(path: Path, rows: list[dict], command: str | None = None) -> dict:
    """Merge ``rows`` (and the command) into the JSON at ``path``, re-read so parallel calls on one disk keep theirs."""
    doc = load_results(path)
    if command is not None and command not in doc["commands"]:
        doc["commands"].append(command)
    doc["rows"] = merge_rows(doc["rows"], rows)
    write_json(path, doc)
    return doc


# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Check:
    status: str  # PASS | FAIL | MISSING | INFO
    text: str


def find_rows(rows: list[dict], protocol: str, reducer: str, ratio: float) -> list[dict]:
    return [r for r in rows if r["protocol"] == protocol and r["reducer"] == reducer and math.isclose(r["ratio"], ratio, abs_tol=1e-9)]


def main_row(rows: list[dict], protocol: str, reducer: str, ratio: float) -> dict | None:
    """A reducer's row at a ratio: the only one, or the rtd mode 'fast' one among several."""
    found = find_rows(rows, protocol, reducer, ratio)
    if len(found) == 1:
        return found[0]
    return next((r for r in found if r.get("rtd_mode") == "fast"), None)


def base_row(rows: list[dict], base: str) -> dict | None:
    return next((r for r in rows if r["protocol"] == BASE and r["reducer"] == base), None)


def acc(row: dict) -> float:
    return 100 * row["accuracy"]["all"]


def pct_of(row: dict, ref: dict) -> float:
    """``row``'s accuracy as % of ``ref``'s (nan when the reference scored 0)."""
    return 100 * acc(row) / acc(ref) if acc(ref) else float("nan")


def fmt_pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def sweep_ratios(rows: list[dict], protocol: str | None = None) -> list[float]:
    """Ratios present in the rows (of one protocol), largest first; the base's 1.0 excluded."""
    rs = {round(r["ratio"], 9) for r in rows if r["protocol"] != BASE and protocol in (None, r["protocol"])}
    return sorted(rs, reverse=True)


def reducer_order(rows: list[dict], preferred: list[str]) -> list[str]:
    seen = {r["reducer"] for r in rows if r["protocol"] != BASE}
    return [n for n in dict.fromkeys(preferred) if n in seen] + sorted(seen - set(preferred))


def acceptance_checks(
    rows: list[dict], base: str, rtd_ratio: float, thresholds: dict[float, float] = THRESHOLDS, reducers: list[str] = (),
) -> list[Check]:
    """Every acceptance check the rows allow, computed from the numbers (reducers in ``reducers``' order)."""
    ref = base_row(rows, base)
    if ref is None:
        return [Check("MISSING", f"no base row (reducer {base!r} at retention 1.0): nothing can be compared")]
    ref_acc = acc(ref)
    checks: list[Check] = []
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    for proto in protocols:
        ratios = sweep_ratios(rows, proto)
        for ratio, need in thresholds.items():
            if not any(math.isclose(ratio, x, abs_tol=1e-9) for x in ratios):
                continue
            r = main_row(rows, proto, base, ratio)
            what = f"{proto}: {base} (rtd fast) keeps >= {need:g} % of base accuracy at {ratio_tag(ratio)}"
            if r is None:
                checks.append(Check("MISSING", f"{what}: no row"))
                continue
            pct = pct_of(r, ref)
            checks.append(Check("PASS" if pct >= need else "FAIL", f"{what}: {pct:.2f} % ({acc(r):.1f} vs {ref_acc:.1f})"))
    if "trained" in protocols:
        others = [n for n in reducer_order(rows, list(reducers)) if not n.startswith(base)]
        for ratio in sweep_ratios(rows, "trained"):
            mine = main_row(rows, "trained", base, ratio)
            for other in others:
                theirs = main_row(rows, "trained", other, ratio)
                what = f"trained: {base} beats {other} at {ratio_tag(ratio)}"
                if mine is None or theirs is None:
                    checks.append(Check("MISSING", f"{what}: no row for {base if mine is None else other}"))
                    continue
                d = acc(mine) - acc(theirs)
                checks.append(Check("PASS" if d > 0 else "FAIL", f"{what}: {acc(mine):.1f} vs {acc(theirs):.1f} ({d:+.1f} pp)"))
    for proto in protocols:
        for name in reducer_order(rows, [base, *reducers]):
            found = {r.get("rtd_mode"): r for r in find_rows(rows, proto, name, rtd_ratio)}
            if "fast" not in found or len(found) < 2:
                continue
            fast = found["fast"]
            parts = [
                f"{m} - fast = {acc(r) - acc(fast):+.1f} pp ({r['tokens_per_image']:.1f} vs {fast['tokens_per_image']:.1f} tokens)"
                for m, r in found.items() if m != "fast"
            ]
            checks.append(Check("INFO", f"{proto}: rtd modes of {name} at {ratio_tag(rtd_ratio)}: " + "; ".join(parts)))
    for proto in protocols:
        for abl in [n for n in reducer_order(rows, list(reducers)) if n != base and n.startswith(base)]:
            parts = []
            for ratio in sweep_ratios(rows, proto):
                a, b = main_row(rows, proto, base, ratio), main_row(rows, proto, abl, ratio)
                if a is not None and b is not None:
                    parts.append(f"{ratio_tag(ratio)}: {acc(a) - acc(b):+.1f} pp")
            if parts:
                checks.append(Check("INFO", f"{proto}: ablation {base} - {abl}: " + ", ".join(parts)))
    return checks


def _range(values: list[str]) -> str:
    vals = sorted(set(values))
    return vals[0] if len(vals) == 1 else f"{vals[0]} to {vals[-1]}"


def protocol_table(rows: list[dict], protocol: str, ref: dict, order: list[str]) -> str:
    ratios = sweep_ratios(rows)
    head = "| reducer | rtd mode | " + " | ".join(f"{ratio_tag(r)}: accuracy (% of base) | {ratio_tag(r)}: tokens/image" for r in ratios) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(ratios)]
    base_cell = f"{acc(ref):.1f} (100.0) | {ref['tokens_per_image']:.1f}"
    lines.append(f"| no reduction (base, retention 1) | {ref.get('rtd_mode') or ''} | " + " | ".join([base_cell] * len(ratios)) + " |")
    for name in order:
        mine = [r for r in rows if r["protocol"] == protocol and r["reducer"] == name]
        modes = list(dict.fromkeys(r.get("rtd_mode") for r in sorted(mine, key=lambda r: -r["ratio"])))
        for mode in modes:
            cells = []
            for ratio in ratios:
                r = next((x for x in mine if x.get("rtd_mode") == mode and math.isclose(x["ratio"], ratio, abs_tol=1e-9)), None)
                cells.append("— | —" if r is None else f"{acc(r):.1f} ({fmt_pct(pct_of(r, ref))}) | {r['tokens_per_image']:.1f}")
            lines.append(f"| {name} | {mode or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(
    doc: dict, name: str, base: str, rtd_ratio: float, reducers: list[str],
    thresholds: dict[float, float] = THRESHOLDS, failed: list[str] = (), runs_dir: str = "",
) -> str:
    """The markdown report; its last line is the one-line summary."""
    rows = doc["rows"]
    ref = base_row(rows, base)
    if ref is None:
        raise ValueError(f"the results have no base row for reducer {base!r}; run the sweep (without --report-only) first")
    order = reducer_order(rows, reducers)
    limits = sorted({str(r.get("questions")) for r in rows})
    commits = sorted({r["commit"] for r in rows})
    devices = sorted({r["device"] for r in rows})
    stale = [r for r in rows if r["protocol"] == "training_free" and r.get("checkpoint_sha") != ref.get("checkpoint_sha")]
    out = [
        f"# easy-VQA: reducer x retention ratio, training-free and trained ({name})",
        "",
        "Command(s):",
        "",
        *[f"    {c}" for c in doc["commands"]],
        "",
        f"{len(rows)} rows measured {_range([r['date'] for r in rows])} on {', '.join(devices)}; "
        f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}; "
        f"{' / '.join(limits)} test questions per row{' (MIXED: compare with care)' if len(limits) > 1 else ''}.",
        f"Base: reducer `{base}`'s pipeline at retention 1.0 ({ref['tokens_per_image']:.1f} tokens/image), "
        f"{acc(ref):.1f} % exact match, checkpoint `{ref['checkpoint']}` ({ref.get('checkpoint_sha')}).",
        "Cells: exact-match accuracy % (in parentheses % of the base's accuracy); tokens/image: visual tokens each image gives the LLM.",
    ]
    if stale:
        out.append(f"Note: {len(stale)} training-free row(s) were evaluated on a base checkpoint other than the base row's "
                   f"(trained on another machine?): {sorted({r.get('checkpoint_sha') for r in stale})}.")
    for proto in PROTOCOLS:
        if any(r["protocol"] == proto for r in rows):
            out += ["", f"## {PROTOCOL_TITLES[proto]}", "", protocol_table(rows, proto, ref, order)]
    checks = acceptance_checks(rows, base, rtd_ratio, thresholds, reducers)
    out += ["", "## Acceptance checks", "",
            f"Thresholds ({base}, rtd fast, % of base accuracy): "
            + ", ".join(f"{ratio_tag(r)}: {t:g}" for r, t in thresholds.items()) + "; 'beats' means strictly higher accuracy.", ""]
    out += [f"- **{c.status}** {c.text}" for c in checks]
    n = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "MISSING")}
    lowest = []
    for proto in PROTOCOLS:
        ratios = sweep_ratios(rows, proto)
        r = main_row(rows, proto, base, ratios[-1]) if ratios else None
        if r is not None:
            lowest.append(f"{proto} {base}@{ratio_tag(r['ratio'])} {acc(r):.1f}% ({fmt_pct(pct_of(r, ref))}% of base)")
    if failed:
        out += ["", f"**Training runs that FAILED in the last call** (logs: {runs_dir}/<run>.log): {', '.join(failed)}"]
    summary = (f"{name}: base {acc(ref):.1f}%; " + ("; ".join(lowest) + "; " if lowest else "")
               + f"acceptance {n['PASS']} pass, {n['FAIL']} fail, {n['MISSING']} missing"
               + (f"; {len(failed)} training run(s) FAILED" if failed else ""))
    out += ["", summary]
    return "\n".join(out) + "\n"


def plot_sweep(rows: list[dict], path: Path, base: str, reducers: list[str], title: str) -> None:
    """Two panels (training-free, trained): accuracy vs tokens per image, one line per reducer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = base_row(rows, base)
    order = reducer_order(rows, reducers)
    colors = {n: f"C{i}" for i, n in enumerate(order)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, proto in zip(axes, PROTOCOLS):
        for name in order:
            line = [r for ratio in sweep_ratios(rows, proto) if (r := main_row(rows, proto, name, ratio)) is not None]
            line.sort(key=lambda r: r["tokens_per_image"])
            if line:
                modes = {r.get("rtd_mode") for r in line} - {None}
                label = name + (f" (rtd {modes.pop()})" if len(modes) == 1 else "")
                ax.plot([r["tokens_per_image"] for r in line], [acc(r) for r in line], "o-", color=colors[name], label=label)
            extra = [r for r in rows if r["protocol"] == proto and r["reducer"] == name and r not in line]
            for marker, mode in zip("^sDvP", sorted({r.get("rtd_mode") for r in extra}, key=str)):
                pts = [r for r in extra if r.get("rtd_mode") == mode]
                ax.plot([r["tokens_per_image"] for r in pts], [acc(r) for r in pts], marker, color=colors[name],
                        linestyle="none", label=f"{name} (rtd {mode})")
            for r in line + extra:
                ax.annotate(ratio_tag(r["ratio"]), (r["tokens_per_image"], acc(r)), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        if ref is not None:
            ax.axhline(acc(ref), color="k", linestyle="--", linewidth=1, label=f"no reduction ({ref['tokens_per_image']:.0f} tokens)")
        ax.set_title(PROTOCOL_TITLES[proto].split(" (")[0])
        ax.set_xlabel("visual tokens per image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact-match accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Run:
    """A training run: the base, or one reducer at one ratio (trained protocol)."""

    name: str  # "base" or "<reducer>@<ratio>"
    dir: Path
    pipeline: dict  # resolved config, written to dir/pipeline.yaml for the training run
    source: Path  # the reducer's pipeline YAML it was resolved from
    ratio: float

    @property
    def pipeline_yaml(self) -> Path:
        return self.dir / "pipeline.yaml"

    @property
    def log(self) -> Path:
        return Path(f"{self.dir}.log")


@dataclass(frozen=True)
class EvalItem:
    """One model to evaluate (in one or more rtd modes): a run's checkpoint, maybe with another pipeline."""

    protocol: str
    reducer: str
    ratio: float
    modes: tuple[str | None, ...]
    run: str  # name of the Run whose final/ is loaded
    pipeline_yaml: Path | None  # replaces the checkpoint's pipeline (training-free); None keeps it
    pipeline: dict
    source: Path


def is_trained(run_dir: Path) -> bool:
    return (run_dir / "final" / "config.json").is_file()


def checkpoint_sha(run_dir: Path) -> str | None:
    """First 12 hex digits of the sha256 of the run's exported weights (None before it exists)."""
    f = run_dir / "final" / "model.safetensors"
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _same_config(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def write_pipeline_yaml(path: Path, cfg: dict, source: Path, ratio: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# {source} with every retention_ratio at {ratio_tag(ratio)} (written by eval/deft_sweep.py)\n"
    path.write_text(head + yaml.safe_dump(cfg, sort_keys=False))


def plan(args: argparse.Namespace, reducers: dict[str, Path]) -> tuple[dict[str, Run], list[EvalItem]]:
    """Every run and evaluation of the sweep; all configs are resolved (every error at once) first."""
    runs_dir = Path(args.runs).resolve()
    resolved: dict[tuple[str, float], dict] = {}
    errors = []
    for name, path in reducers.items():
        for ratio in sorted({*args.ratios, *([1.0] if name == args.base else [])}, reverse=True):
            try:
                resolved[name, ratio] = resolve_pipeline(path, ratio)
            except (ValueError, FileNotFoundError) as e:  # PipelineConfigError is a ValueError
                errors.append(f"reducer {name!r}: {e}")
                break
    if errors:
        raise ValueError("\n  ".join([f"{len(errors)} reducer pipeline(s) cannot be resolved:", *errors]))
    has_rtd = [n for n in reducers if configured_rtd_mode(resolved[n, args.ratios[0]]) is not None]
    if has_rtd and not any(math.isclose(args.rtd_ratio, r, abs_tol=1e-9) for r in args.ratios):
        raise ValueError(f"--rtd-ratio {args.rtd_ratio} is not in --ratios {args.ratios} (reducers with an rtd stage: {has_rtd})")

    runs = {BASE: Run(BASE, runs_dir / BASE, resolved[args.base, 1.0], reducers[args.base], 1.0)}
    base_mode = configured_rtd_mode(runs[BASE].pipeline)
    items = [EvalItem(BASE, args.base, 1.0, (base_mode,), BASE, None, runs[BASE].pipeline, reducers[args.base])]
    for name, path in reducers.items():
        for ratio in args.ratios:
            cfg = resolved[name, ratio]
            mode = configured_rtd_mode(cfg)
            modes = tuple(args.rtd_modes) if mode is not None and math.isclose(ratio, args.rtd_ratio, abs_tol=1e-9) else (mode,)
            tag = f"{name}@{ratio_tag(ratio)}"
            if "training_free" in args.protocols:
                tf_yaml = runs_dir / "training_free" / f"{tag}.yaml"
                items.append(EvalItem("training_free", name, ratio, modes, BASE, tf_yaml, cfg, path))
            if "trained" in args.protocols:
                runs[tag] = Run(tag, runs_dir / "trained" / tag, cfg, path, ratio)
                items.append(EvalItem("trained", name, ratio, modes, tag, None, cfg, path))
    return runs, items


def pending_items(items: list[EvalItem], runs: dict[str, Run], rows: list[dict], args, sel) -> list[EvalItem]:
    """Items to evaluate now: selected ones whose rows are missing or stale (another checkpoint,
    pipeline, ``--limit``, ``--steps`` or ``--override``), all selected ones with ``--reeval``, and
    the base whenever its row is stale (every row is compared with it)."""
    index = {row_key(r): r for r in rows}

    def current(it: EvalItem) -> bool:
        sha = checkpoint_sha(runs[it.run].dir)  # None when the checkpoint is not here: trust the row
        rs = [index.get((it.protocol, it.reducer, round(it.ratio, 9), m)) for m in it.modes]
        return all(
            r is not None and r.get("limit") == args.limit and r.get("steps") == args.steps
            and r.get("overrides", []) == args.override
            and _same_config(r.get("pipeline_config", {}), it.pipeline)
            and (sha is None or r.get("checkpoint_sha") == sha)
            for r in rs
        )

    out = []
    for it in items:
        if it.protocol == BASE:
            wanted = not current(it) or (args.reeval and (sel is None or BASE in sel))
        else:
            wanted = selected(sel, it.reducer, it.ratio) and (args.reeval or not current(it))
        if wanted:
            out.append(it)
    return out


# ---------------------------------------------------------------------------------- training
class Launcher:
    """Runs ``python -m llava_deft.train`` subprocesses, records failures as they happen and stops
    the ones still running on ``terminate()``."""

    def __init__(self, args: argparse.Namespace, n_runs: int):
        self.args = args
        self.procs: set[subprocess.Popen] = set()
        self.failed: dict[str, str] = {}
        self.stopping = False  # set by terminate(): runs ended by it are not failures
        self.lock = threading.Lock()
        self.env = dict(os.environ)
        # N concurrent runs must not each take every core (the GPU box has 16 cores for 13 runs)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, min(n_runs, args.parallel)))))
        self.n_stages = len(_load_recipe(args.train_config).stages)
        # runs are spread round-robin over the visible GPUs (one process each, no communication)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.gpus = (visible.split(",") if visible else [str(i) for i in range(n_gpus)])[:n_gpus] if n_gpus else []
        self.launched = 0
        self.bar = tqdm(total=n_runs, desc="training runs finished", dynamic_ncols=True, disable=n_runs == 0)

    def command(self, run: Run) -> list[str]:
        cmd = [sys.executable, "-m", "llava_deft.train", "--config", str(Path(self.args.train_config).resolve()),
               "--output_dir", str(run.dir), "--resume", f"num_workers={self.args.num_workers}"]
        if self.args.steps is not None:
            cmd += [f"stages.{i}.max_steps={self.args.steps}" for i in range(self.n_stages)]
        return cmd + list(self.args.override) + [f"model.pipeline={run.pipeline_yaml}"]

    def train(self, run: Run) -> int:
        """Train one run (``--resume``: an interrupted run continues from its last checkpoint); exit code."""
        write_pipeline_yaml(run.pipeline_yaml, run.pipeline, run.source, run.ratio)
        cmd = self.command(run)
        with run.log.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            with self.lock:
                env = dict(self.env)
                if len(self.gpus) > 1:
                    env["CUDA_VISIBLE_DEVICES"] = self.gpus[self.launched % len(self.gpus)]
                    fh.write(f"# CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}\n")
                    fh.flush()
                self.launched += 1
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            with self.lock:
                self.procs.add(proc)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return rc

    def train_and_report(self, run: Run) -> None:
        """``train`` in a worker thread; a failure is recorded (with the log's tail) before the future completes."""
        try:
            rc = self.train(run)
            why = None if rc == 0 else f"exit code {rc}"
        except OSError as e:  # e.g. the interpreter could not be started
            why = f"{type(e).__name__}: {e}"
        if why is not None and not self.stopping:
            with self.lock:
                self.failed[run.name] = why
            tqdm.write(f"[sweep] run {run.name} FAILED ({why}); last lines of {run.log}:\n{log_tail(run.log)}")
        self.bar.update(1)

    def terminate(self) -> None:
        self.stopping = True
        with self.lock:
            for p in self.procs:
                p.terminate()
        self.bar.close()


def _load_recipe(path: str):
    from llava_deft.train_config import load_train_config

    return load_train_config(path)


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join("    " + ln for ln in lines[-n:])


def warn_if_stale(run: Run) -> None:
    old = yaml.safe_load(run.pipeline_yaml.read_text()) if run.pipeline_yaml.is_file() else None
    if old is not None and not _same_config(old, run.pipeline):
        tqdm.write(f"[sweep] warning: {run.dir} was trained with another pipeline than {run.name}'s now is; delete it to retrain")


# ---------------------------------------------------------------------------------- evaluation
def evaluate_item(it: EvalItem, runs: dict[str, Run], dataset, args, device: torch.device) -> list[dict]:
    """Rows of one item (one per rtd mode)."""
    from eval.easyvqa import evaluate
    from llava_deft.model import LlavaDeftForCausalLM

    run = runs[it.run]
    ckpt = run.dir / "final"
    if it.pipeline_yaml is not None:
        write_pipeline_yaml(it.pipeline_yaml, it.pipeline, it.source, it.ratio)
    pipe = None if it.pipeline_yaml is None else str(it.pipeline_yaml)
    model = LlavaDeftForCausalLM.from_pretrained(ckpt, pipeline=pipe).to(device).eval()
    sha = checkpoint_sha(run.dir)
    recipe = yaml.safe_load((run.dir / "train_config.yaml").read_text()) if (run.dir / "train_config.yaml").is_file() else {}
    rows = []
    for mode in it.modes:
        if mode is not None:
            for stage in model.pipeline.stages:
                if stage.stage_name == "rtd":
                    stage.set_mode(mode)
        desc = f"{it.protocol} {it.reducer}@{ratio_tag(it.ratio)}" + (f" rtd {mode}" if mode else "")
        res = evaluate(model, dataset, args.batch_size, args.max_new_tokens, device, desc=desc)
        rows.append({
            "protocol": it.protocol, "reducer": it.reducer, "ratio": it.ratio, "rtd_mode": mode,
            **res, "questions": res["counts"]["all"], "limit": args.limit, "steps": args.steps,
            "overrides": list(args.override),
            "pipeline": model.pipeline.names, "pipeline_config": it.pipeline,
            "checkpoint": str(ckpt), "checkpoint_sha": sha,
            "recipe": {"train_config": args.train_config, "stages": recipe.get("stages")},
            **run_metadata(device),
        })
    return rows


def usable_in_order(ready: list[str], futures: dict[str, Future]) -> Iterator[str]:
    """Run names as their checkpoints become usable: those already trained, then the base, then the
    others as they finish (the base gates every training-free row)."""
    yield from ready
    if BASE in futures:
        futures[BASE].result()
        yield BASE
    others = {f: name for name, f in futures.items() if name != BASE}
    for f in as_completed(others):
        yield others[f]


def run_sweep(args, runs: dict[str, Run], items: list[EvalItem], sel, command: str) -> list[str]:
    """Train and evaluate what is pending; returns the names of failed runs."""
    json_path = Path(args.out) / f"{args.name}.json"
    todo = pending_items(items, runs, load_results(json_path)["rows"], args, sel)
    save_rows(json_path, [], command)
    need = [runs[n] for n in dict.fromkeys(it.run for it in todo)]  # the base first when it is needed
    for run in need:
        if is_trained(run.dir):
            warn_if_stale(run)
    to_train = [r for r in need if not is_trained(r.dir)]
    print(f"[sweep] {len(todo)} model(s) to evaluate; {len(to_train)} training run(s) to do "
          f"({', '.join(r.name for r in to_train) or 'none'}), {args.parallel} at a time, logs in {args.runs}/<run>.log")
    if not todo:
        return []

    from llava_deft.data import EasyVQADataset

    dataset = EasyVQADataset("test")
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    device = torch.device(args.device)
    launcher = Launcher(args, len(to_train))
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main else None
    pool = ThreadPoolExecutor(max_workers=args.parallel)
    try:
        futures = {r.name: pool.submit(launcher.train_and_report, r) for r in to_train}
        for name in usable_in_order([r.name for r in need if r not in to_train], futures):
            if name in launcher.failed:
                continue
            for it in [it for it in todo if it.run == name]:
                save_rows(json_path, evaluate_item(it, runs, dataset, args, device))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        launcher.terminate()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    skipped = [f"{it.protocol} {it.reducer}@{ratio_tag(it.ratio)}" for it in todo if it.run in launcher.failed]
    if skipped:
        print(f"[sweep] not evaluated because their training run failed: {', '.join(skipped)}")
    return sorted(launcher.failed)


def _sigterm(signum, frame):  # `timeout` sends SIGTERM: stop the training subprocesses too (see finally)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or only the report); 1 when a training run failed, else 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "eval/deft_sweep.py", *argv])
    json_path = Path(args.out) / f"{args.name}.json"
    try:  # every configuration error before anything is trained
        reducers = parse_reducers(args.reducers)
        if args.base not in reducers:
            raise ValueError(f"--base {args.base!r} is not one of --reducers {list(reducers)}")
        bad = [r for r in args.ratios if not 0 < r < 1]
        if bad:
            raise ValueError(f"--ratios must be in (0, 1) (1.0 is the base); got {bad}")
        sel = parse_only(args.only, list(reducers), args.ratios)
        if not args.report_only:
            runs, items = plan(args, reducers)
            _load_recipe(args.train_config)
        elif not json_path.is_file():
            raise FileNotFoundError(f"no results at {json_path}; run the sweep without --report-only first")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"deft_sweep: {e}") from None
    failed = [] if args.report_only else run_sweep(args, runs, items, sel, command)
    doc = load_results(json_path)
    if base_row(doc["rows"], args.base) is None:
        raise SystemExit(f"deft_sweep: {json_path} has no base row (reducer {args.base!r} at retention 1.0)"
                         + (f"; failed runs: {failed}" if failed else ""))
    md = build_report(doc, args.name, args.base, args.rtd_ratio, list(reducers), failed=failed, runs_dir=args.runs)
    (Path(args.out) / f"{args.name}.md").write_text(md)
    plot_sweep(doc["rows"], Path(args.out) / f"{args.name}.png", args.base, list(reducers), f"easy-VQA: {args.name}")
    print(md, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
