"""CUDA-graph decoding (``generate_from_embeds(cuda_graph=...)``) gives the tokens of eager decoding.

Skipped without a GPU (CPU runs never capture). On a GPU box:
``PYTHONPATH=. python -m pytest -q tests/test_llm_stages_cuda.py``.
"""

import pytest
import torch

from llava_deft.model.llm import DecoderLM, build_llm
from llava_deft.model.llm.decoder import generate_from_embeds
from llava_deft.model.llm.runtime import GraphedStep
from pipeline import build_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def tiny_lm(kv_heads: int) -> DecoderLM:
    torch.manual_seed(0)
    spec = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "intermediate_size": 128, "vocab_size": 97, "max_position_embeddings": 512}
    with torch.device("cuda"):
        return DecoderLM(build_llm(spec, torch_dtype=torch.float32).eval())


def ragged_prompts(b: int = 3, length: int = 48):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(b, length, 64, generator=g).cuda()
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, :9], mask[2, :20] = 0, 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return embeds, mask.cuda(), pos.cuda()


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("policy", [{"name": "tova"}, {"name": "tova", "head_strategy": "max", "entropy_weight": 0.5},
                                    {"name": "streaming_llm"}, {"name": "h2o"}])
def test_graph_replay_gives_the_eager_tokens_and_cache(policy, kv_heads, monkeypatch):
    lm = tiny_lm(kv_heads)
    embeds, mask, pos = ragged_prompts()
    captured = []
    real_init = GraphedStep.__init__

    def spy(self, *a, **k):
        captured.append(True)
        real_init(self, *a, **k)

    monkeypatch.setattr(GraphedStep, "__init__", spy)
    out = {}
    for graph in (False, True):
        stages = build_pipeline({"llm": [{**policy, "cache_max_size": 16}]}, 64).llm
        tokens, cache = generate_from_embeds(lm, embeds, mask, pos, 20, eos_token_id=-1, pad_token_id=0,
                                             stages=stages, return_cache=True, cuda_graph=graph)
        out[graph] = (tokens, cache)
    assert captured == [True], "the graph row must capture exactly once"
    assert torch.equal(out[True][0], out[False][0])
    for eager_layer, graph_layer in zip(out[False][1].layers, out[True][1].layers):
        assert torch.equal(eager_layer.keys, graph_layer.keys)
        assert torch.equal(eager_layer.positions, graph_layer.positions)
        assert torch.equal(eager_layer.valid, graph_layer.valid)
    assert [s["evicted"] for s in out[True][1].stats()] == [s["evicted"] for s in out[False][1].stats()]
