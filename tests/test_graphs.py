"""CapturedCall's plumbing on the CPU (issue 16): the structures it flattens come back whole, it never
captures off CUDA, and its state is never copied. The replay itself is tested on a GPU in
tests/test_static_decode_cuda.py (the whole model, every reducer)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from llava_deft.model.graphs import CapturedCall, GraphSlot, flatten, unflatten
from pipeline import TokenBatch, build_pipeline
from tests.conftest import TINY_PIPE


def deft_output() -> TokenBatch:
    torch.manual_seed(0)
    pipe = build_pipeline(TINY_PIPE, dim=24).eval()
    batch = TokenBatch.from_tokens(torch.randn(3, 16, 24), layout=(1, 4, 4))
    with torch.no_grad():
        return pipe(batch)


def test_flatten_and_unflatten_rebuild_a_token_batch():
    out = deft_output()
    assert out.pruned is not None and out.stats  # nested dataclass and dicts of tensors are exercised
    leaves: list[torch.Tensor] = []
    spec = flatten((out, {"k": [1, 2.5, "s"]}), leaves)
    hash(spec)  # a signature key
    clones = [t.clone() for t in leaves]
    back, extra = unflatten(spec, clones)
    assert type(back) is TokenBatch and extra == {"k": [1, 2.5, "s"]}
    assert back.kinds == out.kinds and back.stats.keys() == out.stats.keys()
    rebuilt = _tensors(back)
    assert len(rebuilt) == len(leaves) and all(torch.equal(a, b) for a, b in zip(leaves, rebuilt))
    assert torch.equal(back.pruned.tokens, out.pruned.tokens) and back.pruned.tokens is not out.pruned.tokens


def _tensors(obj) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    flatten(obj, found)
    return found


def test_off_cuda_and_with_grad_the_function_runs_as_is():
    calls = []

    def fn(x, scale):
        calls.append(1)
        return {"y": x * scale}

    wrapped = CapturedCall(fn, "a test function")
    x = torch.randn(4)
    for _ in range(3):
        assert torch.equal(wrapped(x, 2.0)["y"], x * 2.0)
    assert len(calls) == 3 and not wrapped.entries  # nothing warmed or captured on the CPU
    with pytest.raises(TypeError):
        flatten(({"a": {2}},), [])  # a set leaf is unhashable: CapturedCall calls fn as is
    with torch.enable_grad():
        assert wrapped(x.requires_grad_(), 3.0)["y"].requires_grad  # grad mode: eager, the graph of autograd kept


def test_graph_state_is_never_copied(tiny_model):
    model = copy.deepcopy(tiny_model)
    model._graphs.value = {"sentinel": object()}
    assert copy.deepcopy(model)._graphs.value is None
    assert copy.deepcopy(GraphSlot(3)).value is None
    model.release_graphs()
    assert model._graphs.value is None and model.llm._static is None


def test_pipeline_version_follows_its_settings(tiny_model):
    model = copy.deepcopy(tiny_model)
    before = model._graph_version(model.pipeline, settings=True)
    model.pipeline.set_retention(0.5)
    assert model._graph_version(model.pipeline, settings=True) != before
    model.pipeline.train()
    assert model._graph_version(model.pipeline) != model._graph_version(model.pipeline.eval())


def test_generate_glue_makes_no_host_copies_of_constants(tiny_model):
    """Issue 16: between the captured parts, the glue of ``generate`` must not wait for the device where it
    need not: no ``torch.tensor(...)`` of constant ids per call (a pageable host-to-device copy waits for every
    queued kernel), no boolean indexing or ``nonzero`` to order the placeholders (their count is known on the
    host), ``TokenBatch.from_tokens`` checks an all-real layout on the host, ``splice_media`` scatters to
    computed columns instead of boolean indexing, and the media counts of every kind are checked in one
    read. The remaining waits (the media counts, the splice's output width, the prompt checks, the plain
    CPU decoding path's cache and EOS reads) are counted so that a new one fails here: 10 in this call
    (23 before the counts were read at once, 43 before that)."""
    from PIL import Image
    import numpy as np
    from llava_deft.data import build_collator
    from tests.host_sync import HostSyncRecorder

    model = copy.deepcopy(tiny_model)
    items = [{"id": f"g{i}", "messages": [{"role": "user", "content": "<image>\nWhat colour?"}],
              "images": [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8))]} for i in range(2)]
    batch = build_collator(model.processors, generation=True)(items)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2)
        with HostSyncRecorder() as rec:
            model.generate(**batch, max_new_tokens=2)
    sites = {(name, where) for name, where in rec.calls}
    assert not [s for s in sites if s[1].startswith("pipeline/batch.py")], rec.report()
    assert {name for name, where in sites if where.startswith("model/splice.py")} <= {"item"}, rec.report()
    assert not [s for s in sites if s[0] in ("tensor", "as_tensor") and "model/" in s[1]], rec.report()
    lines, first = inspect.getsourcelines(type(model)._media)  # placeholder order and the pipeline call
    inside = [s for s in sites if s[1].startswith("model/llava.py")
              and first <= int(s[1].split(":")[1]) < first + len(lines)]
    assert not inside, rec.report()
    assert len(rec.calls) <= 10, rec.report()
