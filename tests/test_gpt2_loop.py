"""The GPT-2 family in our own layer loop (issue 18 item 3): parity with HF ``GPT2LMHeadModel`` at toy size.

Against the HF model itself: logits (left padding, positions with gaps), greedy ``generate`` token for
token, cached decoding, eager attention weights (the probe, through the runtime as a layer stage sees it,
FastV's choice). Against the stage-free loop: stages that keep everything change nothing; acting stages
give each row of a ragged batch what it gets alone. Plus the static cache, save/load, and the named
full-size shapes (configs/model/gpt2_small.yaml, smollm_1p7b.yaml) built on the meta device.

Run: ``OMP_NUM_THREADS=1 .venv/bin/pytest -p no:xdist -q tests/test_gpt2_loop.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2LMHeadModel
from transformers.masking_utils import create_causal_mask

import pipeline
from llava_deft.config import load_model_config
from llava_deft.model.llm import SUPPORTED_MODEL_TYPES, TINY_GPT2, DecoderLM, build_llm, generate_from_embeds
from llava_deft.model.llm.families import GPT2Family, family_of
from llava_deft.model.llm.probe import attention_probe
from llava_deft.model.llm.runtime import StagedCache
from llava_deft.model.llm.static import static_unsupported
from pipeline.llm import TEXT_KIND, LayerStage

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97
DIM = 64
SMALL = dict(n_embd=DIM, n_layer=3, n_head=4, n_positions=256)
IMAGE = int(pipeline.Modality.IMAGE)
NEVER = -1  # an eos id no row ever produces


def _build(seed: int = 0, attn: str = "sdpa", dtype=None, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    spec = {**TINY_GPT2, **SMALL, **overrides}
    lm = DecoderLM(build_llm(spec, vocab_size=VOCAB, attn_implementation=attn, torch_dtype=dtype)).eval()
    with torch.no_grad():  # nonzero LayerNorm/Conv1D biases (HF initialises them to 0/1): they must matter
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in lm.hf.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return lm


def _eager_twin(lm: DecoderLM, **overrides) -> DecoderLM:
    """The same weights, eager attention (its layers return the attention weights)."""
    twin = _build(seed=123, attn="eager", dtype=next(lm.parameters()).dtype, **overrides)
    twin.load_state_dict(lm.state_dict())
    return twin


@pytest.fixture(scope="module")
def lm() -> DecoderLM:
    return _build()


@pytest.fixture(scope="module")
def lm64() -> DecoderLM:
    """Float64, so that choices compared with eager references have no near-ties."""
    return _build(dtype=torch.float64)


@pytest.fixture(scope="module")
def eager64(lm64) -> DecoderLM:
    return _eager_twin(lm64)


def _left_padded(lengths: list[int], seed: int = 1):
    """Random ids (B, P), left-padding mask (B, P), positions 0..n-1 on the real tokens (0 on pads)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, (mask.cumsum(1) - 1).clamp(min=0)


