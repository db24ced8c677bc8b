"""llava-deft: a LLaVA-style multimodal LLM with a config-built token-reduction pipeline.

    import llava_deft
    model = llava_deft.load_model("runs/easyvqa_tiny/final")
    print(model.generate("what shape is this?", images=["img.png"]))

    model, processors = llava_deft.create_model_and_processors("configs/model/tiny.yaml")

Rooms (each imports only the rooms above it in this list; ``pipeline`` is below them all):
``errors``, ``config`` (model and train configs), ``encoders`` (image, video, audio), ``modality`` (the
one list of modalities), ``model`` (the LLaVA model, tokenizer, projector, splice, ``model.llm``: our
layer loop), ``tasks`` (generated tasks), ``data`` (datasets, collator), ``train``, ``inference``, ``cli``.
Exports import lazily, so ``llava_deft.model.llm`` works where only torch + transformers exist.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, {
    "load_model": ".inference",
    "LlavaDeft": ".inference",
    "LlavaDeftForCausalLM": ".model",
    "create_model_and_processors": ".model",
    "Processors": ".model",
    "load_model_config": ".config",
})
__all__ = __dir__()
