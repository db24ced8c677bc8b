"""The contract every registered pre-LLM stage honours, one test over ``list_stages("tokens")`` (STYLE §2;
stages inside the LLM have their own contract in tests/test_llm_stages.py).

A stage registered tomorrow is covered the day it registers: it runs on a tiny ragged batch
(B=2, N=64, D=32; row 0 has 64 real tokens on an 8x8 grid, row 1 has 48 on a 6x8 grid).
What a stage declares (``retention_ratio``, ``selects_tokens``) decides which checks apply;
see ``pipeline/registry.py``. A stage that acts on what reducers removed declares the class
attribute ``needs_pruned = True`` (e.g. ``rtd``); it is tested after ``REDUCER``, with the
checks made against its own input (the reducer's output) and the original batch.
"""

import pytest
import torch

from pipeline import TokenBatch, build_pipeline, get_stage, list_stages
from pipeline.ops import budget, gather_rows

D = 32
RATIO = 0.25
LAYOUT = torch.tensor([[1, 8, 8], [1, 6, 8]])
REDUCER = {"name": "random", "retention_ratio": RATIO}  # runs before stages that need ``pruned``


def ragged_batch(pad_scale: float = 1.0, pad_seed: int = 1) -> TokenBatch:
    tokens = torch.randn(2, 64, D, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 48:] = False
    pad = pad_scale * torch.randn(2, 64, D, generator=torch.Generator().manual_seed(pad_seed))
    tokens = torch.where(mask.unsqueeze(-1), tokens, pad)
    # what the model's image tower gives stages that ask for it (``visionzip``); others carry it along
    attention = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    attention = torch.where(mask, attention, pad_scale * torch.rand(2, 64, generator=torch.Generator().manual_seed(pad_seed)))
    # the prompt's embeddings, as the model gives stages that ask (``fgcs`` with query_weight > 0): row 0 has
    # 5 query tokens, row 1 has 3 (padded to 5)
    query = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    query_mask = torch.tensor([[True] * 5, [True, False, True, True, False]])
    query = torch.where(query_mask.unsqueeze(-1), query,
                        pad_scale * torch.randn(2, 5, D, generator=torch.Generator().manual_seed(pad_seed + 1)))
    return TokenBatch.from_tokens(tokens, mask, layout=LAYOUT, encoder_attention=attention, query=query,
                                  query_mask=query_mask)


# options that change what a stage declares (selects_tokens ...) get their own contract run
VARIANTS = {"fgcs": [{"merge_pruned": True}, {"query_weight": 1.0, "query_dim": 8}], "visionzip": [{"dominance": "norm"}, {"dominant_share": 1.0}],
            "recursive_compression": [
                {"similarity_threshold": 0.2, "adaptive_threshold": False, "use_residuals": False, "contrastive_weight": 0.0},
                {"similarity_threshold": -1.0, "max_cluster_size": 3}]}
# a stage's base options where its defaults cannot act on this batch: random tokens in D=32 have cosine
# similarities of about N(0, 0.18^2), so recursive_compression's 0.85 floor (meant for real embeddings)
# merges nothing and its modulator, gate and projection head would get no gradient to check
BASE_OPTIONS = {"recursive_compression": {"similarity_threshold": 0.2}}
CASES = ([(name, BASE_OPTIONS.get(name, {})) for name in list_stages("tokens")]
         + [(n, o) for n, opts in VARIANTS.items() for o in opts])


def build_one(name: str, options: dict | None = None):
    """The stage alone, or after ``REDUCER`` when it declares ``needs_pruned``; it is the last stage."""
    cfg = {"name": name, **(options or {})}
    if "retention_ratio" in get_stage(name).Config.model_fields:
        cfg["retention_ratio"] = RATIO
    before = [REDUCER] if getattr(get_stage(name), "needs_pruned", False) else []
    torch.manual_seed(0)
    return build_pipeline([*before, cfg], dim=D)


def run_split(pipe, batch: TokenBatch) -> tuple[TokenBatch, TokenBatch]:
    """(input of the last stage, its output), from one pass (train-mode reducers are random)."""
    for stage in pipe.stages[:-1]:
        batch = stage(batch)
    return batch, pipe.stages[-1](batch)


