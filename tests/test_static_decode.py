"""Static-cache decoding (``generate_from_embeds(static_cache=...)``, issue 16): the preallocated slots give
the plain path's tokens and logits, buffers are reused safely between calls, and it refuses where it cannot
apply. The CUDA-graph capture of the same step is tested in tests/test_static_decode_cuda.py (GPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm, generate_from_embeds
from llava_deft.model.llm.static import BUCKET, SlotCache, StaticDecoder, static_unsupported
from pipeline import build_pipeline
from tests.test_llm import SMALL, VOCAB, _build  # the same toy decoders as the parity tests


@pytest.fixture(scope="module")
def lms() -> dict[str, DecoderLM]:
    return {mt: _build(mt) for mt in ("llama", "qwen2", "qwen3")}


def _prompts(lengths: list[int], seed: int = 1, gaps: bool = False):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    if gaps:  # pruned media keep their original positions: jumps inside the prompt
        pos = pos + (pos >= 3).long() * 7
    return ids.masked_fill(mask == 0, 0), mask, pos


def _gen(lm, ids, mask, pos, **kw):
    kw = {"max_new_tokens": 10, "eos_token_id": [], "pad_token_id": 0, **kw}
    return generate_from_embeds(lm, lm.embed(ids), mask, pos, **kw)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("gaps", [False, True], ids=["dense", "gaps"])
def test_static_slots_give_the_plain_tokens(lms, model_type, gaps):
    lm = lms[model_type]
    ids, mask, pos = _prompts([11, 4, 8], seed=2, gaps=gaps)
    with torch.no_grad():
        plain = _gen(lm, ids, mask, pos, static_cache=False)
        static = _gen(lm, ids, mask, pos, static_cache=True)
    assert static.tolist() == plain.tolist()
    assert plain.shape == (3, 10)


def test_static_prefill_and_steps_equal_the_plain_forward(lms):
    """Prefill and step by step, the static decoder's logits equal the plain path's (float32, same tokens)."""
    lm = lms["qwen2"]
    ids, mask, pos = _prompts([9, 5], seed=3, gaps=True)
    with torch.no_grad():
        dec = StaticDecoder(lm, 2, 32, torch.device("cpu"), torch.float32, capture=False)
        dec.valid.fill_(True)  # stale slots from an earlier call must not be read
        ours = dec.prefill(lm.embed(ids), mask, pos)
        logits, cache = lm(lm.embed(ids), mask, pos, None, use_cache=True, logits_to_keep=1)
        assert_close(ours, logits, rtol=1e-5, atol=1e-5)
        nxt_pos = pos[:, -1:] + 1
        for _ in range(6):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            logits, cache = lm(lm.embed(tok), mask, nxt_pos, cache, use_cache=True, logits_to_keep=1)
            assert_close(dec.step(tok, nxt_pos), logits, rtol=1e-5, atol=1e-5)
            nxt_pos = nxt_pos + 1
    assert dec.length == 9 + 6 and dec.cache.get_seq_length() == 15
    assert dec.valid[1].sum() == 5 + 6 and not dec.valid[:, 15:].any()  # left pads and unwritten slots unread
    real = mask.bool()  # (B, 15): the real slots hold the plain cache's keys and values (pads are never read)
    for layer, plain in zip(dec.cache.layers, cache.layers):
        assert_close(layer.keys[:, :, :15].transpose(1, 2)[real], plain.keys.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
        assert_close(layer.values[:, :, :15].transpose(1, 2)[real], plain.values.transpose(1, 2)[real], rtol=1e-5,
                     atol=1e-5)


def test_eos_stops_rows_and_early_exit_with_static_slots(lms):
    lm = lms["llama"]
    ids, mask, pos = _prompts([9, 5, 7], seed=6)
    free = _gen(lm, ids, mask, pos, max_new_tokens=12, static_cache=False)
    eos = sorted({int(free[b, min(2 + 2 * b, 10)]) for b in range(3)})
    for every in (1, 3):
        plain = _gen(lm, ids, mask, pos, max_new_tokens=12, eos_token_id=eos, static_cache=False, eos_check_every=every)
        static = _gen(lm, ids, mask, pos, max_new_tokens=12, eos_token_id=eos, static_cache=True, eos_check_every=every)
        assert static.tolist() == plain.tolist() and static.shape[1] < 12


def test_buffers_are_reused_and_stale_slots_are_never_read(lms):
    """A second call of the same batch size and bucket reuses the decoder; a shorter prompt after a longer
    one must not see the first call's keys (the prefill resets its validity mask)."""
    lm = _build("llama", seed=4)
    long = _prompts([30, 30], seed=7)
    short = _prompts([6, 3], seed=8)
    with torch.no_grad():
        _gen(lm, *long, static_cache=True)
        first = lm._static[1]
        assert isinstance(first, StaticDecoder) and first.max_len == BUCKET
        again = _gen(lm, *short, static_cache=True)
        assert lm._static[1] is first  # same buffers (a bucket of 256 serves both)
        assert again.tolist() == _gen(lm, *short, static_cache=False).tolist()
        _gen(lm, *_prompts([4], seed=9), static_cache=True)  # batch size 1: a new decoder replaces it
        assert lm._static[1] is not first and lm._static[1].batch_size == 1
        lm.hf.to(torch.float64)  # the weights moved: the next call must not read the old buffers' addresses
        _gen(lm, *_prompts([4], seed=9), static_cache=True)
        assert lm._static[1].dtype == torch.float64
    lm.release_static()
    assert lm._static is None


