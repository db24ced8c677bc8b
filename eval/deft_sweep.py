"""Reducer x retention-ratio sweep on easy-VQA, training-free and trained, over seeds, in one resumable run.

    python eval/deft_sweep.py --name deft_sweep_h100                    # the whole default sweep
    python eval/deft_sweep.py --only deft@0.11 random --name deft_sweep_h100   # part of it
    timeout 590 python eval/deft_sweep.py --seeds 0 1 2 --time-budget 480 --save-steps 250 --name x
                                            # inside a 10-minute call; call again until nothing is unfinished
    python eval/deft_sweep.py --report-only --name deft_sweep_h100      # table + plot from the JSON

The no-reduction model ("base") is trained with the ``--base`` reducer's pipeline at retention 1.0
(all tokens reach the LLM; a learned scorer still trains). Then

- training_free: the base checkpoint is loaded with each reducer's pipeline at each ratio (stages
  whose names and shapes match keep the base's trained weights) and evaluated;
- trained: each reducer x ratio is trained with that pipeline in the loop (same recipe) and evaluated.

Pipelines with an ``rtd`` stage are also evaluated in each ``--rtd-modes`` mode at ``--rtd-ratio``.

Seeds: every run (the base included) is trained once per ``--seeds`` seed (default: the recipe's
seed alone). With more than one seed, or another than the recipe's, run folders get a ``#s<seed>``
suffix and the run gets the override ``seed=<s>``; a seed's training-free rows use that seed's base.
Rows record their seed. The report shows each cell's mean ± sample std over its seeds and n; the
acceptance checks and the plot (error bars: std) use the means, % of base is mean / base mean.

Training runs are subprocesses (``python -m llava_deft.train``), ``--parallel`` at a time, the bases
first (the longest sequences, and every training-free row waits for one), then the trained runs seed
by seed; each logs to ``<runs>/<run>.log``. The main process evaluates on ``--device`` while the
others still train: as soon as a run has exported ``final/``, its rows are evaluated and merged into
``<out>/<name>.json`` (a temporary file, then ``os.replace``), so a call that is killed keeps every
row it finished. A run with a complete ``final/`` is not trained again; an interrupted one resumes
from its last DeepSpeed checkpoint (``--save-steps N`` makes those more frequent).

``--time-budget S`` (seconds from the start): no run is launched with less than ``--launch-margin``
left; at the deadline the running ones are stopped (SIGTERM; the next call resumes them), what
finished is evaluated, the report is written and the exit code is 0; a printed line and the report
name the unfinished runs. The budget covers training only: leave room under the call's hard limit
for the evaluations of the runs that finish last and for the report (rows a hard kill leaves
unevaluated are evaluated by the next call, whose runs are already trained).

Rows are merged by protocol, reducer, ratio, rtd mode and seed; each keeps its own device, date and
commit. A row already there for the same checkpoint, pipeline, ``--limit``, ``--steps`` and
``--override`` is not evaluated again (``--reeval`` forces it). A finished run is never retrained,
whatever ``--steps``/``--override`` say (each row records the recipe its run was trained with):
delete its folder to retrain it. ``<name>.md`` holds one table per protocol and the acceptance
checks, ``<name>.png`` accuracy against visual tokens per image. The last line printed is a
one-line summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval.common import run_metadata  # noqa: E402
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
    "deft_merge=configs/pipeline/deft_merge.yaml",
    "random=configs/pipeline/random.yaml",
    "pool=configs/pipeline/pool.yaml",
]
BASE = "base"  # name of the no-reduction run and of its rows' protocol
LOG_TAIL_LINES = 25
# Rows written before seeds were recorded come from runs trained with the recipe's default seed
# (TrainConfig.seed; configs/train/easyvqa_deft.yaml sets none).
LEGACY_SEED = 0
TERMINATE_GRACE_S = 10.0  # a stopped training run gets this long after SIGTERM before SIGKILL


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
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides of every training run (e.g. stages.0.lr=5e-4)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train every run once per seed; the report shows mean ± std over seeds (default: the recipe's seed)")
    p.add_argument("--save-steps", type=int, default=None, metavar="N",
                   help="save_steps of every training run, so an interrupted run loses little (default: the recipe's)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop at this many seconds from the start: running training is stopped (it resumes next call), "
                        "what finished is evaluated, the report written, exit 0")
    p.add_argument("--launch-margin", type=float, default=120.0, metavar="SECONDS",
                   help="with --time-budget: launch no training run with less than this left")
    p.add_argument("--only", nargs="+", default=None, metavar="REDUCER[@RATIO]", help="run only these (and 'base'); the rest of the JSON is kept")
    p.add_argument("--report-only", action="store_true", help="write the report and plot from the JSON, run nothing")
    p.add_argument("--reeval", action="store_true", help="evaluate rows again even if the JSON has them for the same checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="evaluation device (training runs pick their own)")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds} names a seed twice")
    if args.save_steps is not None and args.save_steps < 1:
        p.error("--save-steps must be at least 1")
    if args.time_budget is not None and not 0 <= args.launch_margin < args.time_budget:
        p.error(f"--launch-margin ({args.launch_margin:g} s) must be in [0, --time-budget ({args.time_budget:g} s))")
    clash = [o for o in args.override if o.partition("=")[0].strip() in ("seed", "output_dir")]
    if clash:
        p.error(f"--override {clash}: use --seeds (the run folders are the sweep's)")
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


def row_seed(row: dict) -> int:
    return row.get("seed", LEGACY_SEED)


def row_key(row: dict) -> tuple:
    """(protocol, reducer, ratio, rtd mode, seed): one row per key in the JSON."""
    return (row["protocol"], row["reducer"], round(float(row["ratio"]), 9), row.get("rtd_mode"), row_seed(row))


def cell_key(row: dict) -> tuple:
    """``row_key`` without the seed: the rows of one report cell."""
    return row_key(row)[:4]


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
    write_json_atomic(path, doc)
    return doc


def write_json_atomic(path: Path, data: dict) -> None:
    """Write a temporary file next to ``path``, then ``os.replace`` it: a reader (or a call killed
    mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Check:
    status: str  # PASS | FAIL | MISSING | INFO
    text: str


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per cell (protocol, reducer, ratio, rtd mode), averaged over its seeds' rows.

    Each keeps the first seed's other fields; ``accuracy`` (every key the rows share) and
    ``tokens_per_image`` are means, ``acc_std`` the sample std of ``accuracy["all"]`` in points (0 for
    one seed), ``n`` the number of seeds and ``seeds`` which. Cells keep the rows' first-seen order.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(cell_key(r), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=row_seed)
        shared = [k for k in rs[0]["accuracy"] if all(k in r["accuracy"] for r in rs)]
        out.append({
            **rs[0],
            "accuracy": {k: statistics.fmean(r["accuracy"][k] for r in rs) for k in shared},
            "tokens_per_image": statistics.fmean(r["tokens_per_image"] for r in rs),
            "acc_std": 100 * statistics.stdev(r["accuracy"]["all"] for r in rs) if len(rs) > 1 else 0.0,
            "n": len(rs),
            "seeds": [row_seed(r) for r in rs],
        })
    return out


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


def fmt_acc(row: dict) -> str:
    """'97.0', or '97.0 ± 1.2' for a cell of several seeds."""
    return f"{acc(row):.1f}" + (f" ± {row['acc_std']:.1f}" if row.get("n", 1) > 1 else "")


def pct_of(row: dict, ref: dict | None) -> float:
    """``row``'s accuracy as % of ``ref``'s (nan without a reference or when it scored 0)."""
    return 100 * acc(row) / acc(ref) if ref is not None and acc(ref) else float("nan")


def fmt_pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def _seeds_note(*rows: dict) -> str:
    """'' when every row is one seed, else '; n=3 vs 2 seeds'."""
    ns = [r.get("n", 1) for r in rows]
    return "" if max(ns) == 1 else "; n=" + " vs ".join(map(str, ns)) + " seeds"


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
    """Every acceptance check the rows allow, computed from each cell's mean over its seeds
    (reducers in ``reducers``' order)."""
    rows = aggregate(rows)
    ref = base_row(rows, base)
    checks: list[Check] = []
    if ref is None:
        checks.append(Check("MISSING", f"no base row (reducer {base!r} at retention 1.0): no % of base can be computed"))
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    for proto in protocols if ref is not None else ():
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
            checks.append(Check("PASS" if pct >= need else "FAIL",
                                f"{what}: {pct:.2f} % ({acc(r):.1f} vs {acc(ref):.1f}{_seeds_note(r, ref)})"))
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
                checks.append(Check("PASS" if d > 0 else "FAIL",
                                    f"{what}: {fmt_acc(mine)} vs {fmt_acc(theirs)} ({d:+.1f} pp{_seeds_note(mine, theirs)})"))
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


def protocol_table(rows: list[dict], protocol: str, ref: dict | None, order: list[str]) -> str:
    """One protocol's table of aggregated ``rows``; with several seeds a cell reads 'mean ± std (% of base) n=k'."""
    ratios = sweep_ratios(rows)
    multi = any(r.get("n", 1) > 1 for r in rows)
    what = "accuracy ± std (% of base) n seeds" if multi else "accuracy (% of base)"
    head = "| reducer | rtd mode | " + " | ".join(f"{ratio_tag(r)}: {what} | {ratio_tag(r)}: tokens/image" for r in ratios) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(ratios)]

    def cell(r: dict) -> str:
        return f"{fmt_acc(r)} ({fmt_pct(pct_of(r, ref))})" + (f" n={r.get('n', 1)}" if multi else "") + f" | {r['tokens_per_image']:.1f}"

    base_cell = cell(ref) if ref is not None else "not evaluated yet | —"
    lines.append(f"| no reduction (base, retention 1) | {(ref or {}).get('rtd_mode') or ''} | " + " | ".join([base_cell] * len(ratios)) + " |")
    for name in order:
        mine = [r for r in rows if r["protocol"] == protocol and r["reducer"] == name]
        modes = list(dict.fromkeys(r.get("rtd_mode") for r in sorted(mine, key=lambda r: -r["ratio"])))
        for mode in modes:
            cells = []
            for ratio in ratios:
                r = next((x for x in mine if x.get("rtd_mode") == mode and math.isclose(x["ratio"], ratio, abs_tol=1e-9)), None)
                cells.append("— | —" if r is None else cell(r))
            lines.append(f"| {name} | {mode or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def type_table(raw: list[dict], order: list[str], base: str) -> str:
    """Accuracy by question type of the base and the trained rows (rtd fast or none): per cell
    'mean ± std [min-max]' over its seeds, in %, and a last line with each type's range over every
    seed of every cell shown, which tells whether a type (not the reducers) carries the spread."""
    keep = [r for r in raw if r["protocol"] in (BASE, "trained") and r.get("rtd_mode") in (None, "fast")]
    types = [k for k in dict.fromkeys(k for r in keep for k in r["accuracy"]) if k != "all"]
    if not keep or not types:
        return ""
    cells: dict[tuple, list[dict]] = {}
    for r in sorted(keep, key=lambda r: (r["protocol"] != BASE, -r["ratio"])):
        cells.setdefault((r["protocol"], r["reducer"], round(float(r["ratio"]), 9)), []).append(r)
    rank = {n: i for i, n in enumerate([base, *order])}
    keys = sorted(cells, key=lambda k: (k[0] != BASE, rank.get(k[1], len(rank)), -k[2]))

    def stat(values: list[float]) -> str:
        v = [100 * x for x in values]
        if len(v) == 1:
            return f"{v[0]:.1f}"
        return f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f} [{min(v):.1f}-{max(v):.1f}]"

    lines = ["| run | ratio | n | all | " + " | ".join(types) + " |", "|---|---|---|---|" + "---|" * len(types)]
    for key in keys:
        rs = cells[key]
        label = "no reduction (base)" if key[0] == BASE else key[1]
        per = [stat([r["accuracy"][t] for r in rs if t in r["accuracy"]]) if any(t in r["accuracy"] for r in rs) else "—"
               for t in types]
        lines.append(f"| {label} | {ratio_tag(key[2])} | {len(rs)} | {stat([r['accuracy']['all'] for r in rs])} | "
                     + " | ".join(per) + " |")
    spread = ", ".join(
        f"{t} {100 * min(vals):.1f}-{100 * max(vals):.1f}"
        for t in types if (vals := [r["accuracy"][t] for r in keep if t in r["accuracy"]])
    )
    lines += ["", f"Range over every run above, by type: {spread}."]
    return "\n".join(lines)