def real_outputs(out: TokenBatch) -> dict[str, torch.Tensor]:
    """Everything a later stage or the LLM reads, restricted to real tokens."""
    res = {"mask": out.mask, "index": out.index[out.mask], "tokens": out.tokens[out.mask]}
    if out.features is not None:
        res["features"] = out.features[out.mask]
    if out.scores is not None:
        res["scores"] = out.scores[out.mask]
    if out.pruned is not None:
        res["pruned_index"] = out.pruned.index[out.pruned.mask]
        res["pruned_tokens"] = out.pruned.tokens[out.pruned.mask]
    return res


def check_output(stage, batch: TokenBatch, out: TokenBatch, original: TokenBatch) -> None:
    """``batch``: the stage's input; ``original``: the pipeline's input (``index`` = arange)."""
    kept = out.mask.sum(1)
    if hasattr(stage, "retention_ratio"):
        limit = budget(batch.lengths, stage.retention_ratio)
        assert (kept <= limit).all(), f"{kept.tolist()} tokens kept, budget {limit.tolist()}"
        if stage.selects_tokens:
            assert torch.equal(kept, limit), f"top-k selector kept {kept.tolist()}, budget {limit.tolist()}"
    elif getattr(stage, "variable_count", False):  # keeps 1..n of a row, as its data says (clustering)
        assert (kept <= batch.lengths).all() and (kept >= 1).all(), f"{kept.tolist()} kept of {batch.lengths.tolist()}"
    else:
        assert torch.equal(kept, batch.lengths), "a non-reducing stage must keep every real token"

    # real tokens first, padding last
    assert torch.equal(out.mask, torch.arange(out.mask.shape[1]) < kept[:, None])
    # original positions: in range, strictly ascending, never a padding slot of the input
    length = original.layout.prod(1)[:, None]
    assert ((out.index >= 0) & (out.index < length))[out.mask].all()
    both = out.mask[:, 1:] & out.mask[:, :-1]
    assert (out.index[:, 1:] > out.index[:, :-1])[both].all(), "index must ascend over real tokens"
    safe = torch.where(out.mask, out.index, 0)
    assert original.mask.gather(1, safe)[out.mask].all(), "a padding token was kept"

    if stage.selects_tokens:
        assert torch.equal(out.tokens[out.mask], gather_rows(original.tokens, safe)[out.mask])

    if out.pruned is not None:
        # kept and pruned partition the input's real tokens, its own pruned ones included (by index)
        for b in range(batch.mask.shape[0]):
            have = torch.cat([out.index[b][out.mask[b]], out.pruned.index[b][out.pruned.mask[b]]])
            want = batch.index[b][batch.mask[b]]
            if batch.pruned is not None:
                want = torch.cat([want, batch.pruned.index[b][batch.pruned.mask[b]]])
            assert torch.equal(have.sort().values, want.sort().values)

    for value in [out.tokens, out.features, out.scores, *out.losses.values()]:
        if value is not None:
            assert not torch.isnan(value).any()
    # the query (an input, like encoder_attention) rides along unchanged: stages keep every row, in order
    assert out.query is batch.query and out.query_mask is batch.query_mask


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{''.join(f'-{k}' for k in o)}" for n, o in CASES])
def test_stage_contract(name, options):
    pipe = build_one(name, options)
    stage = pipe.stages[-1]
    batch = ragged_batch()

    pipe.eval()
    with torch.no_grad():
        out = pipe(batch)
        again = pipe(batch)
        repadded = pipe(ragged_batch(pad_scale=1e3, pad_seed=7))
        check_output(stage, *run_split(pipe, batch), batch)
    expected = real_outputs(out)
    for key, value in real_outputs(again).items():
        assert torch.equal(value, expected[key]), f"{name} is not deterministic in eval ({key})"
    for key, value in real_outputs(repadded).items():
        torch.testing.assert_close(value, expected[key], msg=lambda m: f"padding changed {key}: {m}")

    pipe.train()
    batch.tokens.requires_grad_(True)
    stage_in, out = run_split(pipe, batch)
    check_output(stage, stage_in, out, batch)
    weights = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(3))
    loss = (out.tokens * weights * out.mask.unsqueeze(-1)).sum()
    if out.features is not None:
        loss = loss + (out.features * out.mask.unsqueeze(-1)).pow(2).sum()
    loss = loss + sum(out.losses.values(), torch.zeros(()))
    loss.backward()
    grad = batch.tokens.grad
    assert grad[~batch.mask].abs().sum() == 0, "padding must not influence the output"
    assert grad[batch.mask].abs().sum() > 0, "no gradient reaches the input tokens"
    for pname, p in pipe.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: parameter {pname} gets no gradient"


