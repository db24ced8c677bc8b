"""Question-aware fgcs (``query_weight`` > 0): the relevance of each token to its row's prompt joins the
saliency logit. Off (0) it is DeFT exactly; the relevance equals a slow reference; a token pointing where
the question points is kept; the feedback target trains the query projections; the model gives each row
its own sample's prompt (never the answer), in training and in generation; TokenBatch carries the query."""

from __future__ import annotations

import math

import pytest
import torch

from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.splice import IGNORE_INDEX
from pipeline import DeFTModule, Modality, TokenBatch, build_pipeline
from pipeline.group import group_mean, group_neighbours
from pipeline.stages.fgcs import FGCS, QUERY_EPS, query_relevance
from tests.batching import assert_generate_matches_one_at_a_time, pipeline_inputs
from tests.test_deft import slow_feedback_loss
from tests.test_model import collate, image, samples

D = 8
LAYOUT = torch.tensor([[1, 3, 4], [1, 3, 3]])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ragged(seed=1, query=True):
    """Two rows (12 and 9 real tokens, D=8) and, with ``query``, 4 / 2 real query tokens (padding garbage)."""
    x = torch.randn(2, 12, D, generator=gen(seed))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    q = qm = None
    if query:
        q = torch.randn(2, 4, D, generator=gen(seed + 10))
        qm = torch.tensor([[True, True, True, True], [False, True, False, True]])
        q = torch.where(qm[..., None], q, 100 * torch.randn(2, 4, D, generator=gen(seed + 20)))
    return x, mask, q, qm


def fgcs(seed=0, **options):
    torch.manual_seed(seed)
    return FGCS(dim=D, retention_ratio=0.5, hidden_dim=16, **options)


# ------------------------------------------------------------------------------------ off = DeFT exactly
@pytest.mark.parametrize("with_query", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_query_weight_zero_is_deft_bit_for_bit(with_query, train):
    """query_weight 0 builds nothing new, computes nothing new: parameters, init, scores, selection and
    gradients equal the default stage's (and the old formula), whether or not the batch carries a query."""
    old, new = fgcs(), fgcs(query_weight=0.0, query_dim=16)
    assert not new.needs_query and not hasattr(new, "query_proj")
    assert old.state_dict().keys() == new.state_dict().keys()
    for k, v in old.state_dict().items():
        assert torch.equal(v, new.state_dict()[k])
    x, mask, q, qm = ragged()
    outs = []
    for stage, query in ((old, False), (new, with_query)):
        stage.train(train)
        tokens = x.clone().requires_grad_(True)
        batch = TokenBatch.from_tokens(tokens, mask, layout=LAYOUT, query=q if query else None,
                                       query_mask=qm if query else None)
        out = stage(batch)
        (out.tokens * torch.randn(out.tokens.shape, generator=gen(2)) * out.mask[..., None]).sum().backward()
        outs.append((out, tokens.grad, {n: p.grad for n, p in stage.named_parameters()}))
    (a, ga, pa), (b, gb, pb) = outs
    for field in ("tokens", "mask", "index", "scores"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(ga, gb) and pa.keys() == pb.keys()
    for n in pa:  # in eval the scorer gets no gradient (no gate): None on both sides
        assert (pa[n] is None and pb[n] is None) if not train else torch.equal(pa[n], pb[n]), n
    # the old formula: semantic_weight * s + group_weight * mean(s over the token's group), s = the MLP's logit
    with torch.no_grad():
        s = new.saliency(x).squeeze(-1)
        pos, valid = group_neighbours(torch.arange(12).expand(2, 12), mask, torch.zeros(2, dtype=torch.long),
                                      LAYOUT, x, 5, 2)
        score = 1.0 * s + 0.5 * group_mean(s, pos, valid)
        assert torch.equal(new.score(TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q, query_mask=qm)), score)


# ------------------------------------------------------------------------------------ the relevance
def slow_relevance(q, k, qm, mask):
    """r_i = log(n * mean_j softmax_i(q_j . k_i / sqrt(d)) + eps) with explicit loops; 0 elsewhere."""
    b_n, n_q, d = q.shape
    r = torch.zeros(b_n, k.shape[1], dtype=torch.float64)
    for b in range(b_n):
        toks = [i for i in range(k.shape[1]) if mask[b, i]]
        qs = [j for j in range(n_q) if qm[b, j]]
        if not toks or not qs:
            continue
        a = {i: 0.0 for i in toks}
        for j in qs:
            e = {i: math.exp(sum(float(q[b, j, c]) * float(k[b, i, c]) for c in range(d)) / math.sqrt(d)) for i in toks}
            z = sum(e.values())
            for i in toks:
                a[i] += e[i] / z / len(qs)
        for i in toks:
            r[b, i] = math.log(len(toks) * a[i] + QUERY_EPS)
    return r


def test_relevance_equals_slow_reference_with_padding_everywhere():
    g = gen(5)
    q, k = torch.randn(4, 5, 6, generator=g), torch.randn(4, 7, 6, generator=g)
    qm = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    k = torch.where(mask[..., None], k, 1e4 * torch.randn(4, 7, 6, generator=g))  # padding: garbage, ignored
    r = query_relevance(q, k, qm, mask)
    torch.testing.assert_close(r, slow_relevance(q, k, qm, mask).float(), rtol=1e-5, atol=1e-5)
    assert torch.all(r[2] == 0), "a row without a valid query token gets r = 0"
    assert torch.all(r[~mask] == 0) and torch.all(r[3, 0].abs() < 1e-5), "one real token: uniform, r = log(1 + eps)"
    uniform = query_relevance(torch.zeros(1, 2, 6), k[:1], torch.ones(1, 2, dtype=torch.bool), mask[:1])
    torch.testing.assert_close(uniform, torch.full((1, 7), math.log(1 + QUERY_EPS)))


def test_stage_relevance_projects_query_and_inputs_and_enters_the_saliency_logit():
    stage = fgcs(query_weight=2.5, query_dim=6, group_weight=0.0).eval()
    x, mask, q, qm = ragged()
    batch = TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q, query_mask=qm)
    with torch.no_grad():
        r = stage.relevance(batch)
        qp = stage.query_proj(torch.where(qm[..., None], q, 0))
        kp = stage.key_proj(x)
        torch.testing.assert_close(r, slow_relevance(qp, kp, qm, mask).float(), rtol=1e-5, atol=1e-5)
        s = stage.saliency(x).squeeze(-1)
        torch.testing.assert_close(stage.saliency_logits(batch), s + 2.5 * r)
        out = stage(batch)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        top = (s[b] + 2.5 * r[b]).masked_fill(~mask[b], -1e9).topk(int(math.ceil(0.5 * int(mask[b].sum())))).indices
        keep[b, top] = True
        assert out.index[b][out.mask[b]].tolist() == sorted(top.tolist())


