"""A sweep's report from its rows: cells (mean ± std over seeds), acceptance checks (thresholds as % of
the no-reduction base; "A beats B" by a paired bootstrap CI over questions and seeds), tables by
protocol and question type, and the plot of accuracy against kept tokens and against time to first token.

A row is one evaluation: ``protocol`` (``base`` | ``training_free`` | ``trained`` | ``finetuned``), ``reducer``,
``ratio``, ``rtd_mode``, ``seed``, ``accuracy`` {"all", <type>...} in [0, 1], ``tokens_per_image``
(media tokens per media item that reach the LLM), ``correct`` ("0"/"1" per question, in the order
``ids_digest`` names), ``ttft_ms`` and its metadata (device, date, commit, checkpoint...).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stats import paired_bootstrap

BASE = "base"  # the no-reduction run's name and its rows' protocol
PROTOCOLS = ("training_free", "trained", "finetuned")
DEFAULT_PROTOCOLS = ("training_free", "trained")  # a spec without `protocols:`
TRAINED_WITH = ("trained", "finetuned")  # protocols whose checks decide (the reducer was in the training loop)
PRIOR = "prior"  # the question prior's rows (llava_deft/evaluation/prior.py): the text alone, no media
REFERENCES = (BASE, PRIOR)  # protocols of reference rows, not reducer cells
PROTOCOL_TITLES = {
    "training_free": "Training-free (the base checkpoint, reducer inserted at evaluation)",
    "trained": "Trained (reducer in the training loop, same recipe)",
    "finetuned": "Fine-tuned from the base (its seed's base checkpoint trained on with the reducer in the loop)",
}
LEGACY_SEED = 0  # rows written before seeds were recorded come from the recipe's default seed


@dataclass(frozen=True)
class Check:
    status: str  # PASS | FAIL | MISSING | INFO
    text: str


@dataclass(frozen=True)
class ReportSpec:
    """What the report needs to know beyond the rows."""

    name: str
    method: str  # the reducer the checks are about (its pipeline at 1.0 trained the base)
    reducers: tuple[str, ...]  # report order
    thresholds: dict[float, float]  # ratio -> % of base the method must keep
    beats: tuple[str, ...]  # reducers the method must beat (CI of the difference above zero)
    ablations: dict[str, str]  # ablation -> the reducer it is an ablation of
    rtd_ratio: float = 0.11
    title: str = ""
    resamples: int = 10_000
    confidence: float = 0.95


def ratio_tag(ratio: float) -> str:
    """0.482 -> '0.482', 1.0 -> '1' (run folder names, row labels)."""
    return format(ratio, "g")


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


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per cell (protocol, reducer, ratio, rtd mode), averaged over its seeds' rows.

    Each keeps the first seed's other fields; ``accuracy`` (every key the rows share),
    ``tokens_per_image`` and ``ttft_ms`` (where every seed has one) are means, ``acc_std`` the sample
    std of ``accuracy["all"]`` in points (0 for one seed), ``n`` the number of seeds, ``seeds`` which and
    ``members`` the rows themselves. Cells keep the rows' first-seen order.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(cell_key(r), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=row_seed)
        shared = [k for k in rs[0]["accuracy"] if all(k in r["accuracy"] for r in rs)]
        ttft = [r.get("ttft_ms") for r in rs]
        out.append({
            **rs[0],
            "accuracy": {k: statistics.fmean(r["accuracy"][k] for r in rs) for k in shared},
            "tokens_per_image": statistics.fmean(r["tokens_per_image"] for r in rs),
            "ttft_ms": statistics.fmean(ttft) if all(t is not None for t in ttft) else None,
            "acc_std": 100 * statistics.stdev(r["accuracy"]["all"] for r in rs) if len(rs) > 1 else 0.0,
            "n": len(rs),
            "seeds": [row_seed(r) for r in rs],
            "members": rs,
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
    ns = [r.get("n", 1) for r in rows]
    return "" if max(ns) == 1 else "; n=" + " vs ".join(map(str, ns)) + " seeds"


def sweep_ratios(rows: list[dict], protocol: str | None = None) -> list[float]:
    """Ratios present in the rows (of one protocol), largest first; the base's 1.0 excluded."""
    rs = {round(r["ratio"], 9) for r in rows if r["protocol"] not in REFERENCES and protocol in (None, r["protocol"])}
    return sorted(rs, reverse=True)


