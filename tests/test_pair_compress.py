"""Pair compression's pieces (issue 17) against slow loop-based references on random inputs: odd lengths,
windows as long as the sequence, a different selection per row, masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch.nn.functional as F
import torch
from torch.testing import assert_close

from pipeline.pair_compress import (
    TokenCompressor,
    WindowAttentionScore,
    interleave_selected_pure_tensor,
    select_tokens,
    selection_count,
)

D = 12


def ref_compress(comp: TokenCompressor, x: torch.Tensor, t_w: int) -> torch.Tensor:
    rows = []
    for row in x:
        t = row.shape[0]
        memory = max(t - t_w, 0)
        out, j = [], 0
        while j + 1 < memory:
            a, b = row[j], row[j + 1]
            out.append((a + b) / 2 + comp.mlp(torch.cat([a + comp.pos[0], b + comp.pos[1]])))
            j += 2
        out += [row[i] for i in range(j, t)]  # an odd memory's last token, then the window
        rows.append(torch.stack(out))
    return torch.stack(rows)


@pytest.mark.parametrize("t,t_w", [(11, 3), (10, 3), (10, 4), (7, 7), (7, 9), (8, 0), (9, 8), (2, 0)])
def test_compressor_equals_the_pairwise_loop(t, t_w):
    torch.manual_seed(t * 10 + t_w)
    comp = TokenCompressor(D, 16)
    torch.nn.init.normal_(comp.mlp[-1].weight, std=0.1)  # a trained compressor, not the zero start
    x = torch.randn(3, t, D)
    out = comp(x, t_w)
    assert out.shape == (3, t - TokenCompressor.num_pairs(t, t_w), D)
    assert_close(out, ref_compress(comp, x, t_w))
    if TokenCompressor.num_pairs(t, t_w) == 0:
        assert out is x  # nothing to pair: no work


def test_a_new_compressor_mean_pools_pairs_and_trains():
    comp = TokenCompressor(D)
    x = torch.randn(2, 9, D, requires_grad=True)
    out = comp(x, 2)
    assert_close(out[:, :3], x[:, :6].reshape(2, 3, 2, D).mean(2))
    assert_close(out[:, 3:], x[:, 6:])
    out.square().sum().backward()
    assert comp.mlp[-1].weight.grad.abs().sum() > 0 and x.grad is not None


def ref_importance(score: WindowAttentionScore, x, t_w, mask=None):
    b, t, _ = x.shape
    m, h, hd = t - t_w, score.num_heads, score.head_dim
    out = torch.zeros(b, max(m, 0))
    for r in range(b):
        q_all, k_all = score.q(x[r]), score.k(x[r])
        used = 0
        for qi in range(m, t):
            if mask is not None and not mask[r, qi]:
                continue
            used += 1
            for head in range(h):
                q = q_all[qi, head * hd:(head + 1) * hd]
                logits = torch.stack([q @ k_all[j, head * hd:(head + 1) * hd] / math.sqrt(hd) for j in range(m)])
                if mask is not None:
                    logits = logits.masked_fill(~mask[r, :m], float("-inf"))
                    if not mask[r, :m].any():
                        continue
                out[r] += logits.softmax(0)
        out[r] /= max(used, 1) * h
    return out


@pytest.mark.parametrize("t,t_w", [(9, 3), (10, 1), (6, 5)])
def test_importance_equals_the_loop(t, t_w):
    torch.manual_seed(t + t_w)
    score = WindowAttentionScore(D, 3)
    x = torch.randn(2, t, D)
    got = score.ImportanceScore(x, t_w)
    assert got.shape == (2, t - t_w)
    assert_close(got, ref_importance(score, x, t_w), rtol=1e-5, atol=1e-6)
    assert_close(got.sum(1), torch.ones(2))  # each query's softmax spreads one unit over the memory


def test_importance_with_padding_masks_equals_the_loop():
    torch.manual_seed(3)
    score = WindowAttentionScore(D, 2)
    x = torch.randn(3, 10, D)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :3] = False  # left padding in the memory
    mask[1, 7] = False  # one window query is padding
    mask[2, :7] = False  # no valid memory at all: zeros
    got = score.ImportanceScore(x, 3, mask)
    assert_close(got, ref_importance(score, x, 3, mask), rtol=1e-5, atol=1e-6)
    assert got[0, :3].eq(0).all() and got[2].eq(0).all()


def test_importance_without_memory_does_no_work_and_refuses_no_window():
    score = WindowAttentionScore(D, 2)
    calls = []
    score.q.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 5, D)
    assert score.ImportanceScore(x, 5).shape == (2, 0) and score.ImportanceScore(x, 9).shape == (2, 0)
    assert not calls
    with pytest.raises(ValueError, match="T_w = 0 leaves no window"):
        score.ImportanceScore(x, 0)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        WindowAttentionScore(10, 3)


def seed_count(t, t_w, r, m):
    """The seed's formula, as the issue states it, with the documented rounding and clipping."""
    value = r * (t - t_w) + m * (1 - r) / 2
    return min(max(int(math.floor(value + 0.5)), 0), max(t - t_w, 0))


