"""The static decoding step captured in a CUDA graph (``generate_from_embeds(cuda_graph=...)`` without LLM
stages, issue 16): the replay gives the uncaptured step's tokens exactly, is reused between calls, launches
no host sync, and a capture that fails is logged and decoded eagerly.

Skipped without a GPU. On a GPU box: ``PYTHONPATH=. python -m pytest -q tests/test_static_decode_cuda.py``.
"""

import logging

import pytest
import torch

from llava_deft.model.llm import DecoderLM, build_llm, generate_from_embeds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def tiny_lm(model_type: str = "llama", dtype=torch.float32) -> DecoderLM:
    torch.manual_seed(0)
    spec = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 97, "max_position_embeddings": 1024}
    with torch.device("cuda"):
        return DecoderLM(build_llm(spec, torch_dtype=dtype).eval())


def prompts(lm: DecoderLM, b: int = 3, length: int = 40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (b, length), generator=g).cuda()
    mask = torch.ones(b, length, dtype=torch.long, device="cuda")
    if b > 1:
        mask[1, :9] = 0
    if b > 2:
        mask[2, :20] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return lm.embed(ids).detach(), mask, pos


def gen(lm, embeds, mask, pos, **kw):
    kw = {"max_new_tokens": 24, "eos_token_id": [], "pad_token_id": 0, **kw}
    with torch.no_grad():
        return generate_from_embeds(lm, embeds, mask, pos, **kw)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gpt2"])  # gpt2: n_embd etc. by attribute_map
@pytest.mark.parametrize("b", [1, 3])
def test_replay_equals_the_uncaptured_step_and_the_plain_path(model_type, b):
    lm = tiny_lm(model_type)
    embeds, mask, pos = prompts(lm, b)
    captured = gen(lm, embeds, mask, pos)  # the default on CUDA: static slots, captured
    dec = lm._static[1]
    assert dec.graph is not None and dec.graph_failed is None
    uncaptured = gen(lm, embeds, mask, pos, static_cache=True, cuda_graph=False)
    plain = gen(lm, embeds, mask, pos, cuda_graph=False)
    assert captured.tolist() == uncaptured.tolist() == plain.tolist()


def test_bf16_replay_equals_the_uncaptured_static_step_exactly():
    lm = tiny_lm("llama", torch.bfloat16)
    embeds, mask, pos = prompts(lm, 3)
    captured = gen(lm, embeds, mask, pos, max_new_tokens=40)
    uncaptured = gen(lm, embeds, mask, pos, max_new_tokens=40, static_cache=True, cuda_graph=False)
    assert torch.equal(captured, uncaptured)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compiled_replay_gives_the_uncompiled_tokens(model_type):
    """compile=True: inductor's kernels captured in the prefill and step graphs; the greedy tokens equal the
    uncompiled captured path's and the replays read nothing on the host."""
    lm = tiny_lm(model_type)
    embeds, mask, pos = prompts(lm, 3)
    reference = gen(lm, embeds, mask, pos)
    outs = [gen(lm, embeds, mask, pos, compile=True) for _ in range(3)]  # compile + warm-up, capture, replay
    dec = lm._static[1]
    assert dec.compiled is True and dec.graph is not None and dec.graph_failed is None
    assert isinstance(dec._prefills[40], tuple)
    for out in outs:
        assert out.tolist() == reference.tolist()
    dec.length = 40
    nxt = pos[:, -1:] + 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            dec.step(reference[:, :1], nxt)
            nxt = nxt + 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sized_prompts_replay_like_the_uncaptured_sized_decoder():
    """token_sizes on CUDA: a sized static decoder (additive masks with the prompt's log-sizes) is captured and
    replayed, with the uncaptured sized decoder's tokens."""
    lm = tiny_lm()
    embeds, mask, pos = prompts(lm, 3)
    sizes = (torch.arange(40, device="cuda") % 3 + 1).float().expand(3, 40).contiguous()
    outs = [gen(lm, embeds, mask, pos, token_sizes=sizes) for _ in range(3)]
    dec = lm._static[1]
    assert dec.sized and dec.graph is not None and isinstance(dec._prefills[40], tuple)
    uncaptured = gen(lm, embeds, mask, pos, token_sizes=sizes, static_cache=True, cuda_graph=False)
    for out in outs:
        assert out.tolist() == uncaptured.tolist()


def test_graph_is_reused_and_replays_without_host_syncs():
    lm = tiny_lm()
    embeds, mask, pos = prompts(lm, 2)
    first = gen(lm, embeds, mask, pos)
    dec = lm._static[1]
    graph = dec.graph
    second = gen(lm, embeds, mask, pos)  # the step replays from the first step; the prefill is captured now
    assert lm._static[1] is dec and dec.graph is graph
    assert isinstance(dec._prefills[40], tuple)  # (graph, input buffers, logits)
    third = gen(lm, embeds, mask, pos)  # both replayed
    assert torch.equal(first, second) and torch.equal(first, third)
    tok = first[:, :1]
    nxt = pos[:, -1:] + 1
    dec.length = 40
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            dec.step(tok, nxt)
            nxt = nxt + 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_host_sync_is_found_in_the_warm_up_logged_and_run_eagerly(caplog, monkeypatch):
    lm = tiny_lm()
    embeds, mask, pos = prompts(lm, 2)
    expected = gen(lm, embeds, mask, pos, cuda_graph=False)
    lm.release_static()
    norm = lm.hf.model.norm
    real = norm.forward

    def reads_the_device(x):  # a module that branches on a device value cannot be captured
        if bool(x.abs().sum() > 0):
            return real(x)
        return real(x)

    monkeypatch.setattr(norm, "forward", reads_the_device)
    with caplog.at_level(logging.WARNING, logger="llava_deft.generate"):
        out = gen(lm, embeds, mask, pos)
    assert lm._static[1].graph is None and lm._static[1].graph_failed
    # found in the warm-ups (sync debug mode), never attempted as a capture
    assert "the prefill of 40 tokens cannot be captured in a CUDA graph" in caplog.text
    assert "the decoding step cannot be captured in a CUDA graph" in caplog.text
    assert "capturing it failed" not in caplog.text
    assert out.tolist() == expected.tolist()
    assert torch.cuda.get_sync_debug_mode() == 0  # restored


def _reducers():
    from eval.bench_reducers import reducer_names
    return reducer_names()


@pytest.mark.parametrize("reducer", _reducers())
def test_whole_model_replay_gives_the_eager_tokens(reducer):
    """The tiny LLaVA on CUDA: vision tower + projector, the reducer's pipeline, prefill and steps replayed
    from graphs (third call) give the eager path's tokens; every part was captured, none fell back."""
    from eval.bench_reducers import build_model, make_batch, pipeline_for

    device = torch.device("cuda")
    model = build_model("tiny", device, torch.float32)
    model.pipeline = pipeline_for(reducer, 0.25, model.llm.hidden_size).to(device).eval()
    batch = make_batch(model, 2, device)
    eager = model.generate(**batch, max_new_tokens=6, cuda_graph=False)
    outs = [model.generate(**batch, max_new_tokens=6) for _ in range(3)]
    for out in outs:
        assert out.tolist() == eager.tolist()
    calls = model._graphs.value
    for part in ("vision", "pipeline"):
        states = list(calls[part].entries.values())
        assert states and all(isinstance(s, tuple) for s in states), (part, states)
    assert model.llm._static[1].graph is not None and all(isinstance(s, tuple) for s in model.llm._static[1]._prefills.values())