def reducer_order(rows: list[dict], preferred: list[str] | tuple[str, ...]) -> list[str]:
    seen = {r["reducer"] for r in rows if r["protocol"] not in REFERENCES}
    return [n for n in dict.fromkeys(preferred) if n in seen] + sorted(seen - set(preferred))


# ---------------------------------------------------------------------------------- paired comparison
def paired_scores(mine: dict, theirs: dict) -> tuple[np.ndarray, np.ndarray, list[int]] | str:
    """The (seeds, questions) 0/1 arrays of two cells over the seeds both have, or why they cannot be paired."""
    a = {row_seed(r): r for r in mine["members"]}
    b = {row_seed(r): r for r in theirs["members"]}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "no seed in common"
    if any("correct" not in x[s] for s in seeds for x in (a, b)):
        return "rows without per-question scores"
    digests = {x[s].get("ids_digest") for s in seeds for x in (a, b)}
    lengths = {len(x[s]["correct"]) for s in seeds for x in (a, b)}
    if len(digests) > 1 or len(lengths) > 1:
        return "rows scored on different questions"
    to = lambda rs: np.array([[c == "1" for c in rs[s]["correct"]] for s in seeds], dtype=np.float64)
    return to(a), to(b), seeds


def compare(mine: dict, theirs: dict, spec: ReportSpec) -> tuple[str, str]:
    """(status, text) of "mine beats theirs": PASS when the paired bootstrap CI of the accuracy
    difference lies above zero."""
    pair = paired_scores(mine, theirs)
    d_mean = acc(mine) - acc(theirs)
    head = f"{fmt_acc(mine)} vs {fmt_acc(theirs)}"
    if isinstance(pair, str):
        return "FAIL" if d_mean <= 0 else "MISSING", f"{head} ({d_mean:+.1f} pp; no CI: {pair})"
    a, b, seeds = pair
    cmp = paired_bootstrap(a, b, resamples=spec.resamples, confidence=spec.confidence)
    ci = (f"{100 * cmp.diff:+.2f} pp, {100 * cmp.confidence:g} % CI [{100 * cmp.low:+.2f}, {100 * cmp.high:+.2f}] "
          f"over {a.shape[1]} questions x {len(seeds)} seed(s)")
    status = "PASS" if cmp.beats else "FAIL"
    if not cmp.beats and cmp.high > 0:
        ci += "; not decided (the CI contains 0)"
    return status, f"{head}: {ci}"


def acceptance_checks(rows: list[dict], spec: ReportSpec) -> list[Check]:
    """Every acceptance check the rows allow (cells: means over seeds)."""
    rows = aggregate(rows)
    method = spec.method
    ref = base_row(rows, method)
    checks: list[Check] = []
    if ref is None:
        checks.append(Check("MISSING", f"no base row (reducer {method!r} at retention 1.0): no % of base can be computed"))
    prior = next((r for r in rows if r["protocol"] == PRIOR), None)
    if ref is not None and prior is not None:
        status, text = compare(ref, prior, spec)
        hint = ("" if status == "PASS" else
                "; the base does not use the media beyond what the question text says, so this data cannot "
                "rank reducers (train the base longer or use a task it learns)")
        checks.append(Check(status, f"the base beats the question prior (text only, no media): {text}{hint}"))
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    for proto in protocols if ref is not None else ():
        ratios = sweep_ratios(rows, proto)
        for ratio, need in sorted(spec.thresholds.items(), reverse=True):
            if not any(math.isclose(ratio, x, abs_tol=1e-9) for x in ratios):
                continue
            r = main_row(rows, proto, method, ratio)
            what = f"{proto}: {method} keeps >= {need:g} % of base accuracy at {ratio_tag(ratio)}"
            if r is None:
                checks.append(Check("MISSING", f"{what}: no row"))
                continue
            pct = pct_of(r, ref)
            if math.isnan(pct):
                checks.append(Check("FAIL", f"{what}: no % of base (the base scored 0)"))
                continue
            short = "" if pct >= need else f", {need - pct:.2f} points short"
            checks.append(Check("PASS" if pct >= need else "FAIL",
                                f"{what}: {pct:.2f} % ({acc(r):.1f} vs {acc(ref):.1f}{_seeds_note(r, ref)}{short})"))
    for proto in protocols:
        status_of = (lambda s: s) if proto in TRAINED_WITH else (lambda s: "INFO")
        for ratio in sweep_ratios(rows, proto):
            mine = main_row(rows, proto, method, ratio)
            for other in spec.beats:
                theirs = main_row(rows, proto, other, ratio)
                what = f"{proto}: {method} beats {other} at {ratio_tag(ratio)}"
                if mine is None or theirs is None:
                    if proto in TRAINED_WITH:
                        checks.append(Check("MISSING", f"{what}: no row for {method if mine is None else other}"))
                    continue
                status, text = compare(mine, theirs, spec)
                checks.append(Check(status_of(status), f"{what}: {text}"))
    for proto in protocols:
        for name in reducer_order(rows, (method, *spec.reducers)):
            found = {r.get("rtd_mode"): r for r in find_rows(rows, proto, name, spec.rtd_ratio)}
            if "fast" not in found or len(found) < 2:
                continue
            fast = found["fast"]
            parts = [
                f"{m} - fast = {acc(r) - acc(fast):+.1f} pp ({r['tokens_per_image']:.1f} vs {fast['tokens_per_image']:.1f} tokens)"
                for m, r in found.items() if m != "fast"
            ]
            checks.append(Check("INFO", f"{proto}: rtd modes of {name} at {ratio_tag(spec.rtd_ratio)}: " + "; ".join(parts)))
    for proto in protocols:
        for abl, of in spec.ablations.items():
            parts = []
            for ratio in sweep_ratios(rows, proto):
                a, b = main_row(rows, proto, of, ratio), main_row(rows, proto, abl, ratio)
                if a is not None and b is not None:
                    _, text = compare(a, b, spec)
                    parts.append(f"{ratio_tag(ratio)}: {text}")
            if parts:
                checks.append(Check("INFO", f"{proto}: ablation {of} - {abl}: " + "; ".join(parts)))
    return checks


