"""``rtd`` (DeFT's recovery of pruned tokens) against slow per-row references (STYLE §9)."""

import math

import pytest
import torch

from pipeline import PipelineConfigError, PrunedTokens, TokenBatch, build_pipeline
from pipeline.ops import budget, keep_mask_topk, split_by_mask
from pipeline.stages.rtd import RTD, pruned_uncertainty

D = 32
RATIO = 0.25
LAYOUT = torch.tensor([[1, 8, 8], [1, 6, 8], [1, 5, 6]])  # 64, 48 and 30 real tokens


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_batch(pad_scale: float = 1.0, pad_seed: int = 1) -> TokenBatch:
    lengths = LAYOUT.prod(1)
    mask = torch.arange(64) < lengths[:, None]  # (3, 64)
    tokens = torch.randn(3, 64, D, generator=gen(0))
    pad = pad_scale * torch.randn(3, 64, D, generator=gen(pad_seed))
    tokens = torch.where(mask.unsqueeze(-1), tokens, pad)
    return TokenBatch.from_tokens(tokens, mask, layout=LAYOUT)


def build(reducer: str = "random", train: bool = False, **rtd):
    """(reducer stage, rtd stage), built with a fixed init."""
    torch.manual_seed(0)
    pipe = build_pipeline([{"name": reducer, "retention_ratio": RATIO}, {"name": "rtd", **rtd}], dim=D)
    return pipe.stages[0].train(train), pipe.stages[1].train(train)


def real(t: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    return t[b][mask[b]]


def reference_recovery(rtd: RTD, original: TokenBatch, reduced: TokenBatch, rows: list[bool]):
    """Per row, a Python list of (index, value, score) after recovery, plus the indices left pruned."""
    merged, left = [], []
    for b in range(original.mask.shape[0]):
        kept = [
            (int(i), reduced.tokens[b, k], float(reduced.scores[b, k]))
            for k, i in enumerate(reduced.index[b].tolist())
            if reduced.mask[b, k]
        ]
        pruned = [
            (int(i), original.tokens[b, i], float(reduced.pruned.scores[b, p]))
            for p, i in enumerate(reduced.pruned.index[b].tolist())
            if reduced.pruned.mask[b, p]
        ]
        n = math.ceil(rtd.recover_ratio * len(pruned)) if rows[b] else 0
        chosen = sorted(pruned, key=lambda t: (-t[2], t[0]))[:n]  # ties: earlier index wins
        rec = [(i, rtd.reconstruct(rtd.compress(x)), s) for i, x, s in chosen]
        merged.append(sorted(kept + rec, key=lambda t: t[0]))
        left.append(sorted(set(i for i, _, _ in pruned) - set(i for i, _, _ in chosen)))
    return merged, left


def check_against_reference(rtd, original, reduced, out, rows):
    merged, left = reference_recovery(rtd, original, reduced, rows)
    for b, row in enumerate(merged):
        assert real(out.index, out.mask, b).tolist() == [i for i, _, _ in row]
        torch.testing.assert_close(real(out.tokens, out.mask, b), torch.stack([v for _, v, _ in row]))
        assert real(out.scores, out.mask, b).tolist() == pytest.approx([s for _, _, s in row])
        assert real(out.pruned.index, out.pruned.mask, b).tolist() == left[b]
        # what stays pruned keeps its original values
        assert torch.equal(real(out.pruned.tokens, out.pruned.mask, b), original.tokens[b, left[b]])


def check_partition(original: TokenBatch, out: TokenBatch):
    """kept ∪ recovered ∪ remaining pruned = the input's real indices, each once; output ascending."""
    for b in range(original.mask.shape[0]):
        have = torch.cat([real(out.index, out.mask, b), real(out.pruned.index, out.pruned.mask, b)])
        assert torch.equal(have.sort().values, torch.arange(int(original.lengths[b])))
        idx = real(out.index, out.mask, b)
        assert (idx[1:] > idx[:-1]).all(), "output index must ascend"
    k = out.mask.sum(1)
    assert torch.equal(out.mask, torch.arange(out.mask.shape[1]) < k[:, None]), "padding must be last"


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("dim", "ratio", "width"), [(32, 4, 8), (32, 3, 10), (64, 8, 8), (3, 4, 1)])
def test_bottleneck_width(dim, ratio, width):
    rtd = RTD(dim, bottleneck_ratio=ratio)
    assert rtd.bottleneck_dim == width
    z = rtd.compress(torch.randn(2, 5, dim))
    assert z.shape == (2, 5, width)
    assert rtd.reconstruct(z).shape == (2, 5, dim)


