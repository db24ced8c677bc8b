"""``llava-deft`` command line: one entry over plain functions, each callable as ``main(argv)``.

    llava-deft stages                                  # registered reduction stages
    llava-deft validate configs/train/easyvqa_tiny.yaml configs/pipeline/*.yaml
    llava-deft export-easyvqa data/easyvqa --split train
    llava-deft train --config configs/train/easyvqa_tiny.yaml --output_dir runs/x
    llava-deft generate --model runs/x/final --image shape.png "what color is the shape?"
    llava-deft generate --model runs/x/final --audio seven.wav --text "$(cat passage.txt)" "what is said?"
    llava-deft generate --model runs/x/final --image shape.png --pipeline configs/pipeline/deft.yaml \
        --retention 0.25 --stats --overlay kept.png --stream "what shape is this?"
    llava-deft eval --model runs/x/final --task scenes --pipeline configs/pipeline/deft_q.yaml --ratios 1 0.25 0.11
    llava-deft eval --model runs/x/final --test my/test.json --image-folder my/
    llava-deft sweep run configs/sweeps/scenes.yaml [seeds=[0] ...] [--only base deft_q@0.25] [--time-budget 480]
    llava-deft sweep report configs/sweeps/scenes.yaml
    llava-deft viewer --model runs/x/final [--pipeline configs/pipeline/fastv.yaml] [--port 8000]
    llava-deft --version

An error a command raises on purpose (``LlavaDeftError``), and ``FileNotFoundError``, ``ValueError`` and
``TypeError``, print one line ``llava-deft <command>: <message>`` on stderr and exit with status 2
(``--debug``: the traceback too); so do usage errors.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import yaml

from pipeline import PipelineConfigError, list_stages, validate_config
from pipeline.yamlio import load_yaml

from . import __version__
from .config import load_model_config
from .errors import ConfigError, LlavaDeftError
from .modality import MODALITIES

COMMAND_ERRORS = (LlavaDeftError, FileNotFoundError, ValueError, TypeError)
"""What a command's failure may raise: printed as one line, exit status 2 (``--debug``: with the traceback)."""


def _kind(path: Path) -> str:
    """Which config a YAML file is: a training recipe, a model, a pipeline or a sweep spec."""
    data = load_yaml(path.read_text()) or {}
    if isinstance(data, list) or set(data) <= {"stages", "llm"}:
        return "pipeline"
    if {"recipe", "reducers"} <= set(data):
        return "sweep"
    if {"data", "deepspeed", "output_dir"} & set(data) or isinstance(data.get("stages"), list) and "model" in data:
        return "train"
    return "model"


