"""Vectorised ops and stages against slow Python-loop references on random inputs (STYLE §9)."""

import math

import pytest
import torch

from pipeline import TokenBatch
from pipeline.ops import budget, keep_mask_topk, pool_grid, pool_kernel, split_by_mask
from pipeline.stages.fgcs import FGCS
from pipeline.stages.sam import SemanticAbstraction


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mask(b: int, n: int, seed: int) -> torch.Tensor:
    """Random real/padding pattern (not only a prefix), at least one real token per row."""
    mask = torch.rand(b, n, generator=gen(seed)) < 0.7
    mask[:, 0] = True
    return mask


# ----------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("ratio", [1e-3, 0.1, 0.25, 0.482, 0.5, 0.999, 1.0])
def test_budget_matches_ceil(ratio):
    lengths = torch.tensor([0, 1, 2, 3, 7, 48, 64, 576, 1000])
    expected = [min(max(math.ceil(ratio * n), 1), n) for n in lengths.tolist()]
    assert budget(lengths, ratio).tolist() == expected


# ---------------------------------------------------------------------------- keep_mask_topk
@pytest.mark.parametrize("seed", range(4))
def test_keep_mask_topk_matches_loop(seed):
    b, n = 5, 23
    scores = torch.randint(0, 6, (b, n), generator=gen(seed)).float()  # many ties
    mask = random_mask(b, n, seed + 100)
    keep = torch.randint(0, n + 1, (b,), generator=gen(seed + 200)).minimum(mask.sum(1))
    got = keep_mask_topk(scores, mask, keep)

    expected = torch.zeros(b, n, dtype=torch.bool)
    for r in range(b):
        real = [i for i in range(n) if mask[r, i]]
        ranked = sorted(real, key=lambda i: (-scores[r, i].item(), i))  # ties: earlier wins
        expected[r, ranked[: keep[r]]] = True
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- split_by_mask
@pytest.mark.parametrize("seed", range(4))
def test_split_by_mask_matches_loop(seed):
    b, n, d = 4, 17, 3
    tokens = torch.randn(b, n, d, generator=gen(seed))
    mask = random_mask(b, n, seed + 10)
    batch = TokenBatch.from_tokens(tokens, mask)
    # shuffled original positions: the split must order its outputs by index, not by slot
    batch.index = torch.argsort(torch.rand(b, n, generator=gen(seed + 20)), dim=1)
    batch.scores = torch.randn(b, n, generator=gen(seed + 30))
    keep = torch.rand(b, n, generator=gen(seed + 40)) < 0.5
    out = split_by_mask(batch, keep, "t")

    for r in range(b):
        for field_mask, picked_tokens, picked_index, picked_mask in [
            (keep[r] & mask[r], out.tokens[r], out.index[r], out.mask[r]),
            (~keep[r] & mask[r], out.pruned.tokens[r], out.pruned.index[r], out.pruned.mask[r]),
        ]:
            slots = sorted((i for i in range(n) if field_mask[i]), key=lambda i: batch.index[r, i].item())
            k = len(slots)
            assert picked_mask.tolist() == [True] * k + [False] * (len(picked_mask) - k)
            assert torch.equal(picked_index[:k], batch.index[r, slots])
            assert torch.equal(picked_tokens[:k], tokens[r, slots])
        kept_slots = sorted((i for i in range(n) if keep[r, i] and mask[r, i]), key=lambda i: batch.index[r, i].item())
        assert torch.equal(out.scores[r, : len(kept_slots)], batch.scores[r, kept_slots])
    assert out.stats["t"]["tokens_in"] == pytest.approx(mask.sum(1).float().mean().item())