def build_report(
    doc: dict, name: str, base: str, rtd_ratio: float, reducers: list[str],
    thresholds: dict[float, float] = THRESHOLDS, failed: list[str] = (), runs_dir: str = "", unfinished: list[str] = (),
) -> str:
    """The markdown report of ``doc``'s rows (cells: means over seeds); its last line is the one-line summary."""
    raw = doc["rows"]
    if not raw:
        raise ValueError("the results have no rows yet; run the sweep (without --report-only) first")
    rows = aggregate(raw)
    ref = base_row(rows, base)
    order = reducer_order(rows, reducers)
    limits = sorted({str(r.get("questions")) for r in raw})
    commits = sorted({r["commit"] for r in raw})
    devices = sorted({r["device"] for r in raw})
    seeds = sorted({row_seed(r) for r in raw})
    base_raw = sorted((r for r in raw if r["protocol"] == BASE and r["reducer"] == base), key=row_seed)
    base_sha = {row_seed(r): r.get("checkpoint_sha") for r in base_raw}
    stale = [r for r in raw if r["protocol"] == "training_free" and row_seed(r) in base_sha
             and r.get("checkpoint_sha") != base_sha[row_seed(r)]]
    out = [
        f"# easy-VQA: reducer x retention ratio, training-free and trained ({name})",
        "",
        "Command(s):",
        "",
        *[f"    {c}" for c in doc["commands"]],
        "",
        f"{len(raw)} rows measured {_range([r['date'] for r in raw])} on {', '.join(devices)}; "
        f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}; "
        f"{' / '.join(limits)} test questions per row{' (MIXED: compare with care)' if len(limits) > 1 else ''}.",
    ]
    if ref is not None:
        ckpts = ", ".join(f"`{r['checkpoint']}` ({r.get('checkpoint_sha')})" for r in base_raw)
        out.append(f"Base: reducer `{base}`'s pipeline at retention 1.0 ({ref['tokens_per_image']:.1f} tokens/image), "
                   f"{fmt_acc(ref)} % exact match, checkpoint{'s' if len(base_raw) > 1 else ''} {ckpts}.")
    else:
        out.append(f"Base: no row yet (reducer `{base}` at retention 1.0): the % of base is missing.")
    if len(seeds) > 1 or any(r["n"] > 1 for r in rows):
        out.append(f"Seeds {', '.join(map(str, seeds))}: each cell is the mean ± sample std over the seeds it has "
                   "(n = how many); % of base is the cell's mean / the base's mean; the checks use the means.")
    else:
        out.append(f"Seed {seeds[0]} (one training run per cell).")
    out.append("Cells: exact-match accuracy % (in parentheses % of the base's accuracy); tokens/image: visual tokens each image gives the LLM.")
    if stale:
        out.append(f"Note: {len(stale)} training-free row(s) were evaluated on a base checkpoint other than their seed's base row's "
                   f"(trained on another machine?): {sorted({str(r.get('checkpoint_sha')) for r in stale})}.")
    for proto in PROTOCOLS:
        if any(r["protocol"] == proto for r in rows):
            out += ["", f"## {PROTOCOL_TITLES[proto]}", "", protocol_table(rows, proto, ref, order)]
    by_type = type_table(raw, order, base)
    if by_type:
        out += ["", "## By question type (base and trained, rtd fast)", "",
                "Each cell: mean ± sample std [min-max] over its seeds, % exact match.", "", by_type]
    checks = acceptance_checks(raw, base, rtd_ratio, thresholds, reducers)
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
            of_base = f"{fmt_pct(pct_of(r, ref))}% of base" if ref is not None else "no base yet"
            lowest.append(f"{proto} {base}@{ratio_tag(r['ratio'])} {acc(r):.1f}% ({of_base})")
    if failed:
        out += ["", f"**Training runs that FAILED in the last call** (logs: {runs_dir}/<run>.log): {', '.join(failed)}"]
    if unfinished:
        out += ["", f"**Training runs unfinished at the last call's time budget** (the same command resumes them from "
                    f"their last checkpoint): {', '.join(unfinished)}"]
    summary = (f"{name}: " + (f"base {acc(ref):.1f}%; " if ref is not None else "no base row yet; ")
               + ("; ".join(lowest) + "; " if lowest else "")
               + f"acceptance {n['PASS']} pass, {n['FAIL']} fail, {n['MISSING']} missing"
               + (f"; {len(failed)} training run(s) FAILED" if failed else "")
               + (f"; {len(unfinished)} training run(s) unfinished" if unfinished else ""))
    out += ["", summary]
    return "\n".join(out) + "\n"


