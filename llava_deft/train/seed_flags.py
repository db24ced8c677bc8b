"""The compression seeds' command-line flags (seeds 001 and 003: recursive compression of a text LM) on
our DeepSpeed training entry, as aliases of config keys.

    python -m llava_deft.train --base_model_name gpt2_small --train_file fortunes \\
        --use_progressive_compression --compression_layers 3 6 9 --freeze_base --max_length 512 \\
        --batch_size 8 --epochs 1 --learning_rate 3e-4

| flag | config |
|---|---|
| ``--base_model_name`` / ``--model_name`` NAME | a saved llava-deft model folder: ``init_from``; a transformers ``save_pretrained`` folder: ``model.llm.path`` (a text LM, ``vision: null``); else a named model config ``configs/model/NAME.yaml`` (``gpt2_small``, ``smollm_1p7b``, ...) |
| ``--train_file`` / ``--data_path`` FILE | ``data: {type: text, path: FILE}`` (``fortunes`` = Debian's fortunes corpus, the default data of these flags); a ``.json`` / ``.jsonl`` ``--data_path`` stays LLaVA's conversation file |
| ``--use_progressive_compression`` | ``model.pipeline.llm``: a ``progressive_compression`` stage before each of ``--compression_layers`` (thresholds by relative depth), ``tokens: all`` (text merges; ``media`` with a LLaVA ``.json`` ``--data_path``) |
| ``--compression_layers`` L... | where the stages run (decoder layer indices, 0-based: a stage at L runs after layer L-1); default: the layers at relative depths 1/4, 1/2, 3/4 |
| ``--similarity_threshold`` / ``--attention_weight`` / ``--adaptive_threshold`` / ``--use_residuals`` / ``--contrastive_margin`` / ``--contrastive_weight`` | the stages' options of those names (``--similarity_threshold`` is the floor of ``recursive_compression_llm``, the aggressive (deepest) floor of ``progressive_compression``); any of them without ``--use_progressive_compression`` puts ``recursive_compression_llm`` stages at the layers |
| ``--freeze_base`` | ``stages.*.freeze_llm: true`` (only the compression stages train) |
| ``--max_length`` N | ``model.max_length`` (and the text blocks' length) |
| ``--batch_size`` N | ``per_device_batch_size`` |
| ``--epochs`` E | ``stages.*.epochs`` (and ``max_steps`` unset) |
| ``--learning_rate`` LR | ``stages.*.lr`` (LLaVA's flag, already there) |

Without ``--config`` these flags start from ``configs/train/seed_text_lm.yaml`` (one stage on the
default corpus). Everything they set is an ordinary override: ``key=value`` overrides after them win.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..model.llm.compressible import default_layers  # noqa: F401  (the seeds' default layers; tests import it here)

ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = ROOT / "configs" / "model"
DEFAULT_RECIPE = ROOT / "configs" / "train" / "seed_text_lm.yaml"

STAGE_OPTIONS = ("similarity_threshold", "attention_weight", "adaptive_threshold", "use_residuals",
                 "contrastive_margin", "contrastive_weight")


def add_seed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression seeds' flags (llava_deft/train/seed_flags.py)")
    g.add_argument("--base_model_name", "--model_name", dest="base_model_name", default=None,
                   help="a saved model folder, a transformers save_pretrained folder, or a named configs/model/*.yaml")
    g.add_argument("--train_file", default=None, help="a text corpus file, or 'fortunes' (Debian's fortunes package)")
    g.add_argument("--use_progressive_compression", action="store_true", default=None)
    g.add_argument("--compression_layers", type=int, nargs="+", default=None)
    for name in ("similarity_threshold", "attention_weight", "contrastive_margin", "contrastive_weight"):
        g.add_argument(f"--{name}", type=float, default=None)
    for name in ("adaptive_threshold", "use_residuals"):
        g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--freeze_base", action="store_true", default=None)
    g.add_argument("--max_length", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None)


def used(args: argparse.Namespace) -> bool:
    """Whether any seed flag was given."""
    return any(getattr(args, k, None) is not None for k in
               ("base_model_name", "train_file", "use_progressive_compression", "compression_layers", "freeze_base",
                "max_length", "batch_size", "epochs", *STAGE_OPTIONS))


def resolve_model(name: str) -> tuple[str, str]:
    """(``"init_from"`` | ``"llm_path"`` | ``"model"``, value) for ``--base_model_name``."""
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"--base_model_name '{name}' is a folder without config.json (give a saved model "
                              f"folder, a transformers save_pretrained folder or a named config)")
        data = json.loads(cfg.read_text())
        if "llm" in data:  # our own save_pretrained
            return "init_from", str(path)
        if "model_type" in data:
            return "llm_path", str(path)
        raise ConfigError(f"--base_model_name '{name}': its config.json is neither a llava-deft model's nor a "
                          f"transformers model's (no 'llm' or 'model_type' key)")
    named = MODEL_CONFIGS / f"{name}.yaml"
    if named.is_file():
        return "model", str(named)
    known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"--base_model_name '{name}' is neither a folder nor a named model config; named configs: {known}")


def seed_overrides(args: argparse.Namespace, depth: Callable[[list[str]], int]) -> list[str]:
    """The ``key=value`` overrides the seed flags stand for. ``depth(overrides)`` is the LLM's number of
    decoder layers once those overrides apply (for the default compression layers and the range check)."""
    out: list[str] = []
    if args.base_model_name is not None:
        kind, value = resolve_model(args.base_model_name)
        if kind == "init_from":
            out.append(f"init_from={value}")
        elif kind == "llm_path":
            out += ["model.vision=null", "model.llm.config=null", f"model.llm.path={value}"]
        else:  # a named config replaces the recipe's model (JSON is YAML: the override parses it back)
            from ..config import read_model_config_file

            out.append("model=" + json.dumps(read_model_config_file(value)))
    if args.train_file is not None:
        out += ["data.type=text", f"data.path={args.train_file}"]
    wants_stage = args.use_progressive_compression or any(getattr(args, k) is not None for k in STAGE_OPTIONS) \
        or args.compression_layers is not None
    if wants_stage:
        num_layers = depth(out)
        layers = args.compression_layers or default_layers(num_layers)
        bad = [layer for layer in layers if not 0 < layer < num_layers]
        if bad:
            raise ConfigError(f"--compression_layers {bad}: a stage runs between decoder layers, so each must be in "
                              f"1..{num_layers - 1} (the model has {num_layers} layers)")
        name = "progressive_compression" if args.use_progressive_compression else "recursive_compression_llm"
        options = {k: getattr(args, k) for k in STAGE_OPTIONS if getattr(args, k) is not None}
        if name == "progressive_compression" and "similarity_threshold" in options:
            options["aggressive"] = options.pop("similarity_threshold")
        # a text LM (the seeds') merges its text; a LLaVA conversation file keeps text whole and merges media
        conversation = Path(getattr(args, "data_path", None) or "").suffix in (".json", ".jsonl")
        options["tokens"] = "media" if conversation else "all"
        stages = [{"name": name, "layer": layer, **options} for layer in sorted(set(layers))]
        out.append("model.pipeline.llm=" + json.dumps(stages))
    if args.freeze_base:
        out.append("stages.*.freeze_llm=true")
    if args.max_length is not None:
        out.append(f"model.max_length={args.max_length}")
    if args.batch_size is not None:
        out.append(f"per_device_batch_size={args.batch_size}")
    if args.epochs is not None:
        out += [f"stages.*.epochs={args.epochs}", "stages.*.max_steps=null"]
    return out


def llm_depth(model) -> int:
    """Decoder layers of a model config (a dict, or a YAML path as a train config's ``model:`` may be)."""
    from transformers import AutoConfig

    from ..config import load_model_config

    llm = load_model_config(model).llm
    if llm.path is not None:
        return int(AutoConfig.from_pretrained(llm.path, local_files_only=True).num_hidden_layers)
    spec = dict(llm.config)
    return int(AutoConfig.for_model(spec.pop("model_type"), **spec).num_hidden_layers)
