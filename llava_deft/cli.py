"""``llava-deft`` command line: one entry over plain functions, each callable as ``main(argv)``.

    llava-deft stages                                  # registered reduction stages
    llava-deft validate configs/train/easyvqa_tiny.yaml configs/pipeline/*.yaml
    llava-deft export-easyvqa data/easyvqa --split train
    llava-deft train --config configs/train/easyvqa_tiny.yaml --output_dir runs/x
    llava-deft generate --model runs/x/final --image shape.png "what color is the shape?"
    llava-deft generate --model runs/x/final --audio seven.wav --text "$(cat passage.txt)" "what is said?"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline import PipelineConfigError, list_stages, validate_config

from .config import load_model_config
from .errors import ConfigError, LlavaDeftError
from .modality import MODALITIES


def _kind(path: Path) -> str:
    """Which config a YAML file is: a training recipe, a model or a pipeline."""
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, list) or set(data) <= {"stages"}:
        return "pipeline"
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
            else:
                cfg = load_train_config(p)
                load_model_config(cfg.model)
            print(f"ok      {p} ({kind})")
        except (PipelineConfigError, ConfigError, FileNotFoundError, yaml.YAMLError) as e:
            bad += 1
            print(f"invalid {p}: {e}")
    return bad


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="llava-deft", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stages", help="list the registered reduction stages")
    v = sub.add_parser("validate", help="validate model, pipeline and training configs")
    v.add_argument("paths", nargs="+")
    e = sub.add_parser("export-easyvqa", help="write easy-VQA in LLaVA's conversation JSON format")
    e.add_argument("out_dir")
    e.add_argument("--split", choices=["train", "test"], default="train")
    e.add_argument("--limit", type=int, default=None)
    sub.add_parser("train", help="train (same flags as python -m llava_deft.train)", add_help=False)
    g = sub.add_parser("generate", help="answer a prompt with a saved model")
    g.add_argument("--model", required=True)
    for key, kind in MODALITIES.items():  # --image, --video, --audio, --text
        what = f"{kind.noun} file" if kind.from_files else f"{kind.noun} routed through the pipeline at {kind.placeholder}"
        g.add_argument(f"--{key}", action="append", default=[], help=f"{what} (repeat for several)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("prompt")

    if argv and argv[0] == "train":  # hand every flag to the training entry untouched
        from .train import main as train_main

        train_main(argv[1:])
        return 0
    args = p.parse_args(argv)
    try:
        if args.cmd == "stages":
            print("\n".join(list_stages()))
            return 0
        if args.cmd == "validate":
            return 1 if validate(args.paths) else 0
        if args.cmd == "export-easyvqa":
            from .data.easyvqa import export_easyvqa

            print(export_easyvqa(args.out_dir, args.split, args.limit))
            return 0
        from .inference import load_model

        media = {kind.sample_key: getattr(args, key) for key, kind in MODALITIES.items()}
        print(load_model(args.model).generate(args.prompt, max_new_tokens=args.max_new_tokens, **media))
        return 0
    except LlavaDeftError as err:
        print(f"llava-deft {args.cmd}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
