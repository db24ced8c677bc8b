"""The LLaVA model: ``llava.py`` (encoders -> projectors -> reduction pipeline -> splice -> LLM),
``processors.py`` (the factory returning a model with its processors), ``tokenizer.py``,
``projector.py``, ``splice.py`` and ``llm/`` (our loop over the HF decoder's layers). Lazy exports, so
``llava_deft.model.llm`` needs only torch and transformers."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "LlavaDeftForCausalLM": ".llava", "LlavaDeftOutput": ".llava",
    "Processors": ".processors", "create_model_and_processors": ".llava",
    "load_tokenizer": ".tokenizer", "build_projector": ".projector", "splice_media": ".splice",
    "IGNORE_INDEX": ".splice",
})
__all__ = __dir__()
