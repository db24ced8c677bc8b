"""Proportional attention for tokens merged before the LLM (``TokenBatch.sizes`` -> ``Spliced.sizes`` ->
``token_sizes``): a token of size s draws the attention s copies of it would. Exact against duplicated
prompts where duplicates are indistinguishable (one layer, the copies at one position), and the sizes
follow every stage that keeps, pools, merges or recovers tokens."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from llava_deft.model.llm import generate_from_embeds
from llava_deft.model.splice import splice_media
from pipeline import Modality, TokenBatch, build_pipeline
from pipeline.ops import split_by_mask
from pipeline.stages.rtd import merge_recovered
from tests.test_llm import _build


def _prompts(lm, copies: list[int], seed: int = 0):
    """The same prompt twice: token j repeated copies[j] times at one position, and once with size copies[j]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (1, len(copies)), generator=g)
    embeds = lm.embed(ids).detach()
    reps = torch.tensor(copies)
    dup = embeds.repeat_interleave(reps, dim=1)
    dup_pos = torch.arange(len(copies)).repeat_interleave(reps)[None]
    return (dup, torch.ones(1, dup.shape[1], dtype=torch.long), dup_pos), \
        (embeds, torch.ones(1, len(copies), dtype=torch.long), torch.arange(len(copies))[None], reps.float()[None])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_a_size_weighs_like_its_copies(model_type):
    lm = _build(model_type, num_hidden_layers=1)
    (dup, dup_mask, dup_pos), (emb, mask, pos, sizes) = _prompts(lm, [1, 3, 1, 2, 1])
    with torch.no_grad():
        ref, _ = lm(dup, dup_mask, dup_pos, logits_to_keep=1)
        ours, _ = lm(emb, mask, pos, logits_to_keep=1, token_sizes=sizes)
        plain, _ = lm(emb, mask, pos, logits_to_keep=1)
    assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, ref, rtol=1e-4, atol=1e-4)  # without the sizes the copies weigh less


def test_decoding_keeps_the_sizes_in_the_cache():
    """Greedy generation after a sized prompt equals generation after the duplicated prompt (one layer):
    every step's new token attends to the merged keys with their log-size bias."""
    lm = _build("llama", num_hidden_layers=1)
    (dup, dup_mask, dup_pos), (emb, mask, pos, sizes) = _prompts(lm, [2, 1, 4, 1], seed=3)
    with torch.no_grad():
        ref = generate_from_embeds(lm, dup, dup_mask, dup_pos, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
        ours = generate_from_embeds(lm, emb, mask, pos, max_new_tokens=6, eos_token_id=[], pad_token_id=0,
                                    token_sizes=sizes)
    assert ours.tolist() == ref.tolist()
    with pytest.raises(ValueError, match="token_sizes are for the prefill"):
        from llava_deft.model.llm.runtime import LLMStages

        runner = LLMStages(lm, [])
        cache = runner.new_cache()
        lm(emb, mask, pos, cache, use_cache=True, stages=runner, token_sizes=sizes)
        lm(emb[:, :1], None, pos[:, -1:] + 1, cache, use_cache=True, stages=runner, token_sizes=sizes[:, :1])


def _batch(n: int = 12, b: int = 2, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 4, 8, generator=g)
    tokens = base.repeat_interleave(n // 4, dim=1) + 1e-4 * torch.randn(b, n, 8, generator=g)  # runs of alike tokens
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -2:] = False
    return TokenBatch.from_tokens(tokens, mask, layout=torch.tensor([[1, 3, 4], [1, 2, 5]]))


def test_clustering_sizes_sum_to_the_input_and_follow_later_stages():
    batch = _batch()
    pipe = build_pipeline([{"name": "recursive_compression", "similarity_threshold": 0.99, "adaptive_threshold": False,
                            "use_residuals": False}], dim=8).eval()
    out = pipe(batch)
    assert out.sizes is not None and out.lengths.tolist() == [4, 4]
    assert (out.sizes * out.mask).sum(1).tolist() == batch.lengths.float().tolist()
    assert (out.sizes[out.mask] >= 1).all()
    off = build_pipeline([{"name": "recursive_compression", "similarity_threshold": 0.99, "adaptive_threshold": False,
                           "use_residuals": False, "proportional_attention": False}], dim=8).eval()
    assert off(batch).sizes is None
    # a second merge adds sizes; pooling sums them; ToMe merges them; every stage keeps the total
    for stage in ({"name": "recursive_compression", "similarity_threshold": -1.0, "adaptive_threshold": False,
                   "use_residuals": False}, {"name": "pool", "retention_ratio": 0.5}, {"name": "tome", "retention_ratio": 0.5}):
        again = build_pipeline([stage], dim=8).eval()(out)
        assert_close((again.sizes * again.mask).sum(1), batch.lengths.float()), stage["name"]


def test_selection_and_recovery_move_the_sizes():
    batch = _batch().replace(sizes=torch.arange(1, 13, dtype=torch.float32).expand(2, 12).clone())
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, ::3] = True
    out = split_by_mask(batch, keep, "s", width=4, drop_width=8)
    assert out.sizes.tolist() == [[1.0, 4.0, 7.0, 10.0], [1.0, 4.0, 7.0, 10.0]]
    rec_idx = torch.tensor([[0, 1], [0, 1]])
    back = merge_recovered(out, out.pruned.tokens.gather(1, rec_idx[..., None].expand(-1, -1, 8)), rec_idx,
                           torch.ones(2, 2, dtype=torch.bool))
    assert back.index[0].tolist()[:4] == [0, 1, 2, 3] and back.sizes[0].tolist()[:4] == [1.0, 1.0, 1.0, 4.0]