def plot_sweep(rows: list[dict], path: Path, base: str, reducers: list[str], title: str) -> None:
    """Two panels (training-free, trained): mean accuracy over seeds vs tokens per image, one line per
    reducer, error bars one sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(rows)
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
                ax.errorbar([r["tokens_per_image"] for r in line], [acc(r) for r in line], yerr=[r["acc_std"] for r in line],
                            fmt="o-", color=colors[name], capsize=3, label=label)
            extra = [r for r in rows if r["protocol"] == proto and r["reducer"] == name and r not in line]
            for marker, mode in zip("^sDvP", sorted({r.get("rtd_mode") for r in extra}, key=str)):
                pts = [r for r in extra if r.get("rtd_mode") == mode]
                ax.errorbar([r["tokens_per_image"] for r in pts], [acc(r) for r in pts], yerr=[r["acc_std"] for r in pts],
                            fmt=marker, color=colors[name], capsize=3, linestyle="none", label=f"{name} (rtd {mode})")
            for r in line + extra:
                ax.annotate(ratio_tag(r["ratio"]), (r["tokens_per_image"], acc(r)), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        if ref is not None:
            ax.axhline(acc(ref), color="k", linestyle="--", linewidth=1, label=f"no reduction ({ref['tokens_per_image']:.0f} tokens)")
        ax.set_title(PROTOCOL_TITLES[proto].split(" (")[0])
        ax.set_xlabel("visual tokens per image")
        ax.grid(alpha=0.3)
    handles: dict[str, object] = {}  # one legend for both panels, beside them (inside it hid the points)
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[0].set_ylabel("exact-match accuracy (%, mean over seeds ± std)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Run:
    """A training run: a seed's base, or one reducer at one ratio and seed (trained protocol)."""

    name: str  # "base" or "<reducer>@<ratio>", + "#s<seed>" when seeds are named
    dir: Path
    pipeline: dict  # resolved config, written to dir/pipeline.yaml for the training run
    source: Path  # the reducer's pipeline YAML it was resolved from
    ratio: float
    seed: int = LEGACY_SEED
    pass_seed: bool = False  # give the run `seed=<seed>` (else it trains with the recipe's, which is `seed`)

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
    seed: int = LEGACY_SEED

    @property
    def label(self) -> str:
        return f"{self.protocol} {self.reducer}@{ratio_tag(self.ratio)} seed {self.seed}"