@pytest.mark.parametrize("modality", list(Modality))
def test_token_pointing_where_the_question_points_is_ranked_first(modality):
    """W_q = W_k = I and a silent MLP: the token most aligned with the query wins, per row, for every
    modality, whatever the padded query tokens hold."""
    stage = FGCS(dim=D, retention_ratio=0.08, hidden_dim=4, group_weight=0.0, query_weight=10.0, query_dim=D).eval()
    with torch.no_grad():
        stage.query_proj.weight.copy_(torch.eye(D))
        stage.key_proj.weight.copy_(torch.eye(D))
        stage.saliency[-1].weight.zero_()
        stage.saliency[-1].bias.zero_()
    x = torch.nn.functional.normalize(torch.randn(2, 12, D, generator=gen(3)), dim=-1) * 3
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    targets = [7, 2]
    query = torch.randn(2, 3, D, generator=gen(4))
    qm = torch.tensor([[True, False, False], [False, False, True]])
    query[0, 0], query[1, 2] = x[0, 7] * 2, x[1, 2] * 2  # the question "is" token 7 (row 0), token 2 (row 1)
    query[0, 1:], query[1, :2] = x[0, 0] * 5, x[1, 0] * 5  # padding points elsewhere: must not count
    layout = (torch.tensor([[12, 1, 1], [9, 1, 1]]) if modality in (Modality.AUDIO, Modality.TEXT)
              else torch.tensor([[1, 3, 4], [1, 3, 3]]))
    batch = TokenBatch.from_tokens(x, mask, modality=modality, layout=layout, query=query, query_mask=qm)
    out = stage(batch)
    for b, t in enumerate(targets):
        assert out.index[b][out.mask[b]].tolist() == [t]
        assert int(stage.relevance(batch)[b].masked_fill(~mask[b], -1e9).argmax()) == t


# ------------------------------------------------------------------------------------ training
def run_query_fgcs(feedback_weight):
    stage = fgcs(query_weight=1.0, query_dim=6, feedback_weight=feedback_weight).train()
    x, mask, q, qm = ragged()
    tokens = x.clone().requires_grad_(True)
    out = stage(TokenBatch.from_tokens(tokens, mask, layout=LAYOUT, query=q, query_mask=qm))
    w = torch.randn(out.tokens.shape, generator=gen(2))
    (out.tokens * w * out.mask.unsqueeze(-1)).sum().backward()
    return stage, x, mask, q, qm, out, {n: p.grad.clone() for n, p in stage.named_parameters()}


