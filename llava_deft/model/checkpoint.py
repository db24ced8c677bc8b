"""What loading a model directory shares, whoever wrote it (our ``save_pretrained``, a training
export, transformers' ``LlavaForConditionalGeneration.save_pretrained``): its ``config.json`` read as
a JSON object, and a state dict loaded into a built model with every mismatch a ``CheckpointError``.
Weights themselves are read by ``llava_deft.encoders.weights`` (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from ..encoders.weights import PICKLE_SUFFIXES, require_safetensors
from ..errors import CheckpointError

CONFIG_NAME = "config.json"


def read_config_json(directory: str | Path) -> dict:
    """``directory/config.json`` as a dict: ``FileNotFoundError`` when absent (``PickleCheckpointError``
    when the directory holds only pickled weights), ``CheckpointError`` naming the file when it is not
    JSON or not a JSON object."""
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        if Path(directory).is_dir() and any(p.suffix in PICKLE_SUFFIXES for p in Path(directory).iterdir()):
            require_safetensors(directory, "LlavaForConditionalGeneration")  # the command that converts them
        raise FileNotFoundError(
            f"checkpoint '{directory}' has no {CONFIG_NAME}; is it a llava-deft model directory "
            f"(or a transformers LlavaForConditionalGeneration one)?"
        )
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{file}' is not valid JSON ({e}); re-export the model or re-download the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"'{file}' must hold a JSON object, got {type(data).__name__}; re-export the model or re-download the file"
        )
    return data


def load_state(model: nn.Module, state: dict[str, Tensor], source: str | Path, may_miss: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``: a tensor of another shape, an unexpected key, or a missing one
    (other than tied aliases and keys starting with ``may_miss``) is a ``CheckpointError`` naming
    ``source``."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint '{source}' does not match its config: shapes differ for {wrong[:5]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_keys(model)
    missing = [k for k in missing if not k.startswith(may_miss) and k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{source}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (e.g. tied lm_head); they need not be stored twice."""
    seen: dict[int, str] = {}
    tied = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.add(k)
        seen[id(v)] = k
    return tied
