"""Decoder LLM wrapper whose layer loop we own, and generation from embeddings with a KV cache.

The HF causal LM is used piece by piece -- token embedding, decoder layers, positional inputs, final
norm, ``lm_head`` and transformers' own mask builders -- so that later in-LLM stages (pruning at layer
K, pair-compressed layers, TOVA eviction) act inside a loop we control, without monkey-patching
transformers and without forcing eager attention. Families (``SUPPORTED_MODEL_TYPES``), each reached
through its adapter in ``families.py``:

- Llama, Qwen2, Qwen3 (``model.{embed_tokens, layers, rotary_emb, norm}``): RoPE inside every layer;
- GPT-2 (``transformer.{wte, wpe, h, ln_f}``, tied ``lm_head``): learned absolute positions,
  ``wpe(position_ids)`` added to the input embeddings once, before block 0.

Two things differ from ``hf_model(...)`` on purpose:

- positions are OURS: ``position_ids`` may have gaps (pruned media tokens keep their original
  positions, see ``TokenBatch.index``) and are used as given, for RoPE as for GPT-2's ``wpe``. The mask
  builders get ``position_ids=None`` so transformers never reads a gap as a packed-sequence boundary;
  padding comes only from the 2D ``attention_mask``.
- generation starts from ``inputs_embeds`` (text embeddings with media spliced in), left-padded.
  ``DecoderLM.embed`` gives token embeddings only; GPT-2's position embeddings are added in ``forward``,
  so spliced media get them as text does.

Reference for the parity tests: litgpt ``tests/test_model.py::test_against_hf_llama_2_and_3``.
Run the tests: ``OMP_NUM_THREADS=1 .venv/bin/pytest -p no:xdist -q tests/test_llm.py``.

Imports only torch and transformers (and llava_deft's errors and safetensors reader, which need
nothing more), so it runs on a bare GPU box (see eval/bench_layer_loop.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ...encoders.weights import require_safetensors
from ...errors import CheckpointError, ContextLengthError, InvalidArgumentError, VocabularyMismatchError
from .families import FAMILIES, Family, family_of
from .runtime import GraphedStep, LLMStages, StagedCache, cache_kwarg
from . import static as static_module
from .static import BUCKET, StaticDecoder, logger, static_unsupported

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "StaticDecoder",
    "TINY_GPT2",
    "TINY_LLM",
    "DecoderLM",
    "LayerHook",
    "build_llm",
    "generate_from_embeds",
]

# Families the loop runs: those with an adapter in families.py (where each says where its pieces are and
# how its layers are called); optional per-layer "sliding_attention" in config.layer_types.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Tiny default LLM: trains on CPU in minutes. No vocab_size: build_llm(vocab_size=len(tokenizer))
# sizes its embeddings to the tokenizer.
TINY_LLM: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    # ~1/sqrt(hidden_size): HF's 0.02 is tuned for width 4096 and, at width 128, starves the path from
    # image tokens to the answer (eval/results/easyvqa_recipe_sweep_h100.md)
    "initializer_range": 0.09,
}

# A tiny GPT-2 (tests, CPU demos): learned positions, fused qkv, LayerNorm, GELU MLP (4x), tied head.
# No vocab_size: build_llm(vocab_size=len(tokenizer)) sizes its embeddings to the tokenizer.
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 2048,
    "initializer_range": 0.09,  # as TINY_LLM's: ~1/sqrt(width)
    # no dropout, as TINY_LLM (a Llama has none): a training forward equals an eval one
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "resid_pdrop": 0.0,
    # the tokenizer's ids apply: GPT-2's 50256 lies outside a tokenizer-sized vocabulary
    "bos_token_id": None,
    "eos_token_id": None,
}

_SLIDING = "sliding_attention"
_FULL = "full_attention"

# (layer_idx, hidden_states (B, L, D), attention_mask (B, past+L) bool, position_ids (B, L)) -> None
# to observe, or a (B, L, D) tensor that replaces the hidden states fed to the next layer.
LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def _check_model_type(model_type: str | None, where: str) -> None:
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported LLM model_type {model_type!r} ({where}); supported: {list(SUPPORTED_MODEL_TYPES)}"
        )


def build_llm(
    spec: Mapping[str, Any] | str | os.PathLike,
    vocab_size: int | None = None,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    resize_vocab: bool = False,
) -> PreTrainedModel:
    """Build an HF causal LM from a config dict (random init) or load one from a local directory.

    Args:
        spec: either a dict of an HF config with ``model_type`` in ``SUPPORTED_MODEL_TYPES`` (e.g.
            ``TINY_LLM``), or the path of a directory written by ``save_pretrained`` (config.json +
            safetensors, sharded or not; loaded with ``local_files_only=True`` and
            ``use_safetensors=True``, never from a hub; a directory with only pickles is refused).
        vocab_size: the tokenizer's size. A config dict without ``vocab_size`` gets that many rows.
            Rows of a given ``vocab_size`` or of a checkpoint are kept when there are at least that
            many (a table padded past the tokenizer, as llava-1.5's 32,064 rows for 32,002 tokens);
            fewer is a ``VocabularyMismatchError`` naming both numbers, unless ``resize_vocab``.
        torch_dtype: parameter dtype (default: the config's, else float32).
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ...
        resize_vocab: grow the embeddings and lm_head to ``vocab_size`` when the tokenizer is larger
            (new rows initialised by transformers).

    Raises:
        FileNotFoundError: ``spec`` is a path that is not an existing directory.
        ValueError: unsupported ``model_type``.
        PickleCheckpointError / CheckpointError: a directory without safetensors weights.
        VocabularyMismatchError: the tokenizer has more tokens than the LLM has rows.
    """
    dtype_kw = {} if torch_dtype is None else {"dtype": torch_dtype}
    if isinstance(spec, Mapping):
        cfg = dict(spec)
        model_type = cfg.pop("model_type", None)
        _check_model_type(model_type, "config dict")
        if vocab_size is not None:
            if "vocab_size" not in cfg or resize_vocab:
                cfg["vocab_size"] = max(int(vocab_size), int(cfg.get("vocab_size", 0)))
            _check_vocab(int(vocab_size), int(cfg["vocab_size"]), "llm.config's vocab_size",
                         "remove vocab_size from llm.config (it then follows the tokenizer) or raise it")
        config = AutoConfig.for_model(model_type, **cfg)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **dtype_kw)

    path = os.fspath(spec)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LLM directory {path!r} does not exist (expected a save_pretrained folder)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_model_type(getattr(config, "model_type", None), f"config.json in {path!r}")
    require_safetensors(path, "AutoModelForCausalLM")
    model, info = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, use_safetensors=True, attn_implementation=attn_implementation,
        output_loading_info=True, **dtype_kw
    )
    if info["missing_keys"]:  # transformers would leave them randomly initialised
        raise CheckpointError(f"LLM directory {path!r} lacks weights {sorted(info['missing_keys'])[:5]}; "
                              f"re-export it with save_pretrained")
    if vocab_size is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if resize_vocab and int(vocab_size) > rows:
            model.resize_token_embeddings(int(vocab_size))
        _check_vocab(int(vocab_size), model.get_input_embeddings().weight.shape[0], f"checkpoint {path!r}",
                     f"use the LLM's own tokenizer, or add the rows and save the LLM again: "
                     f"model.resize_token_embeddings({int(vocab_size)}); model.save_pretrained(dir)")
    return model


def _check_vocab(tokens: int, rows: int, where: str, fix: str) -> None:
    if tokens > rows:
        raise VocabularyMismatchError(
            f"the tokenizer has {tokens} tokens but the LLM ({where}) has {rows} embedding rows, so token ids "
            f"{rows}..{tokens - 1} have no embedding; {fix}"
        )


def _slice_last(hidden_states: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    # 0 keeps every position (HF's convention for logits_to_keep).
    return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]


class DecoderLM(nn.Module):
    """A stock HF decoder LM (held as ``self.hf``) run through our own layer loop.

    ``forward`` takes embeddings, a 2D padding mask over cache + new tokens, and our own
    positions, and returns ``(logits, past_key_values)``. The HF modules are used unchanged, so
    ``DecoderLM(hf).state_dict()`` is ``hf.state_dict()`` with an ``hf.`` prefix.
    """

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.family: Family = family_of(hf_model, type(hf_model).__name__)  # where the pieces are (families.py)
        self.hf = hf_model
        self._cache_kw = cache_kwarg(self.family.layers[0])  # "cache" (transformers >= 5.23) or "past_key_values"
        self._stages: LLMStages | None = None  # installed by use_stages()
        self._static: tuple[tuple, StaticDecoder] | None = None  # (key, decoder) kept between generate calls

    @property
    def config(self):
        return self.hf.config

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: (B, L) long -> (B, L, D) (GPT-2's position embeddings are added by ``forward``)."""
        return self.family.embed_tokens(input_ids)

    def bind_stages(self, stages: "LLMStages | Sequence[nn.Module] | None") -> LLMStages | None:
        """LLM stages (``pipeline.llm``; e.g. ``build_pipeline(cfg, dim).llm``) bound to this model, or None."""
        if stages is None or isinstance(stages, LLMStages):
            return stages  # an LLMStages of no stage is kept: it still adds token_sizes' log-size bias
        stages = list(stages)
        return LLMStages(self, stages) if stages else None

    @contextmanager
    def use_stages(self, stages: "LLMStages | Sequence[nn.Module] | None") -> Iterator[LLMStages | None]:
        """Run ``stages`` in every ``forward`` and ``generate_from_embeds`` inside the block; the HF model
        is untouched (nothing is patched) and the previous stages come back afterwards."""
        previous, self._stages = self._stages, self.bind_stages(stages)
        try:
            yield self._stages
        finally:
            self._stages = previous

    def static_decoder(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype,
                       capture: bool, compile: bool | str = False, sized: bool = False) -> StaticDecoder:
        """A :class:`StaticDecoder` for this batch size, device and dtype with at least ``max_len`` slots, kept
        between calls (its buffers and CUDA graphs are reused) while the weights stay where they are: a call
        that needs more slots replaces it (it only grows; ``release_static()`` frees it); one is kept at a time."""
        fam = self.family
        weights = tuple(p.data_ptr() for p in (fam.embed_tokens.weight, fam.head.weight,
                                               next(fam.layers[0].parameters())))
        key = (batch_size, torch.device(device), dtype, bool(capture), compile, bool(sized), weights, self.training)
        if self._static is not None and self._static[0] == key and max_len <= self._static[1].max_len:
            return self._static[1]  # a larger cache serves a shorter call (its graphs stay; more masked slots read)
        self.release_static()  # free the old buffers before allocating new ones
        decoder = StaticDecoder(self, batch_size, max_len, device, dtype, capture, compile=compile, sized=sized)
        self._static = (key, decoder)
        return decoder

    def release_static(self) -> None:
        """Free the static decoding cache and its CUDA graph (``generate_from_embeds(static_cache=...)``)."""
        self._static = None

    def layer_types(self) -> list[str]:
        """Per-layer attention type, "full_attention" or "sliding_attention"."""
        types = getattr(self.hf.config, "layer_types", None)
        return list(types) if types is not None else [_FULL] * self.num_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values: DynamicCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        layer_hooks: Mapping[int, LayerHook] | None = None,
        stages: "LLMStages | Sequence[nn.Module] | None" = None,
        token_kinds: torch.Tensor | None = None,
        token_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DynamicCache | None]:
        """Run the decoder on embeddings.

        Args:
            inputs_embeds: (B, L, D) new tokens' embeddings.
            attention_mask: (B, past+L), 1 for real tokens, 0 for padding (left padding in
                generation); None means no padding at all.
            position_ids: (B, L) long positions (RoPE, or GPT-2's ``wpe``); may have gaps and need not start at 0.
            past_key_values: a ``DynamicCache`` from a previous call, or None.
            use_cache: create (if None) and fill a cache, and return it.
            logits_to_keep: 0 for logits at every position, k for the last k only.
            layer_hooks: ``{layer_idx: hook}``; each hook is called after that layer as
                ``hook(layer_idx, hidden_states, attention_mask_2d, position_ids)`` and may return a
                tensor of the same shape that replaces the hidden states (or None to only observe).
            stages: LLM stages (``pipeline.llm``) to run (default: those of ``use_stages``). With stages,
                a call is a prefill (empty or no cache; a cache, if asked for, is a :class:`StagedCache`)
                or one decoding step (L = 1, the StagedCache of that prefill); layer stages may drop
                tokens (logits of dropped positions are 0 when ``logits_to_keep`` is 0) and cache
                policies evict. ``attention_mask`` is then ignored after the prefill (the cache keeps
                per-slot validity).
            token_kinds: (B, L) long, ``pipeline.llm.TEXT_KIND`` for text, else the medium's
                ``pipeline.Modality`` code (prefill with stages only; default all text).
            token_sizes: (B, L) float, how many input tokens each prompt token stands for (a merge before
                the LLM with proportional attention, ``TokenBatch.sizes``): every layer adds ``log(size)``
                to the attention logits of each key, in the prefill and, through the cache, while decoding.
                Runs through the LLM-stage runtime (with no stage when none is given; prefill only).

        Returns:
            logits (B, L', V) with L' = L or ``logits_to_keep``; the cache (None if not used).
        """
        bsz, q_len, _ = inputs_embeds.shape
        if position_ids.shape != (bsz, q_len):
            raise ValueError(
                f"position_ids must have shape (B, L) = {(bsz, q_len)}, got {tuple(position_ids.shape)}"
            )
        runner = self.bind_stages(stages) if stages is not None else self._stages
        if token_sizes is not None and runner is None:  # the runtime adds the log-size bias
            runner = LLMStages(self, [])
        if runner is not None:
            if layer_hooks:
                raise ValueError("layer_hooks and LLM stages cannot run together; express the hook as an LLM stage")
            return self._forward_staged(runner, inputs_embeds, attention_mask, position_ids, past_key_values,
                                        use_cache, logits_to_keep, token_kinds, token_sizes)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.hf.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.shape != (bsz, past_len + q_len):
            raise ValueError(
                f"attention_mask must have shape (B, past+L) = {(bsz, past_len + q_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        hooks = dict(layer_hooks or {})
        bad = sorted(i for i in hooks if not 0 <= i < self.num_layers)
        if bad:
            raise ValueError(f"layer_hooks for layers {bad}; the model has layers 0..{self.num_layers - 1}")

        fam = self.family
        types = self.layer_types()
        # position_ids=None: our positions are RoPE / wpe positions, never packing information. The cache goes
        # by position: transformers 5.23 renamed the keyword (past_key_values -> cache).
        mask_args = (self.hf.config, inputs_embeds, attention_mask, past_key_values)
        masks = {_FULL: create_causal_mask(*mask_args, position_ids=None)}
        if _SLIDING in types:
            masks[_SLIDING] = create_sliding_window_causal_mask(*mask_args, position_ids=None)

        hidden_states = fam.inputs(inputs_embeds, position_ids)  # (B, L, D); GPT-2: + wpe(position_ids)
        position_embeddings = fam.position_embeddings(hidden_states, position_ids)  # RoPE (cos, sin); GPT-2 ()
        for i, layer in enumerate(fam.layers[: self.num_layers]):
            hidden_states = fam.call(layer, hidden_states, masks[types[i]], position_embeddings, position_ids,
                                     past_key_values, use_cache, self._cache_kw)
            if i in hooks:
                out = hooks[i](i, hidden_states, attention_mask, position_ids)
                if out is not None:
                    if out.shape != hidden_states.shape:
                        raise ValueError(
                            f"layer hook at layer {i} returned shape {tuple(out.shape)}; "
                            f"it must keep {tuple(hidden_states.shape)}"
                        )
                    hidden_states = out
        hidden_states = fam.norm(hidden_states)
        logits = fam.head(_slice_last(hidden_states, logits_to_keep))  # (B, L', V)
        return logits, (past_key_values if use_cache else None)

    def _forward_staged(self, runner: LLMStages, inputs_embeds, attention_mask, position_ids, cache, use_cache,
                        logits_to_keep, token_kinds, token_sizes=None):
        if cache is not None and not isinstance(cache, StagedCache):
            if cache.get_seq_length() > 0:
                raise ValueError("with LLM stages the cache must be the StagedCache of their prefill; got a "
                                 f"{type(cache).__name__} holding {cache.get_seq_length()} tokens")
            cache = None
        started = cache is not None and cache.layers[0].num_slots > 0
        if not started:
            if use_cache and cache is None:
                cache = runner.new_cache()
            logits = runner.prefill(inputs_embeds, attention_mask, position_ids, cache if use_cache else None,
                                    token_kinds, logits_to_keep, token_sizes)
            return logits, (cache if use_cache else None)
        if token_sizes is not None:
            raise ValueError("token_sizes are for the prefill; a decoding step's new token stands for itself")
        if inputs_embeds.shape[1] != 1:
            raise ValueError(f"with LLM stages a call after the prefill is one decoding step (L = 1), got L = "
                             f"{inputs_embeds.shape[1]}")
        return runner.decode(inputs_embeds, position_ids, cache), cache


def check_compile(compile: Any) -> None:
    """``compile`` is False, True (inductor) or the name of a registered ``torch.compile`` backend."""
    if isinstance(compile, bool):
        return
    import torch._dynamo

    names = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(compile, str) or compile not in names:
        raise InvalidArgumentError(f"compile={compile!r}: give True (inductor), False, or a torch.compile backend "
                                   f"name, one of {sorted(names)}")


_SAID: set[str] = set()


def _log_uncaptured(why: str, runner: "LLMStages | None") -> str:
    """Say once per process and reason why ``generate`` on CUDA runs its prefill (and, until a policy's cache
    is steady, its decoding) without a CUDA graph: never silently."""
    names = sorted({type(s).__name__ for s in runner.stages}) if runner is not None else []
    message = (f"cuda_graph: the prefill runs eagerly ({why}"
               + (f": {', '.join(names)}" if names else "") + ")"
               + ("; decoding steps are replayed from a CUDA graph once every layer's cache policy is full and "
                  "graph_safe (TOVA, StreamingLLM, H2O), else eagerly" if runner is not None else ""))
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)
    return message


@functools.lru_cache(maxsize=64)
def device_ids(values: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A constant id tensor on ``device``, made once: a ``torch.tensor(list, device=cuda)`` per call is a
    host-to-device copy from pageable memory, which waits for every queued kernel. Read it, never write it."""
    return torch.tensor(values, dtype=dtype, device=device)


def _warpers(do_sample: bool, temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    if not do_sample:
        return LogitsProcessorList()
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


@torch.no_grad()
def generate_from_embeds(
    lm: DecoderLM,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    streamer: Any | None = None,
    stages: "LLMStages | Sequence[nn.Module] | None" = None,
    token_kinds: torch.Tensor | None = None,
    return_cache: bool = False,
    cuda_graph: bool | None = None,
    eos_check_every: int | None = None,
    static_cache: bool | None = None,
    compile: bool | str = False,
    token_sizes: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Generate from left-padded prompt embeddings with a KV cache.

    Args:
        inputs_embeds: (B, P, D) prompts, LEFT-padded.
        attention_mask: (B, P), 0 on the left padding, 1 elsewhere.
        position_ids: (B, P) positions of the prompt tokens (may have gaps); row b's first new
            token gets ``position_ids[b, -1] + 1``, and so on.
        max_new_tokens: at most this many new tokens per row.
        eos_token_id: one id or several; a row stops after producing one of them.
        pad_token_id: written after a row has stopped.
        do_sample: greedy (False) or sampling with ``temperature``, ``top_k`` (0 = off) and
            ``top_p`` (1 = off) through transformers' logits warpers; ``generator`` makes it
            reproducible.
        streamer: an object of transformers' streamer protocol (``TextStreamer``,
            ``TextIteratorStreamer``): ``put(ids (1,))`` is called with each new token as it is chosen
            and ``end()`` once generation stops. Only new tokens are put (there are no prompt ids:
            generation starts from embeddings), so build it with ``skip_prompt=False``. Batch size 1.
        stages: LLM stages (``pipeline.llm``: FastV-style pruning, TOVA / H2O / SnapKV / StreamingLLM
            cache policies) run in the prefill and in every decoding step (default: ``lm.use_stages``'s).
        token_kinds: (B, P) long kinds of the prompt tokens (``pipeline.llm.TEXT_KIND`` or a
            ``pipeline.Modality`` code), for stages that act on media tokens.
        token_sizes: (B, P) float, input tokens each prompt token stands for (``DecoderLM.forward``): the
            log-size key bias in the prefill and in every step, through a static decoder built ``sized`` (its
            masks additive) where the static path applies, else through the staged runtime.
        return_cache: also return the cache (a :class:`StagedCache` with stages: ``cache.stats()``
            gives per-layer slots, tokens, evictions and bytes).
        cuda_graph: without LLM stages, on CUDA: prefill and decode through a :class:`StaticDecoder` (keys
            and values in preallocated slots, see ``static_cache``) whose prefill (per prompt length, from
            the second prompt of that length) and step (from the second step) are captured in CUDA graphs
            and replayed: the host launches one graph instead of ~15 kernels per layer; buffers and graphs
            are kept for the next call of the same batch size and cache bucket. With
            cache policies on every layer that evict while decoding (TOVA without
            debug or weighted heads, StreamingLLM, H2O), capture one steady decoding step in a CUDA
            graph once the caches are full and replay it for the remaining steps (same tokens, far
            fewer kernel launches: eager decoding with a policy spends most of a step launching
            kernels, eval/results/bench_decode_h200.md). None (default): on whenever it applies;
            False: always eager. Ignored where it cannot apply (CPU, no policy, a policy that is not
            ``graph_safe``, a cache not yet full).
        eos_check_every: read on the host whether every row has finished only every this many steps
            (each read waits for the GPU to drain its queue); rows that finished emit ``pad_token_id``
            meanwhile and the tokens are cut back, with one read at the end, to where the last row
            finished, so the result equals a check at every step (the returned cache may hold up to
            ``eos_check_every - 1`` more steps). None (default): 8 on CUDA, 1 elsewhere (a CPU waits
            for nothing). A streamer reads every token anyway.
        static_cache: without LLM stages: prefill and decode into preallocated key/value slots (prompt +
            ``max_new_tokens`` + 1 rounded up to a multiple of 256), attending over them through a validity
            mask, so the prefill of a prompt length and every step have fixed shapes (what ``cuda_graph``
            captures: the prefill per prompt length, the step once). Logits equal the plain path's up to
            kernel rounding. None (default): on where the capture applies (CUDA, no stages, ``cuda_graph``
            not False, full-attention layers under 'sdpa' or 'eager'); True: also on CPU or uncaptured
            (``cuda_graph=False``), ``ValueError`` where it cannot apply; False: never.
            With ``return_cache`` the cache returned is then the static one (a :class:`SlotCache`).
        compile: run the static decoder's prefill and step through ``torch.compile`` (inductor fuses each
            layer's norms, RoPE, activation and residual adds, which at batch 1 cost more than the matrix
            products), captured in CUDA graphs as above. Turns ``static_cache`` on where it applies, CPU
            included; where it cannot apply (LLM stages, sliding windows) a warning says why and the plain
            path runs. The first call of a batch size compiles (tens of seconds for a 7B model); the
            compiled code is kept with the static decoder. A string names another ``torch.compile`` backend
            (``"aot_eager"`` traces without generating kernels: a quick check that a model compiles).

    The prompt occupies positions up to ``position_ids.max()`` (original, unreduced positions) and new
    tokens follow it, so ``position_ids.max() + 1 + max_new_tokens`` may not exceed the LLM's
    ``max_position_embeddings`` (``ContextLengthError`` naming both numbers).

    Returns:
        (B, T) long new tokens, T <= max_new_tokens; generation stops once every row has hit EOS.
    """
    bsz, prompt_len, _ = inputs_embeds.shape
    if attention_mask.shape != (bsz, prompt_len) or position_ids.shape != (bsz, prompt_len):
        raise ValueError(
            f"attention_mask and position_ids must be (B, P) = {(bsz, prompt_len)}, got "
            f"{tuple(attention_mask.shape)} and {tuple(position_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = getattr(lm.config, "max_position_embeddings", None)
    spans = position_ids.max(1).values + 1  # (B,) positions each prompt spans
    # both prompt checks in one read of the device (each read waits for every queued kernel)
    left_padded, longest = (torch.stack([attention_mask[:, -1].bool().all().long(), spans.max()]).tolist()
                            if bsz else (1, 0))
    if not left_padded:
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompts must be LEFT-padded; rows {rows} end with padding")
    if limit is not None and bsz and longest + max_new_tokens > limit:
        row = int(spans.argmax())
        raise ContextLengthError(int(spans[row]), max_new_tokens, limit, f"prompt #{row} of the batch")
    if streamer is not None and bsz != 1:
        raise ValueError(f"a streamer takes one prompt at a time (batch size 1), got a batch of {bsz}")
    device = inputs_embeds.device
    if eos_check_every is None:
        eos_check_every = 8 if device.type == "cuda" else 1
    check_compile(compile)
    if isinstance(eos_check_every, bool) or not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every must be an integer >= 1, got {eos_check_every!r}")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = device_ids(tuple(int(i) for i in eos_ids), device)
    warpers = _warpers(do_sample, temperature, top_k, top_p)

    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    next_pos = position_ids[:, -1:].to(device=device, dtype=torch.long) + 1  # (B, 1)
    runner = lm.bind_stages(stages) if stages is not None else lm._stages
    why_not = static_unsupported(lm) if runner is None else "LLM stages keep their own cache (StagedCache)"
    if static_cache is None:
        static_cache = (compile or cuda_graph is not False and device.type == "cuda") and why_not is None
        if cuda_graph is not False and device.type == "cuda" and why_not is not None:
            _log_uncaptured(why_not, runner)
    elif static_cache and why_not is not None:
        raise ValueError(f"static_cache=True cannot apply: {why_not}; pass static_cache=None or False")
    if compile and not static_cache:
        logger.warning("generate: compile=True applies to the static decoder only, which is off (%s); "
                       "decoding uncompiled", why_not or "static_cache=False")
    if token_sizes is not None and runner is None and not static_cache:  # the runtime adds the log-size bias
        runner = LLMStages(lm, [])
    static = None
    if static_cache:
        slots = -(-(prompt_len + max_new_tokens + 1) // BUCKET) * BUCKET
        dtype = next(lm.family.layers[0].parameters()).dtype
        static = lm.static_decoder(bsz, slots, device, dtype, capture=cuda_graph is not False, compile=compile,
                                   sized=token_sizes is not None)
        logits, cache = static.prefill(inputs_embeds, attention_mask, position_ids, token_sizes), static.cache
    else:
        cache = runner.new_cache() if runner is not None else DynamicCache(config=lm.config)
        logits, cache = lm(inputs_embeds, attention_mask, position_ids, cache, use_cache=True, logits_to_keep=1,
                           stages=runner, token_kinds=token_kinds, token_sizes=token_sizes)

    tokens = torch.empty(bsz, 0, dtype=torch.long, device=device)
    graphed = None  # a GraphedStep once the cache is steady (cuda_graph=True)
    warmed = False
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    done_at = torch.full((bsz,), max(max_new_tokens - 1, 0), dtype=torch.long, device=device)  # (B,) first EOS step
    ones = torch.ones(bsz, 1, dtype=attention_mask.dtype, device=device)
    for step in range(max_new_tokens):
        scores = logits[:, -1, :].float()  # (B, V)
        if do_sample:
            probs = torch.softmax(warpers(tokens, scores), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        now = torch.isin(nxt, eos) & ~finished
        done_at = torch.where(now, step, done_at)
        finished |= now
        if step == max_new_tokens - 1 or (step % eos_check_every == eos_check_every - 1 or streamer is not None) \
                and bool(finished.all()):
            break
        if static is not None:  # preallocated slots, the step replayed from a CUDA graph where captured
            logits = static.step(nxt[:, None], next_pos)
            next_pos = next_pos + 1
            continue
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        step_embeds = lm.embed(nxt[:, None])  # (B, 1, D)
        if graphed is not None:
            logits = graphed(step_embeds, next_pos)
        elif cuda_graph is not False and runner is not None and device.type == "cuda" and runner.graph_ready(cache):
            if not warmed:  # one eager step on a side stream before capturing (CUDA graph warm-up)
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    logits, cache = lm(step_embeds, attention_mask, next_pos, cache, use_cache=True,
                                       logits_to_keep=1, stages=runner)
                torch.cuda.current_stream(device).wait_stream(side)
                warmed = True
            else:
                graphed = GraphedStep(runner, cache, step_embeds, next_pos)
                logits = graphed(step_embeds, next_pos)
        else:
            logits, cache = lm(step_embeds, attention_mask, next_pos, cache, use_cache=True, logits_to_keep=1,
                               stages=runner)
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    if static is not None and static.nbytes() > static_module.KEEP_BYTES and not return_cache:
        lm.release_static()  # a long-context cache is not kept between calls (see KEEP_BYTES)
    if eos_check_every > 1 and tokens.shape[1] > 1 and bool(finished.all()):  # one read: cut the steps after the last EOS
        tokens = tokens[:, : int(done_at.max()) + 1]
    return (tokens, cache) if return_cache else tokens