def test_splice_writes_media_sizes_and_ones_elsewhere():
    ids = torch.tensor([[5, 99, 6, 7]])
    text = torch.randn(1, 4, 8)
    media = torch.randn(1, 3, 8)
    out = splice_media(ids, torch.ones(1, 4, dtype=torch.long), text, ids == 99, media, torch.ones(1, 3, dtype=torch.bool),
                       torch.tensor([[0, 2, 5]]), torch.tensor([6]), media_sizes=torch.tensor([[2.0, 3.0, 1.0]]))
    assert out.sizes.tolist() == [[1.0, 2.0, 3.0, 1.0, 1.0, 1.0]]
    plain = splice_media(ids, torch.ones(1, 4, dtype=torch.long), text, ids == 99, media, torch.ones(1, 3, dtype=torch.bool),
                         torch.tensor([[0, 2, 5]]), torch.tensor([6]))
    assert plain.sizes is None and torch.equal(plain.embeds, out.embeds)


def test_the_model_passes_the_clusters_sizes_to_its_llm(tiny_model, monkeypatch):
    import copy

    import numpy as np
    from PIL import Image

    from llava_deft.data import build_collator

    model = copy.deepcopy(tiny_model).eval()
    model.pipeline = build_pipeline([{"name": "recursive_compression", "similarity_threshold": -1.0,
                                      "adaptive_threshold": False, "use_residuals": False}], dim=model.llm.hidden_size)
    items = [{"id": "a", "messages": [{"role": "user", "content": "<image>\nWhat?"}],
              "images": [Image.fromarray(np.full((32, 32, 3), 90, np.uint8))]}]
    batch = build_collator(model.processors, generation=True)(items)
    seen = {}
    real = type(model.llm).forward

    def spy(self, *args, **kwargs):
        if kwargs.get("token_sizes") is not None:  # the prefill (decoding steps stand for themselves)
            seen["sizes"] = kwargs["token_sizes"]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model.llm), "forward", spy)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2)
    sizes = seen["sizes"]
    n_media = model.vision.grid[0] * model.vision.grid[1]
    assert sizes.shape[0] == 1 and (sizes >= 1).all()
    assert sizes.max() == n_media and (sizes == 1).sum() == sizes.shape[1] - 1  # one cluster holds the image


def test_within_frames_keeps_one_cluster_per_frame_at_least():
    tokens = torch.ones(1, 8, 4)  # two 2x2 frames of one identical token
    batch = TokenBatch.from_tokens(tokens, modality=Modality.VIDEO, layout=(2, 2, 2))
    options = {"name": "recursive_compression", "similarity_threshold": 0.5, "adaptive_threshold": False,
               "use_residuals": False}
    across = build_pipeline([options], dim=4).eval()(batch)
    within = build_pipeline([{**options, "within_frames": True}], dim=4).eval()(batch)
    assert across.index[across.mask].tolist() == [0] and across.sizes[across.mask].tolist() == [8.0]
    assert within.index[within.mask].tolist() == [0, 4] and within.sizes[within.mask].tolist() == [4.0, 4.0]