@pytest.mark.parametrize("train", [False, True])
def test_composed_pipeline_partitions_tokens(train):
    torch.manual_seed(0)
    pipe = build_pipeline(
        [{"name": "sam"}, {"name": "fgcs", "retention_ratio": 0.5}, {"name": "random", "retention_ratio": 0.5}], dim=D
    ).train(train)
    batch = ragged_batch()
    out = pipe(batch)

    assert out.mask.sum(1).tolist() == [16, 12]  # ceil(ceil(n / 2) / 2)
    assert out.pruned.mask.sum(1).tolist() == [48, 36]
    for b in range(2):
        kept_i = out.index[b][out.mask[b]]
        pruned_i = out.pruned.index[b][out.pruned.mask[b]]
        assert torch.equal(torch.cat([kept_i, pruned_i]).sort().values, torch.arange(int(batch.lengths[b])))
        assert torch.equal(pruned_i, pruned_i.sort().values), "pruned must stay in original order"
        # kept and pruned carry the input values (the training gate changes gradients, not values)
        assert torch.equal(out.tokens[b][out.mask[b]], batch.tokens[b, kept_i])
        assert torch.equal(out.pruned.tokens[b][out.pruned.mask[b]], batch.tokens[b, pruned_i])
    assert list(out.stats) == ["fgcs", "random"]


# ------------------------------------------------------------------------------ no host synchronisation
# rtd's recovering modes add tokens back (outside the reducer contract above) and must not sync either
SYNC_CASES = CASES + [("rtd", {"mode": "hybrid"}), ("rtd", {"mode": "adaptive"})]
CASE_IDS = [f"{n}{''.join(f'-{k}={v}' for k, v in o.items())}" for n, o in SYNC_CASES]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("name", "options"), SYNC_CASES, ids=CASE_IDS)
def test_stage_forward_reads_nothing_on_the_host(name, options, train):
    """Issue 16: no ``.item()``, ``.tolist()``, ``bool()``/``float()``/``int()`` of a tensor, data-dependent
    sizes or boolean indexing in a stage's forward (each one is a host synchronisation on a GPU, and CUDA
    graphs cannot capture it); output widths come from shapes, statistics stay tensors."""
    from tests.host_sync import HostSyncRecorder

    pipe = build_one(name, options).train(train)
    batch = ragged_batch()
    batch = batch.replace(tokens=batch.tokens.clone().requires_grad_(train))
    for stage in pipe.stages[:-1]:
        batch = stage(batch)
    with HostSyncRecorder() as rec:
        out = pipe.stages[-1](batch)
    assert not rec.calls, rec.report()
    for values in out.stats.values():  # statistics are 0-dim tensors until someone reads them
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values.values()), values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize(("name", "options"), SYNC_CASES, ids=CASE_IDS)
def test_stage_forward_does_not_synchronise_the_gpu(name, options):
    pipe = build_one(name, options).cuda().eval()
    batch = ragged_batch()
    batch = batch.replace(**{k: getattr(batch, k).cuda() for k in ("tokens", "mask", "index", "layout", "modality",
                                                                   "encoder_attention", "query", "query_mask")})
    for stage in pipe.stages[:-1]:
        batch = stage(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pipe.stages[-1](batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_read_stats_reads_each_statistic_once_as_a_float():
    from pipeline.ops import read_stats

    out = build_pipeline([{"name": "random", "retention_ratio": 0.25}], dim=D).eval()(ragged_batch())
    stats = read_stats(out.stats)
    assert stats == {"random": {"tokens_in": 56.0, "tokens_out": 14.0, "kept_fraction": 0.25}}
