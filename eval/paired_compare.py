"""Does model A beat model B? A paired bootstrap over test questions and seeds, from ``llava-deft eval`` JSONs.

Each ``--a`` / ``--b`` file is the JSON ``llava-deft eval --out DIR --name NAME`` writes (its row keeps the
per-question record ``correct`` and the ``ids_digest`` of the questions); give one file per seed, the
seeds of A and B in the same order, every file scored on the same questions. Prints and writes each
side's accuracy mean ± std over seeds and the paired bootstrap 95 % interval of A - B
(``llava_deft.evaluation.stats.paired_bootstrap``: "A beats B" when the whole interval is above zero).

    python eval/paired_compare.py --a runs/rc_s0.json runs/rc_s1.json --b runs/base_s0.json runs/base_s1.json \\
        --label-a "clustering trained in" --label-b "no reduction" --out eval/results --name rc_vs_base

Writes ``<out>/<name>.json`` and ``<name>.md`` with device, date and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.errors import InvalidArgumentError  # noqa: E402
from llava_deft.evaluation.stats import mean_std, paired_bootstrap  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", required=True, help="eval JSONs of method A, one per seed")
    p.add_argument("--b", nargs="+", required=True, help="eval JSONs of method B, the same seeds in the same order")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--row", type=int, default=0, help="which row of each file (one per ratio; default the first)")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--out", default=None, help="write <out>/<name>.{json,md} (default: print only)")
    p.add_argument("--name", default="paired_compare")
    return p.parse_args(argv)


def load_scores(paths: list[str], row: int) -> tuple[np.ndarray, list[float], str, dict]:
    """(seeds, questions) 0/1 scores, per-seed accuracies, the questions' digest and the first row."""
    records, accs, digests, first = [], [], set(), None
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            r = doc["rows"][row]
            bits = r["correct"]
        except FileNotFoundError as e:
            raise InvalidArgumentError(f"{path}: no such file; give the JSON `llava-deft eval --out` wrote") from e
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise InvalidArgumentError(f"{path}: not an eval JSON with a per-question record in row {row} "
                                       f"({type(e).__name__}: {e}); write it with `llava-deft eval --out DIR`") from e
        records.append([c == "1" for c in bits])
        accs.append(r["accuracy"]["all"])
        digests.add(r.get("ids_digest"))
        first = first or r
    if len({len(x) for x in records}) != 1 or len(digests) != 1:
        raise InvalidArgumentError(f"{paths}: the files score different questions (counts "
                                   f"{sorted({len(x) for x in records})}, digests {sorted(map(str, digests))})")
    return np.asarray(records, dtype=float), accs, digests.pop(), first


def compare(args) -> dict:
    if len(args.a) != len(args.b):
        raise InvalidArgumentError(f"--a has {len(args.a)} files and --b {len(args.b)}: give one per seed on each side")
    a, acc_a, dig_a, row_a = load_scores(args.a, args.row)
    b, acc_b, dig_b, row_b = load_scores(args.b, args.row)
    if dig_a != dig_b:
        raise InvalidArgumentError(f"A and B were scored on different questions (digests {dig_a} and {dig_b})")
    cmp = paired_bootstrap(a, b, resamples=args.resamples)
    side = lambda accs, row: {"accuracy": [100 * x for x in accs], "mean_std": str(mean_std([100 * x for x in accs])),  # noqa: E731
                              "media_tokens_per_sample": row.get("media_tokens_per_sample")}
    return {"a": {"label": args.label_a, "files": args.a, **side(acc_a, row_a)},
            "b": {"label": args.label_b, "files": args.b, **side(acc_b, row_b)},
            "questions": int(a.shape[1]), "seeds": int(a.shape[0]), "ids_digest": dig_a,
            "diff_points": 100 * cmp.diff, "ci_points": [100 * cmp.low, 100 * cmp.high], "confidence": cmp.confidence,
            "resamples": cmp.resamples, "a_beats_b": cmp.beats}


def markdown(r: dict, meta: dict) -> str:
    lines = [f"# {r['a']['label']} against {r['b']['label']} (eval/paired_compare.py)", "",
             f"{meta['date']}, {meta['device']}, commit {meta['commit']}; {r['seeds']} seed(s) x {r['questions']} "
             f"questions (digest {r['ids_digest']}); `python eval/paired_compare.py {' '.join(sys.argv[1:])}`", "",
             "| method | accuracy per seed (%) | mean ± std | media tokens per sample |", "|---|---|---|---|"]
    for s in (r["a"], r["b"]):
        tokens = s["media_tokens_per_sample"]
        lines.append(f"| {s['label']} | {', '.join(f'{x:.2f}' for x in s['accuracy'])} | {s['mean_std']} | "
                     f"{'' if tokens is None else f'{tokens:.1f}'} |")
    lo, hi = r["ci_points"]
    lines += ["", f"A - B: {r['diff_points']:+.2f} points, paired bootstrap {100 * r['confidence']:g} % CI "
              f"[{lo:+.2f}, {hi:+.2f}] over questions and seeds ({r['resamples']} resamples): "
              f"**{'A beats B' if r['a_beats_b'] else 'not decided (the interval reaches zero)'}**", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = compare(args)
    meta = run_metadata(torch.device("cpu"))
    md = markdown(result, meta)
    if args.out:
        out = Path(args.out)
        write_json(out / f"{args.name}.json", {**meta, **result})
        (out / f"{args.name}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
