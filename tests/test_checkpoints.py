"""Checkpoint hardening: a damaged file, a pickle-only LLM, an LLM directory without a tokenizer and a
tokenizer larger than the LLM's embeddings each fail with a typed error naming the file or numbers,
and nothing resizes a real LLM's vocabulary behind the user's back."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from llava_deft.errors import CheckpointError, ConfigError, PickleCheckpointError, VocabularyMismatchError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.llm import build_llm
from llava_deft.model.tokenizer import load_tokenizer

SMALL_LLM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture
def saved(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_model_safetensors_names_the_file(saved, damage):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a safetensors file" * 8)
    with pytest.raises(CheckpointError, match=rf"model weights '{weights}' are not a readable safetensors file .*"
                                              r"truncated or corrupt; re-export the model or re-download the file"):
        LlavaDeftForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("text, problem", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object, got list")])
def test_bad_config_json_names_the_file(saved, text, problem):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"'{saved / 'config.json'}' {problem}.*re-export the model"):
        LlavaDeftForCausalLM.from_pretrained(saved)


def test_a_tensor_of_another_shape_is_a_checkpoint_error(tiny_model, saved):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["projector.0.weight"] = torch.zeros(3, 3)
    tiny_model.save_pretrained(saved, state_dict=state)
    with pytest.raises(CheckpointError, match=r"shapes differ for \['projector.0.weight \(3, 3\) != \(128, 128\)'\]"):
        LlavaDeftForCausalLM.from_pretrained(saved)


def _llm_dir(path, rows: int, tokenizer: bool):
    torch.manual_seed(0)
    hf = build_llm({**SMALL_LLM, "vocab_size": rows})
    hf.save_pretrained(path)
    if tokenizer:
        load_tokenizer().save_pretrained(path)
    return hf


def test_llm_path_with_only_pickles_is_refused_with_the_conversion_command(tmp_path):
    hf = _llm_dir(tmp_path / "llm", 1200, tokenizer=True)
    (tmp_path / "llm" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "llm" / "pytorch_model.bin")  # ours: never loaded
    cmd = (f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{tmp_path / 'llm'}')"
           f".save_pretrained('OUT', safe_serialization=True)\"")
    with pytest.raises(PickleCheckpointError, match=r"holds its weights only as pickles \(pytorch_model.bin\)") as e:
        LlavaDeftForCausalLM({"llm": {"path": str(tmp_path / "llm")}})
    assert cmd in str(e.value)


def test_llm_path_without_tokenizer_uses_its_own_and_keeps_every_row(tmp_path):
    hf = _llm_dir(tmp_path / "llm", 3000, tokenizer=True)
    model = LlavaDeftForCausalLM({"llm": {"path": str(tmp_path / "llm")}})
    assert model.llm.vocab_size == 3000 and model.llm.hf.lm_head.weight.shape[0] == 3000
    assert_close(model.llm.hf.model.embed_tokens.weight, hf.model.embed_tokens.weight, rtol=0, atol=0)
    assert model.tokenizer.name_or_path == str(tmp_path / "llm")


def test_llm_path_without_any_tokenizer_asks_for_one(tmp_path):
    _llm_dir(tmp_path / "llm", 3000, tokenizer=False)
    with pytest.raises(ConfigError, match=rf"llm.path '{tmp_path / 'llm'}' holds no tokenizer .* set tokenizer: to the "
                                          r"LLM's tokenizer directory"):
        LlavaDeftForCausalLM({"llm": {"path": str(tmp_path / "llm")}})


def test_tokenizer_larger_than_the_llm_is_a_typed_error_naming_both_numbers(tmp_path):
    _llm_dir(tmp_path / "llm", 1000, tokenizer=True)
    n = len(load_tokenizer())
    with pytest.raises(VocabularyMismatchError, match=rf"the tokenizer has {n} tokens but the LLM \(checkpoint .*\) has "
                                                      rf"1000 embedding rows.*resize_token_embeddings\({n}\)"):
        LlavaDeftForCausalLM({"llm": {"path": str(tmp_path / "llm")}})
    with pytest.raises(VocabularyMismatchError, match=rf"{n} tokens but the LLM \(llm.config's vocab_size\) has 1000"):
        LlavaDeftForCausalLM({"llm": {"config": {**SMALL_LLM, "vocab_size": 1000}}})
    assert build_llm(str(tmp_path / "llm"), vocab_size=n, resize_vocab=True).lm_head.weight.shape[0] == n  # asked for


def test_llm_path_with_missing_weights_is_refused(tmp_path):
    """transformers only warns and initialises what a checkpoint lacks: a broken export must not load."""
    from safetensors.torch import load_file, save_file

    _llm_dir(tmp_path / "llm", 1200, tokenizer=True)
    weights = tmp_path / "llm" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"LLM directory .* lacks weights \['model.layers.0.mlp.up_proj.weight'\]"):
        LlavaDeftForCausalLM({"llm": {"path": str(tmp_path / "llm")}})
