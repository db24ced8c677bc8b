"""DeFT: feedback-aware importance, group-aware neighbourhoods, the DeFTModule facade, use_deft in the model."""

import inspect
import math

import pytest
import torch

from pipeline import DeFTModule, Modality, TokenBatch, build_pipeline
from pipeline.group import group_mean, group_neighbours, grid_neighbours, text_neighbours
from pipeline.stages.fgcs import FGCS
from tests.test_model import collate, samples


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ feedback
def slow_feedback_loss(logits, target, valid, alpha_var):
    rows = []
    for b in range(logits.shape[0]):
        idx = [i for i in range(logits.shape[1]) if valid[b, i]]
        if not idx:
            continue
        p = torch.stack([torch.sigmoid(logits[b, i]) for i in idx])
        t = torch.stack([target[b, i] for i in idx])
        bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        r = p - t
        rows.append(bce.mean() + alpha_var * ((r - r.mean()) ** 2).mean())
    return torch.stack(rows).mean()


def run_fgcs(feedback_weight, alpha_var=0.1, signal="l1"):
    torch.manual_seed(0)
    stage = FGCS(dim=8, retention_ratio=0.5, hidden_dim=16, feedback_weight=feedback_weight, alpha_var=alpha_var,
                 feedback_signal=signal)
    stage.train()
    x = torch.randn(2, 12, 8, generator=gen(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    tokens = x.clone().requires_grad_(True)
    out = stage(TokenBatch.from_tokens(tokens, mask, layout=torch.tensor([[1, 3, 4], [1, 3, 3]])))
    w = torch.randn(out.tokens.shape, generator=gen(2))
    (out.tokens * w * out.mask.unsqueeze(-1)).sum().backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
    return stage, x, mask, out, w, grads


SLOW_SIGNALS = {
    "l1": lambda g, x: sum(abs(float(g[d] * x[d])) for d in range(len(g))),
    "dot": lambda g, x: abs(float(sum(g[d] * x[d] for d in range(len(g))))),
    "grad_norm": lambda g, x: math.sqrt(sum(float(g[d]) ** 2 for d in range(len(g)))),
}


@pytest.mark.parametrize("signal", list(SLOW_SIGNALS))
def test_feedback_target_is_gradient_times_input_of_kept_tokens(signal):
    stage, x, mask, out, w, _ = run_fgcs(1.0, signal=signal)
    fb = stage.last_feedback
    # slow reference: the loss is sum(out * w), so dL/dx at a kept token is its w row; pruned get 0
    expected = torch.zeros(2, 12)
    for b in range(2):
        for k in range(int(out.mask[b].sum())):
            p = int(out.index[b, k])
            expected[b, p] = SLOW_SIGNALS[signal](w[b, k], x[b, p])
    torch.testing.assert_close(fb["importance"], expected, rtol=1e-5, atol=1e-6)
    for b in range(2):
        top = expected[b].max()
        torch.testing.assert_close(fb["target"][b], expected[b] / top, rtol=1e-5, atol=1e-6)
    assert fb["target"].max() <= 1 and fb["target"].min() >= 0


@pytest.mark.parametrize("alpha_var", [0.0, 0.1, 2.0])
def test_feedback_gradient_reaches_saliency_head_in_the_same_backward(alpha_var):
    """Gradients with feedback minus without = d(slow feedback loss)/d params: one backward did both."""
    stage, x, mask, out, _, with_fb = run_fgcs(1.0, alpha_var)
    _, _, _, _, _, without = run_fgcs(0.0, alpha_var)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        keep[b, out.index[b][out.mask[b]]] = True
    stage.zero_grad()
    logits = stage.saliency_logits(TokenBatch.from_tokens(x, mask, layout=torch.tensor([[1, 3, 4], [1, 3, 3]])))
    slow_feedback_loss(logits, stage.last_feedback["target"], keep, alpha_var).backward()
    for name, p in stage.named_parameters():
        torch.testing.assert_close(with_fb[name] - without[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in stage.parameters())


def test_feedback_loss_does_not_vanish_when_saliency_saturates():
    logits = torch.full((1, 4), -60.0, requires_grad=True)
    target = torch.tensor([[1.0, 0.5, 0.0, 0.2]])
    from pipeline.stages.fgcs import feedback_loss

    feedback_loss(logits, target, torch.ones(1, 4, dtype=torch.bool), 0.1).backward()
    assert (logits.grad[0, [0, 1, 3]] < -0.01).all()  # pulls the important tokens' logits up


def test_explore_temperature_samples_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 8, generator=gen(9))
    batch = TokenBatch.from_tokens(x, layout=(1, 8, 8))
    plain = FGCS(dim=8, retention_ratio=0.25, hidden_dim=16)
    explore = FGCS(dim=8, retention_ratio=0.25, hidden_dim=16, explore_temperature=1.0)
    explore.load_state_dict(plain.state_dict())
    with torch.no_grad():
        ref = plain.eval()(batch).index
        assert torch.equal(explore.eval()(batch).index, ref)  # eval: deterministic, no noise
        assert torch.equal(plain.train()(batch).index, ref)  # temperature 0: the plain top-k
        torch.manual_seed(1)
        picks = [explore.train()(batch).index for _ in range(4)]
    assert any(not torch.equal(p, ref) for p in picks)  # training explores
    assert all(p.shape == ref.shape for p in picks)  # always exactly the budget
    # a large temperature approaches uniform sampling; a tiny one the plain top-k
    tiny = FGCS(dim=8, retention_ratio=0.25, hidden_dim=16, explore_temperature=1e-6)
    tiny.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(tiny.train()(batch).index, ref)


def test_feedback_off_in_eval_and_without_grad():
    stage = FGCS(dim=8, retention_ratio=0.5, hidden_dim=16).eval()
    x = torch.randn(1, 9, 8, requires_grad=True)
    stage(TokenBatch.from_tokens(x, layout=(1, 3, 3))).tokens.sum().backward()
    assert stage.last_feedback == {}


# ------------------------------------------------------------------------------------ merging
def slow_merge(tokens, keys, mask, keep):
    out = tokens.clone()
    for b in range(tokens.shape[0]):
        kept = [i for i in range(tokens.shape[1]) if keep[b, i] and mask[b, i]]
        if not kept:
            continue
        groups = {k: [k] for k in kept}
        for i in range(tokens.shape[1]):
            if mask[b, i] and i not in groups:
                sims = [torch.nn.functional.cosine_similarity(keys[b, i], keys[b, k], dim=0) for k in kept]
                best = max(range(len(kept)), key=lambda j: (float(sims[j]), -j))  # ties: earlier kept token
                groups[kept[best]].append(i)
        for k, members in groups.items():
            out[b, k] = torch.stack([tokens[b, m] for m in members]).mean(0)
    return out


def test_merge_into_kept_matches_slow_reference_and_keeps_the_sum():
    from pipeline.ops import merge_into_kept

    tokens = torch.randn(3, 10, 6, generator=gen(4))
    keys = torch.randn(3, 10, 5, generator=gen(5))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    keep = torch.rand(3, 10, generator=gen(6)) < 0.3
    keep[0, 0] = True
    keep[2] = False  # a row that keeps nothing is left alone
    got = merge_into_kept(tokens, keys, mask, keep)
    torch.testing.assert_close(got, slow_merge(tokens, keys, mask, keep))
    # every real token of rows 0-1 is in exactly one kept group: sum(size * mean) = sum of the row
    for b in range(2):
        k = keep[b] & mask[b]
        sizes = torch.zeros(10)
        assign = torch.where(k, torch.arange(10), (torch.nn.functional.normalize(keys[b], dim=-1)
                             @ torch.nn.functional.normalize(keys[b], dim=-1).T).masked_fill(~k, -1e9).argmax(-1))
        sizes.scatter_add_(0, assign[mask[b]], torch.ones(int(mask[b].sum())))
        torch.testing.assert_close((got[b][k] * sizes[k, None]).sum(0), tokens[b][mask[b]].sum(0))


def test_fgcs_merge_reaches_pruned_tokens_with_gradient_and_feedback():
    torch.manual_seed(0)
    stage = FGCS(dim=8, retention_ratio=0.25, hidden_dim=16, merge_pruned=True).train()
    assert not stage.selects_tokens
    x = torch.randn(2, 16, 8, generator=gen(7))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    tokens = x.clone().requires_grad_(True)
    out = stage(TokenBatch.from_tokens(tokens, mask, layout=torch.tensor([[1, 4, 4], [1, 3, 4]])))
    assert out.mask.sum(1).tolist() == [4, 3]
    w = torch.randn(out.tokens.shape, generator=gen(8))
    (out.tokens * w * out.mask.unsqueeze(-1)).sum().backward()
    pruned = out.pruned.index[out.pruned.mask]
    rows = out.pruned.mask.nonzero()[:, 0]
    assert (tokens.grad[rows, pruned].abs().sum(-1) > 0).all(), "every pruned token reaches the loss"
    assert tokens.grad[1, 12:].abs().sum() == 0
    target = stage.last_feedback["target"]
    assert (target[rows, pruned] > 0).all() and (target[1, 12:] == 0).all()
    # eval: the kept values are the merged means; pruned keeps each token's own value
    stage.eval()
    with torch.no_grad():
        ev = stage(TokenBatch.from_tokens(x, mask, layout=torch.tensor([[1, 4, 4], [1, 3, 4]])))
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[ev.mask.nonzero()[:, 0], ev.index[ev.mask]] = True
    ref = slow_merge(x, x, mask, keep)
    torch.testing.assert_close(ev.tokens[ev.mask], ref[keep])
    torch.testing.assert_close(ev.pruned.tokens[ev.pruned.mask], x[ev.pruned.mask.nonzero()[:, 0], ev.pruned.index[ev.pruned.mask]])


# ------------------------------------------------------------------------------------ groups
def slow_grid(t_len, h_len, w_len, radius=2):
    out = {}
    for t in range(t_len):
        for h in range(h_len):
            for w in range(w_len):
                nb = set()
                for dh in (-1, 0, 1):
                    for dw in (-1, 0, 1):
                        if (dh, dw) != (0, 0) and 0 <= h + dh < h_len and 0 <= w + dw < w_len:
                            nb.add(t * h_len * w_len + (h + dh) * w_len + w + dw)
                for dt in range(-radius, radius + 1):
                    if dt and 0 <= t + dt < t_len:
                        nb.add((t + dt) * h_len * w_len + h * w_len + w)
                out[t * h_len * w_len + h * w_len + w] = nb
    return out


def neighbour_sets(pos, valid, index, row=0):
    return {
        int(index[row, i]): {int(index[row, p]) for p, v in zip(pos[row, i], valid[row, i]) if v}
        for i in range(pos.shape[1])
    }


def full_grid(t_len, h_len, w_len):
    """Neighbour sets of every token of one unpruned (T, H, W) row, checked against the slow reference."""
    n = t_len * h_len * w_len
    index = torch.arange(n)[None]
    pos, valid = grid_neighbours(index, torch.ones(1, n, dtype=torch.bool), torch.tensor([[t_len, h_len, w_len]]))
    got = neighbour_sets(pos, valid, index)
    assert got == slow_grid(t_len, h_len, w_len)
    return got


def test_image_neighbours_corners_edges_interior():
    got = full_grid(1, 3, 4)
    assert len(got[0]) == 3 and len(got[11]) == 3  # corners
    assert len(got[1]) == 5 and len(got[4]) == 5  # top edge, left edge
    assert len(got[5]) == 8  # interior
    assert got[0] == {1, 4, 5}


def test_video_neighbours_first_and_last_frames():
    got = full_grid(4, 2, 2)
    assert got[0] == {1, 2, 3, 4, 8}  # frame 0: 3 spatial + frames 1 and 2
    assert got[15] == {12, 13, 14, 11, 7}  # last frame: 3 spatial + frames 2 and 1
    assert got[5] == {4, 6, 7, 1, 9, 13}  # frame 1: frames 0, 2, 3 (frame -1 does not exist)


def test_neighbours_skip_tokens_an_earlier_reducer_removed():
    # tokens 5 and 6 of a 3x4 image were pruned: current positions skip them
    index = torch.tensor([[0, 1, 2, 3, 4, 7, 8, 9, 10, 11]])
    pos, valid = grid_neighbours(index, torch.ones(1, 10, dtype=torch.bool), torch.tensor([[1, 3, 4]]))
    got = neighbour_sets(pos, valid, index)
    ref = {k: v - {5, 6} for k, v in slow_grid(1, 3, 4).items() if k not in (5, 6)}
    assert got == ref


@pytest.mark.parametrize("n,k", [(8, 5), (4, 5), (6, 5), (2, 5)])
def test_text_neighbours_top_k_by_cosine_and_k_larger_than_row(n, k):
    f = torch.randn(1, n, 6, generator=gen(n))
    pos, valid = text_neighbours(f, torch.ones(1, n, dtype=torch.bool), k)
    assert pos.shape == (1, n, min(k, n - 1)) and valid.all()
    fn = torch.nn.functional.normalize(f[0], dim=-1)
    for i in range(n):
        sims = sorted(((float(fn[i] @ fn[j]), j) for j in range(n) if j != i), reverse=True)
        assert set(pos[0, i].tolist()) == {j for _, j in sims[: min(k, n - 1)]}


def test_text_neighbours_ignore_padding():
    f = torch.randn(1, 6, 4, generator=gen(3))
    mask = torch.tensor([[True, True, True, False, False, False]])
    pos, valid = text_neighbours(f, mask, 5)
    for i in range(3):
        assert set(pos[0, i][valid[0, i]].tolist()) == {0, 1, 2} - {i}


def test_mixed_modalities_share_a_batch_and_group_mean_matches_loop():
    b, n = 2, 9
    feats = torch.randn(b, n, 4, generator=gen(5))
    scores = torch.randn(b, n, generator=gen(6))
    index = torch.arange(n).expand(b, n)
    mask = torch.ones(b, n, dtype=torch.bool)
    modality = torch.tensor([int(Modality.IMAGE), int(Modality.TEXT)])
    layout = torch.tensor([[1, 3, 3], [1, 1, 9]])
    pos, valid = group_neighbours(index, mask, modality, layout, feats, text_k=5)
    mean = group_mean(scores, pos, valid)
    grid = slow_grid(1, 3, 3)
    for i in range(n):
        torch.testing.assert_close(mean[0, i], scores[0, sorted(grid[i])].mean())
    tpos, _ = text_neighbours(feats[1:], mask[1:], 5)
    for i in range(n):
        torch.testing.assert_close(mean[1, i], scores[1, tpos[0, i]].mean())


def test_group_weight_changes_selection_toward_dense_regions():
    """With group_weight, a lone high-saliency token loses to a cluster of moderately salient ones."""
    stage = FGCS(dim=4, retention_ratio=1 / 9, hidden_dim=4, semantic_weight=1.0, group_weight=2.0).eval()
    logits = torch.zeros(1, 9)
    logits[0, 0] = 1.0  # lone corner token
    logits[0, [4, 5, 7, 8]] = 0.8  # a 2x2 cluster
    batch = TokenBatch.from_tokens(torch.randn(1, 9, 4), layout=(1, 3, 3))
    score = stage.combine(batch, logits)
    assert int(score.argmax()) in (4, 5, 7, 8)
    assert int((stage.semantic_weight * logits).argmax()) == 0


# ------------------------------------------------------------------------------------ facade
def test_deft_module_matches_seed_signature():
    init = inspect.signature(DeFTModule.__init__).parameters
    assert list(init)[1:7] == ["token_dim", "semantic_dim", "retention_ratio", "enable_rtd", "alpha_var", "rtd_bottleneck_ratio"]
    assert [init[k].default for k in list(init)[2:7]] == [512, 0.482, True, 0.1, 4]
    fwd = inspect.signature(DeFTModule.forward).parameters
    assert list(fwd)[1:6] == ["tokens", "modality", "spatial_shape", "task_loss", "inference_mode"]
    assert fwd["inference_mode"].default == "fast" and fwd["task_loss"].default is None


@pytest.mark.parametrize("mode", ["fast", "hybrid", "adaptive"])
def test_deft_module_modes_give_documented_shapes(mode):
    torch.manual_seed(0)
    deft = DeFTModule(token_dim=16, semantic_dim=32, retention_ratio=0.25).eval()
    x = torch.randn(3, 64, 16)
    out = deft(tokens=x, modality="image", spatial_shape=(8, 8), inference_mode=mode)
    assert {"retained_tokens", "retained_indices", "retained_mask", "pruned_indices", "scores", "losses"} <= set(out)
    kept = math.ceil(0.25 * 64)
    recovered = math.ceil(0.25 * (64 - kept))
    counts = out["retained_mask"].sum(1)
    if mode == "fast":
        assert out["retained_tokens"].shape == (3, kept, 16) and (counts == kept).all()
    elif mode == "hybrid":
        assert out["retained_tokens"].shape == (3, kept + recovered, 16) and (counts == kept + recovered).all()
    else:  # per row: either fast or hybrid
        assert set(counts.tolist()) <= {kept, kept + recovered}
    assert (out["retained_mask"].sum(1) + out["pruned_mask"].sum(1) == 64).all()
    idx = out["retained_indices"]
    assert (idx[:, 1:] > idx[:, :-1]).all()


def test_deft_module_unbatched_video_text_audio_and_errors():
    deft = DeFTModule(token_dim=8, semantic_dim=16, retention_ratio=0.5, enable_rtd=False).eval()
    out = deft(tokens=torch.randn(2 * 2 * 3, 8), modality="video", spatial_shape=(2, 2, 3))
    assert out["retained_tokens"].shape == (6, 8) and out["retained_indices"].shape == (6,)
    assert deft(tokens=torch.randn(7, 8), modality="text")["retained_tokens"].shape == (4, 8)
    assert deft(tokens=torch.randn(5, 8), modality="audio")["retained_tokens"].shape == (3, 8)
    with pytest.raises(ValueError, match=r"spatial_shape \(3, 3\) covers 9 tokens, but tokens has 12"):
        deft(tokens=torch.randn(12, 8), spatial_shape=(3, 3))
    with pytest.raises(ValueError, match="modality 'image' needs spatial_shape"):
        deft(tokens=torch.randn(12, 8))
    with pytest.raises(ValueError, match="inference_mode 'hybrid' needs RTD"):
        deft(tokens=torch.randn(9, 8), spatial_shape=(3, 3), inference_mode="hybrid")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        deft(tokens=torch.randn(9, 8), modality="smell")


def test_deft_module_task_loss_gives_feedback_loss():
    torch.manual_seed(0)
    deft = DeFTModule(token_dim=8, semantic_dim=16, retention_ratio=0.5).train()
    x = torch.randn(2, 9, 8, requires_grad=True)
    task_loss = (x * torch.randn(2, 9, 8)).sum()  # e.g. the loss of a pass that saw every token
    out = deft(tokens=x, modality="image", spatial_shape=(3, 3), task_loss=task_loss)
    assert set(out["losses"]) == {"rtd_recon", "fgcs_feedback"}
    assert out["losses"]["fgcs_feedback"] > 0
    out["losses"]["fgcs_feedback"].backward()
    assert deft.fgcs.saliency[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="task_loss does not depend on the tokens"):
        y = torch.randn(2, 9, 8, requires_grad=True)
        deft(tokens=y, spatial_shape=(3, 3), task_loss=(torch.randn(3, requires_grad=True) ** 2).sum())


def test_deft_module_is_the_config_pipeline():
    a = DeFTModule(token_dim=16, retention_ratio=0.25)
    b = build_pipeline("configs/pipeline/deft.yaml", dim=16)
    assert a.pipeline.names == b.names


# ------------------------------------------------------------------------------------ model
def test_use_deft_model_trains_end_to_end_with_feedback():
    from llava_deft.model import LlavaDeftForCausalLM

    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"use_deft": True, "deft_retention_ratio": 0.25, "deft_semantic_dim": 32}).train()
    out = model(**collate(model, samples()))
    assert out.stats["fgcs"]["tokens_out"] == math.ceil(0.25 * model.media_tokens_per_image)
    assert "rtd_recon" in out.aux_losses
    out.loss.backward()
    fgcs = model.pipeline.stages[1]
    assert "loss" in fgcs.last_feedback and fgcs.last_feedback["target"].max() == 1
    assert fgcs.saliency[0].weight.grad.abs().sum() > 0
    assert model.pipeline.stages[2].encoder.weight.grad.abs().sum() > 0


