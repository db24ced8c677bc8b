"""CompressibleLanguageModel (issue 18, seeds 001/003): a GPT-2 / Llama causal LM with recursive compression
before chosen layers, frozen base, causal loss, stats, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llava_deft.errors import CheckpointError
from llava_deft.model.llm import TINY_GPT2, TINY_LLM, build_llm
from llava_deft.model.llm.compressible import CompressibleLanguageModel, default_layers


@pytest.mark.parametrize("spec", [TINY_GPT2, TINY_LLM], ids=["gpt2", "llama"])
def test_frozen_base_trains_only_the_stages_and_the_loss_skips_merged_columns(spec):
    torch.manual_seed(0)
    base = build_llm(spec)
    model = CompressibleLanguageModel(base, compression_layers=[1], freeze_base=True, similarity_threshold=0.3,
                                      use_progressive_compression=False, contrastive_weight=0.0)
    assert model.specs == [{"name": "recursive_compression_llm", "layer": 1, "similarity_threshold": 0.3,
                            "contrastive_weight": 0.0, "tokens": "all"}]
    ids = torch.randint(5, 60, (2, 24))
    ids[:, 8:16] = 7  # a run of one token: merges
    loss, logits = model(ids, labels=ids)
    stats = model.compression_stats()["recursive_compression_llm@1"]
    assert stats["tokens_out"] < stats["tokens_in"] == 24
    runner = model.lm.bind_stages(model.compression)
    ref_logits, _ = model.lm(model.lm.embed(ids), torch.ones_like(ids), model._positions(torch.ones_like(ids)), stages=runner)
    keep = runner.present[:, :-1]
    assert not keep.all()
    ref = F.cross_entropy(ref_logits[:, :-1][keep].float(), ids[:, 1:][keep])
    torch.testing.assert_close(loss, ref)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("compression.") for n in trainable)
    assert 0 < model.trainable_share() < 1
    assert all(p.grad is None for p in model.lm.parameters())


def test_nothing_merges_above_one_and_progressive_defaults():
    torch.manual_seed(0)
    base = build_llm(TINY_GPT2)
    ids = torch.randint(5, 60, (2, 12))
    plain = CompressibleLanguageModel(base, compression_layers=[1], similarity_threshold=1.5,
                                      use_progressive_compression=False)
    _, logits = plain(ids)
    ref, _ = plain.lm(plain.lm.embed(ids), torch.ones_like(ids), plain._positions(torch.ones_like(ids)), stages=[])
    torch.testing.assert_close(logits, ref)  # a floor above 1: the base model exactly
    prog = CompressibleLanguageModel(build_llm(dict(TINY_GPT2, n_layer=8)), similarity_threshold=0.7)
    assert prog.compression_layers == default_layers(8) == [2, 4, 6]
    assert [s["aggressive"] for s in prog.specs] == [0.7] * 3 and {s["name"] for s in prog.specs} == {"progressive_compression"}
    with pytest.raises(ValueError, match=r"compression_layers \[2\]: .* 1\.\.1"):
        CompressibleLanguageModel(build_llm(TINY_GPT2), compression_layers=[2])


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CompressibleLanguageModel(build_llm(TINY_GPT2), compression_layers=[1], similarity_threshold=0.2,
                                      freeze_base=True).eval()
    with torch.no_grad():
        for p in model.compression.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the weights must come back
    ids = torch.randint(5, 60, (2, 16))
    _, before = model(ids)
    model.save_pretrained(tmp_path / "cm")
    loaded = CompressibleLanguageModel.from_pretrained(tmp_path / "cm").eval()
    assert loaded.specs == model.specs and loaded.settings == model.settings
    _, after = loaded(ids)
    torch.testing.assert_close(after, before)
    out = loaded.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (2, 3)
    with pytest.raises(CheckpointError, match="missing"):
        CompressibleLanguageModel.from_pretrained(tmp_path)
