"""``tome`` and ``divprune`` against slow pure-Python references (loops over rows and tokens).

The references follow the papers' algorithms step by step on plain Python floats; the stages are the
batched versions. Inputs are float64 so that a near-tie cannot be broken differently by rounding.
"""

import math
import random

import pytest
import torch

from pipeline import TokenBatch, build_pipeline
from pipeline.ops import budget
from pipeline.stages.divprune import DivPrune
from pipeline.stages.tome import TokenMerging

D = 6
LENGTHS = [37, 20, 1, 9, 2, 0]


def ragged(lengths=LENGTHS, dim=D, seed=0, dtype=torch.float64) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    tokens = torch.randn(len(lengths), n, dim, generator=g, dtype=dtype)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    tokens = torch.where(mask[..., None], tokens, 1e3 * torch.randn(tokens.shape, generator=g, dtype=dtype))
    return TokenBatch.from_tokens(tokens, mask)


def cos(u: list[float], v: list[float]) -> float:
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return sum(x * y for x, y in zip(u, v)) / (max(nu, 1e-12) * max(nv, 1e-12))


def rows_of(batch: TokenBatch, x: torch.Tensor) -> list[list]:
    """The real entries of ``x (B, N, ...)`` per row, as Python lists."""
    return [x[b][batch.mask[b]].tolist() for b in range(batch.mask.shape[0])]


# --------------------------------------------------------------------------------------- ToMe
def ref_tome(index: list[int], keys: list[list[float]], values: list[list[float]], ratio: float):
    """ToMe on one row: returns [(index, merged value, size)] ascending, and the merged-away indices."""
    n = len(index)
    k = min(max(math.ceil(n * ratio), 1), n)
    # a group: its index (the B destination's), its size, the size-weighted means of its keys and values
    cur = [{"index": i, "size": 1, "key": list(kv), "value": list(v)} for i, kv, v in zip(index, keys, values)]
    gone = []
    while len(cur) > k:
        c = len(cur)
        r = min(c - k, c // 2)
        a_set, b_set = cur[0::2], cur[1::2]
        edges = []
        for ai, a in enumerate(a_set):
            best, partner = -math.inf, None
            for bi, b in enumerate(b_set):
                s = cos(a["key"], b["key"])
                if s > best:  # the first maximum wins ties
                    best, partner = s, bi
            edges.append((best, ai, partner))
        edges.sort(key=lambda e: (-e[0], e[1]))  # most similar first, the earlier A on ties
        merged = set()
        for _, ai, bi in edges[:r]:
            a, b = a_set[ai], b_set[bi]
            size = a["size"] + b["size"]
            for f in ("key", "value"):
                b[f] = [(a["size"] * x + b["size"] * y) / size for x, y in zip(a[f], b[f])]
            b["size"] = size
            merged.add(ai)
            gone.append(a["index"])
        cur = sorted([a for ai, a in enumerate(a_set) if ai not in merged] + b_set, key=lambda g: g["index"])
    return [(g["index"], g["value"], g["size"]) for g in cur], sorted(gone)


def check_tome(batch: TokenBatch, stage: TokenMerging, keys: torch.Tensor):
    out, sizes = stage.merge(batch)
    values = torch.cat([x if x.dim() == 3 else x[..., None] for x in (batch.tokens, batch.features, batch.scores)
                        if x is not None], dim=-1)
    outs = torch.cat([x if x.dim() == 3 else x[..., None] for x in (out.tokens, out.features, out.scores)
                      if x is not None], dim=-1)
    for b, (idx, kv, v) in enumerate(zip(rows_of(batch, batch.index), rows_of(batch, keys), rows_of(batch, values))):
        want, gone = ref_tome(idx, kv, v, stage.retention_ratio)
        m = out.mask[b]
        assert out.index[b][m].tolist() == [w[0] for w in want]
        assert sizes[b][m].tolist() == [w[2] for w in want]
        assert (sizes[b][~m] == 0).all()
        torch.testing.assert_close(outs[b][m], torch.tensor([w[1] for w in want], dtype=outs.dtype).reshape(-1, outs.shape[-1]))
        pm = out.pruned.mask[b]
        before = [] if batch.pruned is None else batch.pruned.index[b][batch.pruned.mask[b]].tolist()
        assert out.pruned.index[b][pm].tolist() == sorted(before + gone)  # an earlier reducer's pruned kept
        # the merged-away tokens are reported with their own values
        pos = {i: j for j, i in enumerate(idx)}
        new = torch.tensor([i in set(gone) for i in out.pruned.index[b][pm].tolist()], dtype=torch.bool)
        assert torch.equal(out.pruned.tokens[b][pm][new], batch.tokens[b][batch.mask[b]][[pos[i] for i in gone]])
    return out, sizes


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.1, 0.9, 1.0])
def test_tome_equals_the_reference(ratio):
    batch = ragged()
    check_tome(batch, TokenMerging(retention_ratio=ratio).eval(), batch.tokens)


def test_tome_reference_with_features_scores_and_selected_indices():
    """After another reducer (indices not arange), matching on ``sam``-style features, scores merged too."""
    batch = build_pipeline([{"name": "random", "retention_ratio": 0.8}], dim=D).eval()(ragged(seed=3))
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(*batch.mask.shape, 3, generator=g, dtype=torch.float64)
    batch = batch.replace(features=feats, scores=torch.randn(batch.mask.shape, generator=g, dtype=torch.float64))
    assert not torch.equal(batch.index[0][batch.mask[0]], torch.arange(int(batch.lengths[0])))
    check_tome(batch, TokenMerging(retention_ratio=0.3, use_features=True), feats)
    with pytest.raises(ValueError, match="use_features=True but the batch has no `features`"):
        TokenMerging(use_features=True)(ragged())