def test_set_mode_validates():
    rtd = RTD(D)
    assert rtd.mode == "fast" and not hasattr(rtd, "retention_ratio")
    rtd.set_mode("adaptive")
    assert rtd.mode == "adaptive"
    with pytest.raises(ValueError, match=r"unknown rtd mode 'slow'; allowed modes: \['fast', 'hybrid', 'adaptive'\]"):
        rtd.set_mode("slow")
    with pytest.raises(ValueError, match="allowed modes"):
        RTD(D, mode="slow")
    rtd.mode = "slow"  # a plain attribute: a bad assignment is caught at forward
    with pytest.raises(ValueError, match="allowed modes"):
        rtd(ragged_batch())
    with pytest.raises(PipelineConfigError, match="stages.0.rtd.mode"):
        build_pipeline([{"name": "rtd", "mode": "slow"}], dim=D)
    with pytest.raises(PipelineConfigError, match="stages.0.rtd.bottleneck_ratio"):
        build_pipeline([{"name": "rtd", "bottleneck_ratio": 1}], dim=D)


def test_without_pruned_returns_batch_unchanged():
    batch = ragged_batch()
    assert RTD(D, mode="hybrid")(batch) is batch


# ------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("reducer", ["random", "fgcs"])
@pytest.mark.parametrize("train", [False, True])
def test_fast_returns_retained_tokens(reducer, train):
    red, rtd = build(reducer, train=train)
    batch = ragged_batch()
    reduced = red(batch)
    out = rtd(reduced)
    assert out.mask.sum(1).tolist() == budget(batch.lengths, RATIO).tolist() == [16, 12, 8]
    for key in ["tokens", "mask", "index", "scores"]:
        assert torch.equal(getattr(out, key), getattr(reduced, key))
    assert out.pruned is reduced.pruned
    assert ("rtd_recon" in out.losses) == train
    assert out.stats["rtd"] == {"tokens_in": 12.0, "tokens_out": 12.0, "recovered": 0.0, "recovered_rows": 0.0}


@pytest.mark.parametrize("reducer", ["random", "fgcs"])
@pytest.mark.parametrize("recover_ratio", [0.25, 0.1, 1.0])
def test_hybrid_recovers_top_pruned_tokens(reducer, recover_ratio):
    red, rtd = build(reducer, mode="hybrid", recover_ratio=recover_ratio)
    batch = ragged_batch()
    with torch.no_grad():
        reduced = red(batch)
        out = rtd(reduced)
    n_pruned = [48, 36, 22]
    extra = [math.ceil(recover_ratio * p) for p in n_pruned]
    assert out.mask.sum(1).tolist() == [k + e for k, e in zip([16, 12, 8], extra)]
    assert out.pruned.mask.sum(1).tolist() == [p - e for p, e in zip(n_pruned, extra)]
    assert out.features is None
    check_partition(batch, out)
    with torch.no_grad():
        check_against_reference(rtd, batch, reduced, out, rows=[True] * 3)
    assert out.stats["rtd"]["recovered"] == pytest.approx(sum(extra) / 3)
    assert out.stats["rtd"]["recovered_rows"] == 1.0