def is_trained(run_dir: Path) -> bool:
    """``final/`` is complete: it has ``config.json`` and every file of the last stage's export, at the
    same size (train.py copies the export into ``final/`` file by file: a run stopped during the copy
    leaves a partial one, which the next call's ``--resume`` copies again)."""
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        return False
    stages = [(int(p.parent.name[5:].split("_")[0]), p) for p in run_dir.glob("stage*_*/export")
              if p.parent.name[5:].split("_")[0].isdigit()]
    if not stages:
        return True
    export = max(stages)[1]
    return all((final / f.relative_to(export)).is_file() and (final / f.relative_to(export)).stat().st_size == f.stat().st_size
               for f in export.rglob("*") if f.is_file())


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


def plan(args: argparse.Namespace, reducers: dict[str, Path], recipe_seed: int = LEGACY_SEED) -> tuple[dict[str, Run], list[EvalItem]]:
    """Every run and evaluation of the sweep; all configs are resolved (every error at once) first.

    Items come in launch order: every seed's base, then the trained runs seed by seed.
    """
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

    seeds = list(args.seeds) if args.seeds else [recipe_seed]
    named = len(seeds) > 1 or seeds[0] != recipe_seed  # else the folders of a one-seed sweep keep their names

    def suffix(seed: int) -> str:
        return f"#s{seed}" if named else ""

    runs: dict[str, Run] = {}
    items: list[EvalItem] = []
    base_cfg, base_src = resolved[args.base, 1.0], reducers[args.base]
    base_mode = configured_rtd_mode(base_cfg)
    for seed in seeds:
        b = BASE + suffix(seed)
        runs[b] = Run(b, runs_dir / b, base_cfg, base_src, 1.0, seed, named)
        items.append(EvalItem(BASE, args.base, 1.0, (base_mode,), b, None, base_cfg, base_src, seed))
    for seed in seeds:
        for name, path in reducers.items():
            for ratio in args.ratios:
                cfg = resolved[name, ratio]
                mode = configured_rtd_mode(cfg)
                modes = tuple(args.rtd_modes) if mode is not None and math.isclose(ratio, args.rtd_ratio, abs_tol=1e-9) else (mode,)
                tag = f"{name}@{ratio_tag(ratio)}"
                if "training_free" in args.protocols:
                    tf_yaml = runs_dir / "training_free" / f"{tag}.yaml"
                    items.append(EvalItem("training_free", name, ratio, modes, BASE + suffix(seed), tf_yaml, cfg, path, seed))
                if "trained" in args.protocols:
                    run = tag + suffix(seed)
                    runs[run] = Run(run, runs_dir / "trained" / run, cfg, path, ratio, seed, named)
                    items.append(EvalItem("trained", name, ratio, modes, run, None, cfg, path, seed))
    return runs, items


