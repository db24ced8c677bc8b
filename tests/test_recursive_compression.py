"""Recursive compression by clustering (issue 18): pipeline/recursive.py and pipeline/stages/recursive.py.

Every vectorised piece against a slow loop reference (clustering, similarities, cluster means,
contrastive loss), the guarantees (no member below the floor, sizes sum to the input, identity when
nothing merges), the adaptive threshold, the emergency parachute, progressive thresholds by depth, and
the runtime's log-size bias against an eager twin that sees the merged token as s duplicated keys, in
prefill and while decoding. Toy sizes, seconds on a CPU.

Run: ``OMP_NUM_THREADS=1 .venv/bin/pytest -p no:xdist -q tests/test_recursive_compression.py``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import pipeline
from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm
from pipeline import TokenBatch, build_pipeline
from pipeline.llm import TEXT_KIND, LayerStage, collect_losses
from pipeline.recursive import (
    EmergencyParachute,
    RecursiveCompressionLayer,
    anchor_clusters,
    attention_similarity,
    cluster_means,
    compression_stats,
    contrastive_loss,
    cosine_similarity_matrix,
    depth_threshold,
)

D = 16
IMAGE = int(pipeline.Modality.IMAGE)


# ---------------------------------------------------------------------------------------------- references
def loop_clusters(sim, eligible, threshold, kind, size, max_size):
    """The sequential anchor-chain algorithm, one row and one token at a time: (anchor, owner) lists."""
    b, l = eligible.shape
    anchors, owners = [], []
    for r in range(b):
        anchor, owner = [False] * l, [0] * l
        a, total = None, 0.0
        for j in range(l):
            ok = (a is not None and bool(eligible[r, j]) and bool(eligible[r, a])
                  and all(bool(eligible[r, k]) for k in range(a, j + 1))
                  and (kind is None or all(int(kind[r, k]) == int(kind[r, a]) for k in range(a, j + 1)))
                  and float(sim[r, a, j]) >= float(threshold[r])
                  and (max_size is None or total + float(size[r, j]) <= max_size + 1e-9))
            if ok:
                owner[j] = a
                total += float(size[r, j])
            else:
                a, total = j, float(size[r, j])
                anchor[j], owner[j] = True, j
        anchors.append(anchor)
        owners.append(owner)
    return torch.tensor(anchors), torch.tensor(owners)


def _random_case(seed: int, b: int = 3, l: int = 14):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, l, D, generator=g, dtype=torch.float64)
    # runs of near-duplicates so that clusters of several sizes form
    walk = base.clone()
    for j in range(1, l):
        stay = torch.rand(b, 1, generator=g, dtype=torch.float64) < 0.7
        walk[:, j] = torch.where(stay, walk[:, j - 1] + 0.4 * base[:, j], base[:, j])
    lengths = torch.randint(l // 2, l + 1, (b,), generator=g)
    mask = torch.arange(l)[None] >= (l - lengths)[:, None]  # left padding, ragged
    kind = torch.where(torch.rand(b, l, generator=g) < 0.2, TEXT_KIND, IMAGE)
    size = torch.randint(1, 4, (b, l), generator=g).to(torch.float64)
    return walk, mask, kind, size, g


# ---------------------------------------------------------------------------------------------- clustering
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_size", [None, 4])
def test_clustering_equals_the_loop_reference(seed, max_size):
    x, mask, kind, size, g = _random_case(seed)
    eligible = mask & (kind != TEXT_KIND)
    sim = cosine_similarity_matrix(x, eligible)
    threshold = 0.3 + 0.5 * torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    anchor, owner = anchor_clusters(sim, eligible, threshold, kind, size, max_size)
    ref_anchor, ref_owner = loop_clusters(sim, eligible, threshold, kind, size, max_size)
    assert torch.equal(anchor, ref_anchor) and torch.equal(owner, ref_owner)
    assert (anchor.sum(1) < mask.shape[1]).any(), "the case should merge something"


def test_similarities_equal_loop_references():
    x, mask, kind, _, g = _random_case(11)
    sim = cosine_similarity_matrix(x, mask)
    attn = torch.softmax(torch.randn(3, 2, 4, x.shape[1], generator=g, dtype=torch.float64), -1)
    asim = attention_similarity(attn, mask)
    for r in range(3):
        for i in range(x.shape[1]):
            for j in range(x.shape[1]):
                want = F.cosine_similarity(x[r, i], x[r, j], dim=0) if mask[r, i] and mask[r, j] else 0.0
                assert_close(sim[r, i, j], torch.as_tensor(want, dtype=sim.dtype))
                pi, pj = attn[r, :, :, i].flatten(), attn[r, :, :, j].flatten()
                want = F.cosine_similarity(pi, pj, dim=0) if mask[r, i] and mask[r, j] else 0.0
                assert_close(asim[r, i, j], torch.as_tensor(want, dtype=asim.dtype))
    layer = RecursiveCompressionLayer(D, attention_weight=0.25).double()
    assert_close(layer.compute_similarity_matrix(x, mask, attn), 0.75 * sim + 0.25 * asim)
    assert torch.equal(layer.compute_similarity_matrix(x, mask), sim)  # before the LLM: embeddings only


@pytest.mark.parametrize("seed", range(4))
def test_no_member_below_the_floor_and_sizes_add_up(seed):
    x, mask, kind, size, _ = _random_case(seed)
    eligible = mask & (kind != TEXT_KIND)
    layer = RecursiveCompressionLayer(D, similarity_threshold=0.4, max_offset=0.3, attention_weight=0.0).double()
    with torch.no_grad():  # a modulator that pushes as low as it can
        layer.modulator[-1].bias.fill_(-50.0)
    comp = layer.compress(x, mask, eligible=eligible, size=size, kind=kind)
    sim = layer.compute_similarity_matrix(x, eligible)
    assert (comp.threshold >= 0.4).all()
    members = mask & ~comp.keep
    assert members.any()
    to_anchor = sim.gather(2, comp.owner.clamp(min=0).unsqueeze(2)).squeeze(2)
    assert (to_anchor[members] >= comp.threshold.unsqueeze(1).expand_as(members)[members]).all()
    assert (to_anchor[members] >= 0.4).all()
    assert (comp.owner[~mask] == -1).all() and (comp.owner[mask] >= 0).all()
    # text (not eligible) stays alone; a cluster never spans two kinds
    assert comp.keep[mask & ~eligible].all()
    owner_kind = kind.gather(1, comp.owner.clamp(min=0))
    assert torch.equal(owner_kind[mask], kind[mask])
    # sizes: clusters' sizes sum to the input's, and each is the sum over its members (the slow way)
    assert_close((comp.size * comp.keep).sum(1), (size * mask).sum(1))
    for r in range(x.shape[0]):
        for a in comp.keep[r].nonzero().flatten().tolist():
            mem = [j for j in range(x.shape[1]) if mask[r, j] and int(comp.owner[r, j]) == a]
            assert_close(comp.size[r, a], size[r, mem].sum())
            want = sum(size[r, j] * x[r, j] for j in mem) / size[r, mem].sum()
            assert_close(comp.merged[r, a], want)  # gate at zero: the plain size-weighted mean


def test_recursive_application_keeps_count():
    """Compressing the compressed tokens again with their sizes: sizes still add up to the input count."""
    x, mask, _, _, _ = _random_case(5, b=2, l=16)
    layer = RecursiveCompressionLayer(D, similarity_threshold=0.3, adaptive_threshold=False).double().eval()
    first = layer.compress(x, mask)
    layer.similarity_threshold = 0.0
    second = layer.compress(first.merged, first.keep, size=first.size)
    assert (second.keep.sum(1) <= first.keep.sum(1)).all() and (second.keep.sum(1) < first.keep.sum(1)).any()
    assert_close((second.size * second.keep).sum(1), mask.sum(1).double())


def test_nothing_merges_above_one_and_the_gate_at_zero_is_the_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 12, D)
    x[:, 5] = x[:, 4]  # exact duplicates: similarity 1, still below 1.5
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    batch = TokenBatch.from_tokens(x, mask)
    pipe = build_pipeline([{"name": "recursive_compression", "similarity_threshold": 1.5}], dim=D)
    for train in (True, False):
        out = pipe.train(train)(batch)
        assert torch.equal(out.mask, mask) and torch.equal(out.tokens[out.mask], x[mask])
        assert torch.equal(out.index[out.mask], batch.index[mask])
    stage = pipe.stages[0]
    assert torch.equal(stage.last_assignment, torch.where(mask, torch.arange(12), -1))
    # a gate at zero is plain merging even when clusters form
    low = RecursiveCompressionLayer(D, similarity_threshold=0.99, adaptive_threshold=False).train()
    plain = RecursiveCompressionLayer(D, similarity_threshold=0.99, adaptive_threshold=False, use_residuals=False).train()
    a, b = low.compress(x, mask), plain.compress(x, mask)
    assert not a.keep[0, 5] and torch.equal(a.keep, b.keep)
    assert_close(a.merged, b.merged, rtol=0, atol=1e-6)


def test_the_assignment_tensor_points_at_each_tokens_cluster():
    torch.manual_seed(1)
    x = torch.randn(2, 20, D).repeat_interleave(2, dim=1)[:, :20]  # pairs of duplicates
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 15:] = False
    pipe = build_pipeline([{"name": "recursive_compression", "similarity_threshold": 0.95}], dim=D).eval()
    out = pipe(TokenBatch.from_tokens(x, mask))
    assign = pipe.stages[0].last_assignment
    assert (assign[~mask] == -1).all()
    assert out.mask.sum(1).tolist() == [8, 10]
    for r in range(2):
        for c in range(int(out.mask[r].sum())):
            members = (assign[r] == c).nonzero().flatten()
            assert len(members) in (1, 2)
            assert_close(out.tokens[r, c], x[r, members].mean(0))
            assert int(out.index[r, c]) == int(members[0])  # the anchor's (first member's) original index
    stats = pipe.stages[0].last_stats
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert_close(stats["compression_ratio"], torch.tensor((8 / 15 + 10 / 20) / 2))
    assert_close(stats["mean_cluster_size"], torch.tensor(35 / 18))
    read = compression_stats(pipe.stages)
    assert read["recursive_compression"]["tokens_out"] == 9.0


# ---------------------------------------------------------------------------------------------- threshold
def test_adaptive_threshold_never_below_the_floor_and_trains_the_modulator():
    g = torch.Generator().manual_seed(3)
    layer = RecursiveCompressionLayer(D, similarity_threshold=0.6, max_offset=0.5)
    for scale in (0.0, 30.0, 1.0):  # the last (unsaturated) one is differentiated
        with torch.no_grad():
            for p in layer.modulator.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g))
        x = torch.randn(4, 10, D, generator=g)
        x[2] = x[2, :1] + 0.01 * x[2]  # a row of near-duplicates: statistics near 1
        mask = torch.rand(4, 10, generator=g) < 0.8
        mask[3] = False  # a row without tokens: the floor
        sim = layer.compute_similarity_matrix(x, mask)
        tau = layer.compute_adaptive_threshold(sim, mask, x.mean(1))
        assert tau.shape == (4,) and (tau >= 0.6).all() and torch.isfinite(tau).all()
        assert tau[2] > 0.9 and tau[3] == 0.6
        assert (tau <= 1.0).all()  # capped at max(floor, 1): near-identical tokens stay mergeable
    layer.zero_grad()
    tau.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.modulator.parameters())
    layer.threshold_raise = 0.2
    assert (layer.compute_adaptive_threshold(sim.detach(), mask, x.mean(1)) >= 0.8).all()
    fixed = RecursiveCompressionLayer(D, similarity_threshold=0.6, adaptive_threshold=False)
    assert fixed.modulator is None and torch.equal(fixed.compute_adaptive_threshold(sim, mask, x.mean(1)),
                                                    torch.full((4,), 0.6))


def test_progressive_thresholds_follow_depth():
    assert [depth_threshold(layer, 10, 0.95, 0.9, 0.8) for layer in (1, 2, 3, 6, 7, 9)] == [0.95, 0.95, 0.9, 0.9, 0.8, 0.8]
    llm = build_pipeline({"llm": [{"name": "progressive_compression", "layer": k} for k in (1, 5, 8)]}, D).llm
    for stage in llm:
        stage.bind(10, 4, 2)
    assert [s.similarity_threshold for s in llm] == [0.95, 0.9, 0.8]


# ---------------------------------------------------------------------------------------------- contrastive
def loop_contrastive(z, zc, owner, anchor, mask, weight, margin):
    pull_num = pull_den = 0.0
    push_num, push_n = 0.0, 0
    b, l, _ = z.shape
    for r in range(b):
        for j in range(l):
            if not mask[r, j]:
                continue
            a = int(owner[r, j])
            n_members = sum(1 for k in range(l) if mask[r, k] and int(owner[r, k]) == a)
            if n_members >= 2:
                pull_num += float(weight[r, j]) * (1 - float(F.cosine_similarity(z[r, j], zc[r, a], dim=0)))
                pull_den += float(weight[r, j])
        real = [a for a in range(l) if anchor[r, a] and mask[r, a]]
        for a in real:
            for c in real:
                if a != c:
                    push_num += max(0.0, margin - (1 - float(F.cosine_similarity(zc[r, a], zc[r, c], dim=0))))
                    push_n += 1
    return (pull_num / pull_den if pull_den else 0.0) + (push_num / push_n if push_n else 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_contrastive_loss_equals_the_loop_reference(seed):
    x, mask, kind, size, g = _random_case(seed + 20)
    eligible = mask & (kind != TEXT_KIND)
    sim = cosine_similarity_matrix(x, eligible)
    anchor, owner = anchor_clusters(sim, eligible, torch.full((x.shape[0],), 0.3, dtype=torch.float64), kind)
    mean, _ = cluster_means(x, owner, size * mask)
    z = torch.randn(*x.shape[:2], 6, generator=g, dtype=torch.float64)
    zc = torch.randn(*x.shape[:2], 6, generator=g, dtype=torch.float64) + 0.8 * z
    for margin in (0.0, 0.2, 1.5):
        got = contrastive_loss(z, zc, owner, anchor & eligible, eligible, size, margin)
        want = loop_contrastive(z, zc, owner, anchor & eligible, eligible, size, margin)
        assert got >= 0 and abs(float(got) - want) < 1e-9
    del mean


# ---------------------------------------------------------------------------------------------- parachute
class _Knob:
    def __init__(self, floor):
        self.similarity_threshold, self.threshold_raise, self.stage_name = floor, 0.0, "recursive_compression"


def test_parachute_raises_on_a_spike_lowers_on_improvement_within_bounds(caplog):
    knobs = [_Knob(0.85), _Knob(0.7)]
    chute = EmergencyParachute(knobs, step=0.05, max_raise=0.1, spike_tolerance=0.5, patience=3, window=4, warmup=2)
    step = 0
    with caplog.at_level(logging.INFO, logger="pipeline.recursive"):
        for loss in [2.0, 2.0, 2.0, 2.0]:
            step += 1
            chute.update(step, loss)
        assert chute.raise_ == 0.0 and not chute.events
        for loss in [5.0, 9.0, 20.0]:  # three spikes: +0.05, +0.05, then the bound
            step += 1
            chute.update(step, loss)
        assert chute.raise_ == pytest.approx(0.1) and [k.threshold_raise for k in knobs] == [chute.raise_] * 2
        assert [e["reason"] for e in chute.events] == ["spike", "spike"]  # the capped third changes nothing
        assert chute.events[0] == {"step": 5, "old": 0.0, "new": 0.05, "reason": "spike", "loss": 5.0, "ema": 2.0}
        for loss in [1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8]:  # sustained improvement
            step += 1
            chute.update(step, loss)
    assert chute.raise_ == 0.0  # back down to the floor, never below
    reasons = [e["reason"] for e in chute.events]
    assert reasons == ["spike", "spike", "sustained improvement", "sustained improvement"]
    assert all(0.0 <= e["new"] <= 0.1 for e in chute.events)
    assert sum("emergency parachute" in r.message for r in caplog.records) == 4
    stats = chute.stats()
    import json
    assert json.loads(chute.to_json()) == json.loads(json.dumps(stats))
    assert stats["thresholds"] == {"recursive_compression": 0.7}  # both knobs share a name; the last wins
    with pytest.raises(ValueError, match="loss of step 99 is nan"):
        chute.update(99, float("nan"))
    with pytest.raises(ValueError, match="patience=0"):
        EmergencyParachute(knobs, patience=0)


# ---------------------------------------------------------------------------------------------- the LLM
VOCAB = 97
LDIM = 64
SMALL = dict(hidden_size=LDIM, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=3, max_position_embeddings=256)


def _build(attn="sdpa", seed=0, dtype=torch.float64) -> DecoderLM:
    torch.manual_seed(seed)
    spec = {**TINY_LLM, **SMALL, "model_type": "llama"}
    return DecoderLM(build_llm(spec, vocab_size=VOCAB, attn_implementation=attn, torch_dtype=dtype)).eval()


class _Sized(LayerStage):
    """Gives the tokens at ``cols`` (columns of the unpadded prompt) sizes ``sizes``; nothing moves."""
    stage_name = "test_sized"

    def __init__(self, layer, cols, sizes):
        super().__init__(layer)
        self.cols, self.sizes = cols, sizes

    def reduce(self, state, attention):
        size = torch.ones(state.mask.shape, dtype=torch.float64)
        for c, s in zip(self.cols, self.sizes):
            size[0, c] = s
        return replace(state, size=size)


class _Duplicated(LayerStage):
    """On a prompt with ``sum(sizes - 1)`` extra padding columns: repeats each sized token s times."""
    stage_name = "test_duplicated"

    def __init__(self, layer, cols, sizes):
        super().__init__(layer)
        self.cols, self.sizes = cols, sizes

    def reduce(self, state, attention):
        extra = sum(s - 1 for s in self.sizes)
        src = []
        for j in range(extra, state.mask.shape[1]):
            c = j - extra
            src += [j] * (self.sizes[self.cols.index(c)] if c in self.cols else 1)
        idx = torch.tensor([src])
        take = lambda x: x.gather(1, idx.view(1, -1, *[1] * (x.dim() - 2)).expand(1, len(src), *x.shape[2:]))  # noqa: E731
        return replace(state, hidden=take(state.hidden), mask=torch.ones(1, len(src), dtype=torch.bool),
                       positions=take(state.positions), index=take(state.index), kind=take(state.kind))


@torch.no_grad()
def _run(lm, emb, mask, pos, stage, forced):
    runner = lm.bind_stages([stage])
    logits, cache = lm(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner)
    out = [logits[:, -1]]
    nxt = pos[:, -1:] + 1
    for tok in forced:
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        logits, cache = lm(lm.embed(torch.tensor([[tok]])).to(emb.dtype), mask, nxt, cache, use_cache=True,
                           logits_to_keep=1, stages=runner)
        nxt = nxt + 1
        out.append(logits[:, -1])
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_log_size_bias_attends_like_duplicated_keys(attn):
    """A token of size s in the layers after the stage = s copies of it as keys (a twin with the token
    duplicated, through the stock mask), in prefill and in every decoding step. The twin runs SDPA: its
    prompt is padded (room for the copies), and HF's eager float64 softmax over a padding row is NaN."""
    lm = _build(attn)
    twin = _build("sdpa", seed=1)
    twin.load_state_dict(lm.state_dict())
    n, cols, sizes = 11, [3, 6], [3, 2]
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(1, n, LDIM, generator=g, dtype=torch.float64)
    mask, pos = torch.ones(1, n, dtype=torch.long), torch.arange(n).view(1, n)
    forced = [5, 17, 2, 40]
    got, cache = _run(lm, emb, mask, pos, _Sized(2, cols, sizes), forced)
    extra = sum(s - 1 for s in sizes)
    pad_emb = torch.cat([torch.zeros(1, extra, LDIM, dtype=torch.float64), emb], 1)
    pad_mask = torch.cat([torch.zeros(1, extra, dtype=torch.long), mask], 1)
    pad_pos = torch.cat([torch.zeros(1, extra, dtype=torch.long), pos], 1)
    want, _ = _run(twin, pad_emb, pad_mask, pad_pos, _Duplicated(2, cols, sizes), forced)
    tol = 1e-9 if attn == "sdpa" else 1e-5  # HF's eager attention takes its softmax in float32
    assert_close(got, want, rtol=tol, atol=tol)
    assert "log_size" in cache.layers[2].extras and "log_size" not in cache.layers[1].extras
    nobias, _ = _run(lm, emb, mask, pos, _Sized(2, [], []), forced)
    assert (nobias - want).abs().max() > 1e3 * tol  # the sizes matter


