"""Bounded token memories for long media streams, compressed by a KV-cache policy (torch and pipeline only).

A long video (or audio clip) is encoded chunk by chunk; each chunk's tokens enter a
:class:`StreamMemory` that never holds more than ``max_tokens`` of them. When a chunk brings it over
budget, the same :class:`pipeline.llm.CachePolicy` that compresses the LLM's KV cache (``tova``,
``h2o``, ``snapkv``, ``streaming_llm``) decides which tokens stay, so a stream of any length has a
fixed footprint: ``max_tokens`` tokens between chunks, at most ``max_tokens + chunk`` while one is
added (:attr:`StreamMemory.peak_slots` records it).

    memory = StreamMemory("tova", max_tokens=256)
    for chunk in chunks:                        # (n, D) tokens each, in stream order
        memory.add(chunk)
    tokens, positions = memory.result()         # (<= 256, D), (<= 256,) original positions, ascending

How the policy sees the memory: a :class:`~pipeline.llm.CacheView` of ONE row, ONE layer (0) and ONE
KV head (one query head), whose keys and values are the memory's tokens followed by the new chunk's
(``(1, 1, T, D)``, ``T = memory + chunk``), ``positions`` their original positions in the stream,
``kind`` the stream's ``Modality`` code and ``phase`` ``"decode"`` (a stream has no prompt). The
attention ``attn (1, 1, Q, T)`` is what the new chunk asks of everything held:

- queries (``queries="chunk"``, the default): every token of the new chunk is a query (``Q = n``);
  it attends to every memory slot and to the chunk's other tokens, never to itself (its own slot
  would get the largest similarity there is, and every policy would then favour the newest tokens:
  the memory would degenerate into a recency window). ``queries="mean"``: one query, the chunk's
  mean token (``Q = 1``), attending to every slot.
- scores: scaled dot products of L2-normalised tokens, ``cos(q, k) / temperature``, softmaxed over
  the slots in float32. ``temperature`` (default ``0.1``, as contrastive encoders use) sets how
  peaked the attention is: cosines lie in [-1, 1], so 0.1 spreads the logits over 20 nats (a slot
  much like the query gets e^10 the weight of an orthogonal one); larger values flatten it towards
  uniform.

The policy's ``update`` sees every view (H2O accumulates attention across chunks in ``extras``,
which the memory keeps aligned with its slots and gathers at every eviction); ``score`` is called
only when the memory is over budget, and :func:`pipeline.llm.keep_topk` keeps the ``max_tokens``
best slots, in stream order. The memory evicts whenever it is over budget, whatever the policy's
``evict_in_prefill`` / ``evict_in_decoding`` say (SnapKV, a prefill-only policy in the LLM, scores
the stream the same way): bounding the stream is the point. A policy's ``cache_max_size`` should be
``max_tokens`` (H2O sizes its recent share and SnapKV caps its window by it); :func:`build_cache_policy`
and a policy given by name set it so.

Kept tokens keep their ORIGINAL positions (``positions``), ascending; :func:`stream_batch` turns
several memories' results into a ``TokenBatch`` whose ``index`` is those positions and whose
``layout`` is the whole stream's, so RoPE positions after the splice are the unreduced ones (kept
tokens leave gaps, as after any reduction stage). ``LlavaDeftForCausalLM.compress_all_encoders``
routes a model's video and audio encoders through these memories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import Modality, TokenBatch, build_pipeline
from pipeline.llm import CachePolicy, CacheView, keep_topk
from pipeline.registry import get_stage, list_stages

__all__ = ["DEFAULT_TEMPERATURE", "EncoderMemory", "StreamMemory", "build_cache_policy", "cache_policy_names",
           "stream_batch"]

DEFAULT_TEMPERATURE = 0.1
"""``cos(q, k) / temperature`` logits of a stream's attention (see the module docstring)."""

Queries = Literal["chunk", "mean"]