# ---------------------------------------------------------------------------------- tables
def _range(values: list[str]) -> str:
    vals = sorted(set(values))
    return vals[0] if len(vals) == 1 else f"{vals[0]} to {vals[-1]}"


def _ms(row: dict) -> str:
    return "—" if row.get("ttft_ms") is None else f"{row['ttft_ms']:.1f}"


def protocol_table(rows: list[dict], protocol: str, ref: dict | None, order: list[str]) -> str:
    """One protocol's table of aggregated ``rows``; a cell reads 'mean ± std (% of base) n=k | tokens | TTFT'."""
    ratios = sweep_ratios(rows)
    multi = any(r.get("n", 1) > 1 for r in rows)
    what = "accuracy ± std (% of base) n seeds" if multi else "accuracy (% of base)"
    head = "| reducer | rtd mode | " + " | ".join(
        f"{ratio_tag(r)}: {what} | {ratio_tag(r)}: tokens/item | {ratio_tag(r)}: TTFT ms" for r in ratios) + " |"
    lines = [head, "|---|---|" + "---|---|---|" * len(ratios)]

    def cell(r: dict) -> str:
        return (f"{fmt_acc(r)} ({fmt_pct(pct_of(r, ref))})" + (f" n={r.get('n', 1)}" if multi else "")
                + f" | {r['tokens_per_image']:.1f} | {_ms(r)}")

    base_cell = cell(ref) if ref is not None else "not evaluated yet | — | —"
    lines.append(f"| no reduction (base, retention 1) | {(ref or {}).get('rtd_mode') or ''} | " + " | ".join([base_cell] * len(ratios)) + " |")
    for name in order:
        mine = [r for r in rows if r["protocol"] == protocol and r["reducer"] == name]
        modes = list(dict.fromkeys(r.get("rtd_mode") for r in sorted(mine, key=lambda r: -r["ratio"])))
        for mode in modes:
            cells = []
            for ratio in ratios:
                r = next((x for x in mine if x.get("rtd_mode") == mode and math.isclose(x["ratio"], ratio, abs_tol=1e-9)), None)
                cells.append("— | — | —" if r is None else cell(r))
            lines.append(f"| {name} | {mode or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def type_table(raw: list[dict], order: list[str], base: str) -> str:
    """Accuracy by question type of the base and the trained rows (rtd fast or none): per cell
    'mean ± std [min-max]' over its seeds, in %, and a last line with each type's range."""
    keep = [r for r in raw if r["protocol"] in (PRIOR, BASE, *TRAINED_WITH) and r.get("rtd_mode") in (None, "fast")]
    types = [k for k in dict.fromkeys(k for r in keep for k in r["accuracy"]) if k != "all"]
    if not keep or not types:
        return ""
    cells: dict[tuple, list[dict]] = {}
    first = {PRIOR: 0, BASE: 1}
    for r in sorted(keep, key=lambda r: (first.get(r["protocol"], 2), -r["ratio"])):
        cells.setdefault((r["protocol"], r["reducer"], round(float(r["ratio"]), 9)), []).append(r)
    rank = {n: i for i, n in enumerate([base, *order])}
    keys = sorted(cells, key=lambda k: (first.get(k[0], 2), rank.get(k[1], len(rank)), -k[2]))

    def stat(values: list[float]) -> str:
        v = [100 * x for x in values]
        if len(v) == 1:
            return f"{v[0]:.1f}"
        return f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f} [{min(v):.1f}-{max(v):.1f}]"

    lines = ["| run | ratio | n | all | " + " | ".join(types) + " |", "|---|---|---|---|" + "---|" * len(types)]
    for key in keys:
        rs = cells[key]
        label = {BASE: "no reduction (base)", PRIOR: "question prior (text only)",
                 "finetuned": f"{key[1]} (fine-tuned)"}.get(key[0], key[1])
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