def pending_items(items: list[EvalItem], runs: dict[str, Run], rows: list[dict], args, sel) -> list[EvalItem]:
    """Items to evaluate now: selected ones whose rows are missing or stale (another checkpoint,
    pipeline, ``--limit``, ``--steps`` or ``--override``), all selected ones with ``--reeval``, and
    each seed's base whenever its row is stale (every row of that seed is compared with it)."""
    index = {row_key(r): r for r in rows}

    def current(it: EvalItem) -> bool:
        sha = checkpoint_sha(runs[it.run].dir)  # None when the checkpoint is not here: trust the row
        rs = [index.get((it.protocol, it.reducer, round(it.ratio, 9), m, it.seed)) for m in it.modes]
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
    """Runs ``python -m llava_deft.train`` subprocesses (thread-safe: one call of ``train_and_report``
    per worker thread) and sorts each run into done, ``failed`` or ``unfinished``.

    With a ``deadline`` (``time.monotonic()`` seconds) no run is launched with less than
    ``args.launch_margin`` seconds left, and ``stop()`` (called by the sweep at the deadline, or on
    the way out) ends the running ones: those are unfinished, not failed.
    """

    def __init__(self, args: argparse.Namespace, n_runs: int, deadline: float | None = None):
        self.args = args
        self.deadline = deadline
        self.margin = args.launch_margin if deadline is not None else 0.0
        self.procs: set[subprocess.Popen] = set()
        self.failed: dict[str, str] = {}
        self.unfinished: dict[str, str] = {}
        self.stopping = False  # set by stop(): runs it ends are unfinished, not failed
        self.stop_reason = "the sweep stopped"
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

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def command(self, run: Run) -> list[str]:
        cmd = [sys.executable, "-m", "llava_deft.train", "--config", str(Path(self.args.train_config).resolve()),
               "--output_dir", str(run.dir), "--resume", f"num_workers={self.args.num_workers}"]
        if self.args.steps is not None:
            cmd += [f"stages.{i}.max_steps={self.args.steps}" for i in range(self.n_stages)]
        if self.args.save_steps is not None:
            cmd.append(f"save_steps={self.args.save_steps}")
        if run.pass_seed:
            cmd.append(f"seed={run.seed}")
        return cmd + list(self.args.override) + [f"model.pipeline={run.pipeline_yaml}"]

    def train(self, run: Run) -> int | None:
        """Train one run (``--resume``: an interrupted run continues from its last checkpoint); its exit
        code, None when ``stop()`` came first and it was not started."""
        write_pipeline_yaml(run.pipeline_yaml, run.pipeline, run.source, run.ratio)
        cmd = self.command(run)
        with run.log.open("a") as fh:
            with self.lock:  # no run starts after stop() has collected the running ones
                if self.stopping:
                    return None
                fh.write(f"$ {shlex.join(cmd)}\n")
                env = dict(self.env)
                if len(self.gpus) > 1:
                    env["CUDA_VISIBLE_DEVICES"] = self.gpus[self.launched % len(self.gpus)]
                    fh.write(f"# CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}\n")
                fh.flush()
                self.launched += 1
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
                self.procs.add(proc)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return rc

    def train_and_report(self, run: Run) -> str:
        """``train`` in a worker thread: 'done', 'failed' (recorded with the log's tail) or 'unfinished'."""
        left = self.time_left()
        if self.stopping or left < self.margin:
            why = self.stop_reason if self.stopping else f"not started: {max(left, 0):.0f} s left < --launch-margin {self.margin:g} s"
            return self._finish(run, "unfinished", why)
        try:
            rc = self.train(run)
        except OSError as e:  # e.g. the interpreter could not be started
            return self._finish(run, "failed", f"{type(e).__name__}: {e}")
        if rc is None:
            return self._finish(run, "unfinished", f"not started: {self.stop_reason}")
        if rc == 0 and is_trained(run.dir):
            return self._finish(run, "done", "")
        if self.stopping:
            return self._finish(run, "unfinished", f"stopped ({self.stop_reason}); resumes from its last checkpoint")
        return self._finish(run, "failed", f"exit code {rc}" if rc else f"exit code 0 but no complete {run.dir}/final")

    def _finish(self, run: Run, status: str, why: str) -> str:
        with self.lock:
            if status == "failed":
                self.failed[run.name] = why
            elif status == "unfinished":
                self.unfinished[run.name] = why
        if status == "failed":
            tqdm.write(f"[sweep] run {run.name} FAILED ({why}); last lines of {run.log}:\n{log_tail(run.log)}")
        self.bar.update(1)
        return status

    def stop(self, reason: str = "the sweep stopped", grace: float = TERMINATE_GRACE_S) -> None:
        """Launch nothing more; SIGTERM the running runs, SIGKILL those still alive after ``grace`` s."""
        with self.lock:
            if not self.stopping:
                self.stopping, self.stop_reason = True, reason
            procs = list(self.procs)
        if procs:
            tqdm.write(f"[sweep] {reason}: stopping {len(procs)} training run(s)")
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()

    def terminate(self) -> None:
        """``stop()`` and close the progress bar (on the way out)."""
        self.stop()
        self.bar.close()


