"""The runtime of stages inside the LLM (``pipeline.llm``): a cache that shrinks, and the loop's two phases.

:class:`LLMStages` binds a list of LLM stages (``pipeline.build_pipeline(cfg, dim).llm``) to a
:class:`~llava_deft.model.llm.decoder.DecoderLM`; ``DecoderLM.forward(..., stages=)`` and
``generate_from_embeds(..., stages=)`` run it (or ``with lm.use_stages(stages):`` for a block). The HF
modules are never patched: the loop calls the stock decoder layers, passes them a
:class:`StagedCache` and builds the masks itself.

:class:`StagedCache` is a transformers ``Cache`` of :class:`TrackedLayer` s. Each layer keeps, beside
its keys and values ``(B, H_kv, T, d)``, per-slot validity, RoPE positions, token kinds and a policy's
extras, and can shrink for real:

- ``keep(idx)`` gathers the chosen slots into new, smaller tensors (the old ones are freed) and leaves
  one spare slot behind them;
- in steady decoding (a full cache that evicts one token per step, TOVA / StreamingLLM / H2O) the new
  token's key is written into the spare slot, attention runs over ``budget + 1`` slots, and the evicted
  slot is overwritten with the new token: no tensor grows, nothing is copied but one key per KV head.

Slots are not in position order after that; attention does not care (keys carry their RoPE phase and
validity is per slot), and ``positions`` records where each key was cached.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask

from pipeline.llm import TEXT_KIND, CachePolicy, CacheView, LayerStage, LayerState, keep_topk

from .families import kv_heads_of
from .probe import attention_probe

__all__ = ["LLMStages", "StageTrace", "StagedCache", "TrackedLayer", "cache_kwarg"]

_PROBE_BYTES = 2**28  # float32 scores per probe chunk (256 MiB) for policies that read every prompt position (H2O)


def cache_kwarg(layer: nn.Module) -> str:
    """The keyword the installed transformers' decoder layers take their cache by: ``cache`` (>= 5.23,
    which deprecates ``past_key_values`` for 5.40) or ``past_key_values`` (older 5.x)."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TrackedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose slots carry metadata and that can shrink (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.valid: Tensor | None = None  # (B, H_kv, T) bool
        self.positions: Tensor | None = None  # (B, H_kv, T) long
        self.kind: Tensor | None = None  # (B, H_kv, T) long
        self.extras: dict[str, Tensor] = {}
        self.headwise = False  # validity differs between KV heads (after a per-head eviction)
        self.evicted = 0  # slots dropped so far (per row and KV head, summed over evictions)
        self._buf: tuple[Tensor, Tensor] | None = None  # (keys, values) with one spare slot at the end
        self._spare = False  # keys == buf[:, :, :-1] and the last slot is free
        self._wrote_spare = False

    # -------------------------------------------------------------- transformers' side
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self._spare and key_states.shape[-2] == 1:
            bk, bv = self._buf
            bk[:, :, -1:].copy_(key_states)
            bv[:, :, -1:].copy_(value_states)
            self.keys, self.values = bk, bv
            self._spare, self._wrote_spare = False, True
            return bk, bv
        self._wrote_spare = False
        self._buf, self._spare = None, False
        return super().update(key_states, value_states, *args, **kwargs)

    # -------------------------------------------------------------- our side
    @property
    def num_slots(self) -> int:
        return 0 if self.valid is None else self.valid.shape[-1]

    def append_meta(self, positions: Tensor, valid: Tensor, kind: Tensor) -> None:
        """Record the (B, L) positions / validity / kinds of the tokens the last ``update`` added."""
        hkv = self.keys.shape[1]
        pos, val, knd = (x.unsqueeze(1).expand(-1, hkv, -1) for x in (positions, valid, kind))
        if self._wrote_spare:  # the new token sits in the spare slot (the last one)
            for name, new in (("valid", val), ("positions", pos), ("kind", knd)):
                buf = getattr(self, "_meta_buf")[name]
                buf[:, :, -1:].copy_(new)
                setattr(self, name, buf)
            for name, buf in self._extra_buf.items():
                buf[:, :, -1:].zero_()
                self.extras[name] = buf
            return
        if self.valid is None:
            self.valid, self.positions, self.kind = val.clone(), pos.clone(), knd.clone()
        else:
            self.valid = torch.cat([self.valid, val], dim=-1)
            self.positions = torch.cat([self.positions, pos], dim=-1)
            self.kind = torch.cat([self.kind, knd], dim=-1)
        for name, x in self.extras.items():  # a policy's per-slot state: new slots start at 0
            self.extras[name] = torch.cat([x, x.new_zeros(*x.shape[:2], val.shape[-1])], dim=-1)

    def keep(self, idx: Tensor) -> None:
        """Keep slots ``idx`` (B, H_kv, K) of every (row, KV head); everything else is freed."""
        b, hkv, k = idx.shape
        d = self.keys.shape[-1]
        gather = idx.unsqueeze(-1).expand(b, hkv, k, d)
        bk = self.keys.new_empty(b, hkv, k + 1, d)
        bv = self.values.new_empty(b, hkv, k + 1, self.values.shape[-1])
        torch.gather(self.keys, 2, gather, out=bk[:, :, :k])
        torch.gather(self.values, 2, idx.unsqueeze(-1).expand(b, hkv, k, self.values.shape[-1]), out=bv[:, :, :k])
        self._meta_buf = {}
        for name in ("valid", "positions", "kind"):
            x = getattr(self, name)
            buf = x.new_zeros(b, hkv, k + 1)
            torch.gather(x, 2, idx, out=buf[:, :, :k])
            self._meta_buf[name] = buf
            setattr(self, name, buf[:, :, :k])
        self._extra_buf = {}
        for name, x in self.extras.items():
            buf = x.new_zeros(b, hkv, k + 1)
            torch.gather(x, 2, idx, out=buf[:, :, :k])
            self._extra_buf[name] = buf
            self.extras[name] = buf[:, :, :k]
        self._buf = (bk, bv)
        self.keys, self.values = bk[:, :, :k], bv[:, :, :k]
        self._spare, self.headwise = True, True

    def evict_one(self, slot: Tensor) -> None:
        """Steady decoding: drop slot ``slot`` (B, H_kv) of every (row, KV head) by moving the token in
        the spare (last) slot there; the cache keeps its ``budget`` slots and the spare is free again."""
        bk, bv = self._buf
        last = bk.shape[2] - 1
        idx = slot.unsqueeze(-1)  # (B, H_kv, 1)
        for buf in (bk, bv):
            new = buf[:, :, last:]  # (B, H_kv, 1, d)
            buf.scatter_(2, idx.unsqueeze(-1).expand_as(new), new.clone())
        for name, buf in self._meta_buf.items():
            buf.scatter_(2, idx, buf[:, :, last:].clone())
            setattr(self, name, buf[:, :, :last])
        for name, x in list(self.extras.items()):  # a policy may have replaced its extras this step
            buf = x if x.shape[-1] == last + 1 else self._extra_buf[name]
            buf.scatter_(2, idx, buf[:, :, last:].clone())
            self._extra_buf[name] = buf
            self.extras[name] = buf[:, :, :last]
        self.keys, self.values = bk[:, :, :last], bv[:, :, :last]
        self._spare, self.headwise = True, True
        self.evicted += 1

    def bytes(self) -> int:
        """Bytes held by this layer's keys and values (including a spare slot)."""
        if self._buf is not None:
            return sum(t.numel() * t.element_size() for t in self._buf)
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class StagedCache(Cache):
    """A transformers ``Cache`` of :class:`TrackedLayer` s (one per decoder layer)."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[TrackedLayer() for _ in range(num_layers)])

    def stats(self) -> list[dict]:
        """Per layer: slots held (T), real tokens per row (mean over rows and KV heads, and max),
        evicted so far (per row and KV head), bytes of keys + values."""
        out = []
        for i, layer in enumerate(self.layers):
            if layer.valid is None:
                out.append({"layer": i, "slots": 0, "tokens_mean": 0.0, "tokens_max": 0, "evicted": 0, "bytes": 0})
                continue
            per = layer.valid.sum(-1)  # (B, H_kv)
            out.append({
                "layer": i, "slots": layer.num_slots, "tokens_mean": round(float(per.float().mean()), 3),
                "tokens_max": int(per.max()) if per.numel() else 0, "evicted": int(layer.evicted),
                "bytes": layer.bytes(),
            })
        return out


@dataclass
class StageTrace:
    """What one layer stage did in a recorded prefill (``LLMStages(..., record=True)``; all tensors as the
    stage saw or returned them, on its device).

    ``stage`` the stage module; ``position`` its place in ``LLMStages.stages``; ``after_layer`` the decoder
    layer it followed (``stage.layer - 1``). ``index_in`` / ``mask_in`` (B, L_in): the input state's
    prompt column per column and its validity; ``index`` / ``mask`` / ``positions`` (B, L_out): the output
    state's. ``assignment`` (B, L_in) long: the output column each input column went into (-1 = dropped or
    padding), the stage's ``last_assignment`` when it set one (merging stages), else derived from
    ``index`` (:meth:`columns`).
    """

    stage: nn.Module
    position: int
    after_layer: int
    index_in: Tensor
    mask_in: Tensor
    index: Tensor
    mask: Tensor
    positions: Tensor
    assignment: Tensor | None

    def columns(self) -> Tensor:
        """(B, L_in) long: the output column of every input column, -1 where none holds it. The stage's
        own assignment, or the output column whose ``index`` equals the input's (present = kept)."""
        if self.assignment is not None:
            return self.assignment
        same = (self.index_in.unsqueeze(2) == self.index.unsqueeze(1)) & self.mask.unsqueeze(1)  # (B, L_in, L_out)
        same = same & self.mask_in.unsqueeze(2)
        return torch.where(same.any(2), same.long().argmax(2), -1)