def test_bucket_grows_with_prompt_plus_new_tokens(lms):
    lm = lms["qwen3"]
    ids, mask, pos = _prompts([BUCKET - 5], seed=10)
    out, cache = _gen(lm, ids, mask, pos, max_new_tokens=8, static_cache=True, return_cache=True)
    assert isinstance(cache, SlotCache) and cache.layers[0].keys.shape[-2] == 2 * BUCKET
    assert out.tolist() == _gen(lm, ids, mask, pos, max_new_tokens=8, static_cache=False).tolist()
    grown = lm._static[1]
    short = _prompts([7], seed=14)
    assert _gen(lm, *short, static_cache=True).tolist() == _gen(lm, *short, static_cache=False).tolist()
    assert lm._static[1] is grown  # the larger cache serves the shorter call: no rebuild, graphs kept


def test_eager_attention_masks_additively():
    torch.manual_seed(5)
    lm = DecoderLM(build_llm({**TINY_LLM, **SMALL}, vocab_size=VOCAB, attn_implementation="eager")).eval()
    ids, mask, pos = _prompts([7, 3], seed=11)
    assert _gen(lm, ids, mask, pos, static_cache=True).tolist() == _gen(lm, ids, mask, pos, static_cache=False).tolist()


def test_default_is_off_on_cpu_and_refusals_name_the_reason(lms):
    lm = lms["llama"]
    ids, mask, pos = _prompts([5], seed=12)
    lm.release_static()
    _gen(lm, ids, mask, pos)  # CPU default: the plain path, nothing allocated
    assert lm._static is None
    tova = build_pipeline({"llm": [{"name": "tova", "cache_max_size": 4}]}, dim=lm.hidden_size).llm
    with pytest.raises(ValueError, match=r"static_cache=True cannot apply: LLM stages keep their own cache"):
        _gen(lm, ids, mask, pos, stages=tova, static_cache=True)
    sliding = _build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding" in static_unsupported(sliding)
    with pytest.raises(ValueError, match=r"static_cache=True cannot apply: layer types .*sliding"):
        _gen(sliding, ids, mask, pos, static_cache=True)
    assert _gen(sliding, ids, mask, pos).shape == (1, 10)  # the default falls back to the plain path


def test_a_full_static_cache_refuses_another_step(lms):
    lm = lms["llama"]
    ids, mask, pos = _prompts([3], seed=13)
    with torch.no_grad():
        dec = StaticDecoder(lm, 1, 4, torch.device("cpu"), torch.float32, capture=False)
        with pytest.raises(ValueError, match="a prompt of 4 tokens does not fit a static cache of 4 slots"):
            dec.prefill(lm.embed(_prompts([4])[0]), *_prompts([4])[1:])
        dec.prefill(lm.embed(ids), mask, pos)
        dec.step(ids[:, :1], pos[:, -1:] + 1)
        with pytest.raises(ValueError, match="static cache of 4 slots is full"):
            dec.step(ids[:, :1], pos[:, -1:] + 2)


def test_a_cache_over_the_keep_limit_is_freed_after_its_call(lms, monkeypatch):
    from llava_deft.model.llm import static

    lm = _build("llama", seed=6)
    ids, mask, pos = _prompts([9, 4], seed=15)
    _gen(lm, ids, mask, pos, static_cache=True)
    kept = lm._static[1]
    assert kept.nbytes() == 2 * lm.num_layers * 2 * 2 * BUCKET * 16 * 4  # K and V, (B, H_kv, slots, d) float32
    monkeypatch.setattr(static, "KEEP_BYTES", kept.nbytes() - 1)
    out = _gen(lm, ids, mask, pos, static_cache=True)
    assert lm._static is None  # freed after the call, the tokens unchanged
    assert out.tolist() == _gen(lm, ids, mask, pos, static_cache=False).tolist()