def _load_recipe(path: str):
    from llava_deft.config import load_train_config

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
        desc = f"{it.protocol} {it.reducer}@{ratio_tag(it.ratio)}" + (f" rtd {mode}" if mode else "") + f" s{it.seed}"
        res = evaluate(model, dataset, args.batch_size, args.max_new_tokens, device, desc=desc)
        rows.append({
            "protocol": it.protocol, "reducer": it.reducer, "ratio": it.ratio, "rtd_mode": mode, "seed": it.seed,
            **res, "questions": res["counts"]["all"], "limit": args.limit, "steps": args.steps,
            "overrides": list(args.override),
            "pipeline": model.pipeline.names, "pipeline_config": it.pipeline,
            "checkpoint": str(ckpt), "checkpoint_sha": sha,
            "recipe": {"train_config": args.train_config, "stages": recipe.get("stages"), "seed": recipe.get("seed"),
                       "save_steps": recipe.get("save_steps")},
            **run_metadata(device),
        })
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training runs share the GPU
    return rows


def make_evaluator(args: argparse.Namespace) -> Callable[[EvalItem, dict[str, Run]], list[dict]]:
    """``evaluate(item, runs) -> rows`` on the test split (first ``--limit`` questions) on ``--device``."""
    from llava_deft.data import EasyVQADataset

    dataset = EasyVQADataset("test")
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    device = torch.device(args.device)
    return lambda it, runs: evaluate_item(it, runs, dataset, args, device)


