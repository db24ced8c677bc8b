"""llava-deft: a LLaVA-style multimodal LLM with a config-built token-reduction pipeline.

    import llava_deft
    model = llava_deft.load_model("runs/easyvqa_tiny/final")
    print(model.generate("what shape is this?", images=["img.png"]))

Submodules import lazily, so ``llava_deft.llm`` works where only torch + transformers exist.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("llava_deft.inference", "load_model"),
    "LlavaDeft": ("llava_deft.inference", "LlavaDeft"),
    "LlavaDeftForCausalLM": ("llava_deft.model", "LlavaDeftForCausalLM"),
    "load_model_config": ("llava_deft.config", "load_model_config"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'llava_deft' has no attribute {name!r}")


__all__ = sorted(_LAZY)
