"""Stages inside the LLM (pipeline.llm): FastV, TOVA, H2O, SnapKV, StreamingLLM on our decoder loop.

Every check is against something independent of the runtime: the stage-free model (identity), eager
attention weights of a twin model with the same weights (the probe, every policy's choice, in
prefill and while decoding, computed in plain Python loops), the stage-free cache (RoPE phases of the
kept keys), one prompt at a time (ragged batches) and a manual layer loop (FastV in training).
Toy sizes (hidden 64, 3 layers, 4 query heads over 2 KV heads, prompts <= 24 tokens).

Run: ``OMP_NUM_THREADS=1 .venv/bin/pytest -p no:xdist -q tests/test_llm_stages.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import pipeline
from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm, generate_from_embeds
from llava_deft.model.llm.probe import attention_probe, project_keys, project_queries
from llava_deft.model.llm.runtime import StagedCache, cache_kwarg
from pipeline.llm import TEXT_KIND, CachePolicy, LayerStage

VOCAB = 97
DIM = 64
FAMILIES = ["llama", "qwen2", "qwen3"]
SMALL = dict(hidden_size=DIM, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=3, max_position_embeddings=256)
IMAGE = int(pipeline.Modality.IMAGE)
NEVER = -1  # an eos id no row ever produces: every generation runs its full length


# ---------------------------------------------------------------------------------------------- helpers
def _build(model_type: str = "llama", seed: int = 0, attn: str = "sdpa", dtype=None, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    spec = {**TINY_LLM, **SMALL, "model_type": model_type, **overrides}
    return DecoderLM(build_llm(spec, vocab_size=VOCAB, attn_implementation=attn, torch_dtype=dtype)).eval()


def _eager_twin(lm: DecoderLM, model_type: str = "llama", **overrides) -> DecoderLM:
    """The same weights, eager attention (its layers return the attention weights)."""
    dtype = next(lm.parameters()).dtype
    twin = _build(model_type, seed=123, attn="eager", dtype=dtype, **overrides)
    twin.load_state_dict(lm.state_dict())
    return twin


@pytest.fixture(scope="module")
def lm() -> DecoderLM:
    return _build("llama")


@pytest.fixture(scope="module")
def lm64() -> DecoderLM:
    """Float64, so that the choices compared with eager references have no near-ties."""
    return _build("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def eager64(lm64) -> DecoderLM:
    return _eager_twin(lm64)


def _prompts(lengths: list[int], seed: int = 1, dtype=torch.float32, media_frac: float = 0.5):
    """Left-padded random embeddings (B, W, D), mask (B, W) long, positions 0..n-1 (B, W) and kinds: row b's
    real tokens are [text, media x floor(n * media_frac), text...] (the last token is always text)."""
    g = torch.Generator().manual_seed(seed)
    b, w = len(lengths), max(lengths)
    emb = torch.randn(b, w, DIM, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.arange(w)[None, :] >= w - torch.tensor(lengths)[:, None]).long()
    emb = emb * mask[..., None].to(dtype)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    kinds = torch.full((b, w), TEXT_KIND, dtype=torch.long)
    for row, n in enumerate(lengths):
        start = w - n + 1
        kinds[row, start: start + int(n * media_frac)] = IMAGE
    return emb, mask, pos, kinds


def _row(x: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """Row ``row`` alone, without its left padding (its last ``n`` columns)."""
    return x[row: row + 1, x.shape[1] - n:]

def _assert_rows_alone_match(model, prompts, lengths, stages, steps, tokens, logits):
    """Each row of a ragged batch, decoded alone, gives the batch's tokens and (closely) its logits."""
    emb, mask, pos, kinds = prompts
    for row, n in enumerate(lengths):
        t1, l1, _ = _decode(model, _row(emb, row, n), _row(mask, row, n), _row(pos, row, n), _row(kinds, row, n),
                            stages, steps=steps)
        assert torch.equal(tokens[row: row + 1], t1)
        assert_close(logits[row: row + 1], l1, rtol=1e-4, atol=1e-5)



def _llm(*cfgs: dict):
    return pipeline.build_pipeline({"llm": list(cfgs)}, DIM).llm


def _gen(lm, emb, mask, pos, kinds=None, stages=None, n=6, **kw):
    return generate_from_embeds(lm, emb, mask, pos, n, eos_token_id=NEVER, pad_token_id=0, stages=stages,
                                token_kinds=kinds, **kw)


@torch.no_grad()
def _decode(lm, emb, mask, pos, kinds=None, stages=None, steps=5, on_step=None):
    """Greedy decoding by hand: (tokens (B, steps+1), logits (B, steps+1, V), cache). ``on_step(step, cache)``
    is called after the prefill (step 0) and after every decoding step."""
    runner = lm.bind_stages(stages) if stages is not None else None
    logits, cache = lm(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner, token_kinds=kinds)
    if on_step:
        on_step(0, cache)
    out_logits, toks = [logits[:, -1]], []
    mask = mask.long()
    nxt_pos = pos[:, -1:] + 1
    for step in range(1, steps + 1):
        tok = out_logits[-1].argmax(-1, keepdim=True)
        toks.append(tok)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        logits, cache = lm(lm.embed(tok).to(emb.dtype), mask, nxt_pos, cache, use_cache=True, logits_to_keep=1,
                           stages=runner)
        nxt_pos = nxt_pos + 1
        out_logits.append(logits[:, -1])
        if on_step:
            on_step(step, cache)
    toks.append(out_logits[-1].argmax(-1, keepdim=True))
    return torch.cat(toks, 1), torch.stack(out_logits, 1), cache


def _kept_positions(cache: StagedCache, layer: int, row: int, head: int) -> set[int]:
    tl = cache.layers[layer]
    return {int(p) for p, v in zip(tl.positions[row, head].tolist(), tl.valid[row, head].tolist()) if v}


def _top(scores: dict[int, float], budget: int, forced: set[int] = frozenset()) -> set[int]:
    """Plain Python top-k: the forced keys, then the highest scores (ties to the smaller key)."""
    if len(scores) <= budget:
        return set(scores)
    kept = set(forced)
    rest = sorted((k for k in scores if k not in kept), key=lambda k: (-scores[k], k))
    return kept | set(rest[: budget - len(kept)])


@torch.no_grad()
def _eager_attentions(eager: DecoderLM, emb, pos) -> list[torch.Tensor]:
    """Per layer (H, n, n) eager attention weights of ONE unpadded prompt (1, n, D), from the HF model itself
    (one row at a time: HF's eager softmax over a fully masked padding row is NaN in float64)."""
    out = eager.hf(inputs_embeds=emb, position_ids=pos, output_attentions=True).attentions
    return [a[0] for a in out]