def cache_policy_names() -> list[str]:
    """Registered KV-cache policies (``pipeline.llm.CachePolicy`` subclasses), sorted."""
    return [n for n in list_stages("llm") if issubclass(get_stage(n), CachePolicy)]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: give an integer >= 1")
    return value


def build_cache_policy(name: str, budget: int, /, **options) -> CachePolicy:
    """The cache policy ``name`` with ``cache_max_size=budget`` and its other ``options`` validated as
    in a pipeline's ``llm:`` list (unknown names and options raise ``ValueError`` naming them)."""
    names = cache_policy_names()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"policy={name!r} is not a KV-cache policy; choose one of {names}")
    _positive_int(budget, "budget")
    if "cache_max_size" in options:
        raise ValueError("cache_max_size is set from the memory's token budget; do not pass it as a policy option")
    return build_pipeline({"llm": [{"name": name, "cache_max_size": budget, **options}]}, dim=1).llm[0]


class StreamMemory:
    """At most ``max_tokens`` tokens of one stream (one row), compressed by a cache policy.

    ``policy``: a :class:`~pipeline.llm.CachePolicy` or its registered name (then built with
    ``cache_max_size=max_tokens`` and ``policy_options``). ``temperature`` and ``queries``: how the new
    chunk's attention is computed (module docstring). ``kind``: the stream's ``Modality`` code (the
    view's ``kind``). The policy is bound to one layer and one head and ``reset`` here, once per stream.

    State, all on the chunks' device: ``tokens (M, D)`` (in the chunks' dtype), ``positions (M,)``
    long (original positions, ascending), ``valid (M,)`` bool, ``extras`` (the policy's per-slot
    state, ``(1, 1, M)``), with ``M <= max_tokens`` between calls of :meth:`add`. ``seen``: tokens
    streamed so far (the next chunk starts at that position); ``evicted``: tokens dropped so far;
    ``peak_slots``: the most slots ever held at once (``<= max_tokens + the largest chunk``).
    """

    def __init__(self, policy: CachePolicy | str, max_tokens: int, *, temperature: float = DEFAULT_TEMPERATURE,
                 queries: Queries = "chunk", kind: int = int(Modality.VIDEO), **policy_options):
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: give a finite number > 0")
        if queries not in ("chunk", "mean"):
            raise ValueError(f"queries={queries!r}: give 'chunk' (every new token asks) or 'mean' (their mean asks)")
        if isinstance(policy, str):
            policy = build_cache_policy(policy, self.max_tokens, **policy_options)
        elif not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a pipeline.llm.CachePolicy or its name, got {type(policy).__name__}")
        elif policy_options:
            raise TypeError(f"policy options {sorted(policy_options)} go with a policy NAME; this one is built already")
        policy.bind(1, 1, 1)  # one layer (0), one query head reading one KV head
        policy.reset()
        self.policy, self.temperature, self.queries, self.kind = policy, float(temperature), queries, int(kind)
        self.tokens: Tensor | None = None
        self.positions: Tensor = torch.zeros(0, dtype=torch.long)
        self.valid: Tensor = torch.zeros(0, dtype=torch.bool)
        self.extras: dict[str, Tensor] = {}
        self.seen = 0
        self.evicted = 0
        self.peak_slots = 0

    def __len__(self) -> int:
        """Real tokens held."""
        return int(self.valid.sum())

    @property
    def num_slots(self) -> int:
        """Slots held (real or not; all are real unless a policy kept invalid ones)."""
        return int(self.valid.shape[0])

    def nbytes(self) -> int:
        """Bytes of the tokens, positions, validity and extras held."""
        held = [self.positions, self.valid, *self.extras.values()] + ([self.tokens] if self.tokens is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    # ------------------------------------------------------------------ attention of a chunk
    @torch.no_grad()  # scores only choose slots; gradients flow through the kept tokens themselves
    def _attention(self, chunk: Tensor, keys: Tensor) -> Tensor:
        """(n, D) chunk, (T, D) slots (the chunk's are the last n) -> (1, 1, Q, T) float32 probabilities."""
        t, n = keys.shape[0], chunk.shape[0]
        if self.policy.window == 0:  # the policy reads no attention (StreamingLLM)
            return keys.new_zeros(1, 1, 0, t, dtype=torch.float32)
        k = F.normalize(keys.float(), dim=-1)
        if self.queries == "mean":
            q = F.normalize(chunk.float().mean(0, keepdim=True), dim=-1)  # (1, D)
            logits = q @ k.T / self.temperature  # (1, T)
        else:
            q = F.normalize(chunk.float(), dim=-1)  # (n, D)
            logits = q @ k.T / self.temperature  # (n, T)
            if t > 1:  # a query never attends to itself (there is always another slot to attend to)
                own = torch.arange(n, device=keys.device) + (t - n)
                logits[torch.arange(n, device=keys.device), own] = -math.inf
        return logits.softmax(-1).view(1, 1, -1, t)

    # ------------------------------------------------------------------ streaming
    def add(self, chunk: Tensor) -> "StreamMemory":
        """Append ``chunk (n, D)`` (the stream's next ``n`` tokens, positions ``seen .. seen + n - 1``);
        when the memory then holds more than ``max_tokens``, the policy keeps the ``max_tokens`` best.
        Returns the memory."""
        if chunk.dim() != 2:
            raise ValueError(f"a chunk is (n, D) tokens, got shape {tuple(chunk.shape)}")
        n, d = chunk.shape
        if self.tokens is None:
            self.tokens = chunk.new_zeros(0, d)
            self.positions, self.valid = self.positions.to(chunk.device), self.valid.to(chunk.device)
        elif d != self.tokens.shape[1]:
            raise ValueError(f"chunk tokens have width {d}, the memory's have {self.tokens.shape[1]}")
        if n == 0:
            return self
        dev = self.tokens.device
        chunk = chunk.to(device=dev, dtype=self.tokens.dtype)
        keys = torch.cat([self.tokens, chunk])  # (T, D)
        positions = torch.cat([self.positions, torch.arange(self.seen, self.seen + n, device=dev)])
        valid = torch.cat([self.valid, torch.ones(n, dtype=torch.bool, device=dev)])
        extras = {k: torch.cat([x, x.new_zeros(1, 1, n)], -1) for k, x in self.extras.items()}  # new slots: 0
        t = keys.shape[0]
        self.peak_slots = max(self.peak_slots, t)
        flat = keys.detach().view(1, 1, t, d)  # what the policy reads (it never backpropagates)
        view = CacheView(
            keys=flat, values=flat, valid=valid.view(1, 1, t),
            positions=positions.view(1, 1, t), kind=torch.full((1, 1, t), self.kind, dtype=torch.long, device=dev),
            attn=self._attention(chunk.detach(), flat[0, 0]), layer=0, phase="decode", extras=extras,
        )
        self.policy.update(view)
        if t > self.max_tokens:
            keep = keep_topk(self.policy.score(view), view.valid, self.max_tokens)  # (1, 1, K) ascending
            self.policy.observe(view, keep)
            idx = keep[0, 0]
            keys, positions, valid = keys[idx], positions[idx], valid[idx]
            extras = {k: x.gather(-1, keep) for k, x in view.extras.items()}
            self.evicted += t - idx.shape[0]
        else:
            extras = dict(view.extras)
        self.tokens, self.positions, self.valid, self.extras = keys, positions, valid, extras
        self.seen += n
        return self

    def feed(self, tokens: Tensor, chunk_size: int) -> "StreamMemory":
        """Stream ``tokens (L, D)`` in chunks of ``chunk_size`` (the last may be shorter). Returns the memory."""
        _positive_int(chunk_size, "chunk_size")
        for start in range(0, tokens.shape[0], chunk_size):
            self.add(tokens[start:start + chunk_size])
        return self

    def result(self) -> tuple[Tensor, Tensor]:
        """``(tokens (K, D), positions (K,))``: the real tokens held and their original positions,
        ascending (K <= max_tokens)."""
        if self.tokens is None:
            raise ValueError("the memory has seen no chunk yet")
        return self.tokens[self.valid], self.positions[self.valid]


def stream_batch(results: list[tuple[Tensor, Tensor]], layout: Tensor, modality: Modality | int) -> TokenBatch:
    """Rows of kept tokens -> a :class:`~pipeline.TokenBatch` that looks like a reduced batch.

    ``results``: per row ``(tokens (K_r, D), positions (K_r,))`` (:meth:`StreamMemory.result`);
    ``layout (R, 3)``: each row's WHOLE stream ``(T, H, W)`` (positions lie in ``0 .. T*H*W - 1``).
    Rows are right-padded to the longest (mask False); ``index`` holds the kept positions, ascending;
    padding slots continue after the stream (``T*H*W``, ``T*H*W + 1``, ...), so every row's index
    ascends and padding never aliases a real position.
    """
    r = len(results)
    if layout.shape != (r, 3):
        raise ValueError(f"layout must be ({r}, 3), got {tuple(layout.shape)}")
    if r == 0:
        raise ValueError("stream_batch needs at least one row")
    tokens0 = results[0][0]
    dev, d = tokens0.device, tokens0.shape[1]
    counts = torch.tensor([p.shape[0] for _, p in results], dtype=torch.long, device=dev)  # (R,)
    width = max(1, int(counts.max()))
    totals = layout.to(dev).prod(1)  # (R,)
    if bool((counts > totals).any()):
        raise ValueError(f"rows keep {counts.tolist()} tokens, more than their layouts hold {totals.tolist()}")
    cols = torch.arange(width, device=dev)
    mask = cols < counts.unsqueeze(1)  # (R, width)
    tokens = torch.cat([t for t, _ in results]).to(dev)  # (sum K_r, D)
    positions = torch.cat([p for _, p in results]).to(dev)  # (sum K_r,)
    out = tokens.new_zeros(r, width, d)
    out[mask] = tokens
    if bool((positions < 0).any()) or bool((positions >= totals.repeat_interleave(counts)).any()):
        raise ValueError("kept positions must lie in 0 .. T*H*W - 1 of their row's layout")
    index = totals.unsqueeze(1) + cols - counts.unsqueeze(1)  # padding: T*H*W + 0, 1, ...
    index[mask] = positions
    mod = torch.full((r,), int(modality), dtype=torch.long, device=dev)
    return TokenBatch(tokens=out, mask=mask, index=index, modality=mod, layout=layout.to(device=dev, dtype=torch.long))


@dataclass
class EncoderMemory:
    """What ``LlavaDeftForCausalLM.compress_all_encoders`` set: one policy and token budget per
    modality, the chunking and the attention's ``temperature`` / ``queries``. ``memory(key)`` opens a
    fresh :class:`StreamMemory` for one stream of ``"video"`` or ``"audio"`` (its policy reset)."""

    policy: str
    video_tokens: int
    audio_tokens: int
    chunk_frames: int
    chunk_seconds: float | None
    temperature: float = DEFAULT_TEMPERATURE
    queries: Queries = "chunk"
    policy_options: dict[str, Any] = field(default_factory=dict)
    policies: dict[str, CachePolicy] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        budgets = {"video": self.video_tokens, "audio": self.audio_tokens}
        for key, budget in budgets.items():  # built now: bad names / options fail at set-up, not mid-stream
            self.policies.setdefault(key, build_cache_policy(self.policy, budget, **self.policy_options))

    def memory(self, key: str) -> StreamMemory:
        budget = {"video": self.video_tokens, "audio": self.audio_tokens}[key]
        kind = Modality.VIDEO if key == "video" else Modality.AUDIO
        return StreamMemory(self.policies[key], budget, temperature=self.temperature, queries=self.queries,
                            kind=int(kind))
