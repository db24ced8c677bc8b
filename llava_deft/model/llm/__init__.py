"""The decoder LLM whose layer loop we own (``decoder.py``). Imports only torch and transformers."""

from .decoder import SUPPORTED_MODEL_TYPES, TINY_GPT2, TINY_LLM, DecoderLM, LayerHook, build_llm, generate_from_embeds

__all__ = ["SUPPORTED_MODEL_TYPES", "TINY_GPT2", "TINY_LLM", "DecoderLM", "LayerHook", "build_llm", "generate_from_embeds"]