def test_feedback_target_trains_the_query_projections_in_the_same_backward():
    """Gradients with feedback minus without = d(feedback loss on s + r)/d params, and that is non-zero
    on W_q and W_k: the feedback target fits the question-aware logit."""
    stage, x, mask, q, qm, out, with_fb = run_query_fgcs(1.0)
    *_, without = run_query_fgcs(0.0)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        keep[b, out.index[b][out.mask[b]]] = True
    stage.zero_grad()
    logits = stage.saliency_logits(TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q, query_mask=qm))
    slow_feedback_loss(logits, stage.last_feedback["target"], keep, stage.alpha_var).backward()
    for name, p in stage.named_parameters():
        torch.testing.assert_close(with_fb[name] - without[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("query_proj.weight", "key_proj.weight"):
        assert (with_fb[name] - without[name]).abs().sum() > 0, f"the feedback target does not reach {name}"


def test_missing_query_is_refused_and_deft_module_takes_one():
    stage = fgcs(query_weight=1.0)
    x, mask, q, qm = ragged()
    with pytest.raises(ValueError, match=r"query_weight=1.0 .* the batch has no `query`.*query_weight: 0"):
        stage(TokenBatch.from_tokens(x, mask, layout=LAYOUT))
    torch.manual_seed(0)
    deft = DeFTModule(token_dim=D, semantic_dim=16, retention_ratio=0.5, query_weight=1.0).eval()
    out = deft(x[0], modality="image", spatial_shape=(3, 4), query=q[0], query_mask=qm[0])
    assert out["retained_tokens"].shape == (6, D)
    with pytest.raises(ValueError, match="no `query`"):
        deft(x[0], modality="image", spatial_shape=(3, 4))


# ------------------------------------------------------------------------------------ TokenBatch
def test_token_batch_validates_and_carries_the_query():
    x, mask, q, qm = ragged()
    b = TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q)
    assert b.query_mask.all() and b.query_mask.shape == (2, 4)
    for bad, match in ((torch.randn(3, 4, D), r"query must be \(B, Q, D\) = \(2, Q, 8\)"),
                       (torch.randn(2, 4, D + 1), r"query must be"), (torch.randn(2, 4), r"query must be")):
        with pytest.raises(ValueError, match=match):
            TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=bad)
    with pytest.raises(ValueError, match=r"query_mask must be \(2, 4\)"):
        TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q, query_mask=qm[:, :3])
    with pytest.raises(ValueError, match="query_mask was given without a query"):
        TokenBatch.from_tokens(x, mask, layout=LAYOUT, query_mask=qm)
    with pytest.raises(ValueError, match="float"):
        TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q.long())

    a = TokenBatch.from_tokens(x, mask, layout=LAYOUT, query=q, query_mask=qm)
    short = TokenBatch.from_tokens(torch.randn(1, 5, D), query=torch.randn(1, 2, D))
    plain = TokenBatch.from_tokens(torch.randn(1, 3, D))
    cat = TokenBatch.cat_rows([a, plain, short])
    assert cat.query.shape == (4, 4, D) and cat.query_mask.tolist() == [
        *qm.tolist(), [False] * 4, [True, True, False, False]]
    assert torch.equal(cat.query[:2], q) and torch.equal(cat.query[3, :2], short.query[0])
    assert torch.all(cat.query[2] == 0) and torch.all(cat.query[3, 2:] == 0)
    taken = cat.take_rows(torch.tensor([3, 0]))
    assert torch.equal(taken.query, cat.query[[3, 0]]) and torch.equal(taken.query_mask, cat.query_mask[[3, 0]])
    assert TokenBatch.cat_rows([plain, plain]).query is None
    # stages keep every row in order, so the query rides along through a whole pipeline untouched
    torch.manual_seed(0)
    pipe = build_pipeline([{"name": "sam", "semantic_dim": 16}, {"name": "fgcs", "query_weight": 1.0, "query_dim": 4},
                           {"name": "pool", "retention_ratio": 0.5}, {"name": "rtd", "mode": "hybrid"}], dim=D).eval()
    out = pipe(a)
    assert out.query is a.query and out.query_mask is a.query_mask


# ------------------------------------------------------------------------------------ the model
QPIPE = {"stages": [{"name": "sam", "semantic_dim": 32},
                    {"name": "fgcs", "retention_ratio": 0.25, "hidden_dim": 32, "query_weight": 1.0, "query_dim": 16}]}


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"pipeline": QPIPE}).eval()