def test_selection_count_matches_the_formula_on_a_grid():
    for t in (0, 1, 7, 64, 101, 4096):
        for t_w in (0, 1, 5, 100, 5000):
            for r in (0.0, 0.1, 0.25, 0.5, 0.8, 1.0):
                for m in (0, 1, 33, 100, 10_000):
                    assert selection_count(t, t_w, r, m) == seed_count(t, t_w, r, m), (t, t_w, r, m)
    assert selection_count(4100, 100, 0.8, 100) == 3210  # 0.8 * 4000 + 100 * 0.2 / 2
    with pytest.raises(ValueError, match=r"r is the share of the memory kept, in \[0, 1\]"):
        selection_count(10, 2, 1.5, 0)
    with pytest.raises(ValueError, match="T_w must be an integer >= 0"):
        selection_count(10, -1, 0.5, 0)


def test_select_tokens_equals_a_sorted_loop_and_keeps_order():
    torch.manual_seed(5)
    x = torch.randn(4, 13, D)
    scores = torch.randint(0, 4, (4, 10)).float()  # many ties: the earlier token wins
    kept, idx = select_tokens(x, scores, 3, 0.5, M=2)
    k = selection_count(13, 3, 0.5, 2)
    assert kept.shape == (4, k, D) and idx.shape == (4, k)
    for r in range(4):
        ranked = sorted(range(10), key=lambda j: (-float(scores[r, j]), j))[:k]
        assert idx[r].tolist() == sorted(ranked)
        assert_close(kept[r], x[r, sorted(ranked)])
    assert not torch.equal(idx[0], idx[1]) or not torch.equal(idx[1], idx[2])  # rows choose differently
    with pytest.raises(ValueError, match=r"scores must be \(B, T - T_w\)"):
        select_tokens(x, scores[:, :5], 3, 0.5)


def ref_interleave(x, xc, sel):
    n = x.shape[1] - xc.shape[1]
    rows = []
    for r in range(x.shape[0]):
        chosen = set(sel[r].tolist())
        out = []
        for j in range(n):
            out += [x[r, 2 * j], x[r, 2 * j + 1]] if j in chosen else [xc[r, j]]
        out += list(xc[r, n:])
        rows.append(torch.stack(out))
    return torch.stack(rows)


@pytest.mark.parametrize("t,t_w,k", [(13, 3, 2), (12, 2, 5), (12, 2, 0), (9, 0, 4), (6, 6, 0), (11, 1, 5)])
def test_interleave_equals_the_loop_with_a_selection_per_row(t, t_w, k):
    torch.manual_seed(t * 7 + k)
    comp = TokenCompressor(D)
    x = torch.randn(3, t, D, requires_grad=True)
    xc = comp(x, t_w)
    n = t - xc.shape[1]
    sel = torch.stack([torch.randperm(n)[:k] for _ in range(3)]) if n else torch.zeros(3, 0, dtype=torch.long)
    out = interleave_selected_pure_tensor(x, xc, sel)
    assert out.shape == (3, xc.shape[1] + k, D)
    assert_close(out, ref_interleave(x, xc, sel))
    # gradients equal the loop's: they reach the expanded originals and, through the merged tokens kept,
    # the compressor -- nothing written to the discarded slot leaks into them
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x, comp.pos], retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad((ref_interleave(x, xc, sel) * w).sum(), [x, comp.pos], allow_unused=True)
    for g, ref in zip(grads, ref_grads):
        assert (g is None) == (ref is None)  # no pair merged (T_w >= T): the compressor is not in the graph
        if g is not None:
            assert_close(g, ref)