class LLMStages:
    """LLM stages bound to one decoder: layer stages by the layer they follow, cache policies by layer.

    ``record=True`` keeps a trace of every prefill in ``self.trace`` (a list of :class:`StageTrace`, one per
    layer stage call, reset at each prefill); off (None) by default, when the loop does nothing for it.
    """

    def __init__(self, lm: nn.Module, stages: Sequence[nn.Module], record: bool = False):
        cfg = lm.config
        num_layers = lm.num_layers
        heads, kv_heads = cfg.num_attention_heads, kv_heads_of(cfg)
        self.lm = lm
        self.stages = list(stages)
        self.trace: list[StageTrace] | None = [] if record else None
        self.present: Tensor | None = None
        """After a prefill that reduced tokens with ``logits_to_keep=0``: (B, L) bool, the prompt columns
        whose logits are real (the others, dropped or merged into another column, are 0); else None."""
        self.after: dict[int, list[LayerStage]] = {}
        self.policies: dict[int, CachePolicy] = {}
        for stage in self.stages:
            if isinstance(stage, LayerStage):
                stage.bind(num_layers, heads, kv_heads)
                self.after.setdefault(stage.layer - 1, []).append(stage)
            elif isinstance(stage, CachePolicy):
                stage.bind(num_layers, heads, kv_heads)
                for i in range(num_layers):
                    if stage.covers(i):
                        if i in self.policies:
                            raise ValueError(f"layer {i} has two cache policies ({self.policies[i].stage_name!r} and "
                                             f"{stage.stage_name!r}); give them disjoint 'layers'")
                        self.policies[i] = stage
            else:
                raise TypeError(f"{type(stage).__name__} is not an LLM stage (pipeline.llm.LayerStage or CachePolicy); "
                                f"pre-LLM stages belong in the pipeline's 'stages:' list")
        impl = getattr(cfg, "_attn_implementation", "sdpa")
        if self.policies and impl not in ("sdpa", "eager"):
            raise ValueError(f"cache policies need attn_implementation 'sdpa' or 'eager' (per-head masks); this LLM uses {impl!r}")
        if self.policies and "sliding_attention" in lm.layer_types():
            raise ValueError("cache policies do not support sliding-window layers yet (config.layer_types has "
                             "'sliding_attention'); build the LLM with use_sliding_window=False")
        self.eager = impl == "eager"
        self.impl = impl
        self.cache_kw = cache_kwarg(lm.family.layers[0])

    def __bool__(self) -> bool:
        return bool(self.stages)

    def reset(self) -> None:
        for stage in self.stages:
            if isinstance(stage, CachePolicy):
                stage.reset()

    def new_cache(self) -> StagedCache:
        return StagedCache(self.lm.num_layers)

    # ------------------------------------------------------------------ probes
    def _prefill_probe(self, layer: nn.Module, h_in: Tensor, pe: tuple[Tensor, Tensor], state: LayerState,
                       keys: Tensor, start: int, stop: int) -> Tensor:
        """Attention of prompt columns ``start:stop`` (of the current state) over ``keys`` (B, H_kv, L, d)."""
        fam = self.lm.family
        q = fam.queries(layer, h_in[:, start:stop], tuple(x[:, start:stop] for x in pe))
        cols = torch.arange(keys.shape[2], device=keys.device)
        qcols = torch.arange(start, stop, device=keys.device)
        allowed = (cols.view(1, 1, -1) <= qcols.view(1, -1, 1)) & state.mask[:, None, :]  # (B, Q, L)
        allowed = allowed & state.mask[:, start:stop, None]  # padding queries attend to nothing
        return attention_probe(q, keys, allowed.unsqueeze(1), fam.scaling(layer), _size_bias(state))

    def _stage_probe(self, layer: nn.Module, h_in: Tensor, pe: tuple[Tensor, Tensor], state: LayerState,
                     keys: Tensor, queries: "int | str | Tensor") -> Tensor:
        """The probe a layer stage gets. ``queries``: an int n (each row's last n REAL tokens: the last n
        columns under left padding, and still the right ones under right padding, as in training),
        ``"text"`` (every real text token) or a (B, L) bool mask. Returns (B, H, Q, T), Q the most asking
        positions of a row, in column order and right-aligned (a row with fewer has zero rows first)."""
        mask = state.mask
        if isinstance(queries, Tensor):
            asking = queries.to(device=mask.device, dtype=torch.bool) & mask
        elif queries == "text":
            asking = mask & (state.kind == TEXT_KIND)
        else:
            asking = mask & (mask.flip(1).cumsum(1).flip(1) <= int(queries))  # real tokens from here on <= n
        b = asking.shape[0]
        counts = asking.sum(1)
        width = int(counts.max()) if b else 0
        order = torch.argsort((~asking).to(torch.int8), dim=1, stable=True)[:, :width]  # asking columns first
        slot = torch.arange(width, device=mask.device).expand(b, width)
        shift = (width - counts).unsqueeze(1)
        qvalid = slot >= shift
        qcols = torch.gather(order, 1, (slot - shift).clamp(min=0))  # (B, Q) each query's column

        def rows(x: Tensor) -> Tensor:
            return torch.gather(x, 1, qcols.unsqueeze(-1).expand(b, width, x.shape[-1]))

        fam = self.lm.family
        q = fam.queries(layer, rows(h_in), tuple(rows(x) for x in pe))  # pe: the family's per-position tensors
        cols = torch.arange(keys.shape[2], device=keys.device)
        allowed = (cols.view(1, 1, -1) <= qcols.unsqueeze(-1)) & mask[:, None, :] & qvalid.unsqueeze(-1)
        return attention_probe(q, keys, allowed.unsqueeze(1), fam.scaling(layer), _size_bias(state))

    def _layer_keys(self, i: int, layer: nn.Module, h_in: Tensor, pe, cache: StagedCache | None) -> Tensor:
        if cache is not None:
            return cache.layers[i].keys
        return self.lm.family.keys(layer, h_in, pe)

    # ------------------------------------------------------------------ eviction
    def _evict(self, i: int, layer: nn.Module, h_in: Tensor, pe, state: LayerState | None,
               cache: StagedCache, phase: str) -> None:
        policy = self.policies[i]
        tl: TrackedLayer = cache.layers[i]
        b, hkv = tl.keys.shape[:2]
        heads = self.lm.config.num_attention_heads
        window = policy.window

        def view(attn: Tensor) -> CacheView:
            return CacheView(keys=tl.keys, values=tl.values, valid=tl.valid, positions=tl.positions, kind=tl.kind,
                             attn=attn, layer=i, phase=phase, extras=tl.extras)

        if window == 0:
            v = view(tl.keys.new_zeros(b, heads, 0, tl.num_slots, dtype=torch.float32))
            policy.update(v)
        elif phase == "decode":
            fam = self.lm.family
            q = fam.queries(layer, h_in, pe)
            allowed = tl.valid.unsqueeze(2)  # (B, H_kv, 1, T)
            v = view(attention_probe(q, tl.keys, allowed, fam.scaling(layer), tl.extras.get(LOG_SIZE)))
            policy.update(v)
        else:
            length = state.hidden.shape[1]
            # chunks of queries whose float32 scores take about _PROBE_BYTES (H2O reads every prompt position)
            chunk = max(1, _PROBE_BYTES // max(1, 4 * b * heads * tl.num_slots))
            spans = ([(s, min(s + chunk, length)) for s in range(0, length, chunk)]
                     if window == "all" else [(max(0, length - int(window)), length)])
            for start, stop in spans:
                v = view(self._prefill_probe(layer, h_in, pe, state, tl.keys, start, stop))
                policy.update(v)
        budget = policy.budget(v)
        if tl.num_slots <= budget:
            return
        scores = policy.score(v)  # (B, H_kv, T)
        if tl._wrote_spare and tl.num_slots == budget + 1:  # steady decoding: one token leaves
            ranked = torch.where(tl.valid, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
            # the last slot among the lowest (keep_topk keeps the earlier one on ties)
            slot = tl.num_slots - 1 - ranked.flip(-1).argmin(dim=-1)
            if _wants_keep(policy):
                policy.observe(v, _all_but(slot, tl.num_slots))
            tl.evict_one(slot)
            return
        keep = keep_topk(scores, tl.valid, budget)
        before = tl.num_slots
        tl.keep(keep)
        tl.evicted += before - budget
        policy.observe(v, keep)

    # ------------------------------------------------------------------ prefill
    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
                cache: StagedCache | None, token_kinds: Tensor | None, logits_to_keep: int,
                token_sizes: Tensor | None = None) -> Tensor:
        lm, fam = self.lm, self.lm.family
        cfg = lm.config
        bsz, length, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        self.reset()
        if self.trace is not None:
            self.trace.clear()
        mask = torch.ones(bsz, length, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        kinds = torch.full((bsz, length), TEXT_KIND, dtype=torch.long, device=dev) if token_kinds is None else token_kinds.to(dev)
        size = None if token_sizes is None else token_sizes.to(device=dev, dtype=torch.float32)
        state = LayerState(hidden=fam.inputs(inputs_embeds, position_ids), mask=mask, positions=position_ids,
                           index=torch.arange(length, device=dev).expand(bsz, length), kind=kinds, size=size)
        if size is not None:  # tokens merged before the LLM: proportional attention from the first layer on
            attn_mask = self._size_mask(mask, size, state.hidden.dtype)
        else:
            attn_mask = create_causal_mask(cfg, inputs_embeds, attention_mask, None, position_ids=None)
        pe = fam.position_embeddings(state.hidden, position_ids)  # RoPE (cos, sin); GPT-2 ()
        use_cache = cache is not None
        reduced = False  # a layer stage dropped or moved tokens: columns are no longer the prompt's
        for i, layer in enumerate(fam.layers[: lm.num_layers]):
            h_in = state.hidden
            h = fam.call(layer, h_in, attn_mask, pe, state.positions, cache, use_cache, self.cache_kw)
            if use_cache:
                cache.layers[i].append_meta(state.positions, state.mask, state.kind)
                if state.size is not None:  # merged keys remember their size for decoding (new slots: 0 = log 1)
                    tl = cache.layers[i]
                    tl.extras[LOG_SIZE] = _log_size(state.size).unsqueeze(1).expand(-1, tl.keys.shape[1], -1).clone()
            stages = self.after.get(i, ())
            if stages:
                keys = self._layer_keys(i, layer, h_in, pe, cache)
                probe_state = state

                def attention(queries, _layer=layer, _h=h_in, _pe=pe, _s=probe_state, _k=keys):
                    return self._stage_probe(_layer, _h, _pe, _s, _k, queries)

            if use_cache and i in self.policies and self.policies[i].acts("prefill"):
                self._evict(i, layer, h_in, pe, state, cache, "prefill")
            state = replace(state, hidden=h)
            for stage in stages:
                if self.trace is not None:
                    stage.record_assignment, stage.last_assignment = True, None
                new = stage(state, attention)
                if self.trace is not None:
                    self._record(stage, i, state, new)
                if new is not state:
                    state, reduced = new, True
                    pe = fam.position_embeddings(state.hidden, state.positions)
                    if state.size is not None:  # merged tokens: proportional attention (log-size key bias)
                        attn_mask = self._size_mask(state.mask, state.size, state.hidden.dtype)
                    else:
                        attn_mask = create_causal_mask(cfg, state.hidden, state.mask.long(), None, position_ids=None)
        hidden = fam.norm(state.hidden)
        # back to the prompt's columns (dropped ones: 0). Not the width: a row that keeps everything keeps
        # it at L while the others' tokens moved right
        self.present = None
        if logits_to_keep == 0 and reduced:
            full = hidden.new_zeros(bsz, length, hidden.shape[-1])
            rows = torch.arange(bsz, device=dev).unsqueeze(1).expand_as(state.index)
            full[rows[state.mask], state.index[state.mask]] = hidden[state.mask]
            hidden = full
            # (B, L) the prompt columns that got an output: the LM loss must skip the others (llava.py)
            self.present = torch.zeros(bsz, length, dtype=torch.bool, device=dev)
            self.present[rows[state.mask], state.index[state.mask]] = True
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return fam.head(hidden)

    def _bias_mask(self, allowed: Tensor, bias: Tensor, dtype: torch.dtype, heads: int | None = None) -> Tensor:
        """Additive float mask: ``bias`` where ``allowed``, the dtype's minimum elsewhere; a per-KV-head
        (B, H_kv, ...) mask is repeated to one row per query head (GQA order)."""
        if self.impl not in ("sdpa", "eager"):
            raise ValueError(f"merged tokens (LayerState.size, e.g. recursive_compression_llm) need attn_implementation "
                             f"'sdpa' or 'eager' (an additive log-size bias in the mask); this LLM uses {self.impl!r}")
        out = torch.where(allowed, bias.to(dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype, device=bias.device))
        if heads is not None and out.shape[1] != heads:
            out = out.repeat_interleave(heads // out.shape[1], dim=1)
        return out

    def _size_mask(self, mask: Tensor, size: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, 1, L, L) prefill mask after a merging stage: causal over columns, padding keys masked, and
        ``log(size)`` added to every allowed key: a key of size s weighs as s copies of it (ToMe's
        proportional attention)."""
        length = mask.shape[1]
        cols = torch.arange(length, device=mask.device)
        allowed = (cols.view(1, -1) <= cols.view(-1, 1)).unsqueeze(0) & mask.unsqueeze(1)  # (B, L, L)
        return self._bias_mask(allowed, _log_size(size).unsqueeze(1), dtype).unsqueeze(1)

    def _record(self, stage: LayerStage, after_layer: int, state: LayerState, new: LayerState) -> None:
        """Append the :class:`StageTrace` of one layer stage call (recording prefills only)."""
        assignment, stage.last_assignment, stage.record_assignment = stage.last_assignment, None, False
        position = next(j for j, s in enumerate(self.stages) if s is stage)
        self.trace.append(StageTrace(stage=stage, position=position, after_layer=after_layer, index_in=state.index,
                                     mask_in=state.mask, index=new.index, mask=new.mask, positions=new.positions,
                                     assignment=assignment))

    def graph_ready(self, cache: StagedCache) -> bool:
        """Whether the next decoding step can be captured: every layer has a graph-safe policy that evicts
        while decoding, and its cache is full (``budget`` slots with a free spare), so steps are alike."""
        if len(self.policies) != self.lm.num_layers:
            return False
        for i, policy in self.policies.items():
            tl = cache.layers[i]
            if not (getattr(policy, "graph_safe", False) and policy.evict_in_decoding and tl._spare and tl.headwise):
                return False
            if tl.num_slots != policy.cache_max_size or tl.keys.device.type != "cuda":
                return False
        return True

    # ------------------------------------------------------------------ one decoding step
    def decode(self, inputs_embeds: Tensor, position_ids: Tensor, cache: StagedCache) -> Tensor:
        """One new token per row: (B, 1, D) embeddings at (B, 1) positions -> logits (B, 1, V)."""
        lm, fam = self.lm, self.lm.family
        cfg = lm.config
        bsz = inputs_embeds.shape[0]
        dev = inputs_embeds.device
        h = fam.inputs(inputs_embeds, position_ids)  # (B, 1, D)
        pe = fam.position_embeddings(h, position_ids)
        ones = torch.ones(bsz, 1, dtype=torch.bool, device=dev)
        text = torch.full((bsz, 1), TEXT_KIND, dtype=torch.long, device=dev)
        heads = cfg.num_attention_heads
        for i, layer in enumerate(fam.layers[: lm.num_layers]):
            tl: TrackedLayer = cache.layers[i]
            if LOG_SIZE in tl.extras:  # keys merged in prefill: their log-size is added to the logits
                allowed = torch.cat([tl.valid, ones.unsqueeze(1).expand(-1, tl.valid.shape[1], -1)], dim=-1)
                bias = torch.cat([tl.extras[LOG_SIZE], tl.extras[LOG_SIZE].new_zeros(*allowed.shape[:2], 1)], dim=-1)
                attn_mask = self._bias_mask(allowed, bias, h.dtype, heads).unsqueeze(2)  # (B, H, 1, T+1)
            elif tl.headwise:
                allowed = torch.cat([tl.valid, ones.unsqueeze(1).expand(-1, tl.valid.shape[1], -1)], dim=-1)
                if heads != allowed.shape[1]:  # GQA: one mask row per query head (the keys stay per KV head)
                    allowed = allowed.repeat_interleave(heads // allowed.shape[1], dim=1)
                allowed = allowed.unsqueeze(2)  # (B, H, 1, T+1)
                if self.eager:
                    attn_mask = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill(
                        ~allowed, torch.finfo(h.dtype).min)
                else:
                    attn_mask = allowed
            else:
                mask2d = torch.cat([tl.valid[:, 0], ones], dim=-1).long()
                attn_mask = create_causal_mask(cfg, inputs_embeds, mask2d, cache, position_ids=None, layer_idx=i)
            h_in = h
            h = fam.call(layer, h_in, attn_mask, pe, position_ids, cache, True, self.cache_kw)
            tl.append_meta(position_ids, ones, text)
            if i in self.policies and self.policies[i].acts("decode"):
                self._evict(i, layer, h_in, pe, None, cache, "decode")
        return fam.head(fam.norm(h))


class GraphedStep:
    """One steady decoding step captured in a CUDA graph and replayed (``generate_from_embeds(cuda_graph=True)``).

    Steady means every layer's cache is full and evicts one token per step into its spare slot, so no
    tensor changes shape or address from step to step (:meth:`LLMStages.graph_ready`). The capture
    records the kernels of ``LLMStages.decode`` on static input buffers; each call copies the new
    token's embedding and position in and replays them. Python-side counters advance by hand.
    """

    def __init__(self, runner: "LLMStages", cache: StagedCache, embeds: Tensor, positions: Tensor):
        self.runner, self.cache = runner, cache
        self.embeds, self.positions = embeds.clone(), positions.clone()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = runner.decode(self.embeds, self.positions, cache)
        except RuntimeError as e:  # the cache's bookkeeping ran without its kernels: this generation cannot go on
            names = sorted({p.stage_name for p in runner.policies.values()})
            raise RuntimeError(
                f"capturing the decoding step of cache policies {names} in a CUDA graph failed ({e}); generate "
                f"again with cuda_graph=False, and mark a custom policy graph_safe = False if it reads tensors "
                f"on the host") from e
        self._captured = True  # the capture counted one eviction per layer; the first replay is that step

    def __call__(self, embeds: Tensor, positions: Tensor) -> Tensor:
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)
        self.graph.replay()
        if self._captured:
            self._captured = False
        else:
            for i in self.runner.policies:
                self.cache.layers[i].evicted += 1
        return self.logits


LOG_SIZE = "log_size"
"""``TrackedLayer.extras`` key of the log-size of each cached key after a merging layer stage (``LayerState.size``);
gathered with every eviction like a policy's extras, 0 (size 1) for tokens decoded later."""


def _size_bias(state: LayerState) -> Tensor | None:
    """(B, 1, L) log-size key bias of a state whose tokens carry sizes, for the probe; None otherwise."""
    return None if state.size is None else _log_size(state.size).unsqueeze(1)


def _log_size(size: Tensor) -> Tensor:
    return torch.log(size.to(torch.promote_types(size.dtype, torch.float32)).clamp(min=1e-6))


def _wants_keep(policy: CachePolicy) -> bool:
    return type(policy).observe is not CachePolicy.observe


def _all_but(slot: Tensor, t: int) -> Tensor:
    """(B, H_kv) evicted slot -> (B, H_kv, t-1) the kept slots, ascending (no host sync: CUDA-graph safe)."""
    j = torch.arange(t - 1, device=slot.device).expand(*slot.shape, t - 1)
    return j + (j >= slot.unsqueeze(-1)).long()
