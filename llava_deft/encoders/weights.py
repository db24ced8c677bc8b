"""Weights from local safetensors files only (never a pickle): one file, or a directory's
``model.safetensors`` / shards named by ``model.safetensors.index.json`` (what transformers'
``save_pretrained`` writes)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError, PickleCheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_safetensors(path: str | Path, kind: str) -> dict[str, Tensor]:
    """A local ``.safetensors`` state dict; a missing file or any other format (pickles) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} weights file '{path}' does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{kind} weights '{path}' must be a .safetensors file (pickles are never loaded)")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(
            f"{kind} weights '{path}' are not a readable safetensors file ({e}): the file is truncated or "
            f"corrupt; re-export the model or re-download the file"
        ) from None


def require_safetensors(directory: str | Path, loader: str) -> None:
    """Refuse a directory without ``*.safetensors`` weights: ``PickleCheckpointError`` (with the
    command that converts them, ``loader`` being the transformers class that reads them) when it holds
    only pickles, else ``CheckpointError``."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleCheckpointError.in_dir(directory, pickles, loader)
    raise CheckpointError(f"checkpoint '{directory}' has no {SAFE_WEIGHTS_NAME} (nor shards and {SAFE_WEIGHTS_INDEX_NAME})")


def read_safetensors_dir(directory: str | Path, loader: str) -> dict[str, Tensor]:
    """The state dict saved in ``directory``: ``model.safetensors``, or every shard that
    ``model.safetensors.index.json`` names (a missing shard is a ``CheckpointError`` naming it)."""
    directory = Path(directory)
    single, index = directory / SAFE_WEIGHTS_NAME, directory / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        return read_safetensors(single, "model")
    if not index.is_file():
        require_safetensors(directory, loader)  # pickles only: the conversion command
        raise CheckpointError(f"checkpoint '{directory}' has no {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"'{index}' is not a safetensors index (a JSON object with a 'weight_map' of tensor -> shard): {e!r}; "
            f"re-export the model or re-download the file"
        ) from None
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(
            f"'{index}' names shard(s) {missing} that are not in '{directory}'; download or copy every shard"
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(read_safetensors(directory / shard, "model"))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"'{index}' lists tensors {absent[:5]} that its shards do not hold; re-export the model")
    return state
