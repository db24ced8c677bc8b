"""Pair compression's pieces (issue 17) against slow loop-based references on random inputs: odd lengths,
windows as long as the sequence, a different selection per row, masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from llava_deft.model.llm.pair_compress import (
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