def test_interleave_of_positions_says_where_each_token_came_from():
    t = 10  # window of 2: four pairs merged
    pos = torch.arange(t, dtype=torch.float).expand(2, t).unsqueeze(-1)
    merged_pos = torch.cat([pos[:, 0:8:2], pos[:, 8:]], 1)  # a merged pair at its first token's position
    sel = torch.tensor([[0, 3], [2, 1]])
    out = interleave_selected_pure_tensor(pos, merged_pos, sel).squeeze(-1)
    assert out[0].tolist() == [0, 1, 2, 4, 6, 7, 8, 9]
    assert out[1].tolist() == [0, 2, 3, 4, 5, 6, 8, 9]


def test_interleave_refuses_mismatched_inputs():
    x = torch.randn(2, 8, D)
    xc = TokenCompressor(D)(x, 2)
    with pytest.raises(ValueError, match="must be \\(B, k <= 3 merged pairs\\)"):
        interleave_selected_pure_tensor(x, xc, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="is not a compression of x"):
        interleave_selected_pure_tensor(x, torch.randn(2, 9, D), torch.zeros(2, 0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- the layer stage
from pipeline import build_pipeline  # noqa: E402
from pipeline.llm import TEXT_KIND, LayerState  # noqa: E402


def _stage(**opts):
    cfg = {"name": "pair_compress", "layer": 1, "window": 3, "ratio": 0.5, "memory_floor": 2, "num_heads": 2,
           "hidden_dim": 16, **opts}
    stage = build_pipeline({"llm": [cfg]}, dim=D).llm[0]
    torch.nn.init.normal_(stage.compressor.mlp[-1].weight, std=0.1)
    return stage.eval()


def _state(lengths, width):
    b = len(lengths)
    mask = torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]
    pos = (mask.long().cumsum(1) - 1).clamp(min=0) * 3  # gaps: pruned media keep their positions
    kind = torch.where(torch.arange(width)[None, :] % 3 == 0, 0, TEXT_KIND).expand(b, width)
    hidden = torch.randn(b, width, D) * mask.unsqueeze(-1)
    index = torch.where(mask, torch.arange(width).expand(b, width), -1)
    return LayerState(hidden=hidden, mask=mask, positions=torch.where(mask, pos, 0), index=index,
                      kind=torch.where(mask, kind, TEXT_KIND))


def test_stage_on_a_full_row_equals_the_functions_by_hand():
    torch.manual_seed(0)
    stage = _stage()
    st = _state([12], 12)  # memory 9: column 0 alone, pairs (1,2) .. (7,8), window 9..11
    with torch.no_grad():
        out = stage.reduce(st, attention=None)
        h = st.hidden[0]
        merged = [h[0]] + [stage.compressor(h[None, j:j + 2], 0)[0, 0] for j in (1, 3, 5, 7)] + [h[9], h[10], h[11]]
        merged = torch.stack(merged)
        scores = stage.scorer.ImportanceScore(merged[None], 3)[0, 1:]  # the 4 merged pairs
        k = min(selection_count(8, 3, 0.5, 2), 4)  # 0.5 * 5 + 2 * 0.5 / 2 = 3
        top = sorted(sorted(range(4), key=lambda j: (-float(scores[j]), j))[:k])
        rows, positions = [h[0]], [int(st.positions[0, 0])]
        for j in range(4):
            cols = [1 + 2 * j, 2 + 2 * j]
            if j in top:
                rows += [h[c] for c in cols]
                positions += [int(st.positions[0, c]) for c in cols]
            else:
                rows.append(merged[1 + j])
                positions.append(int(st.positions[0, cols[0]]))  # a merged pair sits at its first token
        rows += [h[9], h[10], h[11]]
        positions += [int(st.positions[0, c]) for c in (9, 10, 11)]
    assert k == 3 and out.hidden.shape == (1, 12 - 4 + 3, D)
    assert_close(out.hidden[0], torch.stack(rows))
    assert out.positions[0].tolist() == positions and out.mask.all()
    assert out.index[0, -3:].tolist() == [9, 10, 11]


def test_stage_rows_alone_equal_rows_in_a_padded_batch():
    torch.manual_seed(1)
    stage = _stage(ratio=0.3)
    batch = _state([14, 9, 4], 14)
    with torch.no_grad():
        out = stage.reduce(batch, attention=None)
        for r, n in enumerate([14, 9, 4]):
            alone = LayerState(*(getattr(batch, f)[r:r + 1, 14 - n:] for f in ("hidden", "mask", "positions", "index", "kind")))
            one = stage.reduce(alone, attention=None)
            width = one.hidden.shape[1]
            assert not out.mask[r, : out.mask.shape[1] - width].any()  # the rest of the batch row is padding
            assert_close(out.hidden[r, -width:], one.hidden[0], rtol=1e-5, atol=1e-6)
            for f in ("mask", "positions", "index", "kind"):
                assert torch.equal(getattr(out, f)[r, -width:], getattr(one, f)[0]), f


def test_sizes_of_an_earlier_merge_follow_the_pairs():
    """After a merging stage (LayerState.size), a merged pair stands for its halves' sizes, every other token
    keeps its own: the sizes still sum to the prompt's tokens, and the layout is the sizeless stage's."""
    torch.manual_seed(2)
    stage = _stage(ratio=0.3)
    st = _state([14, 9, 4], 14)
    size = torch.where(st.mask, torch.randint(1, 5, st.mask.shape).float(), 1.0)
    with torch.no_grad():
        plain = stage.reduce(st, attention=None)
        sized = stage.reduce(LayerState(st.hidden, st.mask, st.positions, st.index, st.kind, size=size), attention=None)
    assert plain.size is None
    for f in ("hidden", "mask", "positions", "index", "kind"):
        assert torch.equal(getattr(sized, f), getattr(plain, f)), f
    assert torch.equal((sized.size * sized.mask).sum(1), (size * st.mask).sum(1))
    assert (sized.size[~sized.mask] == 1).all()
    # by hand, row 0: each output token's size is the sum over the input columns it holds (the assignment)
    stage.record_assignment = True
    with torch.no_grad():
        out = stage.reduce(LayerState(st.hidden, st.mask, st.positions, st.index, st.kind, size=size), attention=None)
    assign = stage.last_assignment  # (B, L) input column -> output column
    for r in range(3):
        expect = torch.zeros(out.hidden.shape[1]).index_add_(0, assign[r][st.mask[r]], size[r][st.mask[r]])
        assert torch.equal(torch.where(out.mask[r], out.size[r], 0), expect)


def test_ratio_one_hands_the_state_on_and_a_short_context_is_untouched():
    stage = _stage(ratio=1.0)
    st = _state([12, 7], 12)
    assert stage.reduce(st, attention=None) is st
    assert _stage(window=11).reduce(st, attention=None) is st  # memory of 1: no pair to merge


def test_frozen_base_gradients_reach_only_the_compressor():
    from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm

    torch.manual_seed(2)
    lm = DecoderLM(build_llm({**TINY_LLM, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2}, vocab_size=50))
    lm.requires_grad_(False)
    stages = build_pipeline({"llm": [{"name": "pair_compress", "layer": 1, "window": 4, "ratio": 0.25,
                                      "memory_floor": 2, "num_heads": 2}]}, dim=32).llm
    stage = stages[0]
    torch.nn.init.normal_(stage.compressor.mlp[-1].weight, std=0.1)  # past its zero start: every part has a gradient
    ids = torch.randint(3, 50, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits, _ = lm(lm.embed(ids), mask, pos, stages=stages)
    logits[:, -1].logsumexp(-1).sum().backward()
    trained = {n for n, p in stage.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"compressor.pos", "compressor.mlp.0.weight", "compressor.mlp.0.bias", "compressor.mlp.2.weight",
                       "compressor.mlp.2.bias"}
    assert not any(n.startswith("scorer") for n in trained)  # the hard top-k passes no gradient to the scorer
    assert all(p.grad is None for p in lm.parameters())
    share = sum(p.numel() for p in stage.parameters()) / (sum(p.numel() for p in stage.parameters())
                                                          + sum(p.numel() for p in lm.parameters()))
    assert 0 < share < 0.5


# ---------------------------------------------------------------------------------------------- seed 002's facade
from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm  # noqa: E402
from llava_deft.model.llm.pair_wrapper import ModelWrapperPretrained, windowed_lm_loss  # noqa: E402


def _base(seed: int = 3, model_type: str = "llama"):
    torch.manual_seed(seed)
    return build_llm({**TINY_LLM, "model_type": model_type, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}, vocab_size=60).eval()


def _ids(lengths, width, seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_windowed_loss_equals_a_loop():
    torch.manual_seed(5)
    logits, labels = torch.randn(3, 9, 11), torch.randint(0, 11, (3, 9))
    labels[1, 7] = -100
    losses = [F.cross_entropy(logits[b, t - 1][None], labels[b, t][None]) for b in range(3) for t in range(5, 9)
              if labels[b, t] != -100]
    assert_close(windowed_lm_loss(logits, labels, 4), torch.stack(losses).mean())
    with pytest.raises(ValueError, match="window must be >= 1"):
        windowed_lm_loss(logits, labels, 0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_ratio_one_facade_equals_the_frozen_base(model_type):
    base = _base(model_type=model_type)
    ids, mask = _ids([24, 17], 24)
    model = ModelWrapperPretrained(base, layer_idx=[1, 2], T_w=4, r=1.0, M=2, num_heads=2)
    plain = DecoderLM(base)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        _, logits = model(ids, mask)
        ref, _ = plain(plain.embed(ids), mask, pos)
    assert torch.equal(logits, ref)
    out = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    from llava_deft.model.llm import generate_from_embeds

    assert torch.equal(out, generate_from_embeds(plain, plain.embed(ids), mask, pos, 5, [], 0))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_compressed_facade_trains_only_its_compressors_and_shrinks_later_layers(model_type):
    base = _base(model_type=model_type)
    ids, mask = _ids([24, 17], 24)
    model = ModelWrapperPretrained(base, layer_idx=[1], T_w=4, r=0.25, M=2, num_heads=2)
    for stage in model.compression:
        torch.nn.init.normal_(stage.compressor.mlp[-1].weight, std=0.1)
    share = model.trainable_share()
    n_train = sum(p.numel() for p in model.compression.parameters())
    assert share == pytest.approx(n_train / sum(p.numel() for p in model.parameters()))
    loss, logits = model(ids, mask, labels=ids)
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.compression.parameters())
    stats = model.compression[0].last_stats
    assert stats["tokens_out"] < stats["tokens_in"]  # layers 1.. see fewer tokens
    assert logits.shape == (2, 24, 60) and torch.isfinite(loss)


def test_facade_refuses_a_layer_outside_the_model():
    with pytest.raises(ValueError, match="must be in 1..2"):
        ModelWrapperPretrained(_base(), layer_idx=[3], T_w=4)


# ---------------------------------------------------------------------------------------------- windowed loss
from llava_deft.model.splice import IGNORE_INDEX, window_labels  # noqa: E402


def test_window_labels_keep_each_rows_last_real_tokens_whatever_the_padding():
    labels = torch.arange(1, 8).expand(3, 7).clone()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0],   # right padding: real 0..4 -> window 2..4
                         [0, 0, 1, 1, 1, 1, 1],   # left padding: window 4..6
                         [1, 1, 0, 0, 0, 0, 0]])  # shorter than the window: both
    out = window_labels(labels, mask, 3)
    keep = [[2, 3, 4], [4, 5, 6], [0, 1]]
    for r in range(3):
        assert [c for c in range(7) if out[r, c] != IGNORE_INDEX] == keep[r]
        assert all(out[r, c] == labels[r, c] for c in keep[r])
    with pytest.raises(ValueError, match="loss window must be >= 1"):
        window_labels(labels, mask, 0)


def test_training_config_loss_window_reaches_the_models_loss(tiny_model):
    import copy

    from llava_deft.config.train import load_train_config
    from llava_deft.data import build_collator
    from llava_deft.errors import ConfigError

    assert load_train_config(None, ["loss_window=4"]).loss_window == 4
    with pytest.raises(ConfigError, match="loss_window"):
        load_train_config(None, ["loss_window=0"])
    model = copy.deepcopy(tiny_model)
    items = [{"id": f"s{i}", "messages": [{"role": "user", "content": "Say a colour"},
                                           {"role": "assistant", "content": "blue green red" if i else "red"}]}
             for i in range(2)]
    batch = build_collator(model.processors)(items)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        full = model(**batch)
        model.loss_window = 2
        windowed = model(**batch)
        sp, _, _ = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        pixel_values=batch.get("pixel_values"), media_counts=batch.get("media_counts"))
        target = window_labels(sp.labels, sp.attention_mask, 2)[:, 1:]
        ref = F.cross_entropy(windowed.logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)
    assert_close(windowed.lm_loss, ref)
    assert not torch.allclose(windowed.lm_loss, full.lm_loss)
