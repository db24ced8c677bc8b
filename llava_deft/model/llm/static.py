"""Decoding with a preallocated KV cache, one step captured in a CUDA graph and replayed (issue 16).

Eager decoding of a 7B decoder at batch 1 is launch-bound: a step launches ~15 kernels per layer and the
host needs longer to launch them than the GPU to run them (eval/results/bench_reducers_h100.md: 21-38 ms
per token where reading the weights takes ~4 ms). :class:`StaticDecoder` removes that:

- the prefill writes the prompt's keys and values into slots ``0..P-1`` of buffers of ``max_len`` slots
  per row (:class:`SlotLayer`), attending through a causal, padding-aware ``(B, 1, P, max_len)`` mask;
- a decoding step embeds the token ids in a static input buffer, writes the new key and value at slot
  ``write_at`` (a device tensor), marks the slot valid in a ``(B, max_len)`` mask and attends over every
  slot through that mask -- nothing changes shape or address from step to step;
- on CUDA the step runs eagerly once (on a side stream: the warm-up capture needs), is captured by
  ``torch.cuda.graph`` at the next step and replayed from then on; the host only copies the new token
  ids and positions into the input buffers and launches one graph. The prefill is captured the same
  way per prompt length (the second prompt of a length is captured; the last few lengths are kept).
  All graphs of a decoder share one memory pool: they run one after another on one stream and each
  output is read before the next graph runs.

A decoder keeps its buffers and graphs between ``generate`` calls of the same batch size, dtype and
weights whose cache bucket (prompt + new tokens rounded up to :data:`BUCKET` slots) it holds
(``DecoderLM.static_decoder``; a longer call replaces it with a larger one): a later call replays from
its first step. Rebuilding it for every other length would capture again and again. A cache of more than
:data:`KEEP_BYTES` (4 GiB: a 7B Llama at batch 8 keeps ~1,200 slots) is freed after its call instead, so
a long-context generation does not hold its whole cache afterwards. ``DecoderLM.release_static()`` frees them.

Where it cannot apply (LLM stages, sliding-window layers, an attention implementation that ignores a
4D mask) the caller uses the plain path; a capture that fails (a layer that reads a device value on
the host) is logged and the decoder carries on eagerly with the same buffers -- never silently.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..graphs import HostSyncError, warm_up
from .families import kv_heads_of
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["BUCKET", "SlotLayer", "SlotCache", "StaticDecoder", "static_unsupported"]

logger = logging.getLogger("llava_deft.generate")

BUCKET = 256  # cache slots are allocated in multiples of this, so nearby lengths share buffers and graph
MAX_PREFILL_GRAPHS = 8  # captured prefills kept per decoder (one per prompt length)
KEEP_BYTES = 4 * 2**30  # a decoder whose cache holds more is freed after its call instead of kept for the next


def _compiled(fn, dynamic: bool | None, backend: bool | str):
    """``torch.compile(fn)``: inductor's default mode (``backend`` True) -- kernels fused, no CUDA graphs of its
    own (the static decoder captures its graphs itself, so the two never nest) -- or the named backend."""
    return torch.compile(fn, dynamic=dynamic, backend="inductor" if backend is True else backend)


def static_unsupported(lm: Any) -> str | None:
    """Why ``lm`` cannot decode through a :class:`StaticDecoder`, or None when it can."""
    impl = getattr(lm.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return f"attn_implementation {impl!r} ignores a 4D mask (use 'sdpa' or 'eager')"
    types = set(lm.layer_types())
    if types != {"full_attention"}:
        return f"layer types {sorted(types)}: sliding-window layers need their own ring cache"
    return None


class SlotLayer(DynamicLayer):
    """One layer's keys and values ``(B, H_kv, max_len, d)`` preallocated; ``update`` writes the new ones at
    ``write_at + (0..L-1)`` (a shared device tensor) with ``index_copy_`` and returns the whole buffer."""

    def __init__(self, keys: Tensor, values: Tensor, write_at: Tensor, offsets: Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.write_at, self.offsets = write_at, offsets
        self.length = 0  # host count of written slots (``get_seq_length``)
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        idx = self.write_at + self.offsets[: key_states.shape[-2]]  # (L,) slots, on the device
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[-2], 0


class SlotCache(Cache):
    """A transformers ``Cache`` of :class:`SlotLayer` s sharing one ``write_at`` slot index."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)