def _prompts(lengths: list[int], seed: int = 1, dtype=torch.float32):
    """Left-padded random embeddings (B, W, D), mask, positions and kinds (half of each row's tokens, after
    the first, are media; the last is text)."""
    g = torch.Generator().manual_seed(seed)
    b, w = len(lengths), max(lengths)
    emb = torch.randn(b, w, DIM, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.arange(w)[None, :] >= w - torch.tensor(lengths)[:, None]).long()
    emb = emb * mask[..., None].to(dtype)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    kinds = torch.full((b, w), TEXT_KIND, dtype=torch.long)
    for row, n in enumerate(lengths):
        kinds[row, w - n + 1: w - n + 1 + n // 2] = IMAGE
    return emb, mask, pos, kinds


def _row(x: torch.Tensor, row: int, n: int) -> torch.Tensor:
    return x[row: row + 1, x.shape[1] - n:]


def _ours(lm, ids, mask, pos, **kw):
    with torch.no_grad():
        return lm(lm.embed(ids), mask, pos, **kw)[0]


def _hf_logits(lm, ids, mask, pos):
    with torch.no_grad():
        return lm.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _llm(*cfgs: dict):
    return pipeline.build_pipeline({"llm": list(cfgs)}, DIM).llm


@torch.no_grad()
def _decode(lm, emb, mask, pos, kinds=None, stages=None, steps=5):
    """Greedy decoding by hand: tokens (B, steps+1), logits (B, steps+1, V), the cache."""
    runner = lm.bind_stages(stages) if stages is not None else None
    logits, cache = lm(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner, token_kinds=kinds)
    out, toks = [logits[:, -1]], []
    mask, nxt = mask.long(), pos[:, -1:] + 1
    for _ in range(steps):
        tok = out[-1].argmax(-1, keepdim=True)
        toks.append(tok)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        logits, cache = lm(lm.embed(tok).to(emb.dtype), mask, nxt, cache, use_cache=True, logits_to_keep=1,
                           stages=runner)
        nxt = nxt + 1
        out.append(logits[:, -1])
    toks.append(out[-1].argmax(-1, keepdim=True))
    return torch.cat(toks, 1), torch.stack(out, 1), cache


@torch.no_grad()
def _eager_attentions(eager: DecoderLM, emb, pos) -> list[torch.Tensor]:
    """Per layer (H, n, n) eager attention weights of ONE unpadded prompt (1, n, D) from the HF model."""
    return [a[0] for a in eager.hf(inputs_embeds=emb, position_ids=pos, output_attentions=True).attentions]


# ---------------------------------------------------------------------------------------------- the adapter
def test_gpt2_is_a_supported_family_with_its_adapter(lm):
    assert "gpt2" in SUPPORTED_MODEL_TYPES and isinstance(lm.hf, GPT2LMHeadModel)
    assert isinstance(lm.family, GPT2Family) and lm.family.layers is lm.hf.transformer.h
    assert lm.hf.lm_head.weight is lm.hf.transformer.wte.weight  # tied head
    assert (lm.hidden_size, lm.num_layers, lm.vocab_size, lm.config.max_position_embeddings) == (DIM, 3, VOCAB, 256)
    assert static_unsupported(lm) is None  # the static cache runs GPT-2 too (tested below)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=16,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=8))
    with pytest.raises(ValueError, match=r"unsupported LLM model_type 'mistral' \(MistralForCausalLM\); supported: "
                                         r"\['llama', 'qwen2', 'qwen3', 'gpt2'\]"):
        DecoderLM(mistral)
    with pytest.raises(ValueError, match=r"model_type 'mistral' \(here\)"):
        family_of(mistral, "here")


def test_tiny_gpt2_default_builds():
    hf = build_llm(TINY_GPT2, vocab_size=50)
    cfg = hf.config
    assert (cfg.model_type, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (
        "gpt2", 128, 2, 4, 2048, 50)
    assert hf.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("lengths", [[12, 12], [12, 7, 3]], ids=["no_pad", "left_pad"])
def test_logits_match_hf_forward(lm, lengths):
    ids, mask, pos = _left_padded(lengths)
    real = mask.bool()
    assert_close(_ours(lm, ids, mask, pos)[real], _hf_logits(lm, ids, mask, pos)[real])
    # HF's own defaults (positions 0.. when unpadded) agree too
    if lengths[0] == lengths[-1]:
        with torch.no_grad():
            assert_close(_ours(lm, ids, mask, pos), lm.hf(input_ids=ids).logits)


def test_training_forward_draws_the_same_dropout_as_hf():
    """GPT-2's dropouts (after wte + wpe, in attention, on both residual branches) run where HF runs them, in
    the same order: under one seed a training forward equals HF's, and the dropout really acts."""
    lm = _build(embd_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2).train()
    ids, mask, pos = _left_padded([12, 7])
    real = mask.bool()
    torch.manual_seed(3)
    ours = _ours(lm, ids, mask, pos)
    torch.manual_seed(3)
    assert_close(ours[real], _hf_logits(lm, ids, mask, pos)[real])
    assert not torch.allclose(ours[real], _ours(lm.eval(), ids, mask, pos)[real])


def test_positions_with_gaps_are_used_as_given(lm):
    ids, mask, _ = _left_padded([10, 10])
    pos = torch.tensor([[0, 1, 2, 7, 8, 11, 12, 13, 20, 21], [5, 6, 9, 10, 11, 12, 30, 31, 32, 33]])
    ours = _ours(lm, ids, mask, pos)
    assert_close(ours, _hf_logits(lm, ids, mask, pos))
    assert_close(_ours(lm, ids, None, pos), ours)  # no mask: gaps are not packed-sequence boundaries
    assert not torch.allclose(ours, _ours(lm, ids, mask, torch.arange(10).expand(2, 10)))  # wpe really reads ours


def test_incremental_decoding_matches_full_forward(lm):
    ids, mask, pos = _left_padded([11, 6])
    pos = pos + torch.tensor([[0], [4]])  # a different start per row
    full = _ours(lm, ids, mask, pos)
    with torch.no_grad():
        _, cache = lm(lm.embed(ids[:, :5]), mask[:, :5], pos[:, :5], use_cache=True)
        chunk, cache = lm(lm.embed(ids[:, 5:8]), mask[:, :8], pos[:, 5:8], cache, use_cache=True)
        assert_close(chunk, full[:, 5:8])
        for t in range(8, 11):
            step, cache = lm(lm.embed(ids[:, t: t + 1]), mask[:, : t + 1], pos[:, t: t + 1], cache, use_cache=True)
            assert_close(step[:, 0], full[:, t])
    assert cache.get_seq_length() == 11


def test_greedy_equals_hf_generate(lm):
    ids, mask, pos = _left_padded([9, 5], seed=4)
    first = generate_from_embeds(lm, lm.embed(ids), mask, pos, 8, eos_token_id=[], pad_token_id=0)
    eos = int(first[1, 3])  # row 1 stops at step 3: stopping and pad-filling are exercised
    ours = generate_from_embeds(lm, lm.embed(ids), mask, pos, 8, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = lm.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    assert ours.tolist() == ref[:, ids.shape[1]:].tolist()
    assert ours[1, 3] == eos and ours[1, 4:].eq(0).all()


def test_batched_greedy_equals_one_at_a_time_and_the_static_cache(lm):
    ids, mask, pos = _left_padded([10, 4, 7], seed=3)
    kw = dict(max_new_tokens=7, eos_token_id=[], pad_token_id=0)
    batched = generate_from_embeds(lm, lm.embed(ids), mask, pos, **kw)
    for b in range(3):
        keep = mask[b].bool()
        alone = generate_from_embeds(lm, lm.embed(ids[b: b + 1, keep]), mask[b: b + 1, keep], pos[b: b + 1, keep], **kw)
        assert alone[0].tolist() == batched[b].tolist()
    # preallocated slots + a validity mask (what CUDA graphs capture), here uncaptured on the CPU
    static, cache = generate_from_embeds(lm, lm.embed(ids), mask, pos, static_cache=True, return_cache=True, **kw)
    assert static.tolist() == batched.tolist() and type(cache).__name__ == "SlotCache"
    lm.release_static()


def test_save_pretrained_roundtrip(lm, tmp_path):
    lm.hf.save_pretrained(tmp_path)
    loaded = DecoderLM(build_llm(tmp_path)).eval()
    assert loaded.config.model_type == "gpt2" and isinstance(loaded.family, GPT2Family)
    assert loaded.hf.lm_head.weight is loaded.hf.transformer.wte.weight
    ids, mask, pos = _left_padded([8, 5])
    assert_close(_ours(loaded, ids, mask, pos), _ours(lm, ids, mask, pos), rtol=0, atol=0)


def test_hf_model_unchanged_after_use(lm):
    before = {k: v.clone() for k, v in lm.hf.state_dict().items()}
    forward = type(lm.hf.transformer.h[0].attn).forward
    emb, mask, pos, kinds = _prompts([9, 6], seed=8)
    _decode(lm, emb, mask, pos, kinds, _llm({"name": "fastv", "layer": 1}, {"name": "tova", "cache_max_size": 5}))
    after = lm.hf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(lm.hf.transformer.h[0].attn).forward is forward and lm.config._attn_implementation == "sdpa"
    assert all(k.startswith("hf.") for k in lm.state_dict())


# ---------------------------------------------------------------------------------------------- the probe
@pytest.mark.parametrize("inverse_layer_scale", [False, True], ids=["plain", "scale_by_layer"])
def test_probe_equals_eager_attention_weights(inverse_layer_scale):
    lm = _build(attn="eager", scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    fam, layer = lm.family, lm.family.layers[1]
    assert fam.scaling(layer) == pytest.approx(16 ** -0.5 / (2 if inverse_layer_scale else 1))
    g = torch.Generator().manual_seed(7)
    lengths = [12, 9, 4]
    w = max(lengths)
    h = torch.randn(3, w, DIM, generator=g)
    mask = (torch.arange(w)[None, :] >= w - torch.tensor(lengths)[:, None]).long()
    mask4d = create_causal_mask(lm.config, h, mask, None, position_ids=None)
    with torch.no_grad():
        _, weights = layer.attn(layer.ln_1(h), attention_mask=mask4d)  # (B, H, w, w)
        keys = fam.keys(layer, h, ())
        assert keys.shape == (3, 4, w, 16)
        real = mask.bool()
        for start in (w - 1, w - 5, 0):  # the last query, a window, every query
            q = fam.queries(layer, h[:, start:], ())
            cols = torch.arange(w)
            allowed = (cols[None, None, :] <= torch.arange(start, w)[None, :, None]) & real[:, None, :]
            allowed = allowed & real[:, start:, None]
            probs = attention_probe(q, keys, allowed.unsqueeze(1), fam.scaling(layer))
            assert probs.shape == (3, 4, w - start, w)
            asking = real[:, start:]
            got, want = probs.transpose(1, 2)[asking], weights[:, :, start:].transpose(1, 2)[asking]
            assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
            assert (probs.transpose(1, 2)[~asking] == 0).all()


class _Spy(LayerStage):
    """A layer stage (not registered) that records what its attention probe answers and keeps everything."""

    stage_name = "spy"

    def __init__(self, layer: int, asks):
        super().__init__(layer)
        self.asks, self.got = asks, []

    def reduce(self, state, attention):
        self.got = [(ask, attention(ask)) for ask in self.asks]
        return state


def test_layer_stage_probe_equals_hf_eager_attentions(lm64, eager64):
    """What a layer stage after block k sees (``_stage_probe`` over the loop's keys) is block k's attention."""
    lengths, k = [13, 9, 5], 2
    w = max(lengths)
    emb, mask, _, kinds = _prompts(lengths, seed=13, dtype=torch.float64)
    pos = (mask.cumsum(1) - 1).clamp(min=0) * 2 + torch.tensor([[0], [3], [1]])  # gaps and offsets
    spy = _Spy(k, [3, "text"])
    with torch.no_grad():
        out = lm64(emb, mask, pos, stages=[spy], token_kinds=kinds)[0]
        assert torch.equal(out, lm64(emb, mask, pos)[0])
    for ask, probs in spy.got:
        assert probs.dtype == torch.float32 and probs.shape[:2] == (3, 4) and probs.shape[-1] == w
        for row, n in enumerate(lengths):
            kind = kinds[row, w - n:].tolist()
            asking = [c for c in range(n) if kind[c] == TEXT_KIND] if ask == "text" else list(range(n))[-ask:]
            a = _eager_attentions(eager64, _row(emb, row, n), _row(pos, row, n))[k - 1]  # (H, n, n)
            got = probs[row][:, probs.shape[2] - len(asking):]
            assert_close(got[:, :, w - n:], a[:, asking].float(), rtol=1e-5, atol=1e-6)
            assert (got[:, :, : w - n] == 0).all()  # padding keys get nothing


def test_fastv_choice_equals_eager_reference(lm64, eager64):
    lengths, k, r, nq = [20, 14, 9], 2, 0.5, 3
    emb, mask, pos, kinds = _prompts(lengths, seed=12, dtype=torch.float64)
    with torch.no_grad():
        _, cache = lm64(emb, mask, pos, use_cache=True, logits_to_keep=1, token_kinds=kinds,
                        stages=_llm({"name": "fastv", "layer": k, "drop_ratio": r, "num_queries": nq}))
    w = max(lengths)
    for row, n in enumerate(lengths):
        a = _eager_attentions(eager64, _row(emb, row, n), _row(pos, row, n))[k - 1]
        kind = kinds[row, w - n:].tolist()
        media = [c for c in range(n) if kind[c] != TEXT_KIND]
        score = {c: float(a[:, n - nq:, c].mean()) for c in media}
        ranked = sorted(media, key=lambda c: (-score[c], c))[: math.ceil((1 - r) * len(media))]
        want = {c for c in range(n) if kind[c] == TEXT_KIND} | set(ranked)
        tl = cache.layers[k]
        got = {int(p) for p, v in zip(tl.positions[row, 0].tolist(), tl.valid[row, 0].tolist()) if v}
        assert got == want, f"row {row}"


# ---------------------------------------------------------------------------------------------- stages
KEEP_ALL = {
    "fastv": [{"name": "fastv", "layer": 1, "drop_ratio": 0.0}],
    "pair_compress": [{"name": "pair_compress", "layer": 1, "ratio": 1.0, "window": 3}],
    "tova": [{"name": "tova", "cache_max_size": 64}],
    "h2o": [{"name": "h2o", "cache_max_size": 64}],
    "snapkv": [{"name": "snapkv", "cache_max_size": 64, "window_size": 3}],
    "fastv+tova+h2o": [{"name": "fastv", "layer": 1, "drop_ratio": 0.0},
                       {"name": "tova", "cache_max_size": 64, "layers": [0, 1]},
                       {"name": "h2o", "cache_max_size": 64, "layers": [2]}],
}


@pytest.mark.parametrize("case", list(KEEP_ALL))
def test_stages_that_keep_everything_change_nothing(lm, case):
    lengths, new = [18, 11, 7], 6
    emb, mask, pos, kinds = _prompts(lengths, seed=14)
    stages = _llm(*KEEP_ALL[case])
    ref_t, ref_l, _ = _decode(lm, emb, mask, pos, steps=new)
    t, logits, cache = _decode(lm, emb, mask, pos, kinds, stages, steps=new)
    assert torch.equal(t, ref_t) and torch.equal(logits, ref_l)
    assert isinstance(cache, StagedCache) and all(s["evicted"] == 0 for s in cache.stats())
    kw = dict(eos_token_id=NEVER, pad_token_id=0)
    assert torch.equal(generate_from_embeds(lm, emb, mask, pos, new, stages=stages, token_kinds=kinds, **kw),
                       generate_from_embeds(lm, emb, mask, pos, new, **kw))
    with torch.no_grad():
        assert torch.equal(lm(emb, mask, pos, stages=stages, token_kinds=kinds)[0], lm(emb, mask, pos)[0])


ACTING = {
    "fastv+tova+h2o": [{"name": "fastv", "layer": 1, "drop_ratio": 0.5},
                       {"name": "tova", "cache_max_size": 6, "layers": [0, 1]},
                       {"name": "h2o", "cache_max_size": 6, "layers": [2]}],
    "snapkv": [{"name": "snapkv", "cache_max_size": 6, "window_size": 3, "kernel_size": 5}],
    "streaming_llm": [{"name": "streaming_llm", "cache_max_size": 6, "num_sinks": 2}],
    "pair_compress": [{"name": "pair_compress", "layer": 2, "window": 3, "ratio": 0.0, "memory_floor": 2,
                       "num_heads": 2, "hidden_dim": 16}],
}


@pytest.mark.parametrize("case", list(ACTING))
def test_acting_stages_on_a_ragged_batch_equal_one_at_a_time(lm, case):
    lengths, steps = [18, 11, 7], 5
    emb, mask, pos, kinds = _prompts(lengths, seed=2)
    torch.manual_seed(5)
    stages = _llm(*ACTING[case]).eval()
    _, ref_l, _ = _decode(lm, emb, mask, pos, steps=steps)
    toks, logits, cache = _decode(lm, emb, mask, pos, kinds, stages, steps=steps)
    assert not torch.equal(logits, ref_l)  # the stages really act
    assert sum(s["evicted"] for s in cache.stats()) > 0 or case == "pair_compress"
    for row, n in enumerate(lengths):
        t1, l1, _ = _decode(lm, _row(emb, row, n), _row(mask, row, n), _row(pos, row, n), _row(kinds, row, n),
                            stages, steps=steps)
        assert torch.equal(toks[row: row + 1], t1), f"{case}: row {row} differs from its one-at-a-time run"
        assert_close(logits[row: row + 1], l1, rtol=1e-4, atol=1e-5)
    batched = generate_from_embeds(lm, emb, mask, pos, steps, eos_token_id=NEVER, pad_token_id=0, stages=stages,
                                   token_kinds=kinds)
    assert torch.equal(batched, toks[:, :steps])


def test_eviction_keeps_the_cached_keys_of_the_kept_positions(lm):
    """GPT-2 keys carry no RoPE phase; an evicting cache holds, for each kept position, exactly the key and
    value the stage-free cache holds there."""
    lengths = [20, 13, 7]
    emb, mask, pos, kinds = _prompts(lengths, seed=11)
    with torch.no_grad():
        _, full = lm(emb, mask, pos, use_cache=True)
        _, cache = lm(emb, mask, pos, use_cache=True, stages=_llm({"name": "tova", "cache_max_size": 8}),
                      token_kinds=kinds)
    w = max(lengths)
    for i in range(3):
        tl = cache.layers[i]
        assert tl.num_slots == 8 and tl.keys.shape == (3, 4, 8, 16)
        for row, n in enumerate(lengths):
            for kv in range(4):
                for s in range(8):
                    if tl.valid[row, kv, s]:
                        col = w - n + int(tl.positions[row, kv, s])
                        assert torch.equal(tl.keys[row, kv, s], full.layers[i].keys[row, kv, col])
                        assert torch.equal(tl.values[row, kv, s], full.layers[i].values[row, kv, col])


# ---------------------------------------------------------------------------------------------- named shapes
@pytest.mark.parametrize("name,model_type,shape,params", [
    ("gpt2_small", "gpt2", (768, 12, 12, 12, 1024, 50257), 124_439_808),
    ("smollm_1p7b", "llama", (2048, 24, 32, 32, 2048, 49152), 1_711_376_384),
], ids=["gpt2_small", "smollm_1p7b"])
def test_named_full_size_shapes(name, model_type, shape, params):
    """The shipped shapes, built on the meta device (no memory): the published parameter counts (GPT-2 small
    124M, SmolLM-1.7B 1.71B, both with tied heads)."""
    cfg = load_model_config(ROOT / "configs" / "model" / f"{name}.yaml")
    assert cfg.vision is None and cfg.llm.config["model_type"] == model_type
    with torch.device("meta"):
        hf = build_llm(cfg.llm.config, vocab_size=1163)  # the project tokenizer's size: the config's rows stay
    c = hf.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, kv, c.max_position_embeddings,
            c.vocab_size) == shape
    assert c.tie_word_embeddings and hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert sum(p.numel() for p in hf.parameters()) == params
    lm = DecoderLM(hf)
    assert lm.family.layers is (hf.transformer.h if model_type == "gpt2" else hf.model.layers)
    if model_type == "llama":
        assert c.intermediate_size == 8192 and c.rope_parameters["rope_theta"] == 10000.0


# ---------------------------------------------------------------------------------------------- the whole model
def test_text_model_on_a_gpt2_llm_trains_generates_and_reloads(tmp_path):
    """A text-only llava-deft model whose LLM is a GPT-2: the loss is the loop's own next-token loss and
    trains every LLM parameter; generation with a cache policy survives save_pretrained / from_pretrained."""
    from llava_deft.data import build_collator
    from llava_deft.model import LlavaDeftForCausalLM

    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"vision": None, "llm": {"config": {**TINY_GPT2, "n_positions": 512}},
                                  "pipeline": {"stages": [], "llm": [{"name": "tova", "cache_max_size": 8}]}})
    assert isinstance(model.llm.family, GPT2Family) and model.llm.vocab_size == len(model.tokenizer)
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    batch = build_collator(model.processors)([{"id": f"s{i}", "messages": chat} for i in range(2)])
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = model(**tensors)
    mask = batch["attention_mask"]
    logits = model.llm(model.llm.embed(batch["input_ids"]), mask, (mask.cumsum(1) - 1).clamp(min=0))[0]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                            ignore_index=-100)
    assert_close(out.loss, ref)
    out.loss.backward()
    assert all(p.grad is not None for p in model.llm.parameters() if p.requires_grad)
    model.eval()
    prompt, prompt_mask = batch["input_ids"][:, :-2], mask[:, :-2]
    with torch.no_grad():
        tokens = model.generate(prompt, prompt_mask, max_new_tokens=4)
    model.save_pretrained(tmp_path)
    loaded = LlavaDeftForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.llm.config.model_type == "gpt2"
    with torch.no_grad():
        assert torch.equal(loaded.generate(prompt, prompt_mask, max_new_tokens=4), tokens)
