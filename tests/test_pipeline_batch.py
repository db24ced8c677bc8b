"""TokenBatch row operations: ``TokenBatch.cat_rows``, ``batch.take_rows``, ``TokenBatch.empty``."""

import re

import pytest
import torch

from pipeline import Modality, PrunedTokens, TokenBatch


def part(b: int, n: int, d: int = 4, real: int | None = None, dtype=torch.float32, modality=Modality.IMAGE, seed: int = 0):
    tokens = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    mask = None
    if real is not None:
        mask = torch.arange(n).expand(b, n) < real
    return TokenBatch.from_tokens(tokens, mask, modality=modality)


def test_cat_rows_pads_to_the_longest_with_mask_false():
    a = part(2, 5, real=3, modality=Modality.TEXT, seed=1)  # 3 real, 2 padding
    b = part(1, 8, modality=Modality.IMAGE, seed=2)
    out = TokenBatch.cat_rows([a, b])
    assert out.tokens.shape == (3, 8, 4) and out.mask.shape == (3, 8)
    assert out.mask.tolist() == [[True] * 3 + [False] * 5] * 2 + [[True] * 8]
    assert torch.equal(out.tokens[:2, :5], a.tokens) and torch.equal(out.tokens[2], b.tokens[0])
    assert torch.equal(out.tokens[:2, 5:], torch.zeros(2, 3, 4))  # new padding is zero
    assert torch.equal(out.index, torch.arange(8).expand(3, 8))  # ascending 0..n-1 on every row
    assert out.index.dtype == torch.long and out.index.is_contiguous()  # a real tensor, not an expanded view
    assert out.modality.tolist() == [Modality.TEXT, Modality.TEXT, Modality.IMAGE]
    assert out.layout.tolist() == [[1, 1, 3], [1, 1, 3], [1, 1, 8]]
    assert out.scores is None and out.features is None and out.pruned is None and out.losses == {} and out.stats == {}


def test_cat_rows_takes_the_first_parts_dtype():
    text = part(1, 3, dtype=torch.bfloat16)
    media = part(2, 6, dtype=torch.float32)
    assert TokenBatch.cat_rows([text, media]).tokens.dtype == torch.bfloat16
    assert TokenBatch.cat_rows([media, text]).tokens.dtype == torch.float32
    one = TokenBatch.cat_rows([media])
    assert torch.equal(one.tokens, media.tokens) and torch.equal(one.mask, media.mask)


def test_cat_rows_of_nothing_raises():
    with pytest.raises(ValueError, match="TokenBatch.cat_rows needs at least one batch"):
        TokenBatch.cat_rows([])


def test_take_rows_follows_order():
    batch = TokenBatch.cat_rows([part(1, 4, real=2, modality=Modality.TEXT), part(2, 4, modality=Modality.VIDEO, seed=3)])
    order = torch.tensor([2, 0])
    out = batch.take_rows(order)
    for field in ("tokens", "mask", "index", "modality", "layout"):
        assert torch.equal(getattr(out, field), getattr(batch, field)[order]), field
    assert out.tokens.shape == (2, 4, 4) and out.modality.tolist() == [Modality.VIDEO, Modality.TEXT]
    mask_rows = batch.take_rows(torch.tensor([False, True, True]))
    assert torch.equal(mask_rows.tokens, batch.tokens[1:])
    assert batch.take_rows(torch.tensor([], dtype=torch.long)).tokens.shape == (0, 4, 4)


def test_empty_batch_shapes_and_dtypes():
    e = TokenBatch.empty(6)
    assert (e.tokens.shape, e.tokens.dtype) == ((0, 1, 6), torch.float32)
    assert (e.mask.shape, e.mask.dtype) == ((0, 1), torch.bool)
    assert (e.index.shape, e.index.dtype) == ((0, 1), torch.long)
    assert (e.modality.shape, e.modality.dtype) == ((0,), torch.long)
    assert (e.layout.shape, e.layout.dtype) == ((0, 3), torch.long)
    assert e.lengths.shape == (0,)
    half = TokenBatch.empty(6, dtype=torch.float16, device="cpu")
    assert half.tokens.dtype == torch.float16 and half.tokens.device.type == "cpu"
    # an empty batch joins others like any part
    out = TokenBatch.cat_rows([TokenBatch.empty(4), part(2, 3)])
    assert out.tokens.shape == (2, 3, 4) and out.mask.all()


_PRUNED = PrunedTokens(tokens=torch.zeros(2, 1, 4), mask=torch.zeros(2, 1, dtype=torch.bool), index=torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"scores": torch.zeros(2, 3)}, "['scores']"),
        ({"features": torch.zeros(2, 3, 5)}, "['features']"),
        ({"pruned": _PRUNED}, "['pruned']"),
        ({"losses": {"rtd_recon": torch.zeros(())}}, "['losses']"),
        ({"stats": {"fgcs": {"tokens": 1.0}}}, "['stats']"),
        ({"scores": torch.zeros(2, 3), "pruned": _PRUNED}, "['scores', 'pruned']"),
    ],
    ids=["scores", "features", "pruned", "losses", "stats", "two"],
)
def test_row_operations_refuse_batches_a_stage_has_touched(changes, named):
    """Dropping a stage's outputs silently would hide bugs: such a batch is an error."""
    touched = part(2, 3).replace(**changes)
    with pytest.raises(ValueError, match=re.escape(f"TokenBatch.cat_rows (parts[1]) takes fresh batches (before any stage ran), but this one has {named} set")):
        TokenBatch.cat_rows([part(1, 3), touched])
    with pytest.raises(ValueError, match=re.escape(f"TokenBatch.take_rows takes fresh batches (before any stage ran), but this one has {named} set")):
        touched.take_rows(torch.tensor([0]))


def test_kinds_say_on_the_host_which_modalities_the_rows_may_hold():
    """TokenBatch.kinds: set from a plain modality, unioned by cat_rows, kept by take_rows and stages,
    None when the modality came as a tensor (unknown without a device read)."""
    from pipeline import Modality, TokenBatch, build_pipeline

    img = TokenBatch.from_tokens(torch.randn(1, 4, 8), modality=Modality.IMAGE, layout=(1, 2, 2))
    txt = TokenBatch.from_tokens(torch.randn(2, 3, 8), modality=Modality.TEXT, layout=(3, 1, 1))
    assert img.kinds == {int(Modality.IMAGE)} and TokenBatch.empty(8).kinds == frozenset()
    both = TokenBatch.cat_rows([img, txt])
    assert both.kinds == {int(Modality.IMAGE), int(Modality.TEXT)} and both.take_rows(torch.tensor([0])).kinds == both.kinds
    unknown = TokenBatch.from_tokens(torch.randn(1, 4, 8), modality=torch.tensor([int(Modality.IMAGE)]), layout=(1, 2, 2))
    assert unknown.kinds is None and TokenBatch.cat_rows([img, unknown]).kinds is None
    out = build_pipeline([{"name": "random", "retention_ratio": 0.5}], dim=8).eval()(both)
    assert out.kinds == both.kinds