def test_training_through_sized_tokens_gives_finite_gradients(tiny_model):
    import copy

    import numpy as np
    from PIL import Image

    from llava_deft.data import build_collator

    model = copy.deepcopy(tiny_model).train()
    model.pipeline = build_pipeline([{"name": "recursive_compression", "similarity_threshold": 0.5}],
                                    dim=model.llm.hidden_size).train()
    items = [{"id": f"t{i}", "messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                                          {"role": "assistant", "content": "red"}],
              "images": [Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8))]} for i in range(2)]
    batch = build_collator(model.processors)(items)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.llm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pipeline.parameters())


def test_the_probe_weighs_a_merged_key_like_its_copies():
    """attention_probe with a log-size bias equals the probe over the duplicated keys, each key's copies
    summed (GQA: 4 query heads over 2 KV heads)."""
    from llava_deft.model.llm.probe import attention_probe

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 8, generator=g)
    keys = torch.randn(2, 2, 5, 8, generator=g)
    sizes = torch.tensor([[1, 3, 2, 1, 4], [2, 1, 1, 5, 1]])
    allowed = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    allowed[1, :, :, 0] = False
    ours = attention_probe(q, keys, allowed, 0.35, torch.log(sizes.float()).unsqueeze(1))
    for row in range(2):
        reps = sizes[row]
        dup = keys[row:row + 1].repeat_interleave(reps, dim=2)
        ref = attention_probe(q[row:row + 1], dup, allowed[row:row + 1].repeat_interleave(reps, dim=-1), 0.35)
        owner = torch.arange(5).repeat_interleave(reps)
        summed = torch.zeros(1, 4, 3, 5).index_add_(3, owner, ref)
        assert_close(ours[row:row + 1], summed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_static_decoder_carries_the_sizes(model_type):
    """static_cache=True with token_sizes: a ``sized`` static decoder (additive masks, the prompt's log-sizes in
    its slots) gives the duplicated prompt's tokens (one layer) and the staged runtime's (two layers)."""
    one = _build(model_type, num_hidden_layers=1)
    (dup, dup_mask, dup_pos), (emb, mask, pos, sizes) = _prompts(one, [2, 1, 3, 1], seed=7)
    kw = {"max_new_tokens": 6, "eos_token_id": [], "pad_token_id": 0}
    with torch.no_grad():
        ref = generate_from_embeds(one, dup, dup_mask, dup_pos, **kw)
        static = generate_from_embeds(one, emb, mask, pos, token_sizes=sizes, static_cache=True, **kw)
        assert one._static[1].sized and static.tolist() == ref.tolist()
        two = _build(model_type, num_hidden_layers=2)
        staged = generate_from_embeds(two, emb, mask, pos, token_sizes=sizes, **kw)  # CPU default: the runtime
        assert two._static is None
        static2 = generate_from_embeds(two, emb, mask, pos, token_sizes=sizes, static_cache=True, **kw)
        plain = generate_from_embeds(two, emb, mask, pos, static_cache=True, **kw)  # another, unsized decoder
        assert not two._static[1].sized
    assert static2.tolist() == staged.tolist()
    assert plain.shape == staged.shape


def test_a_sized_static_decoder_refuses_a_prompt_without_sizes():
    from llava_deft.model.llm.static import StaticDecoder

    lm = _build("llama", num_hidden_layers=1)
    emb = lm.embed(torch.tensor([[3, 4]])).detach()
    mask, pos = torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None]
    sized = StaticDecoder(lm, 1, 16, torch.device("cpu"), torch.float32, capture=False, sized=True)
    with pytest.raises(ValueError, match="takes the prompt's sizes"):
        sized.prefill(emb, mask, pos)
    plain = StaticDecoder(lm, 1, 16, torch.device("cpu"), torch.float32, capture=False)
    with pytest.raises(ValueError, match="token sizes need sized=True"):
        plain.prefill(emb, mask, pos, torch.ones(1, 2))