def train_and_evaluate(
    todo: list[EvalItem], to_train: list[Run], ready: set[str], launcher: Launcher,
    evaluate: Callable[[EvalItem], list[dict]], save: Callable[[list[dict]], object], parallel: int,
) -> list[EvalItem]:
    """Train ``to_train`` (``parallel`` at a time, in order) in worker threads and, in this thread,
    evaluate each item of ``todo`` as soon as its run is usable (in ``ready`` or trained here), saving
    its rows at once. At ``launcher.deadline`` the running runs are stopped; what finished is still
    evaluated. Returns the items not evaluated (their run failed or is unfinished)."""
    usable = set(ready)
    left = list(todo)
    timer = None
    if launcher.deadline is not None:
        timer = threading.Timer(max(0.0, launcher.time_left()), launcher.stop, kwargs={"reason": "time budget reached"})
        timer.daemon = True
        timer.start()
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="train")
    try:
        futures = {pool.submit(launcher.train_and_report, r): r.name for r in to_train}
        running = set(futures)
        while True:
            for f in [f for f in running if f.done()]:
                running.discard(f)
                if f.result() == "done":
                    usable.add(futures[f])
            it = next((it for it in left if it.run in usable), None)
            if it is not None:
                left.remove(it)
                save(evaluate(it))
            elif not running:
                return left
            else:
                wait(running, return_when=FIRST_COMPLETED)
    finally:
        if timer is not None:
            timer.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        launcher.terminate()


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)  # runs whose training failed
    unfinished: list[str] = field(default_factory=list)  # runs stopped or not started (time budget)