def _prompt(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    b, w = len(lengths), max(lengths)
    emb = torch.randn(b, w, LDIM, generator=g, dtype=torch.float64)
    mask = (torch.arange(w)[None] >= w - torch.tensor(lengths)[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    kinds = torch.full((b, w), TEXT_KIND)
    for r, n in enumerate(lengths):
        start = w - n + 1
        kinds[r, start:start + n // 2] = IMAGE
        # runs of near-duplicate media tokens, so that clusters form at a high threshold
        emb[r, start:start + n // 2] = emb[r, start:start + n // 2].repeat_interleave(3, 0)[: n // 2] + \
            0.05 * emb[r, start:start + n // 2]
    return emb * mask[..., None], mask, pos, kinds


def test_llm_stage_merges_media_and_trains(caplog):
    lm = _build()
    emb, mask, pos, kinds = _prompt([18, 12])
    cfg = {"name": "recursive_compression_llm", "layer": 1, "similarity_threshold": 0.7, "projection_dim": 8,
           "modulator_dim": 8, "num_queries": 3}
    llm = build_pipeline({"llm": [cfg]}, LDIM).llm.double()
    stage = llm[0]
    runner = lm.bind_stages(llm)
    stage.record_assignment = True
    with torch.no_grad():
        lm(emb, mask, pos, use_cache=True, logits_to_keep=1, stages=runner, token_kinds=kinds)
    media = (kinds != TEXT_KIND) & mask.bool()
    stats = {k: float(v) for k, v in stage.last_stats.items()}
    assert stats["tokens_in"] == media.sum(1).double().mean()
    assert stats["tokens_out"] < stats["tokens_in"] and stats["threshold"] >= 0.7
    assign = stage.last_assignment
    assert (assign[~mask.bool()] == -1).all() and (assign[mask.bool()] >= 0).all()
    for r in range(2):
        text_cols = assign[r][mask[r].bool() & ~media[r]].tolist()
        assert len(set(text_cols)) == len(text_cols)  # text never merges
    assert "recursive_compression_llm@1" in compression_stats(llm)
    # training: gradients reach the modulator, the gate and the projection head; the aux loss is collected
    lm.train()
    llm.train()
    for p in lm.parameters():
        p.requires_grad_(False)
    logits, _ = lm(emb, mask, pos, stages=runner, token_kinds=kinds)
    aux = collect_losses(llm)
    assert list(aux) == ["recursive_compression_llm@1.contrastive"] and stage.aux_losses == {}
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=logits.dtype)
    ((logits * w).sum() + sum(aux.values())).backward()
    for name, p in llm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lm.eval()


# ---------------------------------------------------------------------------------------------- training side
def test_training_config_builds_the_parachute_over_the_compression_stages(tmp_path):
    from types import SimpleNamespace

    from llava_deft.config import load_train_config
    from llava_deft.errors import ConfigError
    from llava_deft.train.trainer import build_parachute

    pipe = build_pipeline({"stages": [{"name": "random", "retention_ratio": 0.5}, {"name": "recursive_compression"}],
                           "llm": [{"name": "progressive_compression", "layer": 1}, {"name": "fastv"}]}, D)
    model = SimpleNamespace(pipeline=pipe)
    off = load_train_config(None)
    assert off.parachute.enabled is False
    chute, stages = build_parachute(off, model)
    assert chute is None and [s.stage_name for s in stages] == ["recursive_compression", "progressive_compression"]
    cfg = load_train_config(None, ["parachute.enabled=true", "parachute.step=0.05", "parachute.patience=2"])
    chute, _ = build_parachute(cfg, model)
    assert chute.step == 0.05 and chute.patience == 2
    for step, loss in enumerate([1.0] * 6 + [9.0], 1):
        chute.update(step, loss)
    assert [s.threshold_raise for s in stages] == [0.05, 0.05]
    assert pipe.llm[0].core.floor == pytest.approx(pipe.llm[0].similarity_threshold + 0.05)
    with pytest.raises(ConfigError, match="no recursive-compression stage"):
        build_parachute(cfg, SimpleNamespace(pipeline=build_pipeline({"stages": [{"name": "random"}]}, D)))
    with pytest.raises(ConfigError, match="parachute.step"):
        load_train_config(None, ["parachute.step=0"])
    with pytest.raises(ConfigError, match="parachute.spike"):
        load_train_config(None, ["parachute.spike=1"])


def test_compression_curves_write_json_and_png_from_the_training_log(tmp_path):
    import json

    from eval.compression_curves import main

    run = tmp_path / "run"
    (run / "stage0_finetune").mkdir(parents=True)
    lines = []
    for step in (1, 2, 3):
        lines.append({"stage": 0, "step": step, "loss": 3.0 - step / 2, "parachute_raise": 0.02 * (step > 1),
                      "compression": {"recursive_compression_llm@2": {"threshold": 0.85 + 0.01 * step,
                                                                      "compression_ratio": 0.5, "mean_cluster_size": 2.0},
                                      "recursive_compression": {"threshold": 0.9, "compression_ratio": 0.8,
                                                                "mean_cluster_size": 1.25}}})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    events = [{"step": 2, "old": 0.0, "new": 0.02, "reason": "spike", "loss": 2.0, "ema": 1.0}]
    (run / "stage0_finetune" / "parachute.json").write_text(json.dumps({"events": events}))
    curves = main(["--run", str(run), "--name", "rc", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "rc.json").read_text())
    assert (tmp_path / "out" / "rc.png").stat().st_size > 1000
    assert saved["stages"]["recursive_compression_llm@2"]["threshold"] == pytest.approx([0.86, 0.87, 0.88])
    assert saved["loss"]["loss"] == [2.5, 2.0, 1.5] and saved["parachute_raise"]["raise"] == [0.0, 0.02, 0.02]
    assert curves["parachute_events"][0]["reason"] == "spike"
    (run / "train_log.jsonl").write_text(json.dumps({"stage": 0, "step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit):
        main(["--run", str(run), "--name", "rc", "--out", str(tmp_path / "out")])


def test_text_merging_puts_each_cluster_at_its_last_member_and_the_loss_skips_the_rest():
    """tokens: all (a text LM): clusters of text sit at their last member's column; the model's loss
    scores only columns with logits (LLMStages.present), each predicting the token after its run."""
    from llava_deft.model import LlavaDeftForCausalLM
    from pipeline import build_pipeline

    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": []}})
    dim = model.llm.hidden_size
    ids = torch.tensor([[20, 20, 20, 20, 31, 40, 40, 40, 52, 53], [0, 0, 61, 61, 61, 61, 61, 70, 71, 72]])
    mask = (ids != 0).long()
    model.pipeline.llm = build_pipeline({"llm": [{"name": "recursive_compression_llm", "layer": 1, "tokens": "all",
                                                  "similarity_threshold": 0.99, "adaptive_threshold": False,
                                                  "attention_weight": 0.0, "use_residuals": False}]}, dim).llm
    runner = model.llm.bind_stages(model.pipeline.llm)
    runner.trace = []
    model.llm(model.llm.embed(ids), mask, (mask.cumsum(1) - 1).clamp(min=0), stages=runner)
    (trace,) = runner.trace
    present = runner.present
    # repeated ids embed alike and merge (layer 0 sees the same token at nearby positions: similar states)
    assert present.sum() < mask.sum()
    for b in range(2):
        cols = trace.index[b][trace.mask[b]].tolist()
        assert cols == sorted(cols) and present[b].nonzero().flatten().tolist() == cols
        assert cols[-1] == ids.shape[1] - 1  # every row's last token is the last of its cluster
        out_col = trace.columns()[b]  # (L_in,) output column of every input column
        for o, c in enumerate(trace.index[b].tolist()):
            if trace.mask[b, o]:  # a cluster sits at its last member: no member after its column
                assert max(i for i in range(ids.shape[1]) if out_col[i] == o) == c
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels)
    assert torch.isfinite(out.lm_loss)