def build_report(doc: dict, spec: ReportSpec, failed: list[str] = (), runs_dir: str = "",
                 unfinished: list[str] = ()) -> str:
    """The markdown report of ``doc``'s rows (cells: means over seeds); its last line is the one-line summary."""
    raw = doc["rows"]
    if not raw:
        raise ValueError("the results have no rows yet; run the sweep (not only its report) first")
    base = spec.method
    rows = aggregate(raw)
    ref = base_row(rows, base)
    order = reducer_order(rows, spec.reducers)
    limits = sorted({str(r.get("questions")) for r in raw})
    commits = sorted({str(r.get("commit")) for r in raw})
    devices = sorted({str(r.get("device")) for r in raw})
    seeds = sorted({row_seed(r) for r in raw})
    base_raw = sorted((r for r in raw if r["protocol"] == BASE and r["reducer"] == base), key=row_seed)
    base_sha = {row_seed(r): r.get("checkpoint_sha") for r in base_raw}
    stale = [r for r in raw if r["protocol"] == "training_free" and row_seed(r) in base_sha
             and r.get("checkpoint_sha") != base_sha[row_seed(r)]]
    out = [
        f"# {spec.title or doc.get('data', 'sweep')}: reducer x retention ratio, "
        + ", ".join(p.replace("_", "-") for p in PROTOCOLS if any(r["protocol"] == p for r in raw)) + f" ({spec.name})",
        "",
        "Command(s):",
        "",
        *[f"    {c}" for c in doc["commands"]],
        "",
        f"{len(raw)} rows measured {_range([str(r.get('date')) for r in raw])} on {', '.join(devices)}; "
        f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}; "
        f"{' / '.join(limits)} test questions per row{' (MIXED: compare with care)' if len(limits) > 1 else ''}.",
    ]
    if ref is not None:
        ckpts = ", ".join(f"`{r.get('checkpoint')}` ({r.get('checkpoint_sha')})" for r in base_raw)
        out.append(f"Base: reducer `{base}`'s pipeline at retention 1.0 ({ref['tokens_per_image']:.1f} tokens/item), "
                   f"{fmt_acc(ref)} % exact match, checkpoint{'s' if len(base_raw) > 1 else ''} {ckpts}.")
    else:
        out.append(f"Base: no row yet (reducer `{base}` at retention 1.0): the % of base is missing.")
    if len(seeds) > 1 or any(r["n"] > 1 for r in rows):
        out.append(f"Seeds {', '.join(map(str, seeds))}: each cell is the mean ± sample std over the seeds it has "
                   "(n = how many); % of base is the cell's mean / the base's mean.")
    else:
        out.append(f"Seed {seeds[0]} (one training run per cell).")
    ttft = next((r for r in raw if r.get("ttft_ms") is not None), None)
    out.append("Cells: exact-match accuracy % (in parentheses % of the base's accuracy); tokens/item: media tokens each "
               "media item gives the LLM; TTFT: median time to first token (encoders + pipeline + prefill)"
               + (f" at batch {ttft.get('ttft_batch')} on {ttft.get('device')}" if ttft else " (not measured)") + ".")
    shared = [r for r in raw if r.get("ttft_ms") is not None and r.get("ttft_concurrent_trainings")]
    if shared:
        out.append(f"Note: the TTFT of {len(shared)} of {sum(r.get('ttft_ms') is not None for r in raw)} rows was "
                   f"measured while up to {max(r['ttft_concurrent_trainings'] for r in shared)} training runs shared "
                   "the device, so its differences between rows are contention, not reducer cost; time reducers on an "
                   "idle device (`eval/bench_decode.py`).")
    if stale:
        out.append(f"Note: {len(stale)} training-free row(s) were evaluated on a base checkpoint other than their seed's base row's "
                   f"(trained on another machine?): {sorted({str(r.get('checkpoint_sha')) for r in stale})}.")
    for proto in PROTOCOLS:
        if any(r["protocol"] == proto for r in rows):
            out += ["", f"## {PROTOCOL_TITLES[proto]}", "", protocol_table(rows, proto, ref, order)]
    by_type = type_table(raw, order, base)
    if by_type:
        out += ["", "## By question type (base, trained and fine-tuned, rtd fast)", "",
                "Each cell: mean ± sample std [min-max] over its seeds, % exact match.", "", by_type]
    checks = acceptance_checks(raw, spec)
    out += ["", "## Acceptance checks", "",
            f"Thresholds ({base}, % of base accuracy): "
            + ", ".join(f"{ratio_tag(r)}: {t:g}" for r, t in sorted(spec.thresholds.items(), reverse=True))
            + f". '{base} beats X': the paired bootstrap {100 * spec.confidence:g} % CI of the accuracy difference "
              f"(questions and seeds resampled together, {spec.resamples} resamples) lies above zero; decided on the "
              "trained and fine-tuned rows, reported (INFO) on the training-free ones.", ""]
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
    summary = (f"{spec.name}: " + (f"base {acc(ref):.1f}%; " if ref is not None else "no base row yet; ")
               + ("; ".join(lowest) + "; " if lowest else "")
               + f"acceptance {n['PASS']} pass, {n['FAIL']} fail, {n['MISSING']} missing"
               + (f"; {len(failed)} training run(s) FAILED" if failed else "")
               + (f"; {len(unfinished)} training run(s) unfinished" if unfinished else ""))
    out += ["", summary]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------- plot