def test_hybrid_train_matches_eval_and_trains_the_bottleneck():
    red, rtd = build("random", mode="hybrid", recon_weight=0.0)
    reduced = red(ragged_batch())
    with torch.no_grad():
        expected = rtd.eval()(reduced)
    out = rtd.train()(reduced)
    for key in ["mask", "index", "scores"]:
        assert torch.equal(getattr(out, key), getattr(expected, key))
    torch.testing.assert_close(out.tokens, expected.tokens)
    assert out.losses["rtd_recon"] == 0
    # the task loss alone reaches encoder and decoder through the recovered tokens
    weights = torch.randn(out.tokens.shape, generator=gen(3))
    ((out.tokens * weights * out.mask.unsqueeze(-1)).sum() + out.losses["rtd_recon"]).backward()
    for name, p in rtd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hybrid_ignores_padding():
    red, rtd = build("fgcs", mode="hybrid")
    with torch.no_grad():
        a = rtd(red(ragged_batch()))
        b = rtd(red(ragged_batch(pad_scale=1e3, pad_seed=7)))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.index[a.mask], b.index[b.mask])
    torch.testing.assert_close(a.tokens[a.mask], b.tokens[b.mask])
    assert torch.equal(a.pruned.index[a.pruned.mask], b.pruned.index[b.pruned.mask])


def scripted_batch() -> tuple[TokenBatch, TokenBatch]:
    """(input, reduced), reduced by score at 0.25.

    Row 0: 20 tokens, 5 of them scored 10, the rest 0 (confident). Row 1: 16 tokens, all 0.3 (flat).
    """
    mask = torch.arange(20) < torch.tensor([[20], [16]])
    layout = torch.tensor([[1, 4, 5], [1, 4, 4]])
    batch = TokenBatch.from_tokens(torch.randn(2, 20, D, generator=gen(5)), mask, layout=layout)
    scores = torch.zeros(2, 20)
    scores[0, [3, 7, 11, 15, 19]] = 10.0
    scores[1] = 0.3
    keep = keep_mask_topk(scores, batch.mask, budget(batch.lengths, RATIO))
    return batch, split_by_mask(batch.replace(scores=scores), keep, "scripted")


def test_adaptive_recovers_only_uncertain_rows():
    original, reduced = scripted_batch()
    assert reduced.index[0].tolist() == [3, 7, 11, 15, 19] and reduced.index[1, :4].tolist() == [0, 1, 2, 3]
    torch.manual_seed(0)
    rtd = RTD(D, mode="adaptive", adaptive_threshold=0.5).eval()
    with torch.no_grad():
        out = rtd(reduced)
    # row 0 is confident (u ~ 2e-4): untouched; row 1 is flat (u = 1): gets ceil(0.25 * 12) = 3 back,
    # the earliest pruned ones since all scores tie
    assert out.mask.sum(1).tolist() == [5, 7]
    assert out.index[0, :5].tolist() == [3, 7, 11, 15, 19]
    assert out.index[1, :7].tolist() == list(range(7))
    assert out.pruned.mask.sum(1).tolist() == [15, 9]
    with torch.no_grad():
        check_against_reference(rtd, original, reduced, out, rows=[False, True])
    assert out.stats["rtd"]["recovered_rows"] == 0.5
    assert out.stats["rtd"]["recovered"] == 1.5
    assert out.stats["rtd"]["uncertainty"] == pytest.approx((15 / (5 * math.exp(10) + 15) / 0.75 + 1) / 2, rel=1e-5)

    for threshold, counts in [(0.0, [5 + 4, 7]), (1.5, [5, 4])]:
        rtd.adaptive_threshold = threshold
        assert rtd(reduced).mask.sum(1).tolist() == counts


@pytest.mark.parametrize("seed", range(3))
def test_pruned_uncertainty_matches_loop(seed):
    b, n, p = 4, 9, 13
    scores, pruned_scores = 3 * torch.randn(b, n, generator=gen(seed)), 3 * torch.randn(b, p, generator=gen(seed + 1))
    mask = torch.rand(b, n, generator=gen(seed + 2)) < 0.6
    pruned_mask = torch.rand(b, p, generator=gen(seed + 3)) < 0.6
    pruned_mask[0] = False  # nothing pruned: u = 0
    scores[~mask] = float("nan")  # padding never contributes
    pruned_scores[~pruned_mask] = 1e9
    got = pruned_uncertainty(scores, mask, pruned_scores, pruned_mask)
    for r in range(b):
        kept = [math.exp(s) for s in scores[r][mask[r]].tolist()]
        pruned = [math.exp(s) for s in pruned_scores[r][pruned_mask[r]].tolist()]
        mass = sum(pruned) / (sum(kept) + sum(pruned)) if pruned else 0.0
        want = mass / (len(pruned) / (len(kept) + len(pruned))) if pruned else 0.0
        assert got[r].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", ["hybrid", "adaptive"])