def test_feedback_signals_differ_where_gradient_times_input_cancels():
    """A token whose gradient is orthogonal to its value has no ``dot`` importance (the cancellation that
    hid pass-key's first digit) but keeps its ``l1`` and ``grad_norm`` importance."""
    from pipeline.stages.fgcs import feedback_importance

    x = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # (1, 2, 2)
    g = torch.tensor([[[1.0, -1.0], [0.5, 0.0]]])
    torch.testing.assert_close(feedback_importance(g, x, "dot"), torch.tensor([[0.0, 0.5]]))
    torch.testing.assert_close(feedback_importance(g, x, "l1"), torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(feedback_importance(g, x, "grad_norm"), torch.tensor([[math.sqrt(2.0), 0.5]]))
    with pytest.raises(ValueError, match=r"unknown feedback_signal 'sum'; choose one of \['l1', 'dot', 'grad_norm'\]"):
        feedback_importance(g, x, "sum")


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_top_feedback_target_labels_each_rows_most_important_share(share):
    """feedback_target='top': 1 at the ceil(share * n) most important kept tokens of each row (slow loop
    reference, ties to the earlier token), 0 elsewhere; the head is fitted to it in the same backward."""
    torch.manual_seed(0)
    stage = FGCS(dim=8, retention_ratio=0.75, hidden_dim=16, feedback_target="top", feedback_top=share)
    stage.train()
    x = torch.randn(2, 12, 8, generator=gen(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    out = stage(TokenBatch.from_tokens(x.clone().requires_grad_(True), mask, layout=torch.tensor([[1, 3, 4], [1, 3, 3]])))
    w = torch.randn(out.tokens.shape, generator=gen(2))
    (out.tokens * w * out.mask.unsqueeze(-1)).sum().backward()
    fb = stage.last_feedback
    for b in range(2):
        kept = [int(p) for p in out.index[b][out.mask[b]]]
        imp = {p: float(fb["importance"][b, p]) for p in kept}
        k = math.ceil(share * len(kept))
        top = sorted(kept, key=lambda p: (-imp[p], p))[:k]
        expected = torch.tensor([1.0 if p in top else 0.0 for p in range(12)])
        torch.testing.assert_close(fb["target"][b], expected)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.saliency.parameters())


def test_group_mean_is_the_same_whether_or_not_the_host_knows_there_is_no_text_row():
    """group_neighbours skips the text neighbours when ``kinds`` rules text out; the group means equal
    those of the unknown case (where they are computed for every row and masked off non-text rows)."""
    g = torch.Generator().manual_seed(3)
    index = torch.arange(16).expand(2, 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    layout = torch.tensor([[1, 4, 4], [1, 4, 4]])
    modality = torch.full((2,), int(Modality.IMAGE))
    feats, logits = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, generator=g)
    known = group_neighbours(index, mask, modality, layout, feats, kinds=frozenset({int(Modality.IMAGE)}))
    unknown = group_neighbours(index, mask, modality, layout, feats)
    assert known[0].shape[-1] < unknown[0].shape[-1]  # the text neighbours were not computed
    torch.testing.assert_close(group_mean(logits, *known), group_mean(logits, *unknown))