def fgcs_outputs(model, batch, **kwargs):
    """(input, output) TokenBatch of the model's fgcs stage in one forward (or ``generate`` with kwargs)."""
    seen = []
    stage = model.pipeline.stages[1]
    hook = stage.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad():
            model.generate(**batch, **kwargs) if kwargs else model(**batch)
    finally:
        hook.remove()
    return seen


def test_models_without_a_query_stage_attach_no_query(tiny_model):
    assert not tiny_model.needs_query()
    (rows,) = pipeline_inputs(tiny_model, collate(tiny_model, samples()))
    assert rows.query is None and rows.query_mask is None


def test_each_row_gets_its_own_samples_prompt_never_the_answer(qmodel):
    assert qmodel.needs_query()
    batch = collate(qmodel, samples())  # a: 1 image; b: none; c: 2 images
    (rows,) = pipeline_inputs(qmodel, batch)
    ids, labels = batch["input_ids"], batch["labels"]
    text = qmodel.llm.embed(ids)
    tok = qmodel.tokenizer
    for row, sample in enumerate([0, 2, 2]):
        assert torch.equal(rows.query[row], text[sample])
        # prompt tokens only: no placeholder, special, padding or answer token, nor the template after the answer
        prompt = ids[sample][rows.query_mask[row]]
        assert tok.decode(prompt) == {0: "USER: \nwhat shape is this?\nASSISTANT:", 2: "USER: \n\nsame color?\nASSISTANT:"}[sample]
        assert not (rows.query_mask[row] & (labels[sample] != IGNORE_INDEX)).any()
    assert not rows.query.requires_grad, "the query is detached from the LLM's embeddings"


def test_answer_tokens_do_not_change_the_selection_but_the_question_does(qmodel):
    def selection(question, answer):
        item = {"id": "x", "messages": [{"role": "user", "content": f"<image>\n{question}"},
                                        {"role": "assistant", "content": answer}], "images": [image(0)]}
        _, out = fgcs_outputs(qmodel, collate(qmodel, [item]))[0]
        return out.index[out.mask].tolist(), out.scores[out.mask]

    base, scores = selection("what shape is this?", "circle")
    other, other_scores = selection("what shape is this?", "a much longer answer about a red triangle")
    assert base == other
    torch.testing.assert_close(scores, other_scores, rtol=1e-6, atol=1e-6)
    _, asked = selection("which colour is the top left corner?", "circle")
    assert not torch.allclose(asked, scores), "the question's text must change the relevance"


def test_training_query_equals_generation_query_and_batched_generation_matches(qmodel):
    items = samples()
    train = fgcs_outputs(qmodel, collate(qmodel, items))[0]
    gen_ = fgcs_outputs(qmodel, collate(qmodel, items, generation=True), max_new_tokens=2)[0]
    for (a_in, a_out), (b_in, b_out) in ((train, gen_),):
        for r in range(a_in.query.shape[0]):
            torch.testing.assert_close(a_in.query[r][a_in.query_mask[r]], b_in.query[r][b_in.query_mask[r]])
        assert torch.equal(a_out.index[a_out.mask], b_out.index[b_out.mask])
        torch.testing.assert_close(a_out.scores, b_out.scores, rtol=1e-5, atol=1e-5)
    assert_generate_matches_one_at_a_time(qmodel, items, lambda xs: collate(qmodel, xs, generation=True))


def test_shipped_deft_q_generates_and_trains_every_parameter():
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"pipeline": "configs/pipeline/deft_q.yaml"})
    assert model.needs_query() and model.pipeline.stages[1].query_weight == 1.0
    out, info = model.eval().generate(**collate(model, samples(), generation=True), max_new_tokens=3, return_info=True)
    assert out.shape == (3, 3) and [len(m) for m in info.media] == [1, 0, 2]
    model.train()
    for items in (samples(), [samples()[1]]):  # with images; text only (the blank image, an empty query)
        model.zero_grad()
        model(**collate(model, items)).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} was not in the graph ({[i['id'] for i in items]})"
    model.zero_grad()
    model(**collate(model, samples())).loss.backward()
    fgcs_stage = model.pipeline.stages[1]
    assert fgcs_stage.query_proj.weight.grad.abs().sum() > 0 and fgcs_stage.key_proj.weight.grad.abs().sum() > 0
    assert "loss" in fgcs_stage.last_feedback