def validate(paths: list[str]) -> int:
    """Validate each config file whole; print every error with its path. Returns the number of bad files."""
    from .config import load_train_config

    bad = 0
    for p in map(Path, paths):
        try:
            if not p.is_file():
                raise FileNotFoundError(f"config file '{p}' does not exist")
            kind = _kind(p)
            if kind == "pipeline":
                validate_config(p)
            elif kind == "model":
                load_model_config(p)
            elif kind == "sweep":
                from .evaluation.sweep import load_spec, plan

                plan(load_spec(p))  # every reducer pipeline resolved at every ratio
                load_train_config(load_spec(p).recipe)
            else:
                cfg = load_train_config(p)
                load_model_config(cfg.model)
            print(f"ok      {p} ({kind})")
        except (PipelineConfigError, ConfigError, FileNotFoundError, ValueError, yaml.YAMLError) as e:
            bad += 1
            print(f"invalid {p}: {e}")
    return bad


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: ``llava-deft generate: <problem> (see --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``llava-deft`` parser; every option of every subcommand has a help text."""
    p = _Parser(prog="llava-deft", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"llava-deft {__version__}", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="on an error, print the traceback, not only its one line")
    # subcommands take --debug too; SUPPRESS keeps the top-level value when a subcommand does not see it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the traceback, not only its one line")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("stages", help="list the registered reduction stages", parents=[common])
    v = sub.add_parser("validate", help="validate model, pipeline and training configs", parents=[common])
    v.add_argument("paths", nargs="+", help="config YAML files (model, pipeline or training recipe; the kind is detected)")
    e = sub.add_parser("export-easyvqa", help="write easy-VQA in LLaVA's conversation JSON format", parents=[common])
    e.add_argument("out_dir", help="folder to write <split>.json and images/ into")
    e.add_argument("--split", choices=["train", "test"], default="train", help="which split (default: train)")
    e.add_argument("--limit", type=int, default=None, help="export only the first N questions")
    sub.add_parser("train", help="train (same flags as python -m llava_deft.train)", add_help=False)
    g = sub.add_parser("generate", help="answer a prompt with a saved model", parents=[common])
    g.add_argument("--model", required=True, help="model directory (save_pretrained or a training run's final/)")
    for key, kind in MODALITIES.items():  # --image, --video, --audio, --text
        what = f"{kind.noun} file" if kind.from_files else f"{kind.noun} routed through the pipeline at {kind.placeholder}"
        g.add_argument(f"--{key}", action="append", default=[], help=f"{what} (repeat for several)")
    g.add_argument("--system", default=None, help="system prompt put before the prompt")
    g.add_argument("--max-new-tokens", type=int, default=32,
                   help="most new tokens (>= 1; prompt + this may not exceed the LLM's max_position_embeddings)")
    g.add_argument("--pipeline", default=None,
                   help="reduction pipeline YAML for this call (default: the model's own; learned stages keep their weights)")
    g.add_argument("--retention", type=float, default=None,
                   help="fraction of media tokens each reducer keeps, in (0, 1] (default: the pipeline's)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; with --do-sample)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off; with --do-sample)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off; with --do-sample)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (reproducible --do-sample)")
    g.add_argument("--stream", action="store_true", help="print the answer piece by piece as it is generated")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (faster tokens after a one-off compile of tens of seconds; "
                        "worth it for long answers on a GPU)")
    g.add_argument("--stats", action="store_true",
                   help="after the answer, print each reduction stage's statistics and each media item's kept tokens")
    g.add_argument("--overlay", default=None, metavar="PNG",
                   help="write the first image (else video) with the tokens each stage kept drawn over it to this PNG")
    g.add_argument("prompt", help="the question or instruction")
    _eval_parser(sub, common)
    _sweep_parser(sub, common)
    _viewer_parser(sub, common)
    _text_lm_parser(sub, common)
    return p


def _text_lm_parser(sub, common) -> None:
    t = sub.add_parser("evaluate", help="a text LM with its compression stages against the same weights without them: "
                       "perplexity, next-token accuracy, compression ratio, KV memory", parents=[common])
    t.add_argument("--model_dir", "--model-dir", required=True, help="a saved text model (a training run's final/)")
    t.add_argument("--baseline_dir", default=None,
                   help="an uncompressed model to compare against (default: --model_dir's weights without its stages)")
    t.add_argument("--data", "--eval_file", default="fortunes",
                   help="a text corpus file, or 'fortunes' (Debian's fortunes package; default)")
    t.add_argument("--split", choices=("train", "test"), default="test", help="the corpus split evaluated (default test)")
    t.add_argument("--block_tokens", type=int, default=None, help="ids per block (default: the model's max_length)")
    t.add_argument("--max_blocks", type=int, default=None, help="first N blocks only")
    t.add_argument("--batch_size", type=int, default=8, help="blocks per forward")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--out", default=None, help="write the report as JSON to this file")


def text_lm(args: argparse.Namespace) -> int:
    import json

    from .evaluation.text_lm import evaluate_text_lm, format_report

    report = evaluate_text_lm(args.model_dir, data=args.data, split=args.split, block_tokens=args.block_tokens,
                              max_blocks=args.max_blocks, batch_size=args.batch_size, device=args.device,
                              baseline_dir=args.baseline_dir)
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _viewer_parser(sub, common) -> None:
    from .viewer.session import MAX_IMAGE_BYTES, MAX_TEXT_CHARS

    v = sub.add_parser("viewer", help="serve the interactive compression viewer (a local web page)", parents=[common])
    v.add_argument("--model", required=True, help="model directory (save_pretrained or a training run's final/)")
    v.add_argument("--pipeline", default=None,
                   help="reduction pipeline YAML whose llm: stages the page controls (default: the model's own; "
                        "stages the checkpoint has keep their weights)")
    v.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    v.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; others need --allow-remote)")
    v.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed at start)")
    v.add_argument("--allow-remote", action="store_true",
                   help="serve on a non-loopback --host: the viewer has no authentication and runs the model for anyone")
    v.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, help="longest prompt text a request may send")
    v.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="largest image file a request may upload")
    v.add_argument("--verbose", action="store_true", help="log every HTTP request on stderr")


def viewer(args: argparse.Namespace) -> int:
    """``llava-deft viewer``: load the model, print the URL, serve until Ctrl-C."""
    from .inference import load_model
    from .viewer.server import check_host, make_server
    from .viewer.session import ViewerSession

    check_host(args.host, args.allow_remote)  # before the model loads: a refused host fails at once
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0..65535; 0 picks a free one)")
    model = load_model(args.model, device=args.device, pipeline=args.pipeline)
    session = ViewerSession(model, max_text_chars=args.max_text_chars, max_image_bytes=args.max_image_bytes)
    server = make_server(session, args.host, args.port, args.allow_remote, quiet=not args.verbose)
    print(f"llava-deft viewer: serving {server.url} (LLM stages: {[c.name for c in session.controls] or 'none'}; "
          f"Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("llava-deft viewer: stopped")
    finally:
        server.server_close()
    return 0


def _eval_parser(sub, common) -> None:
    from .tasks import DEFAULT_TASKS_DIR

    e = sub.add_parser("eval", help="exact-match accuracy, tokens and time to first token of a saved model", parents=[common])
    e.add_argument("--model", required=True, help="model directory (save_pretrained or a training run's final/)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a built-in task: easyvqa or a generated one (python -m llava_deft.tasks)")
    src.add_argument("--test", help="a LLaVA-JSON test file")
    e.add_argument("--image-folder", default=None, help="media folder of --test (default: the JSON's folder)")
    e.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of the generated tasks")
    e.add_argument("--pipeline", default=None, help="reduction pipeline YAML (default: the model's; learned stages keep their weights)")
    e.add_argument("--ratios", type=float, nargs="+", default=[1.0], help="retention ratios, each in (0, 1]")
    e.add_argument("--limit", type=int, default=None, help="first N test questions only")
    e.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    e.add_argument("--max-new-tokens", type=int, default=8, help="most answer tokens")
    e.add_argument("--ttft-batch", type=int, default=1, help="batch at which time to first token is measured (0: not)")
    e.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    e.add_argument("--out", default=None, help="write <out>/<name>.{json,md,png} (default: print only)")
    e.add_argument("--name", default=None, help="output file stem (default: eval_<data>)")


def _sweep_parser(sub, common) -> None:
    s = sub.add_parser("sweep", help="reducer x ratio x seed comparison from a YAML spec (configs/sweeps/)", parents=[common])
    ss = s.add_subparsers(dest="sweep_cmd", required=True, metavar="ACTION")
    for action, text in (("run", "train and evaluate what is missing, then write the report"),
                         ("report", "write the report and plot from the results JSON, run nothing")):
        a = ss.add_parser(action, help=text, parents=[common])
        a.add_argument("spec", help="sweep spec YAML (e.g. configs/sweeps/scenes.yaml)")
        a.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the spec (e.g. seeds=[0] data.limit=200)")
        if action == "run":
            a.add_argument("--only", nargs="+", default=None, metavar="REDUCER[@RATIO]",
                           help="run only these (and 'base'); the rest of the JSON is kept")
            a.add_argument("--reeval", action="store_true", help="evaluate rows again even when the JSON has them")
            a.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                           help="stop training at this many seconds (it resumes next call); evaluate what finished")
            a.add_argument("--launch-margin", type=float, default=120.0, metavar="SECONDS",
                           help="with --time-budget: launch no training run with less than this left")


def evaluate(args: argparse.Namespace) -> int:
    """``llava-deft eval``: print the table (and write the files with ``--out``)."""
    from .evaluation.data import EvalData
    from .evaluation.single import evaluate_model, markdown, write_outputs
    from .provenance import run_metadata

    data = EvalData(task=args.task, test=args.test, image_folder=args.image_folder, tasks_dir=args.tasks_dir,
                    limit=args.limit)
    rows = evaluate_model(args.model, data, args.pipeline, args.ratios, args.batch_size, args.max_new_tokens,
                          args.device, args.ttft_batch)
    print(markdown(rows))
    if args.out is not None:
        import torch

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        meta = {"model": str(args.model), "data": data.label, "pipeline_config": args.pipeline, "limit": args.limit,
                **run_metadata(dev)}
        paths = write_outputs(rows, args.out, args.name or f"eval_{data.label}", meta)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"eval {data.label}: " + ", ".join(f"r={r['ratio']:g} {100 * r['accuracy']['all']:.1f}%" for r in rows))
    return 0


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """``llava-deft sweep run|report SPEC``; 1 when a training run failed."""
    import shlex

    from .evaluation import sweep as sw

    spec = sw.load_spec(args.spec, args.overrides)
    if args.sweep_cmd == "report":
        md = sw.report(spec)
        print(md, end="")
        return 0
    outcome = sw.run(spec, only=args.only, reeval=args.reeval, time_budget=args.time_budget,
                     launch_margin=args.launch_margin, command=shlex.join(["llava-deft", *argv]))
    print(outcome.markdown, end="")
    return 1 if outcome.failed else 0


def _stats_lines(info) -> list[str]:
    """``--stats`` output: one line per stage statistic record, then one per media item."""
    lines = [f"stage {name}: " + " ".join(f"{k}={v:g}" for k, v in values.items()) for name, values in info.stats.items()]
    if not info.stats:
        lines.append("stage (none): no reduction stage reported statistics")
    for m in info.media[0]:
        lines.append(f"{m.kind} {m.item}: kept {len(m.kept)}/{m.total} tokens")
    for name, values in (info.llm_stats or {}).items():
        flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if flat:
            lines.append(f"llm stage {name}: " + " ".join(f"{k}={v:g}" for k, v in flat.items()))
    for layer in info.cache or []:
        lines.append(f"cache layer {layer['layer']}: slots={layer['slots']} tokens={layer['tokens_mean']:g} "
                     f"evicted={layer['evicted']} bytes={layer['bytes']}")
    return lines


def generate(args: argparse.Namespace) -> int:
    """``llava-deft generate``: print the answer (``--stream``: as it comes), then ``--stats``; write ``--overlay``."""
    from .inference import load_model

    if args.overlay is not None and not (args.image or args.video):
        raise ValueError("--overlay draws the first image or video: give --image or --video")
    model = load_model(args.model, device=args.device, compile=args.compile)
    media = {kind.sample_key: getattr(args, key) for key, kind in MODALITIES.items()}
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, pipeline=args.pipeline, retention=args.retention)
    if args.stream:
        stream = model.stream(args.prompt, system=args.system, **media, **options)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        info = stream.info
    else:
        text, info = model.generate(args.prompt, system=args.system, return_stats=True, **media, **options)
        print(text)
    if args.stats:
        print("\n".join(_stats_lines(info)))
    if args.overlay is not None:
        kind = "image" if args.image else "video"
        first = next(m for m in info.media[0] if m.kind == kind and m.item == 0)
        model.draw_reduction(getattr(args, kind)[0], first).save(args.overlay)
    return 0


def one_line(err: BaseException) -> str:
    """An error's message on one line (a multi-line message's lines joined with "; ")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, FileNotFoundError) and err.filename is not None and err.strerror:
        lines = [f"{err.strerror}: '{err.filename}'"]  # OSError's own str starts with "[Errno 2]"
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    return lines[0] + (" " if lines[0].endswith(":") else "; ") + "; ".join(lines[1:])


def _run(command: str, debug: bool, fn) -> int:
    try:
        return fn()
    except COMMAND_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"llava-deft {command}: {one_line(err)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv and argv[0] == "train":  # hand every flag to the training entry untouched
        from .train import main as train_main

        return _run("train", debug, lambda: (train_main(argv[1:]), 0)[1])
    args = build_parser().parse_args(argv)
    debug = debug or args.debug

    def run() -> int:
        if args.cmd == "stages":
            print("\n".join(list_stages()))
            return 0
        if args.cmd == "validate":
            return 1 if validate(args.paths) else 0
        if args.cmd == "export-easyvqa":
            from .data.easyvqa import export_easyvqa

            print(export_easyvqa(args.out_dir, args.split, args.limit))
            return 0
        if args.cmd == "eval":
            return evaluate(args)
        if args.cmd == "sweep":
            return sweep(args, argv)
        if args.cmd == "viewer":
            return viewer(args)
        if args.cmd == "evaluate":
            return text_lm(args)
        return generate(args)

    return _run(args.cmd, debug, run)


if __name__ == "__main__":
    sys.exit(main())
