"""Lazy package exports: ``llava_deft.model.LlavaDeftForCausalLM`` imports its module on first use, so
``import llava_deft.model.llm`` needs only torch and transformers (a bare GPU box, ``eval/bench_layer_loop.py``)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``names`` (attribute -> submodule, relative)."""

    def __getattr__(attr: str) -> Any:
        if attr in names:
            return getattr(importlib.import_module(names[attr], package), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