class StaticDecoder:
    """Preallocated cache + one decoding step, replayed from a CUDA graph where ``capture`` (see the module
    docstring). Built by ``DecoderLM.static_decoder``; driven by ``generate_from_embeds``."""

    def __init__(self, lm: Any, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 capture: bool, compile: bool | str = False, sized: bool = False):
        cfg = lm.config
        heads = cfg.num_attention_heads
        kv_heads = kv_heads_of(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.lm, self.batch_size, self.max_len = lm, batch_size, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.capture = bool(capture) and self.device.type == "cuda"
        self.eager_attn = getattr(cfg, "_attn_implementation", "sdpa") == "eager"
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        offsets = torch.arange(max_len, device=device)
        self.cache = SlotCache([
            SlotLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                      self.write_at, offsets)
            for _ in range(lm.num_layers)
        ])
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # slots a query may read
        # sized: prompts whose tokens stand for several (token_sizes); each slot's log(size) is added to its key's
        # logits (0 for decoded tokens), the masks become additive floats
        self.sized = bool(sized)
        self.key_bias = torch.zeros(batch_size, max_len, dtype=torch.float32, device=device) if sized else None
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the step's inputs
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.length = 0  # slots written (prompt + steps), on the host
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output buffer
        self._warmed = False
        self.graph_failed: str | None = None  # set when the step's capture failed (logged)
        self._prefills: OrderedDict[int, Any] = OrderedDict()  # prompt length -> "warm" | "eager" | graph
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # one memory pool for all graphs
        self.compiled = compile
        # torch.compile (inductor) fuses each layer's norms, RoPE, activation and residual adds into a few
        # kernels; the CUDA graphs below then capture the compiled kernels. The first call of each compiles.
        self._step_fn = _compiled(self._step, False, compile) if compile else self._step
        self._prefill_fn = _compiled(self._prefill, None, compile) if compile else self._prefill

    def nbytes(self) -> int:
        """Bytes held by the key/value slots."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    # ------------------------------------------------------------------ prefill
    def prefill(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                sizes: Tensor | None = None) -> Tensor:
        """Run the prompt ``(B, P, D)`` (left-padded ``attention_mask`` (B, P), RoPE ``position_ids`` (B, P)) into
        slots ``0..P-1`` -> logits of the last position (B, 1, V). Captured per prompt length ``P`` (the
        last :data:`MAX_PREFILL_GRAPHS` lengths are kept) where ``capture``: one eager warm-up call of a
        length, then capture and replay. ``sizes`` (B, P): the prompt tokens' sizes, for a ``sized`` decoder
        (required there, refused elsewhere)."""
        prompt_len = embeds.shape[1]
        if (sizes is not None) != self.sized:
            raise ValueError("a sized static decoder takes the prompt's sizes, and only it" if self.sized else
                             "this static decoder was built without sizes (sized=False); token sizes need sized=True")
        if sizes is None:
            sizes = embeds.new_zeros(0)  # a placeholder input: the unsized prefill never reads it
        if prompt_len >= self.max_len:
            raise ValueError(f"a prompt of {prompt_len} tokens does not fit a static cache of {self.max_len} slots")
        self.length = prompt_len
        for layer in self.cache.layers:
            layer.length = prompt_len
        prefill, args = self._prefill_fn, (embeds, attention_mask, position_ids, sizes)
        if not self.capture:
            return prefill(*args)
        state = self._prefills.pop(prompt_len, None)
        if state is None:  # first prompt of this length: warm up eagerly on a side stream (finds host syncs)
            if self.compiled:  # compile first: compiling may wait for the device, which the warm-up refuses
                prefill(*args)
            try:
                out = warm_up(self.device, lambda: prefill(*args))
                state = "warm"
            except HostSyncError as e:
                logger.warning("static decoding: the prefill of %d tokens cannot be captured in a CUDA graph (%s); "
                               "running it eagerly with the static cache instead", prompt_len, e)
                state, out = "eager", prefill(*args)
        elif state == "eager":
            out = prefill(*args)
        elif state == "warm":
            buffers = tuple(x.clone() for x in args)
            graph = self._capture(lambda: prefill(*buffers), f"the prefill of {prompt_len} tokens")
            if graph is None:
                state, out = "eager", prefill(*args)
            else:
                state = (graph[0], buffers, graph[1])
                graph[0].replay()
                out = graph[1]
        else:
            graph, buffers, out = state
            for buf, x in zip(buffers, args):
                buf.copy_(x)
            graph.replay()
        self._prefills[prompt_len] = state
        while len(self._prefills) > MAX_PREFILL_GRAPHS:  # least recently used first
            self._prefills.pop(next(iter(self._prefills)))
        return out

    def _prefill(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, sizes: Tensor) -> Tensor:
        """The prefill's kernels (what is captured): causal, padding-aware attention over the slots."""
        lm, fam = self.lm, self.lm.family
        prompt_len = embeds.shape[1]
        self.write_at.zero_()
        self.valid.zero_()
        self.valid[:, :prompt_len] = attention_mask.bool()
        if self.sized:  # the prompt's log-sizes; decoded slots stay 0 (log 1)
            self.key_bias.zero_()
            self.key_bias[:, :prompt_len] = torch.log(sizes.float().clamp(min=1e-6))
        slots = torch.arange(self.max_len, device=embeds.device)
        query = torch.arange(prompt_len, device=embeds.device)[:, None]
        # (B, 1, P, S): earlier real tokens and itself (a padding query sees only itself: no empty row)
        allowed = ((slots <= query) & self.valid[:, None, None, :]) | (slots == query)
        h = fam.inputs(embeds, position_ids)  # (B, P, D); GPT-2: + wpe(position_ids)
        pe = fam.position_embeddings(h, position_ids)
        mask = self._mask(allowed, h.dtype)
        for layer in fam.layers[: lm.num_layers]:
            h = fam.call(layer, h, mask, pe, position_ids, self.cache, True, lm._cache_kw)
        return fam.head(fam.norm(h[:, -1:]))

    def _mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        if self.sized:  # additive: log(size) on every allowed key, the dtype's minimum elsewhere
            return torch.where(allowed, self.key_bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)
        if not self.eager_attn:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------------ one step
    def _step(self) -> Tensor:
        """The captured body: ids and positions from the input buffers -> logits (B, 1, V)."""
        lm, fam = self.lm, self.lm.family
        h = fam.inputs(lm.embed(self.ids), self.positions)  # (B, 1, D)
        self.valid.index_fill_(1, self.write_at, True)
        mask = self._mask(self.valid[:, None, None, :], h.dtype)  # (B, 1, 1, max_len)
        pe = fam.position_embeddings(h, self.positions)
        for layer in fam.layers[: lm.num_layers]:
            h = fam.call(layer, h, mask, pe, self.positions, self.cache, True, lm._cache_kw)
        return fam.head(fam.norm(h))

    def step(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Decode one token per row: ids (B, 1) at RoPE positions (B, 1) -> logits (B, 1, V)."""
        if self.length >= self.max_len:
            raise ValueError(f"the static cache of {self.max_len} slots is full")
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.write_at.fill_(self.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        elif self.capture and self._warmed and self.graph_failed is None:
            captured = self._capture(self._step_fn, "the decoding step")
            if captured is None:
                self.graph_failed = "see the log"
                logits = self._step_fn()
            else:
                self.graph, self.logits = captured
                self.graph.replay()
                logits = self.logits
        elif self.capture and self.graph_failed is None:  # warm-up (cuBLAS handles, autotuning) on a side stream
            if self.compiled:  # compile first (see prefill); the step rewrites the same slot, so it may run twice
                self._step_fn()
            try:
                logits = warm_up(self.device, self._step_fn)
                self._warmed = True
            except HostSyncError as e:
                self.graph_failed = str(e)
                logger.warning("static decoding: the decoding step cannot be captured in a CUDA graph (%s); "
                               "decoding eagerly with the static cache instead", e)
                logits = self._step_fn()
        else:
            logits = self._step_fn()
        self.length += 1
        for layer in self.cache.layers:
            layer.length = self.length
        return logits

    def _capture(self, fn, what: str) -> tuple[torch.cuda.CUDAGraph, Tensor] | None:
        """Capture ``fn``'s kernels (nothing runs): (graph, output buffer), or None after logging why not."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except RuntimeError as e:  # a kernel read a device value on the host: run it eagerly from here on
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.warning("static decoding: %s cannot be captured in a CUDA graph: capturing it failed (%s); "
                           "running it eagerly with the static cache instead", what, reason)
            torch.cuda.synchronize(self.device)
            return None
        return graph, out