def test_tome_budget_sizes_and_mean_are_preserved():
    batch = ragged(dtype=torch.float32)
    for ratio in (0.05, 0.25, 0.6):
        out, sizes = TokenMerging(retention_ratio=ratio).merge(batch)
        assert torch.equal(out.lengths, budget(batch.lengths, ratio)), "a merger that can always reach its budget"
        assert torch.equal(sizes.sum(1), batch.lengths.to(sizes.dtype))
        total = (batch.tokens * batch.mask[..., None]).sum(1)
        torch.testing.assert_close((out.tokens * sizes[..., None]).sum(1), total, rtol=1e-5, atol=1e-4)
        assert out.stats["tome"]["rounds"] >= 1


# ------------------------------------------------------------------------------------ DivPrune
def ref_divprune(keys: list[list[float]], ratio: float) -> list[int]:
    """Greedy max-min on one row: positions of the picks, ascending."""
    n = len(keys)
    if n == 0:
        return []
    k = min(max(math.ceil(n * ratio), 1), n)
    dist = [[1 - cos(u, v) for v in keys] for u in keys]
    best, first = -math.inf, None
    for i in range(n):  # the token farthest from its nearest other token
        nearest = min((dist[i][j] for j in range(n) if j != i), default=math.inf)
        if nearest > best:
            best, first = nearest, i
    picks = [first]
    while len(picks) < k:
        best, nxt = -math.inf, None
        for i in range(n):
            if i not in picks:
                d = min(dist[i][s] for s in picks)
                if d > best:
                    best, nxt = d, i
        picks.append(nxt)
    return sorted(picks)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.1, 1.0])
def test_divprune_equals_the_reference(ratio):
    batch = ragged(seed=5)
    out = DivPrune(retention_ratio=ratio)(batch)
    assert torch.equal(out.lengths, budget(batch.lengths, ratio))
    for b, keys in enumerate(rows_of(batch, batch.tokens)):
        want = ref_divprune(keys, ratio)
        m = out.mask[b]
        assert out.index[b][m].tolist() == want
        assert torch.equal(out.tokens[b][m], batch.tokens[b][want])
        assert sorted(out.pruned.index[b][out.pruned.mask[b]].tolist() + want) == list(range(LENGTHS[b]))


def test_divprune_features_and_selected_indices():
    batch = build_pipeline([{"name": "random", "retention_ratio": 0.7}], dim=D).eval()(ragged(seed=6))
    feats = torch.randn(*batch.mask.shape, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    batch = batch.replace(features=feats)
    out = DivPrune(retention_ratio=0.3, use_features=True)(batch)
    for b, keys in enumerate(rows_of(batch, feats)):
        want = ref_divprune(keys, 0.3)
        assert out.index[b][out.mask[b]].tolist() == [batch.index[b][batch.mask[b]][i].item() for i in want]
        assert torch.equal(out.features[b][out.mask[b]], feats[b][batch.mask[b]][want])


@pytest.mark.parametrize("cls, seed", [(TokenMerging, 0), (DivPrune, 8)], ids=["tome", "divprune"])
def test_rows_one_at_a_time_and_deterministic(cls, seed):
    batch = ragged(seed=seed)
    stage = cls(retention_ratio=0.3)
    out = stage(batch)
    assert all(torch.equal(getattr(stage(batch), f), getattr(out, f)) for f in ("tokens", "index", "mask"))
    for b, n in enumerate(LENGTHS):
        one = stage(TokenBatch.from_tokens(batch.tokens[b:b + 1, :n]))
        assert torch.equal(one.index[0], out.index[b][out.mask[b]])
        torch.testing.assert_close(one.tokens[0], out.tokens[b][out.mask[b]], rtol=0, atol=0 if cls is DivPrune else 1e-6)


def min_pairwise_distance(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x, dim=-1)
    d = 1 - x @ x.T
    return float(d.masked_fill(torch.eye(len(x), dtype=torch.bool), float("inf")).min())


def test_divprune_is_more_diverse_than_random_on_clustered_data():
    g = torch.Generator().manual_seed(9)
    clusters, per, dim = 8, 16, 16
    centres = torch.randn(clusters, dim, generator=g)
    label = torch.arange(clusters).repeat_interleave(per)
    perm = torch.randperm(clusters * per, generator=g)
    label = label[perm]
    tokens = centres[label] + 0.05 * torch.randn(clusters * per, dim, generator=g)
    ratio = clusters / (clusters * per)
    out = DivPrune(retention_ratio=ratio)(TokenBatch.from_tokens(tokens[None]))
    picked = out.index[0][out.mask[0]]
    assert sorted(label[picked].tolist()) == list(range(clusters)), "one token of every cluster"
    ours = min_pairwise_distance(tokens[picked])
    rng = random.Random(0)
    randoms = [min_pairwise_distance(tokens[rng.sample(range(clusters * per), clusters)]) for _ in range(50)]
    assert ours > max(randoms), (ours, sorted(randoms)[-5:])


def test_divprune_skips_duplicates_while_distinct_tokens_remain():
    g = torch.Generator().manual_seed(10)
    distinct = torch.randn(5, D, generator=g, dtype=torch.float64)
    tokens = distinct.repeat(4, 1)  # 20 tokens, 4 copies of each
    out = DivPrune(retention_ratio=0.25)(TokenBatch.from_tokens(tokens[None]))
    assert sorted((out.index[0] % 5).tolist()) == list(range(5))
