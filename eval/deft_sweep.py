"""Reducer x retention-ratio sweep, training-free and trained, over seeds, in one resumable run.

    python eval/deft_sweep.py --spec configs/sweeps/scenes.yaml [KEY=VALUE ...]   # a sweep spec (same as
                                                                  # `llava-deft sweep run SPEC`)
    python eval/deft_sweep.py --name deft_sweep_h100                    # the easy-VQA default sweep, flags as before
    python eval/deft_sweep.py --only deft@0.11 random --name deft_sweep_h100   # part of it
    timeout 590 python eval/deft_sweep.py --seeds 0 1 2 --time-budget 480 --save-steps 250 --name x
    python eval/deft_sweep.py --report-only --name deft_sweep_h100      # table + plot from the JSON

A thin entry over :mod:`llava_deft.evaluation.sweep` (planning, training runs, result store, checks)
and :mod:`llava_deft.evaluation.report` (tables, bootstrap checks, plots); their docstrings say how a
sweep runs. Without ``--spec`` the flags below build the spec of the easy-VQA comparison (issue 3).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_deft.evaluation import sweep as sw  # noqa: E402
from llava_deft.evaluation.report import PROTOCOLS  # noqa: E402
from pipeline.stages.rtd import MODES as RTD_MODES  # noqa: E402

THRESHOLDS: dict[float, float] = {0.482: 99.5, 0.25: 99.0, 0.11: 97.0}
DEFAULT_REDUCERS = [
    "deft=configs/pipeline/deft.yaml",
    "deft_nofb=configs/pipeline/deft_nofb.yaml",
    "deft_merge=configs/pipeline/deft_merge.yaml",
    "random=configs/pipeline/random.yaml",
    "pool=configs/pipeline/pool.yaml",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", default=None, help="a sweep spec YAML (configs/sweeps/*.yaml); the flags that build one are then ignored")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --spec: overrides of the spec")
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
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides of every training run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED", help="train every run once per seed")
    p.add_argument("--save-steps", type=int, default=None, metavar="N", help="save_steps of every training run")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop at this many seconds from the start; what finished is evaluated, the report written, exit 0")
    p.add_argument("--launch-margin", type=float, default=120.0, metavar="SECONDS",
                   help="with --time-budget: launch no training run with less than this left")
    p.add_argument("--only", nargs="+", default=None, metavar="REDUCER[@RATIO]", help="run only these (and 'base')")
    p.add_argument("--report-only", action="store_true", help="write the report and plot from the JSON, run nothing")
    p.add_argument("--reeval", action="store_true", help="evaluate rows again even if the JSON has them")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--ttft-batch", type=int, default=1, help="batch of the time-to-first-token measurement (0: none)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="evaluation device (training runs pick their own)")
    return p.parse_args(argv)


def parse_reducers(items: list[str]) -> dict[str, str]:
    """``["deft=configs/pipeline/deft.yaml", ...]`` -> ``{"deft": "configs/..."}`` (order kept)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reducers entry {item!r} is not NAME=YAML (e.g. random=configs/pipeline/random.yaml)")
        if name in out:
            raise ValueError(f"reducer {name!r} is given twice in --reducers")
        out[name] = path
    return out


def spec_from_flags(args: argparse.Namespace) -> sw.SweepSpec:
    """The easy-VQA sweep the flags describe (ablations: reducers named after the base, e.g. deft_nofb)."""
    reducers = parse_reducers(args.reducers)
    data = {
        "name": args.name, "title": "easy-VQA", "recipe": args.train_config, "data": {"task": "easyvqa", "limit": args.limit},
        "reducers": reducers, "method": args.base, "ratios": args.ratios, "seeds": args.seeds,
        "protocols": args.protocols,
        "thresholds": {r: t for r, t in THRESHOLDS.items() if any(abs(r - x) < 1e-9 for x in args.ratios)},
        "ablations": {n: args.base for n in reducers if n != args.base and n.startswith(args.base)},
        "rtd": {"modes": args.rtd_modes, "ratio": args.rtd_ratio},
        "training": {"steps": args.steps, "save_steps": args.save_steps, "overrides": args.override,
                     "parallel": args.parallel, "num_workers": args.num_workers},
        "evaluation": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                       "ttft_batch": args.ttft_batch, "device": args.device},
        "runs": args.runs, "out": args.out,
    }
    try:
        return sw.SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc'])) or '<spec>'}: {err['msg']}" for err in e.errors())) from None


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or only the report); 1 when a training run failed, else 0 (unfinished runs included)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        spec = sw.load_spec(args.spec, args.overrides) if args.spec else spec_from_flags(args)
        if args.overrides and not args.spec:
            raise ValueError(f"KEY=VALUE overrides {args.overrides} need --spec")
        if args.report_only:
            md = sw.report(spec)
            print(md, end="")
            return 0
        outcome = sw.run(spec, only=args.only, reeval=args.reeval, time_budget=args.time_budget,
                         launch_margin=args.launch_margin, command=shlex.join(["python", "eval/deft_sweep.py", *argv]))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"deft_sweep: {e}") from None
    print(outcome.markdown, end="")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