def test_text_rows_get_the_question_of_their_sample(qmodel):
    passage = "The quiet farmer paints the wooden bridge. The pass key of the red door is 48213. The blue door's is 771."
    items = [{"id": "p", "messages": [{"role": "user", "content": "<text>\nWhat is the pass key of the red door?"},
                                      {"role": "assistant", "content": "48213"}], "texts": [passage]},
             samples()[0]]
    batch = collate(qmodel, items)
    (rows,) = pipeline_inputs(qmodel, batch)
    assert rows.modality.tolist() == [Modality.TEXT, Modality.IMAGE]
    assert qmodel.tokenizer.decode(batch["input_ids"][0][rows.query_mask[0]]) == \
        "USER: \nWhat is the pass key of the red door?\nASSISTANT:"
    assert qmodel.tokenizer.decode(batch["input_ids"][1][rows.query_mask[1]]) == "USER: \nwhat shape is this?\nASSISTANT:"
    (_, out), = fgcs_outputs(qmodel, batch)
    assert out.mask.sum(1).tolist() == [math.ceil(0.25 * int(rows.mask[0].sum())), 16]


def module_order(model, batch) -> list[str]:
    """The order in which one training forward first enters the modules ZeRO-3 gathers."""
    watched = {"vision": model.vision, "projector": model.projector, "embed": model.llm.hf.get_input_embeddings(),
               **{f"pipeline.{s.stage_name}": s for s in model.pipeline.stages}}
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: seen.append(name)) for name, m in watched.items()]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [n for i, n in enumerate(seen) if n not in seen[:i]]


@pytest.mark.parametrize("query", [False, True])
def test_every_batch_enters_the_modules_in_one_order(query, tiny_model, qmodel):
    """ZeRO-3 gathers parameters in module order, and two ranks in one step may hold an image batch and a
    text-only one (the blank image): the order must not depend on the batch. (The query pipeline embeds the
    prompt before the pipeline runs; a text-only rank embedding before its blank image hung ZeRO-3.)"""
    model = qmodel if query else tiny_model
    with_image, text_only = (module_order(model, collate(model, items)) for items in (samples()[:1], samples()[1:2]))
    assert with_image == text_only
    embed_first = ["vision", "projector", "embed", "pipeline.sam", "pipeline.fgcs"]
    assert with_image == (embed_first if query else ["vision", "projector", "pipeline.sam", "pipeline.fgcs", "embed"])


# ------------------------------------------------------------------------------------ query_keys / query_init
def test_tied_token_keys_point_at_the_question_word_before_any_training():
    """query_keys=tokens, query_init=tied: W_k starts equal to W_q, so (untrained) the token that equals a
    question token's embedding receives the most attention, with features from sam in the batch."""
    dim = 64
    torch.manual_seed(0)
    stage = FGCS(dim=dim, retention_ratio=0.1, hidden_dim=4, group_weight=0.0, query_weight=1.0, query_dim=48,
                 query_keys="tokens", query_init="tied", feature_dim=16).eval()
    assert torch.equal(stage.key_proj.weight, stage.query_proj.weight) and stage.key_proj.in_features == dim
    x = torch.randn(2, 20, dim, generator=gen(5))
    mask = torch.ones(2, 20, dtype=torch.bool)
    query = torch.randn(2, 2, dim, generator=gen(6))
    qm = torch.ones(2, 2, dtype=torch.bool)
    x[0, 13], x[1, 4] = query[0, 1], query[1, 0]  # the passage repeats a word of the question
    features = torch.randn(2, 20, 16, generator=gen(7))
    batch = TokenBatch.from_tokens(x, mask, modality=Modality.TEXT, layout=torch.tensor([[20, 1, 1]] * 2),
                                   query=query, query_mask=qm).replace(features=features)
    with torch.no_grad():
        r = stage.relevance(batch)
        # the keys are the tokens, not the features: the same as projecting x by hand
        ref = slow_relevance(stage.query_proj(query), stage.key_proj(x), qm, mask).float()
    torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-5)
    assert r[0].argmax().item() == 13 and r[1].argmax().item() == 4


def test_query_key_options_are_validated():
    with pytest.raises(ValueError, match=r"query_init='tied' needs keys as wide as the prompt embeddings \(8\), "
                                         r"but query_keys='input' gives width 16 \(the sam features\)"):
        FGCS(dim=D, query_weight=1.0, query_init="tied", feature_dim=16)
    FGCS(dim=D, query_weight=1.0, query_init="tied")  # keys = the tokens themselves: as wide as the query
    from pipeline import PipelineConfigError, validate_config

    with pytest.raises(PipelineConfigError, match="query_keys: Input should be 'input' or 'tokens'"):
        validate_config({"stages": [{"name": "fgcs", "query_keys": "features"}]})