# -------------------------------------------------------------------------------------- pool
def reference_pool(tokens, mask, index, layout, ratio):
    """One row at a time: (kept tokens, kept index, pruned index) per row, by plain Python."""
    rows = []
    for r in range(tokens.shape[0]):
        t_len, h_len, w_len = layout[r].tolist()
        present = [(index[r, i].item(), tokens[r, i]) for i in range(tokens.shape[1]) if mask[r, i]]
        keep = min(max(math.ceil(ratio * len(present)), 1), len(present))
        kt, k = 1, None
        for cand in range(1, max(h_len, w_len) + 1):
            if t_len * math.ceil(h_len / cand) * math.ceil(w_len / cand) <= keep:
                k = cand
                break
        if k is None:
            k, kt = max(h_len, w_len), math.ceil(t_len / keep)
        windows: dict[tuple[int, int, int], list] = {}
        for idx, tok in present:
            t, rem = divmod(idx, h_len * w_len)
            h, w = divmod(rem, w_len)
            windows.setdefault((t // kt, h // k, w // k), []).append((idx, tok))
        pooled = sorted((min(i for i, _ in members), torch.stack([v for _, v in members]).mean(0)) for members in windows.values())
        reps = {i for i, _ in pooled}
        rows.append(
            (
                torch.stack([v for _, v in pooled]),
                [i for i, _ in pooled],
                sorted(i for i, _ in present if i not in reps),
                keep,
            )
        )
    return rows


def gappy_grid_batch(seed: int) -> TokenBatch:
    """Rows with different grids, one video, then a random subset removed (gaps in index)."""
    layout = torch.tensor([[1, 5, 7], [2, 4, 4], [3, 3, 2], [1, 1, 9]])
    lengths = layout.prod(1)
    n, d = int(lengths.max()), 4
    mask = torch.arange(n) < lengths[:, None]
    batch = TokenBatch.from_tokens(torch.randn(4, n, d, generator=gen(seed)), mask, layout=layout)
    batch.features = torch.randn(4, n, 2, generator=gen(seed + 1))
    holes = torch.rand(4, n, generator=gen(seed + 2)) < 0.3
    return split_by_mask(batch, ~holes, "holes")


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_pool_matches_loop(seed, ratio):
    batch = gappy_grid_batch(seed)
    out = pool_grid(batch, ratio, "pool")
    ref = reference_pool(batch.tokens, batch.mask, batch.index, batch.layout, ratio)
    ref_feat = reference_pool(batch.features, batch.mask, batch.index, batch.layout, ratio)
    for r, (tokens, index, pruned, keep) in enumerate(ref):
        k = len(index)
        assert k <= keep
        assert out.mask[r].tolist() == [True] * k + [False] * (out.mask.shape[1] - k)
        assert out.index[r, :k].tolist() == index
        torch.testing.assert_close(out.tokens[r, :k], tokens)
        torch.testing.assert_close(out.features[r, :k], ref_feat[r][0])
        # pruned = the earlier holes plus this stage's non-representative window members
        holes = batch.pruned.index[r][batch.pruned.mask[r]].tolist()
        assert out.pruned.index[r][out.pruned.mask[r]].tolist() == sorted(holes + pruned)


def test_pool_kernel_cases():
    layout = torch.tensor([[1, 24, 24], [1, 8, 8], [1, 6, 8], [16, 2, 2], [1, 1, 10]])
    keep = torch.tensor([144, 16, 12, 4, 3])
    kt, k = pool_kernel(layout, keep)
    assert k.tolist() == [2, 2, 2, 2, 4]
    assert kt.tolist() == [1, 1, 1, 4, 1]


def test_pool_stage_on_uniform_grid_is_2x2_average():
    x = torch.arange(16.0).view(1, 16, 1)
    out = pool_grid(TokenBatch.from_tokens(x, layout=(1, 4, 4)), 0.25, "pool")
    assert out.index.tolist() == [[0, 2, 8, 10]]
    assert out.tokens.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


# -------------------------------------------------------------------------------------- fgcs
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.482, 1.0])
def test_fgcs_keeps_exactly_the_top_scoring_tokens(ratio):
    torch.manual_seed(0)
    stage = FGCS(dim=8, retention_ratio=ratio, hidden_dim=16).eval()
    mask = random_mask(3, 20, seed=5)
    batch = TokenBatch.from_tokens(torch.randn(3, 20, 8, generator=gen(6)), mask)
    with torch.no_grad():
        scores = stage.score(batch)
        out = stage(batch)
    for r in range(3):
        real = [i for i in range(20) if mask[r, i]]
        top = sorted(sorted(real, key=lambda i: -scores[r, i].item())[: math.ceil(ratio * len(real))])
        k = len(top)
        assert out.index[r, :k].tolist() == top
        assert out.mask[r].sum() == k
        assert torch.equal(out.scores[r, :k], scores[r, top])


def test_fgcs_training_gate_changes_gradients_not_values():
    torch.manual_seed(0)
    stage = FGCS(dim=8, retention_ratio=0.5, hidden_dim=16)
    batch = TokenBatch.from_tokens(torch.randn(2, 12, 8, generator=gen(1)))
    evaluated = stage.eval()(batch)
    trained = stage.train()(batch)
    assert torch.equal(trained.tokens, evaluated.tokens)
    assert torch.equal(trained.index, evaluated.index)
    trained.tokens.sum().backward()
    assert stage.saliency[0].weight.grad.abs().sum() > 0


def test_sam_then_fgcs_scores_semantic_features():
    torch.manual_seed(0)
    sam = SemanticAbstraction(dim=8, semantic_dim=6)
    fgcs = FGCS(dim=8, retention_ratio=0.5, feature_dim=6).eval()
    batch = sam(TokenBatch.from_tokens(torch.randn(2, 10, 8, generator=gen(2))))
    assert batch.features.shape == (2, 10, 6)
    expected = fgcs.saliency(batch.features).squeeze(-1)
    torch.testing.assert_close(fgcs.saliency_logits(batch), expected)
    out = fgcs(batch)
    assert out.features.shape == (2, 5, 6)
    with pytest.raises(ValueError, match="has no `features`; put a feature stage such as 'sam' before it"):
        fgcs(TokenBatch.from_tokens(torch.randn(2, 10, 8)))