def test_recovery_after_pool_needs_scores(mode):
    red, rtd = build("pool", mode=mode)
    reduced = red(ragged_batch())
    assert reduced.pruned.scores is None
    msg = rf"rtd mode '{mode}' needs batch.pruned.scores.*put a scoring reducer such as 'fgcs'"
    with pytest.raises(ValueError, match=msg):
        rtd(reduced)
    rtd.set_mode("fast")
    assert torch.equal(rtd(reduced).tokens, reduced.tokens)


# ------------------------------------------------------------------------------------- loss
def test_recon_loss_matches_reference_and_backprops():
    red, rtd = build("random", train=True, recon_weight=0.5)
    reduced = red(ragged_batch())
    pruned = reduced.pruned
    # padding slots of ``pruned`` may hold anything; they must not reach the loss
    pruned.tokens = torch.where(pruned.mask.unsqueeze(-1), pruned.tokens, torch.full_like(pruned.tokens, float("inf")))
    out = rtd(reduced)
    loss = out.losses["rtd_recon"]

    errs = [
        (rtd.reconstruct(rtd.compress(pruned.tokens[b, q])) - pruned.tokens[b, q]).pow(2).mean()
        for b in range(3)
        for q in range(pruned.tokens.shape[1])
        if pruned.mask[b, q]
    ]
    assert len(errs) == 48 + 36 + 22
    torch.testing.assert_close(loss, 0.5 * torch.stack(errs).mean())
    loss.backward()
    for name, p in rtd.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_recon_loss_is_zero_when_nothing_was_pruned():
    torch.manual_seed(0)
    cfg = [{"name": "random", "retention_ratio": 1.0}, {"name": "rtd", "mode": "hybrid"}]
    pipe = build_pipeline(cfg, dim=D).train()
    out = pipe(ragged_batch(pad_scale=float("inf")))
    assert out.pruned.tokens.shape[1] == 0
    assert out.mask.sum(1).tolist() == [64, 48, 30]
    assert out.losses["rtd_recon"].item() == 0.0
    out.losses["rtd_recon"].backward()  # still attached to the parameters, no NaN from an empty mean
    assert all(p.grad is not None and (p.grad == 0).all() for p in pipe.parameters())


# ------------------------------------------------------------------------ pruned scores plumbing
def test_pruned_scores_are_the_reducers_scores():
    torch.manual_seed(0)
    pipe = build_pipeline([{"name": "fgcs", "retention_ratio": 0.5}], dim=D).eval()
    batch = ragged_batch()
    with torch.no_grad():
        out = pipe(batch)
        scores = pipe.stages[0].score(batch)  # (B, N) at original positions
    pruned = out.pruned
    assert torch.equal(pruned.scores[pruned.mask], scores.gather(1, pruned.index)[pruned.mask])


def test_pruned_cat_keeps_scores_only_when_both_sides_have_them():
    t = torch.randn(1, 2, 3)
    a = PrunedTokens(t, torch.tensor([[True, True]]), torch.tensor([[1, 4]]), torch.tensor([[0.1, 0.4]]))
    b = PrunedTokens(t, torch.tensor([[True, False]]), torch.tensor([[2, 0]]), torch.tensor([[0.2, 9.0]]))
    both = a.cat(b)
    assert both.index[both.mask].tolist() == [1, 2, 4]
    assert both.scores[both.mask].tolist() == pytest.approx([0.1, 0.2, 0.4])
    assert a.cat(PrunedTokens(b.tokens, b.mask, b.index)).scores is None
    # pool prunes without scores, so nothing after it can rank those tokens
    torch.manual_seed(0)
    pipe = build_pipeline([{"name": "pool", "retention_ratio": 0.5}, {"name": "fgcs", "retention_ratio": 0.5}], dim=D)
    assert pipe(ragged_batch()).pruned.scores is None