def plot_sweep(rows: list[dict], path: Path, spec: ReportSpec) -> None:
    """Accuracy (mean over seeds, error bars one sample std) against media tokens per item (top) and
    against measured time to first token (bottom), one panel per protocol, one line per reducer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(rows)
    ref = base_row(rows, spec.method)
    order = reducer_order(rows, spec.reducers)
    colors = {n: f"C{i % 10}" for i, n in enumerate(order)}
    has_ttft = any(r.get("ttft_ms") is not None for r in rows)
    axes_x = [("tokens_per_image", "media tokens per item")] + ([("ttft_ms", "time to first token (ms)")] if has_ttft else [])
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)] or list(DEFAULT_PROTOCOLS)
    fig, axes = plt.subplots(len(axes_x), len(protocols), figsize=(5.5 * len(protocols), 4.2 * len(axes_x)),
                             sharey=True, squeeze=False)
    for (key, xlabel), ax_row in zip(axes_x, axes):
        for ax, proto in zip(ax_row, protocols):
            for name in order:
                line = [r for ratio in sweep_ratios(rows, proto) if (r := main_row(rows, proto, name, ratio)) is not None
                        and r.get(key) is not None]
                line.sort(key=lambda r: r[key])
                if line:
                    modes = {r.get("rtd_mode") for r in line} - {None}
                    label = name + (f" (rtd {modes.pop()})" if len(modes) == 1 else "")
                    ax.errorbar([r[key] for r in line], [acc(r) for r in line], yerr=[r["acc_std"] for r in line],
                                fmt="o-", color=colors[name], capsize=3, label=label)
                extra = [r for r in rows if r["protocol"] == proto and r["reducer"] == name and r not in line
                         and r.get(key) is not None]
                for marker, mode in zip("^sDvP", sorted({r.get("rtd_mode") for r in extra}, key=str)):
                    pts = [r for r in extra if r.get("rtd_mode") == mode]
                    ax.errorbar([r[key] for r in pts], [acc(r) for r in pts], yerr=[r["acc_std"] for r in pts],
                                fmt=marker, color=colors[name], capsize=3, linestyle="none", label=f"{name} (rtd {mode})")
                for r in line + extra:
                    ax.annotate(ratio_tag(r["ratio"]), (r[key], acc(r)), textcoords="offset points", xytext=(4, -10), fontsize=7)
            if ref is not None:
                ax.axhline(acc(ref), color="k", linestyle="--", linewidth=1, label="no reduction")
                if ref.get(key) is not None:
                    ax.plot([ref[key]], [acc(ref)], "k*", markersize=9)
            ax.set_title(PROTOCOL_TITLES[proto].split(" (")[0])
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        ax_row[0].set_ylabel("exact-match accuracy (%, mean ± std)")
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(spec.title or spec.name)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
