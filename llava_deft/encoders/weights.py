"""Encoder weights from local safetensors files only (never a pickle)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError


def read_safetensors(path: str | Path, kind: str) -> dict[str, Tensor]:
    """A local ``.safetensors`` state dict; a missing file or any other format (pickles) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} weights file '{path}' does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{kind} weights '{path}' must be a .safetensors file (pickles are never loaded)")
    return load_file(str(path))