def test_what_cannot_be_captured_is_said_once(lms, caplog):
    import logging

    from llava_deft.model.llm import decoder

    lm = lms["llama"]
    fastv = lm.bind_stages(build_pipeline({"llm": [{"name": "fastv", "layer": 1}]}, dim=lm.hidden_size).llm)
    decoder._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="llava_deft.generate"):
        first = decoder._log_uncaptured("LLM stages keep their own cache (StagedCache)", fastv)
        decoder._log_uncaptured("LLM stages keep their own cache (StagedCache)", fastv)
    assert "prefill runs eagerly (LLM stages keep their own cache (StagedCache): FastV)" in first
    assert caplog.text.count("cuda_graph: the prefill runs eagerly") == 1  # once per process and reason
    sliding = _build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding" in decoder._log_uncaptured(static_unsupported(sliding), None)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_compiled_static_decoding_gives_the_plain_tokens(lms, model_type):
    """``compile``: dynamo traces the static prefill and step (aot_eager: the tracing without generating
    kernels) and the tokens equal the plain path's; compile=True implies the static decoder on CPU."""
    lm = lms[model_type]
    ids, mask, pos = _prompts([9, 4, 6], seed=21, gaps=True)
    with torch.no_grad():
        plain = _gen(lm, ids, mask, pos, static_cache=False)
        lm.release_static()
        compiled = _gen(lm, ids, mask, pos, compile="aot_eager")
        dec = lm._static[1]
        assert dec.compiled == "aot_eager" and dec._step_fn is not dec._step
        again = _gen(lm, ids, mask, pos, compile="aot_eager")  # kept: the same decoder and compiled code
        assert lm._static[1] is dec
        uncompiled = _gen(lm, ids, mask, pos, static_cache=True)  # another key: a new, uncompiled decoder
        assert lm._static[1] is not dec and lm._static[1]._step_fn == lm._static[1]._step
    assert compiled.tolist() == plain.tolist() == again.tolist() == uncompiled.tolist()
    lm.release_static()


def test_inductor_compiled_logits_equal_the_uncompiled_static_ones(lms):
    """The real backend (inductor's generated CPU kernels): prefill and step logits match the uncompiled
    static decoder's to float32 rounding."""
    lm = lms["llama"]
    ids, mask, pos = _prompts([7, 3], seed=22)
    with torch.no_grad():
        ref = StaticDecoder(lm, 2, 32, torch.device("cpu"), torch.float32, capture=False)
        comp = StaticDecoder(lm, 2, 32, torch.device("cpu"), torch.float32, capture=False, compile=True)
        assert_close(comp.prefill(lm.embed(ids), mask, pos), ref.prefill(lm.embed(ids), mask, pos), rtol=1e-4, atol=1e-4)
        nxt = pos[:, -1:] + 1
        tok = torch.tensor([[5], [9]])
        for _ in range(3):
            assert_close(comp.step(tok, nxt), ref.step(tok, nxt), rtol=1e-4, atol=1e-4)
            nxt = nxt + 1


def test_compile_where_the_static_decoder_cannot_apply_says_so(lms, caplog):
    lm = lms["llama"]
    ids, mask, pos = _prompts([5], seed=23)
    tova = build_pipeline({"llm": [{"name": "tova", "cache_max_size": 4}]}, dim=lm.hidden_size).llm
    with caplog.at_level(logging.WARNING, logger="llava_deft.generate"), torch.no_grad():
        out = _gen(lm, ids, mask, pos, stages=tova, compile=True)
    assert out.shape == (1, 10)
    assert "compile=True applies to the static decoder only" in caplog.text
    assert "LLM stages keep their own cache" in caplog.text


def test_an_unknown_compile_backend_is_named(lms, tiny_model):
    from llava_deft import LlavaDeft
    from llava_deft.errors import InvalidArgumentError

    ids, mask, pos = _prompts([4], seed=24)
    with pytest.raises(InvalidArgumentError, match=r"compile='inductr': give True \(inductor\), False, or a torch.compile "
                                                   r"backend name, one of \[.*'aot_eager'.*'inductor'"):
        _gen(lms["llama"], ids, mask, pos, compile="inductr")
    with pytest.raises(InvalidArgumentError, match="compile=3"):
        LlavaDeft(tiny_model, device="cpu", compile=3)
