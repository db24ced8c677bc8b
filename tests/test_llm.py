"""Parity of our layer loop with the HF models' own forward/generate, at toy size (litgpt-style)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from llava_deft.model.llm import (
    SUPPORTED_MODEL_TYPES,
    TINY_LLM,
    DecoderLM,
    build_llm,
    generate_from_embeds,
)

VOCAB = 97
FAMILIES = ["llama", "qwen2", "qwen3"]
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _build(model_type: str, seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    spec = {**TINY_LLM, **SMALL, "model_type": model_type, **overrides}
    return DecoderLM(build_llm(spec, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def lms() -> dict[str, DecoderLM]:
    return {mt: _build(mt) for mt in FAMILIES}


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids (B, P), left-padding mask (B, P), positions 0..n-1 on the real tokens (0 on pads)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


def _hf_logits(lm: DecoderLM, ids, mask, pos) -> torch.Tensor:
    with torch.no_grad():
        return lm.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _ours(lm: DecoderLM, ids, mask, pos, **kw) -> torch.Tensor:
    with torch.no_grad():
        return lm(lm.embed(ids), mask, pos, **kw)[0]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("lengths", [[12, 12], [12, 7, 3]], ids=["no_pad", "left_pad"])
def test_logits_match_hf_forward(lms, model_type, lengths):
    lm = lms[model_type]
    ids, mask, pos = _left_padded(lengths)
    real = mask.bool()
    assert_close(_ours(lm, ids, mask, pos)[real], _hf_logits(lm, ids, mask, pos)[real])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_positions_with_gaps_match_hf(lms, model_type):
    lm = lms[model_type]
    ids, mask, _ = _left_padded([10, 10])
    # pruned media tokens leave holes; row 1 also starts late
    pos = torch.tensor([[0, 1, 2, 7, 8, 11, 12, 13, 20, 21], [5, 6, 9, 10, 11, 12, 30, 31, 32, 33]])
    ours = _ours(lm, ids, mask, pos)
    assert_close(ours, _hf_logits(lm, ids, mask, pos))
    # no mask at all must not turn gaps into packed-sequence boundaries
    assert_close(_ours(lm, ids, None, pos), ours)
    # and the positions matter (RoPE really uses ours)
    assert not torch.allclose(ours, _ours(lm, ids, mask, torch.arange(10).expand(2, 10)))


def test_sliding_window_layers_match_hf():
    # qwen2 with layer 1 sliding (window 4) and a 12-token prompt: the window really cuts
    lm = _build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert lm.layer_types() == ["full_attention", "sliding_attention"]
    ids, mask, pos = _left_padded([12, 9])
    real = mask.bool()
    full = _ours(lm, ids, mask, pos)
    assert_close(full[real], _hf_logits(lm, ids, mask, pos)[real])
    # decoding through the sliding cache, one token at a time, agrees with the full pass
    with torch.no_grad():
        _, cache = lm(lm.embed(ids[:, :8]), mask[:, :8], pos[:, :8], use_cache=True)
        for t in range(8, 12):
            step, cache = lm(lm.embed(ids[:, t : t + 1]), mask[:, : t + 1], pos[:, t : t + 1], cache, use_cache=True)
            assert_close(step[:, 0], full[:, t])


def test_no_padding_keeps_sdpa_is_causal_path(lms):
    """Without padding the mask builder hands SDPA no mask (is_causal); with padding it gets one."""
    lm = lms["llama"]
    seen = []
    handle = lm.hf.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    try:
        for lengths in ([8, 8], [8, 5]):
            ids, mask, pos = _left_padded(lengths)
            _ours(lm, ids, mask, pos)
    finally:
        handle.remove()
    assert seen[0] is None
    assert isinstance(seen[1], torch.Tensor) and seen[1].shape[-2:] == (8, 8)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_incremental_decoding_matches_full_forward(lms, model_type):
    lm = lms[model_type]
    ids, mask, pos = _left_padded([11, 6])
    pos = pos + torch.tensor([[0], [4]])  # arbitrary starting offset per row
    full = _ours(lm, ids, mask, pos)
    with torch.no_grad():
        _, cache = lm(lm.embed(ids[:, :5]), mask[:, :5], pos[:, :5], use_cache=True)
        chunk, cache = lm(lm.embed(ids[:, 5:8]), mask[:, :8], pos[:, 5:8], cache, use_cache=True)
        assert_close(chunk, full[:, 5:8])
        for t in range(8, 11):
            step, cache = lm(lm.embed(ids[:, t : t + 1]), mask[:, : t + 1], pos[:, t : t + 1], cache, use_cache=True)
            assert_close(step[:, 0], full[:, t])
    assert cache.get_seq_length() == 11


def test_logits_to_keep_and_shape_errors(lms):
    lm = lms["llama"]
    ids, mask, pos = _left_padded([9, 4])
    full = _ours(lm, ids, mask, pos)
    assert_close(_ours(lm, ids, mask, pos, logits_to_keep=1), full[:, -1:])
    assert _ours(lm, ids, mask, pos, logits_to_keep=3).shape == (2, 3, VOCAB)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, past\+L\)"):
        _ours(lm, ids, mask[:, 1:], pos)
    with pytest.raises(ValueError, match=r"position_ids must have shape"):
        _ours(lm, ids, mask, pos[:, 1:])


def _one_at_a_time(lm, ids, mask, pos, **kw) -> list[list[int]]:
    rows = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        out = generate_from_embeds(
            lm, lm.embed(ids[b : b + 1, keep]), mask[b : b + 1, keep], pos[b : b + 1, keep], **kw
        )
        rows.append(out[0].tolist())
    return rows


def _strip(row: list[int], eos: int, pad: int) -> list[int]:
    """Tokens up to and including the first EOS (what a row really generated)."""
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("model_type", FAMILIES)
def test_batched_left_padded_greedy_equals_one_at_a_time(lms, model_type):
    lm = lms[model_type]
    ids, mask, pos = _left_padded([10, 4, 7], seed=3)
    kw = dict(max_new_tokens=8, pad_token_id=0)
    # pick an EOS that row 0 first emits at step j >= 1, so stopping and pad-filling are exercised
    first = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=[], **kw)[0].tolist()
    j = next(j for j in range(1, len(first) - 1) if first[j] not in first[:j])
    eos = first[j]
    batched = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=eos, **kw)
    single = _one_at_a_time(lm, ids, mask, pos, eos_token_id=eos, **kw)
    for b, row in enumerate(batched.tolist()):
        gen = _strip(row, eos, 0)
        assert gen == _strip(single[b], eos, 0)
        assert all(t == 0 for t in row[len(gen) :])  # finished rows are padded
    assert batched[0, j] == eos and batched[0, j + 1 :].eq(0).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_equals_hf_generate(lms, model_type):
    lm = lms[model_type]
    ids, mask, pos = _left_padded([9, 5], seed=4)
    first = generate_from_embeds(lm, lm.embed(ids), mask, pos, 8, eos_token_id=[], pad_token_id=0)
    eos = int(first[1, 3])
    ours = generate_from_embeds(lm, lm.embed(ids), mask, pos, 8, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = lm.hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    assert ours.tolist() == ref[:, ids.shape[1] :].tolist()


def test_greedy_with_position_gaps_is_batch_invariant(lms):
    lm = lms["qwen3"]
    ids, mask, _ = _left_padded([8, 5], seed=5)
    pos = torch.tensor([[0, 1, 2, 9, 10, 11, 12, 13], [0, 0, 0, 0, 4, 5, 6, 20]])
    kw = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    batched = generate_from_embeds(lm, lm.embed(ids), mask, pos, **kw)
    assert batched.tolist() == _one_at_a_time(lm, ids, mask, pos, **kw)
    # each row continues at its last prompt position + 1: a full forward over prompt + answer at
    # those positions predicts the same tokens
    seq = torch.cat([ids, batched], dim=1)
    seq_mask = torch.cat([mask, torch.ones_like(batched)], dim=1)
    seq_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(batched.shape[1])], dim=1)
    predicted = _ours(lm, seq, seq_mask, seq_pos)[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(predicted, batched)


def test_sampling_is_reproducible_with_a_generator(lms):
    lm = lms["llama"]
    ids, mask, pos = _left_padded([9, 6], seed=6)
    emb = lm.embed(ids)
    kw = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=0, do_sample=True, temperature=1.5, top_p=0.95)

    def sample(seed: int, **extra) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate_from_embeds(lm, emb, mask, pos, generator=gen, **{**kw, **extra})

    a, b = sample(0), sample(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(1))
    # top_k=1 leaves only the argmax: sampling reduces to greedy
    greedy = generate_from_embeds(lm, emb, mask, pos, 10, eos_token_id=[], pad_token_id=0)
    assert torch.equal(sample(2, top_k=1), greedy)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(0, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sample(0, top_p=0.0)


def test_generate_refuses_right_padding(lms):
    lm = lms["llama"]
    ids, mask, pos = _left_padded([6, 4])
    with pytest.raises(ValueError, match=r"LEFT-padded; rows \[1\]"):
        generate_from_embeds(lm, lm.embed(ids), mask.flip(1), pos, 3, eos_token_id=1, pad_token_id=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_pretrained_roundtrip(lms, model_type, tmp_path):
    lm = lms[model_type]
    lm.hf.save_pretrained(tmp_path)
    loaded = DecoderLM(build_llm(tmp_path)).eval()
    assert loaded.config.model_type == model_type
    ids, mask, pos = _left_padded([8, 5])
    assert_close(_ours(loaded, ids, mask, pos), _ours(lm, ids, mask, pos), rtol=0, atol=0)


def test_load_with_larger_vocab_resizes(lms, tmp_path):
    lms["llama"].hf.save_pretrained(tmp_path)
    loaded = DecoderLM(build_llm(str(tmp_path), vocab_size=VOCAB + 3, resize_vocab=True))
    assert loaded.vocab_size == VOCAB + 3
    assert loaded.hf.lm_head.weight.shape[0] == VOCAB + 3
    assert_close(loaded.hf.model.embed_tokens.weight[:VOCAB], lms["llama"].hf.model.embed_tokens.weight)


def test_build_errors(tmp_path):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(FileNotFoundError, match="no_such_llm"):
        build_llm(missing)
    listed = r"supported: \['llama', 'qwen2', 'qwen3', 'gpt2'\]"
    with pytest.raises(ValueError, match=r"unsupported LLM model_type 'mistral'.*" + listed):
        build_llm({"model_type": "mistral", "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="unsupported LLM model_type None"):
        build_llm({"hidden_size": 8})
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral", "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"unsupported LLM model_type 'mistral' \(config\.json in"):
        build_llm(tmp_path / "mistral")


def test_tiny_default_builds():
    hf = build_llm(TINY_LLM)
    cfg = hf.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 384)
    assert cfg.max_position_embeddings == 2048 and not cfg.tie_word_embeddings
    assert hf.config._attn_implementation == "sdpa"
    assert set(SUPPORTED_MODEL_TYPES) >= set(FAMILIES)
    assert build_llm(TINY_LLM, torch_dtype=torch.bfloat16, vocab_size=50).lm_head.weight.dtype == torch.bfloat16


def test_hf_model_unchanged_after_use(lms):
    lm = lms["qwen2"]
    before = {k: v.clone() for k, v in lm.hf.state_dict().items()}
    attn, cls = lm.hf.config._attn_implementation, type(lm.hf.model.layers[0].self_attn).forward
    ids, mask, pos = _left_padded([7, 4])
    _ours(lm, ids, mask, pos, use_cache=True)
    generate_from_embeds(lm, lm.embed(ids), mask, pos, 4, eos_token_id=[], pad_token_id=0)
    after = lm.hf.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert lm.hf.config._attn_implementation == attn
    assert type(lm.hf.model.layers[0].self_attn).forward is cls
    assert all(k.startswith("hf.") for k in lm.state_dict())


def test_layer_hooks_observe_and_replace(lms):
    lm = lms["llama"]
    ids, mask, pos = _left_padded([8, 5])
    base = _ours(lm, ids, mask, pos)
    calls = []

    def observe(i, h, m, p):
        calls.append((i, tuple(h.shape), m is mask, p is pos))

    assert_close(_ours(lm, ids, mask, pos, layer_hooks={0: observe, 1: observe}), base)
    assert calls == [(0, (2, 8, 64), True, True), (1, (2, 8, 64), True, True)]
    # replacing the last layer's output with zeros leaves only the head's bias-free projection of norm(0)
    zeros = _ours(lm, ids, mask, pos, layer_hooks={1: lambda i, h, m, p: torch.zeros_like(h)})
    assert_close(zeros, torch.zeros_like(base))
    # scaling after layer 0 really feeds layer 1
    assert not torch.allclose(_ours(lm, ids, mask, pos, layer_hooks={0: lambda i, h, m, p: 2 * h}), base)
    with pytest.raises(ValueError, match=r"layer_hooks for layers \[5\]"):
        _ours(lm, ids, mask, pos, layer_hooks={5: observe})
    with pytest.raises(ValueError, match="layer hook at layer 0 returned shape"):
        _ours(lm, ids, mask, pos, layer_hooks={0: lambda i, h, m, p: h[:, :1]})


@pytest.mark.parametrize("every", [2, 3, 8])
def test_reading_eos_flags_every_few_steps_gives_the_same_tokens(lms, every):
    """Issue 16: the host reads "every row finished" only every ``eos_check_every`` steps; the rows that
    finished write pad meanwhile and the result is cut back to the last row's EOS, so it equals the
    check at every step (the HF-equal path above), stopping early included."""
    lm = lms["llama"]
    ids, mask, pos = _left_padded([9, 5, 7], seed=6)
    kw = dict(max_new_tokens=12, pad_token_id=0)
    free = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=[], **kw)
    # EOS ids every row emits before the end: each row stops, at different steps, and generation stops early
    eos = sorted({int(free[b, min(2 + 2 * b, 10)]) for b in range(3)})
    each = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=eos, eos_check_every=1, **kw)
    assert each.shape[1] < 12  # every row met an EOS: stopped early (rows at different steps)
    fewer = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=eos, eos_check_every=every, **kw)
    assert fewer.tolist() == each.tolist()
    never = generate_from_embeds(lm, lm.embed(ids), mask, pos, eos_token_id=[], eos_check_every=every, **kw)
    assert never.tolist() == free.tolist()  # no EOS: all 12 steps either way


def test_eos_check_every_must_be_a_positive_integer(lms):
    lm = lms["llama"]
    ids, mask, pos = _left_padded([4], seed=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"eos_check_every must be an integer >= 1, got"):
            generate_from_embeds(lm, lm.embed(ids), mask, pos, 3, eos_token_id=1, pad_token_id=0, eos_check_every=bad)