def run_sweep(args, runs: dict[str, Run], items: list[EvalItem], sel, command: str, deadline: float | None = None) -> Outcome:
    """Train and evaluate what is pending (incrementally, see ``train_and_evaluate``)."""
    json_path = Path(args.out) / f"{args.name}.json"
    todo = pending_items(items, runs, load_results(json_path)["rows"], args, sel)
    save_rows(json_path, [], command)
    need = [runs[n] for n in dict.fromkeys(it.run for it in todo)]  # the bases first, then seed by seed
    for run in need:
        if is_trained(run.dir):
            warn_if_stale(run)
    to_train = [r for r in need if not is_trained(r.dir)]
    print(f"[sweep] {len(todo)} model(s) to evaluate; {len(to_train)} training run(s) to do "
          f"({', '.join(r.name for r in to_train) or 'none'}), {args.parallel} at a time, logs in {args.runs}/<run>.log"
          + (f"; time budget {args.time_budget:g} s" if deadline is not None else ""))
    if not todo:
        return Outcome()

    evaluator = None

    def evaluate(it: EvalItem) -> list[dict]:  # the test set is loaded once training has been launched
        nonlocal evaluator
        if evaluator is None:
            evaluator = make_evaluator(args)
        return evaluator(it, runs)

    launcher = Launcher(args, len(to_train), deadline)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main else None
    try:
        left = train_and_evaluate(todo, to_train, {r.name for r in need if r not in to_train}, launcher,
                                  evaluate, lambda rows: save_rows(json_path, rows), args.parallel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    out = Outcome(sorted(launcher.failed), [r.name for r in to_train if r.name in launcher.unfinished])
    skipped = [it.label for it in left if it.run in launcher.failed]
    if skipped:
        print(f"[sweep] not evaluated because their training run failed: {', '.join(skipped)}")
    if out.unfinished:
        print(f"[sweep] unfinished (time budget; the same command resumes them): "
              + ", ".join(f"{n} ({launcher.unfinished[n]})" for n in out.unfinished))
    return out


def _sigterm(signum, frame):  # `timeout` sends SIGTERM: stop the training subprocesses too (see finally)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or only the report); 1 when a training run failed, else 0 (unfinished runs included)."""
    start = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    deadline = None if args.time_budget is None else start + args.time_budget
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
            recipe = _load_recipe(args.train_config)
            runs, items = plan(args, reducers, recipe.seed)
        elif not json_path.is_file():
            raise FileNotFoundError(f"no results at {json_path}; run the sweep without --report-only first")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"deft_sweep: {e}") from None
    outcome = Outcome() if args.report_only else run_sweep(args, runs, items, sel, command, deadline)
    doc = load_results(json_path)
    if not doc["rows"]:
        print(f"[sweep] {json_path} has no rows yet: no report"
              + (f"; unfinished: {', '.join(outcome.unfinished)}" if outcome.unfinished else "")
              + (f"; failed: {', '.join(outcome.failed)}" if outcome.failed else ""))
        return 1 if outcome.failed else 0
    if base_row(doc["rows"], args.base) is None:
        print(f"[sweep] warning: {json_path} has no base row (reducer {args.base!r} at retention 1.0) yet: no % of base")
    md = build_report(doc, args.name, args.base, args.rtd_ratio, list(reducers), failed=outcome.failed,
                      runs_dir=args.runs, unfinished=outcome.unfinished)
    (Path(args.out) / f"{args.name}.md").write_text(md)
    plot_sweep(doc["rows"], Path(args.out) / f"{args.name}.png", args.base, list(reducers), f"easy-VQA: {args.name}")
    print(md, end="")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