# ---------------------------------------------------------------------------------------------- 1 identity
IDENTITY = [
    {"name": "tova"}, {"name": "tova", "head_strategy": "weighted"}, {"name": "tova", "head_strategy": "max"},
    {"name": "h2o"}, {"name": "snapkv", "window_size": 4}, {"name": "streaming_llm"},
    {"name": "fastv", "layer": 1, "drop_ratio": 0.0},
]


@pytest.mark.parametrize("cfg", IDENTITY, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_identity_when_the_budget_covers_everything(lm, cfg):
    lengths, new = [20, 13, 7], 8
    emb, mask, pos, kinds = _prompts(lengths)
    if cfg["name"] != "fastv":
        cfg = {**cfg, "cache_max_size": max(lengths) + new}  # prompt + every new token
    stages = _llm(cfg)
    ref = _gen(lm, emb, mask, pos, n=new)
    out, cache = _gen(lm, emb, mask, pos, kinds, stages, n=new, return_cache=True)
    assert torch.equal(out, ref)
    assert isinstance(cache, StagedCache) and all(s["evicted"] == 0 for s in cache.stats())
    # the logits of every step, and a plain forward (all positions, with and without a cache)
    _, ref_logits, _ = _decode(lm, emb, mask, pos, steps=new - 1)
    _, logits, _ = _decode(lm, emb, mask, pos, kinds, stages, steps=new - 1)
    assert torch.equal(logits, ref_logits)
    with torch.no_grad():
        full = lm(emb, mask, pos)[0]
        assert torch.equal(lm(emb, mask, pos, stages=stages, token_kinds=kinds)[0], full)
        assert torch.equal(lm(emb, mask, pos, use_cache=True, stages=stages, token_kinds=kinds)[0], full)


# ---------------------------------------------------------------------------------------------- 2 the probe
@pytest.mark.parametrize("model_type", FAMILIES)
def test_probe_equals_eager_attention_weights(model_type):
    lm = _build(model_type, attn="eager")
    layer = lm.hf.model.layers[1]
    attn = layer.self_attn
    assert attn.config.num_attention_heads == 4 and attn.config.num_key_value_heads == 2  # GQA
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make biases (Qwen2) and q/k norms (Qwen3) matter
        for mod in (attn.q_proj, attn.k_proj):
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
        for name in ("q_norm", "k_norm"):
            if getattr(attn, name, None) is not None:
                getattr(attn, name).weight.copy_(1 + 0.5 * torch.randn(attn.head_dim, generator=g))
    assert (attn.q_proj.bias is not None) == (model_type == "qwen2")
    assert (getattr(attn, "q_norm", None) is not None) == (model_type == "qwen3")

    lengths = [12, 9, 4]
    w = max(lengths)
    h = torch.randn(3, w, DIM, generator=g)
    mask = (torch.arange(w)[None, :] >= w - torch.tensor(lengths)[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0) * 2 + torch.tensor([[0], [3], [1]])  # gaps and offsets
    pe = lm.hf.model.rotary_emb(h, pos)
    mask4d = create_causal_mask(lm.config, h, mask, None, position_ids=None)
    with torch.no_grad():
        _, weights = attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask4d)
        keys = project_keys(layer, h, *pe)
        assert keys.shape == (3, 2, w, 16)  # per KV head, never repeated
        real = mask.bool()
        for start in (w - 1, w - 5, 0):  # the last query, a window, every query
            q = project_queries(layer, h[:, start:], pe[0][:, start:], pe[1][:, start:])
            cols = torch.arange(w)
            allowed = (cols[None, None, :] <= torch.arange(start, w)[None, :, None]) & real[:, None, :]
            allowed = allowed & real[:, start:, None]
            probs = attention_probe(q, keys, allowed.unsqueeze(1), attn.scaling)
            assert probs.dtype == torch.float32 and probs.shape == (3, 4, w - start, w)
            asking = real[:, start:]  # (B, Q)
            got, want = probs.transpose(1, 2)[asking], weights[:, :, start:].transpose(1, 2)[asking]
            assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
            assert (probs.transpose(1, 2)[~asking] == 0).all()  # padding queries: all zero
            # a per-query-head mask (B, H, Q, T) means the same
            per_head = allowed.unsqueeze(1).expand(3, 4, w - start, w)
            assert_close(attention_probe(q, keys, per_head, attn.scaling), probs)


# ---------------------------------------------------------------------------------------------- 3 references
def _tova_reference(att, row, kv, cols, groups, strategy="mean", beta=0.0, per_kv_head=True, weights=None):
    """TOVA's score per column for one (row, KV head) from eager weights ``att`` (H, Q, T): plain loops."""
    heads = range(att.shape[0]) if not per_kv_head else range(kv * groups, (kv + 1) * groups)
    out = {}
    for c in cols:
        per = []
        for hd in heads:
            a = float(att[hd, :, c].mean())
            if beta:
                a = a + beta * (-a * math.log(max(a, 1e-30)))
            per.append(a)
        if strategy == "max":
            out[c] = max(per)
        elif strategy == "weighted":
            ws = [float(weights[hd]) for hd in heads]
            out[c] = sum(w * p for w, p in zip(ws, per)) / sum(ws)
        else:
            out[c] = sum(per) / len(per)
    return out


PREFILL_CASES = {
    "tova-mean": {"name": "tova", "cache_max_size": 8},
    "tova-max": {"name": "tova", "cache_max_size": 8, "head_strategy": "max"},
    "tova-weighted": {"name": "tova", "cache_max_size": 8, "head_strategy": "weighted"},
    "tova-entropy": {"name": "tova", "cache_max_size": 8, "entropy_weight": 0.7},
    "tova-layerwide": {"name": "tova", "cache_max_size": 8, "per_kv_head": False},
    "tova-layerwide-max": {"name": "tova", "cache_max_size": 8, "per_kv_head": False, "head_strategy": "max"},
    "h2o": {"name": "h2o", "cache_max_size": 8, "recent_ratio": 0.25},
    "snapkv": {"name": "snapkv", "cache_max_size": 8, "window_size": 3, "kernel_size": 3},
    "streaming_llm": {"name": "streaming_llm", "cache_max_size": 8, "num_sinks": 3},
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_eviction_equals_eager_reference(lm64, eager64, case):
    cfg = PREFILL_CASES[case]
    lengths = [24, 17, 6]  # the last row is shorter than the budget: it keeps all of it
    emb, mask, pos, kinds = _prompts(lengths, seed=3, dtype=torch.float64)
    stages = _llm(cfg)
    with torch.no_grad():
        _, cache = lm64(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=stages, token_kinds=kinds)
    budget, groups, w = cfg["cache_max_size"], 2, max(lengths)
    name = cfg["name"]
    for row, n in enumerate(lengths):
        atts = _eager_attentions(eager64, _row(emb, row, n), _row(pos, row, n))
        for layer, a in enumerate(atts):  # a (H, n, n)
            cols = list(range(n))  # the row's own columns (its column c is w - n + c in the batch)
            for kv in range(2):
                forced: set[int] = set()
                if name == "tova":
                    scores = _tova_reference(a[:, n - 1:], row, kv, cols, groups, cfg.get("head_strategy", "mean"),
                                             cfg.get("entropy_weight", 0.0), cfg.get("per_kv_head", True),
                                             weights=[1.0] * 4)
                elif name == "h2o":
                    hs = range(kv * groups, (kv + 1) * groups)
                    scores = {c: sum(float(a[hd, q, c]) for hd in hs for q in cols) for c in cols}
                    forced = set(cols[len(cols) - int(budget * cfg["recent_ratio"]):])
                elif name == "snapkv":
                    hs, win, half = range(kv * groups, (kv + 1) * groups), cfg["window_size"], cfg["kernel_size"] // 2
                    votes = {c: sum(float(a[hd, q, c]) for hd in hs for q in cols[-win:]) for c in cols}
                    scores = {}
                    for c in cols:
                        near = [votes[j] for j in range(c - half, c + half + 1) if j in votes]
                        scores[c] = sum(near) / len(near)
                    forced = set(cols[-win:])
                else:  # streaming_llm: sinks, then the most recent
                    scores = {c: float(c) for c in cols}
                    forced = set(cols[: cfg["num_sinks"]])
                want = {int(pos[row, w - n + c]) for c in _top(scores, budget, forced)}
                got = _kept_positions(cache, layer, row, kv)
                assert got == want, f"{case} layer {layer} row {row} KV head {kv}: kept {sorted(got)}, want {sorted(want)}"
    if name == "tova" and cfg.get("per_kv_head", True) is False:  # one choice for the layer
        for layer in range(3):
            assert _kept_positions(cache, layer, 0, 0) == _kept_positions(cache, layer, 0, 1)


class _Capture:
    """Before each decoder layer of a decoding step: its input, rotary embeddings and the cache as it was."""

    def __init__(self, lm: DecoderLM, cache_ref: list, policy):
        self.seen: dict[int, dict] = {}
        self.handles = []
        for i, layer in enumerate(lm.hf.model.layers):
            def pre(mod, args, kwargs, i=i):
                tl = cache_ref[0].layers[i]
                self.seen[i] = {
                    "h": args[0].clone(), "pe": tuple(t.clone() for t in kwargs["position_embeddings"]),
                    "pos": kwargs["position_ids"].clone(), "keys": tl.keys.clone(), "values": tl.values.clone(),
                    "valid": tl.valid.clone(), "positions": tl.positions.clone(),
                    "weights": None if getattr(policy, "head_weights", None) is None
                    else policy.head_weights[i].detach().clone(),
                }
            self.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def _captured_step(lm, logits, positions, cache, cache_ref, policy, runner):
    """One greedy decoding step with ``policy``'s views captured: (logits, cache, capture)."""
    tok = logits[:, -1].argmax(-1, keepdim=True)
    cap = _Capture(lm, cache_ref, policy)
    try:
        logits, cache = lm(lm.embed(tok), None, positions, cache, use_cache=True, logits_to_keep=1, stages=runner)
    finally:
        cap.remove()
    return logits, cache, cap


@torch.no_grad()
def _eager_decode_weights(eager: DecoderLM, i: int, snap: dict) -> torch.Tensor:
    """Eager attention weights (B, H, T+1) of the new token over the cached slots plus itself, masked per KV head."""
    el = eager.hf.model.layers[i]
    dc = DynamicCache(config=eager.config)
    dc.update(snap["keys"], snap["values"], i)
    b, hkv, t = snap["valid"].shape
    allowed = torch.cat([snap["valid"], torch.ones(b, hkv, 1, dtype=torch.bool)], -1)
    allowed = allowed.repeat_interleave(4 // hkv, dim=1).unsqueeze(2)  # (B, H, 1, T+1)
    mask = torch.zeros(allowed.shape, dtype=snap["h"].dtype).masked_fill(~allowed, torch.finfo(snap["h"].dtype).min)
    _, w = el.self_attn(hidden_states=el.input_layernorm(snap["h"]), position_embeddings=snap["pe"],
                        attention_mask=mask, **{cache_kwarg(el): dc})
    return w[:, :, 0] * allowed[:, :, 0]


@pytest.mark.parametrize("strategy", ["mean", "max", "weighted", "weighted-fixed"])
def test_tova_decoding_equals_eager_reference_step_by_step(lm64, eager64, strategy):
    lengths, budget = [16, 11], 6
    emb, mask, pos, kinds = _prompts(lengths, seed=5, dtype=torch.float64)
    head = "weighted" if strategy.startswith("weighted") else strategy
    cfg = {"name": "tova", "cache_max_size": budget, "head_strategy": head, "entropy_weight": 0.0}
    if strategy == "weighted-fixed":
        cfg["head_weight_lr"] = 0.0
    stages = _llm(cfg)
    policy = stages[0]
    runner = lm64.bind_stages(stages)
    if strategy == "weighted-fixed":  # strongly unequal heads: the choice must follow them, not the mean
        policy.head_weights.data.copy_(torch.tensor([1.0, 0.02, 0.02, 1.0]).expand(3, 4))
    cache_ref: list = [None]
    differs_from_mean = 0
    with torch.no_grad():
        logits, cache = lm64(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner, token_kinds=kinds)
        cache_ref[0] = cache
        nxt_pos = pos[:, -1:] + 1
        for step in range(5):
            logits, cache, cap = _captured_step(lm64, logits, nxt_pos, cache, cache_ref, policy, runner)
            for i, snap in cap.seen.items():
                w = _eager_decode_weights(eager64, i, snap)  # (B, H, T+1)
                t = snap["valid"].shape[-1]
                mass = [[0.0] * 4 for _ in lengths]  # attention mass each (row, head) keeps
                for row in range(len(lengths)):
                    for kv in range(2):
                        slots = [s for s in range(t) if snap["valid"][row, kv, s]] + [t]
                        slot_pos = snap["positions"][row, kv].tolist() + [int(nxt_pos[row, 0])]
                        a = w[row][:, None, :]  # (H, 1, T+1)
                        scores = _tova_reference(a, row, kv, slots, 2, head, weights=snap["weights"])
                        evict = min(slots, key=lambda s: (scores[s], -s))
                        want = {slot_pos[s] for s in slots if s != evict}
                        got = _kept_positions(cache, i, row, kv)
                        assert got == want, f"{strategy} step {step} layer {i} row {row} KV {kv}"
                        assert len(got) == budget
                        if head == "weighted":
                            mean = _tova_reference(a, row, kv, slots, 2, "mean")
                            differs_from_mean += evict != min(slots, key=lambda s: (mean[s], -s))
                            for hd in (2 * kv, 2 * kv + 1):
                                mass[row][hd] = sum(float(a[hd, 0, s]) for s in slots if s != evict)
                if head == "weighted":  # w <- (1 - lr) w + lr * contribution (mean over rows, normalised to mean 1)
                    lr = cfg.get("head_weight_lr", 0.1)
                    contrib = [sum(m[hd] for m in mass) / len(mass) for hd in range(4)]
                    contrib = [c / (sum(contrib) / 4) for c in contrib]
                    want_w = [(1 - lr) * float(snap["weights"][hd]) + lr * contrib[hd] for hd in range(4)]
                    assert_close(policy.head_weights[i].double(), torch.tensor(want_w, dtype=torch.float64),
                                 rtol=1e-5, atol=1e-6)
            nxt_pos = nxt_pos + 1
    if strategy == "weighted":  # the weights moved from their initial 1, and differ between heads
        assert not torch.allclose(policy.head_weights, torch.ones(3, 4))
        assert (policy.head_weights.std(dim=1) > 0).all()
    if strategy == "weighted-fixed":
        assert differs_from_mean > 0, "the extreme head weights never changed a choice: the test is too weak"
        assert torch.equal(policy.head_weights, torch.tensor([1.0, 0.02, 0.02, 1.0]).expand(3, 4))


@pytest.mark.parametrize("name", ["h2o", "streaming_llm"])
def test_h2o_and_streaming_llm_decoding_equal_reference_step_by_step(lm64, eager64, name):
    lengths, budget, sinks, ratio = [15, 10], 6, 2, 0.5
    emb, mask, pos, kinds = _prompts(lengths, seed=8, dtype=torch.float64)
    cfg = {"name": "h2o", "cache_max_size": budget, "recent_ratio": ratio} if name == "h2o" else \
        {"name": "streaming_llm", "cache_max_size": budget, "num_sinks": sinks}
    stages = _llm(cfg)
    runner = lm64.bind_stages(stages)
    w = max(lengths)
    with torch.no_grad():
        logits, cache = lm64(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner, token_kinds=kinds)
    # H2O's reference accumulated attention of every prompt position, kept per (layer, row, KV head)
    acc: dict[tuple[int, int, int], dict[int, float]] = {}
    for row, n in enumerate(lengths):
        for layer, a in enumerate(_eager_attentions(eager64, _row(emb, row, n), _row(pos, row, n))):
            for kv in range(2):
                full = {int(pos[row, w - n + c]): float(a[2 * kv: 2 * kv + 2, :, c].sum()) for c in range(n)}
                acc[layer, row, kv] = {p: full[p] for p in _kept_positions(cache, layer, row, kv)}
    cache_ref = [cache]
    nxt_pos = pos[:, -1:] + 1
    with torch.no_grad():
        for step in range(1, 6):
            logits, cache, cap = _captured_step(lm64, logits, nxt_pos, cache, cache_ref, stages[0], runner)
            for i, snap in cap.seen.items():
                wts = _eager_decode_weights(eager64, i, snap) if name == "h2o" else None
                t = snap["valid"].shape[-1]
                for row, n in enumerate(lengths):
                    new_p = int(nxt_pos[row, 0])
                    for kv in range(2):
                        got = _kept_positions(cache, i, row, kv)
                        if name == "streaming_llm":  # the first sinks + the most recent of everything so far
                            seen = list(range(n)) + list(range(n, new_p + 1))
                            want = set(seen[:sinks]) | set(seen[-(budget - sinks):])
                        else:
                            ref = acc[i, row, kv]
                            for s in range(t):
                                if snap["valid"][row, kv, s]:
                                    ref[int(snap["positions"][row, kv, s])] += float(wts[row, 2 * kv: 2 * kv + 2, s].sum())
                            ref[new_p] = float(wts[row, 2 * kv: 2 * kv + 2, t].sum())
                            recent = set(sorted(ref)[-int(budget * ratio):])
                            evict = min((p for p in ref if p not in recent), key=lambda p: (ref[p], -p))
                            del ref[evict]
                            want = set(ref)
                            tl = cache.layers[i]  # the accumulated attention travels with its slot
                            held = {int(p): float(x) for p, x, v in zip(tl.positions[row, kv], tl.extras["h2o_acc"][row, kv],
                                                                       tl.valid[row, kv]) if v}
                            assert held.keys() == ref.keys()
                            assert_close(torch.tensor([held[p] for p in sorted(ref)]),
                                         torch.tensor([ref[p] for p in sorted(ref)]), rtol=1e-5, atol=1e-6)
                        assert got == want, f"{name} step {step} layer {i} row {row} KV {kv}"
            nxt_pos = nxt_pos + 1


def test_fastv_choice_equals_eager_reference(lm64, eager64):
    lengths, k, r, nq = [20, 14, 9], 2, 0.5, 3
    emb, mask, pos, kinds = _prompts(lengths, seed=12, dtype=torch.float64)
    stages = _llm({"name": "fastv", "layer": k, "drop_ratio": r, "num_queries": nq})
    with torch.no_grad():
        _, cache = lm64(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=stages, token_kinds=kinds)
    w = max(lengths)
    for row, n in enumerate(lengths):
        a = _eager_attentions(eager64, _row(emb, row, n), _row(pos, row, n))[k - 1]  # (H, n, n)
        kind = kinds[row, w - n:].tolist()
        media = [c for c in range(n) if kind[c] != TEXT_KIND]
        score = {c: float(a[:, n - nq:, c].mean()) for c in media}
        kept_media = _top(score, math.ceil((1 - r) * len(media)))
        want = {int(pos[row, w - n + c]) for c in range(n) if kind[c] == TEXT_KIND or c in kept_media}
        for layer in range(3):
            got = _kept_positions(cache, layer, row, 0)
            assert got == (want if layer >= k else set(range(n))), f"row {row} layer {layer}"


class _Spy(LayerStage):
    """A layer stage (not registered) that records what its attention probe answers and keeps everything."""

    stage_name = "spy"

    def __init__(self, layer: int, asks):
        super().__init__(layer)
        self.asks, self.got = asks, []

    def reduce(self, state, attention):
        self.got = [(ask, attention(ask(state) if callable(ask) else ask)) for ask in self.asks]
        return state


@pytest.mark.parametrize("padding", ["left", "right"])
def test_layer_stage_probe_answers_each_kind_of_query(lm64, eager64, padding):
    lengths, k = [13, 9, 5], 2
    w = max(lengths)
    emb, _, _, kinds = _prompts(lengths, seed=13, dtype=torch.float64)
    if padding == "right":  # the same rows, right-padded
        emb = torch.stack([torch.roll(emb[b], -(w - n), 0) for b, n in enumerate(lengths)])
        kinds = torch.stack([torch.roll(kinds[b], -(w - n), 0) for b, n in enumerate(lengths)])
        mask = (torch.arange(w)[None, :] < torch.tensor(lengths)[:, None]).long()
    else:
        mask = (torch.arange(w)[None, :] >= w - torch.tensor(lengths)[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    spy = _Spy(k, [1, 3, "text", lambda st: st.media])
    with torch.no_grad():
        out = lm64(emb, mask, pos, stages=[spy], token_kinds=kinds)[0]
        assert torch.equal(out, lm64(emb, mask, pos)[0])  # a stage that keeps everything changes nothing
    for ask, probs in spy.got:
        assert probs.dtype == torch.float32 and probs.shape[:2] == (3, 4) and probs.shape[-1] == w
        for row, n in enumerate(lengths):
            first = w - n if padding == "left" else 0  # the row's first real column
            kind = kinds[row, first: first + n].tolist()
            if ask == "text":
                asking = [c for c in range(n) if kind[c] == TEXT_KIND]
            elif callable(ask):
                asking = [c for c in range(n) if kind[c] != TEXT_KIND]
            else:
                asking = list(range(n))[-ask:]
            emb_r, pos_r = emb[row: row + 1, first: first + n], pos[row: row + 1, first: first + n]
            a = _eager_attentions(eager64, emb_r, pos_r)[k - 1]  # (H, n, n)
            q = probs.shape[2]
            got = probs[row]
            assert (got[:, : q - len(asking)] == 0).all()  # fewer asks than the widest row: zero rows first
            got = got[:, q - len(asking):]
            assert_close(got[:, :, first: first + n], a[:, asking].float(), rtol=1e-5, atol=1e-6)
            others = torch.ones(w, dtype=torch.bool)
            others[first: first + n] = False
            assert (got[:, :, others] == 0).all()  # padding keys get nothing


# ---------------------------------------------------------------------------------------------- 4 RoPE phases
@pytest.mark.parametrize("cfg", [{"name": "tova", "cache_max_size": 8}, {"name": "h2o", "cache_max_size": 8},
                                 {"name": "streaming_llm", "cache_max_size": 8, "num_sinks": 2},
                                 {"name": "snapkv", "cache_max_size": 8, "window_size": 3}], ids=lambda c: c["name"])
def test_kept_keys_keep_their_rope_phase_and_positions(lm, cfg):
    lengths, new = [20, 13, 7], 5
    emb, mask, pos, kinds = _prompts(lengths, seed=11)
    with torch.no_grad():
        _, full = lm(emb, mask, pos, use_cache=True)  # stage-free DynamicCache of the prompt
    out, cache = _gen(lm, emb, mask, pos, kinds, _llm(cfg), n=new, return_cache=True)
    w = max(lengths)
    checked = 0
    for i in range(3):
        tl = cache.layers[i]
        assert tl.positions.shape == tl.valid.shape == tl.keys.shape[:3]
        fk, fv = full.layers[i].keys, full.layers[i].values
        for row, n in enumerate(lengths):
            col_of = {int(pos[row, c]): c for c in range(w - n, w)}
            generated = set(range(n, n + new - 1))  # the last new token is never fed back
            for kv in range(2):
                for s in range(tl.num_slots):
                    if not tl.valid[row, kv, s]:
                        continue
                    p = int(tl.positions[row, kv, s])
                    assert p in col_of or p in generated, f"layer {i} row {row}: position {p} was never cached"
                    if p in col_of:
                        assert_close(tl.keys[row, kv, s], fk[row, kv, col_of[p]])
                        assert_close(tl.values[row, kv, s], fv[row, kv, col_of[p]])
                        checked += 1
    assert checked > 0
    # the newest token always stays (TOVA alone may evict it: its own attention decides)
    for row, n in enumerate(lengths if cfg["name"] != "tova" else []):
        assert n + new - 2 in _kept_positions(cache, 0, row, 0)


# ---------------------------------------------------------------------------------------------- 5 ragged batch
RAGGED = {
    "tova": [{"name": "tova", "cache_max_size": 6}],
    "tova-max": [{"name": "tova", "cache_max_size": 6, "head_strategy": "max"}],
    "tova-entropy": [{"name": "tova", "cache_max_size": 6, "entropy_weight": 0.5}],
    "tova-layerwide": [{"name": "tova", "cache_max_size": 6, "per_kv_head": False}],
    "h2o": [{"name": "h2o", "cache_max_size": 6}],
    "snapkv": [{"name": "snapkv", "cache_max_size": 6, "window_size": 3, "kernel_size": 5}],
    "streaming_llm": [{"name": "streaming_llm", "cache_max_size": 6, "num_sinks": 2}],
    "fastv": [{"name": "fastv", "layer": 1, "drop_ratio": 0.5}],
    "fastv+tova": [{"name": "fastv", "layer": 2, "drop_ratio": 0.75, "num_queries": 3},
                   {"name": "tova", "cache_max_size": 5, "layers": [1, 2]}],
}


@pytest.mark.parametrize("case", list(RAGGED))
def test_ragged_batch_equals_one_at_a_time(lm, case):
    lengths, steps = [22, 14, 9], 6
    emb, mask, pos, kinds = _prompts(lengths, seed=2)
    stages = _llm(*RAGGED[case])
    toks, logits, cache = _decode(lm, emb, mask, pos, kinds, stages, steps=steps)
    assert sum(s["evicted"] for s in cache.stats()) > 0 or case == "fastv"
    for row, n in enumerate(lengths):
        t1, l1, _ = _decode(lm, _row(emb, row, n), _row(mask, row, n), _row(pos, row, n), _row(kinds, row, n),
                            stages, steps=steps)
        assert torch.equal(toks[row: row + 1], t1), f"{case}: row {row} differs from its one-at-a-time run"
        assert_close(logits[row: row + 1], l1, rtol=1e-4, atol=1e-5)
    batched = _gen(lm, emb, mask, pos, kinds, stages, n=steps)
    assert torch.equal(batched, toks[:, :steps])
    assert torch.equal(_gen(lm, emb, mask, pos, kinds, stages, n=steps, cuda_graph=True), batched)  # CPU: ignored


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_other_families_identity_and_ragged(model_type):
    lm_f = _build(model_type)
    lengths, steps = [18, 11, 7], 5
    emb, mask, pos, kinds = _prompts(lengths, seed=14)
    keep_all = _llm({"name": "fastv", "layer": 1, "drop_ratio": 0.0}, {"name": "tova", "cache_max_size": 64, "layers": [0, 1]},
                    {"name": "h2o", "cache_max_size": 64, "layers": [2]})
    ref_t, ref_l, _ = _decode(lm_f, emb, mask, pos, steps=steps)
    t, l, _ = _decode(lm_f, emb, mask, pos, kinds, keep_all, steps=steps)
    assert torch.equal(t, ref_t) and torch.equal(l, ref_l)
    acting = _llm({"name": "fastv", "layer": 1, "drop_ratio": 0.5}, {"name": "tova", "cache_max_size": 6, "layers": [0, 1]},
                  {"name": "h2o", "cache_max_size": 6, "layers": [2]})
    t, l, _ = _decode(lm_f, emb, mask, pos, kinds, acting, steps=steps)
    assert not torch.equal(l, ref_l)
    _assert_rows_alone_match(lm_f, (emb, mask, pos, kinds), lengths, acting, steps, t, l)


def test_eager_attention_model_runs_policies_like_sdpa(lm):
    eager = _eager_twin(lm)
    emb, mask, pos, kinds = _prompts([19, 12, 8], seed=15)
    for cfgs in ([{"name": "tova", "cache_max_size": 6}], [{"name": "h2o", "cache_max_size": 6}],
                 [{"name": "fastv", "layer": 1}, {"name": "snapkv", "cache_max_size": 6, "window_size": 2}]):
        t_s, l_s, c_s = _decode(lm, emb, mask, pos, kinds, _llm(*cfgs), steps=5)
        t_e, l_e, c_e = _decode(eager, emb, mask, pos, kinds, _llm(*cfgs), steps=5)
        assert torch.equal(t_s, t_e)
        assert_close(l_s, l_e, rtol=1e-4, atol=1e-5)
        assert [s["slots"] for s in c_s.stats()] == [s["slots"] for s in c_e.stats()]


# ---------------------------------------------------------------------------------------------- 6 the contract
# One row per registered LLM stage: options that keep everything, and small ones that do act. A layer
# stage also says how many media tokens of n it keeps ("media_kept").
CONTRACT = {
    "fastv": {"identity": {"layer": 1, "drop_ratio": 0.0}, "small": {"layer": 2, "drop_ratio": 0.6},
              "media_kept": lambda n: math.ceil((1 - 0.6) * n - 1e-9)},
    "tova": {"identity": {"cache_max_size": 512}, "small": {"cache_max_size": 7}},
    "h2o": {"identity": {"cache_max_size": 512}, "small": {"cache_max_size": 7, "recent_ratio": 0.5}},
    "snapkv": {"identity": {"cache_max_size": 512, "window_size": 4}, "small": {"cache_max_size": 7, "window_size": 3}},
    "streaming_llm": {"identity": {"cache_max_size": 512}, "small": {"cache_max_size": 7, "num_sinks": 2}},
    # merges text and media alike: its row says how many tokens of n go on (window 3, every row expands
    # min(round(memory_floor / 2), whole pairs) = 1 of its (n - 3) // 2 merged pairs)
    "pair_compress": {"identity": {"layer": 1, "ratio": 1.0, "window": 3}, "small": {
        "layer": 2, "window": 3, "ratio": 0.0, "memory_floor": 2, "num_heads": 2, "hidden_dim": 16},
        "tokens_kept": lambda n: n - (n - 3) // 2 + 1},
    # merge media only; with the floor at -1 every consecutive media token links, so clusters are cut by
    # max_cluster_size alone: ceil(m / size) clusters of m media tokens (one contiguous span per row)
    "recursive_compression_llm": {"identity": {"layer": 1, "similarity_threshold": 1.5}, "small": {
        "layer": 2, "similarity_threshold": -1.0, "adaptive_threshold": False, "max_cluster_size": 2,
        "num_queries": 2, "projection_dim": 8, "modulator_dim": 8}, "media_kept": lambda n: math.ceil(n / 2)},
    "progressive_compression": {
        "identity": {"layer": 1, "conservative": 1.5, "moderate": 1.5, "aggressive": 1.5}, "small": {
            "layer": 2, "conservative": 1.5, "moderate": -1.0, "aggressive": 1.5, "adaptive_threshold": False,
            "max_cluster_size": 3, "projection_dim": 8, "modulator_dim": 8},  # layer 2 of 3 (depth 0.67): moderate
        "media_kept": lambda n: math.ceil(n / 3)},
}


@pytest.mark.parametrize("name", pipeline.list_stages("llm"))
def test_llm_stage_contract(lm, name):
    if name not in CONTRACT:
        pytest.fail(f"LLM stage {name!r} is registered but has no row in CONTRACT (tests/test_llm_stages.py): "
                    f"add its keep-everything ('identity') and acting ('small') options")
    row_cfg = CONTRACT[name]
    lengths, steps = [21, 15, 9], 5
    emb, mask, pos, kinds = _prompts(lengths, seed=4)

    # keeps everything = identity
    ident = _llm({"name": name, **row_cfg["identity"]})
    ref_toks, ref_logits, _ = _decode(lm, emb, mask, pos, steps=steps)
    toks, logits, _ = _decode(lm, emb, mask, pos, kinds, ident, steps=steps)
    assert torch.equal(toks, ref_toks) and torch.equal(logits, ref_logits)

    # the budget is honoured at every step
    small = _llm({"name": name, **row_cfg["small"]})
    stage = small[0]
    seen_steps = []

    def check(step, cache):
        seen_steps.append(step)
        stats = cache.stats()
        if isinstance(stage, CachePolicy):
            budget = stage.cache_max_size
            for i, s in enumerate(stats):
                tl = cache.layers[i]
                per_row = tl.valid.sum(-1)  # (B, H_kv) real tokens
                if step == 0:  # the prompt is longer than the budget: exactly the budget is left
                    assert tl.num_slots == budget and s["slots"] == budget
                    longest = per_row.max()
                    assert int(longest) == budget
                    for row, n in enumerate(lengths):
                        assert (per_row[row] == min(n, budget)).all()
                elif stage.evict_in_decoding:
                    assert tl.num_slots <= budget + 1, f"{name} layer {i} step {step}: {tl.num_slots} slots"
                    assert (per_row <= budget).all()
                else:  # prefill-only (SnapKV): the cache grows by one a step after the prefill
                    assert tl.num_slots == budget + step
                assert tl.keys.shape[1] == lm.config.num_key_value_heads
        elif isinstance(stage, LayerStage) and step == 0 and "tokens_kept" in row_cfg:
            for i, s in enumerate(stats):
                v = cache.layers[i].valid[:, 0]
                for row, n in enumerate(lengths):
                    assert int(v[row].sum()) == (n if i < stage.layer else row_cfg["tokens_kept"](n)), (i, row)
                if i >= stage.layer:
                    assert cache.layers[i].num_slots < max(lengths)
        elif isinstance(stage, LayerStage) and step == 0:
            if "media_kept" not in row_cfg:
                pytest.fail(f"layer stage {name!r} needs 'media_kept' in its CONTRACT row")
            for i, s in enumerate(stats):
                tl = cache.layers[i]
                v, media = tl.valid[:, 0], tl.valid[:, 0] & (tl.kind[:, 0] != TEXT_KIND)
                for row, n in enumerate(lengths):
                    n_media = int(((kinds[row] != TEXT_KIND) & mask[row].bool()).sum())
                    n_text = n - n_media
                    if i < stage.layer:  # layers before it see every token
                        assert int(v[row].sum()) == n
                    else:
                        assert int(media[row].sum()) == row_cfg["media_kept"](n_media)
                        assert int((v[row] & ~media[row]).sum()) == n_text  # all text stays
                        assert tl.num_slots < max(lengths)

    toks_a, logits_a, _ = _decode(lm, emb, mask, pos, kinds, small, steps=steps, on_step=check)
    assert seen_steps == list(range(steps + 1))

    # deterministic in eval
    toks_b, logits_b, _ = _decode(lm, emb, mask, pos, kinds, small, steps=steps)
    assert torch.equal(toks_a, toks_b) and torch.equal(logits_a, logits_b)
    assert not torch.equal(logits_a, ref_logits)  # the small options do act

    # ragged batch = one at a time
    _assert_rows_alone_match(lm, (emb, mask, pos, kinds), lengths, small, steps, toks_a, logits_a)


# ---------------------------------------------------------------------------------------------- 7 untouched HF model
def test_hf_model_unchanged_after_stages(lm):
    before = {k: v.clone() for k, v in lm.hf.state_dict().items()}
    classes = {n: type(m) for n, m in lm.hf.named_modules()}
    forwards = {n: type(m).forward for n, m in lm.hf.named_modules()}
    emb, mask, pos, kinds = _prompts([18, 10])
    stages = _llm({"name": "fastv", "layer": 1, "drop_ratio": 0.5}, {"name": "tova", "cache_max_size": 6})
    assert lm._stages is None
    _gen(lm, emb, mask, pos, kinds, stages, n=4)
    with lm.use_stages(stages) as runner:
        assert lm._stages is runner and runner is not None
        inside = _gen(lm, emb, mask, pos, kinds, n=4)  # the block's stages apply
        assert torch.equal(inside, _gen(lm, emb, mask, pos, kinds, stages, n=4))
        with lm.use_stages(_llm({"name": "h2o", "cache_max_size": 6})) as inner:
            assert lm._stages is inner
        assert lm._stages is runner  # nested blocks restore the outer stages
    assert lm._stages is None
    with pytest.raises(RuntimeError, match="boom"):
        with lm.use_stages(stages):
            _gen(lm, emb, mask, pos, kinds, n=2)
            raise RuntimeError("boom")
    assert lm._stages is None
    after = lm.hf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in lm.hf.named_modules()} == classes
    assert {n: type(m).forward for n, m in lm.hf.named_modules()} == forwards
    assert not any("forward" in vars(m) for m in lm.hf.modules())  # no instance-level patch
    assert torch.equal(_gen(lm, emb, mask, pos, n=4), _gen(_build("llama"), emb, mask, pos, n=4))


# ---------------------------------------------------------------------------------------------- 8 memory
def test_cache_really_shrinks(lm):
    emb, mask, pos, kinds = _prompts([40, 40], seed=6)
    with torch.no_grad():
        _, cache = lm(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=_llm({"name": "tova", "cache_max_size": 8}),
                      token_kinds=kinds)
        _, full = lm(emb, mask, pos, use_cache=True)
    hkv, d = lm.config.num_key_value_heads, 16
    for i, s in enumerate(cache.stats()):
        tl = cache.layers[i]
        assert tl.keys.shape[1] == hkv and tl.values.shape[1] == hkv  # per KV head, no repeat_kv
        assert tl.keys.shape[2] <= 9 and tl.keys.untyped_storage().nbytes() <= 2 * hkv * 9 * d * 4
        assert s["slots"] == 8 and s["tokens_mean"] == 8 and s["tokens_max"] == 8 and s["evicted"] == 32
        assert s["bytes"] == 2 * 2 * hkv * 9 * d * 4  # keys + values, (B, H_kv, 8 + spare, d) float32
        full_bytes = full.layers[i].keys.numel() * 4 * 2
        assert s["bytes"] < full_bytes / 4
    # and it stays that size while decoding
    _, _, cache = _decode(lm, emb, mask, pos, kinds, _llm({"name": "tova", "cache_max_size": 8}), steps=6)
    for s in cache.stats():
        assert s["slots"] == 8 and s["bytes"] == 2 * 2 * hkv * 9 * d * 4 and s["evicted"] == 38


# ---------------------------------------------------------------------------------------------- 9 errors
def test_errors_are_clear(lm, tmp_path):
    emb, mask, pos, kinds = _prompts([12, 8])
    with pytest.raises(ValueError, match=r"fastv\.layer=3.*1\.\.2.*3-layer"):
        _gen(lm, emb, mask, pos, kinds, _llm({"name": "fastv", "layer": 3}), n=2)
    with pytest.raises(ValueError, match=r"tova\.layers has \[5\]"):
        _gen(lm, emb, mask, pos, kinds, _llm({"name": "tova", "layers": [5]}), n=2)
    with pytest.raises(ValueError, match="two cache policies"):
        lm.bind_stages([pipeline.get_stage("tova")(), pipeline.get_stage("h2o")()])
    with pytest.raises(TypeError, match="not an LLM stage"):
        lm.bind_stages(pipeline.build_pipeline({"stages": [{"name": "pool"}]}, DIM).stages)

    flash = _build("llama")
    flash.hf.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attn_implementation 'sdpa' or 'eager'.*flash_attention_2"):
        flash.bind_stages(_llm({"name": "tova"}))
    flash.bind_stages(_llm({"name": "fastv", "layer": 1}))  # a layer stage needs no per-head mask
    sliding = _build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window"):
        sliding.bind_stages(_llm({"name": "h2o"}))

    with torch.no_grad():
        _, dyn = lm(emb, mask, pos, use_cache=True)
        with pytest.raises(ValueError, match="StagedCache of their prefill.*DynamicCache holding 12"):
            lm(emb[:, -1:], None, pos[:, -1:] + 1, dyn, use_cache=True, stages=_llm({"name": "tova"}))
        with pytest.raises(ValueError, match="layer_hooks and LLM stages"):
            lm(emb, mask, pos, layer_hooks={0: lambda *a: None}, stages=_llm({"name": "tova"}))
        _, staged = lm(emb, mask, pos, use_cache=True, stages=_llm({"name": "tova", "cache_max_size": 4}))
        with pytest.raises(ValueError, match="one decoding step"):
            lm(emb[:, -2:], None, pos[:, -2:] + 2, staged, use_cache=True, stages=_llm({"name": "tova"}))

    # the head-weight plot
    mean = _llm({"name": "tova", "cache_max_size": 4})[0]
    with pytest.raises(ValueError, match="head_strategy 'weighted'.*'mean'"):
        mean.visualize_head_weights(tmp_path / "x.png")
    weighted = _llm({"name": "tova", "cache_max_size": 4, "head_strategy": "weighted"})
    with pytest.raises(ValueError, match="no head weights recorded yet"):
        weighted[0].visualize_head_weights(tmp_path / "x.png")
    _gen(lm, emb, mask, pos, kinds, weighted, n=5)
    assert set(weighted[0].history) == {0, 1, 2} and len(weighted[0].history[0]) == 1 + 4  # prefill + 4 steps
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        weighted[0].visualize_head_weights(tmp_path / "x.png", layers=[7])
    path = weighted[0].visualize_head_weights(tmp_path / "plots" / "heads.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tova_head_weight_history_spans_calls(lm):
    """Head weights adapt over every call; their recorded trajectory must not restart at each prefill."""
    emb, mask, pos, kinds = _prompts([14, 9])
    stages = _llm({"name": "tova", "cache_max_size": 5, "head_strategy": "weighted", "history_every": 2})
    _gen(lm, emb, mask, pos, kinds, stages, n=4)  # evictions 1..4 per layer: records at 1, 3
    w_first = stages[0].head_weights.clone()
    _gen(lm, emb, mask, pos, kinds, stages, n=4)  # evictions 5..8: records at 5, 7
    for layer, records in stages[0].history.items():
        assert [n for n, _ in records] == [1, 3, 5, 7], f"layer {layer}"
    assert not torch.equal(stages[0].history[0][0][1], stages[0].history[0][-1][1])
    assert not torch.equal(w_first, stages[0].head_weights)  # the second call went on adapting


def test_snapkv_window_larger_than_the_budget_keeps_the_most_recent(lm):
    lengths = [16, 11]
    emb, mask, pos, kinds = _prompts(lengths, seed=17)
    with torch.no_grad():
        _, cache = lm(emb, mask, pos, use_cache=True, logits_to_keep=1, token_kinds=kinds,
                      stages=_llm({"name": "snapkv", "cache_max_size": 4, "window_size": 10}))
    for i in range(3):
        for row, n in enumerate(lengths):
            for kv in range(2):
                assert _kept_positions(cache, i, row, kv) == set(range(n - 4, n))


def test_h2o_prefill_in_probe_chunks_equals_one_chunk(lm, monkeypatch):
    from llava_deft.model.llm import runtime

    emb, mask, pos, kinds = _prompts([23, 16, 8], seed=16)
    cfg = {"name": "h2o", "cache_max_size": 7}
    _, one, cache_one = _decode(lm, emb, mask, pos, kinds, _llm(cfg), steps=3)
    monkeypatch.setattr(runtime, "_PROBE_BYTES", 4 * 3 * 4 * 23 * 2)  # 2 queries per chunk: 12 chunks
    _, many, cache_many = _decode(lm, emb, mask, pos, kinds, _llm(cfg), steps=3)
    assert_close(many, one, rtol=1e-5, atol=1e-6)
    for a, b in zip(cache_one.layers, cache_many.layers):
        assert torch.equal(a.positions, b.positions)
        assert_close(a.extras["h2o_acc"], b.extras["h2o_acc"], rtol=1e-5, atol=1e-6)


def test_tova_debug_statistics(lm):
    emb, mask, pos, kinds = _prompts([16, 10])
    stages = _llm({"name": "tova", "cache_max_size": 6, "debug": True})
    _gen(lm, emb, mask, pos, kinds, stages, n=3)
    stats = stages[0].stats
    assert set(stats) == {0, 1, 2}
    s = stats[1]
    assert s["phase"] == "decode" and s["evictions"] == 3 and s["kept"] == 6 and s["evicted"] == 1
    assert 0 < s["attention_kept"] <= 1 and 0 <= s["media_kept_share"] <= 1 and s["min_kept_position"] >= 0


# ---------------------------------------------------------------------------------------------- 10 FastV in training
def _manual_fastv_row(lm: DecoderLM, emb: torch.Tensor, pos: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """One unpadded row by hand: layers < k on every token, then only the ``kept`` columns; logits (n_kept, V)."""
    model = lm.hf.model
    h = emb
    for i, layer in enumerate(model.layers):
        if i == k:
            h, pos = h[:, kept], pos[:, kept]
        h = layer(h, attention_mask=None, position_embeddings=model.rotary_emb(h, pos), position_ids=pos)
    return lm.hf.lm_head(model.norm(h))[0]


def test_fastv_in_a_training_forward(lm):
    # right padding, no cache, every position's logits; row 1 has no media at all
    lengths, w, k = [18, 18, 11], 18, 2
    g = torch.Generator().manual_seed(9)
    emb = torch.randn(3, w, DIM, generator=g)
    mask = (torch.arange(w)[None, :] < torch.tensor(lengths)[:, None]).long()
    pos = torch.arange(w).expand(3, w) * mask
    kinds = torch.full((3, w), TEXT_KIND)
    kinds[0, 2:12] = IMAGE
    kinds[2, 1:7] = IMAGE
    stages = _llm({"name": "fastv", "layer": k, "drop_ratio": 0.5})
    emb = emb.requires_grad_(True)
    logits, cache = lm(emb, mask, pos, logits_to_keep=0, stages=stages, token_kinds=kinds)
    assert cache is None and logits.shape == (3, w, VOCAB)
    dropped = (logits == 0).all(-1) & mask.bool()  # (B, L) real tokens with no logits
    media = (kinds != TEXT_KIND) & mask.bool()
    assert not (dropped & ~media & mask.bool()).any()  # text is never dropped
    assert dropped[0].sum() == 5 and dropped[2].sum() == 3 and dropped[1].sum() == 0
    assert torch.isfinite(logits).all()
    # each row equals a manual loop over its own tokens (and row 1, untouched, the stage-free model)
    for row, n in enumerate(lengths):
        kept = (~dropped[row, :n]).nonzero().flatten()
        want = _manual_fastv_row(lm, emb[row: row + 1, :n], pos[row: row + 1, :n], kept, k)
        assert_close(logits[row, kept], want, rtol=1e-4, atol=1e-5)
        # one at a time (no padding) drops the same tokens
        alone = lm(emb[row: row + 1, :n], None, pos[row: row + 1, :n], stages=stages, token_kinds=kinds[row: row + 1, :n])[0]
        assert torch.equal((alone[0] == 0).all(-1), dropped[row, :n]), f"row {row} drops other tokens than alone"
    assert_close(logits[1], lm(emb[1:2], None, pos[1:2])[0][0], rtol=1e-4, atol=1e-5)
    # gradients reach the inputs, the dropped media tokens through layers 0..k-1 only
    loss = logits[mask.bool()].logsumexp(-1).sum()
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert (emb.grad[mask.bool()].abs().sum(-1) > 0).all()
