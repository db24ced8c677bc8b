"""The compression seeds' flags on the training entry (llava_deft/train/seed_flags.py), and the LM loss
when an LLM stage removes columns (never a loss on a column without logits)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llava_deft.errors import ConfigError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.splice import IGNORE_INDEX
from llava_deft.train.seed_flags import default_layers
from llava_deft.train.trainer import parse_args, resolve_config
from pipeline.llm import LayerStage


def resolve(*argv):
    return resolve_config(*parse_args(list(argv)))


def test_defaults_are_the_seed_recipe_on_the_default_corpus():
    cfg = resolve("--use_progressive_compression")
    assert cfg.data.type == "text" and cfg.data.path == "fortunes"
    llm = cfg.model["pipeline"]["llm"] if isinstance(cfg.model, dict) else None
    assert [s["layer"] for s in llm] == default_layers(12) == [3, 6, 9]
    assert {s["name"] for s in llm} == {"progressive_compression"}


def test_flags_map_to_config_keys():
    cfg = resolve("--use_progressive_compression", "--compression_layers", "4", "2", "--similarity_threshold", "0.8",
                  "--attention_weight", "0.5", "--no-use_residuals", "--adaptive_threshold", "--contrastive_margin", "0.3",
                  "--contrastive_weight", "0.05", "--freeze_base", "--max_length", "256", "--batch_size", "3",
                  "--epochs", "0.5", "--learning_rate", "1e-3", "--train_file", "corpus.txt")
    llm = cfg.model["pipeline"]["llm"]
    assert [s["layer"] for s in llm] == [2, 4]
    assert llm[0] == {"name": "progressive_compression", "layer": 2, "aggressive": 0.8, "attention_weight": 0.5,
                      "adaptive_threshold": True, "use_residuals": False, "contrastive_margin": 0.3,
                      "contrastive_weight": 0.05, "tokens": "all"}
    st = cfg.stages[0]
    assert st.freeze_llm and st.epochs == 0.5 and st.max_steps is None and st.lr == 1e-3
    assert cfg.per_device_batch_size == 3 and cfg.model["max_length"] == 256
    assert (cfg.data.type, cfg.data.path) == ("text", "corpus.txt")
    # without --use_progressive_compression a stage option asks for recursive_compression_llm, as a floor
    llm = resolve("--similarity_threshold", "0.9", "--compression_layers", "5").model["pipeline"]["llm"]
    assert llm == [{"name": "recursive_compression_llm", "layer": 5, "similarity_threshold": 0.9, "tokens": "all"}]
    conv = resolve("--config", "configs/train/easyvqa_tiny.yaml", "--data_path", "x.json", "--compression_layers", "1")
    assert conv.model["pipeline"]["llm"][0]["tokens"] == "media"  # a conversation file: media merge, text stays
    # --data_path: LLaVA's JSON stays a conversation file, any other file is a text corpus
    assert resolve("--config", "configs/train/easyvqa_tiny.yaml", "--data_path", "x.json").data.type == "llava_json"
    assert resolve("--config", "configs/train/easyvqa_tiny.yaml", "--data_path", "x.txt").data.type == "text"
    # key=value overrides after the flags win
    assert resolve("--batch_size", "3", "per_device_batch_size=5").per_device_batch_size == 5


def test_base_model_name_resolves_folders_and_named_configs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = tmp_path / "hf_gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=64, vocab_size=1200, bos_token_id=1, eos_token_id=2)).save_pretrained(hf)
    cfg = resolve("--base_model_name", str(hf), "--compression_layers", "1", "--use_progressive_compression")
    assert cfg.model["vision"] is None and cfg.model["llm"]["path"] == str(hf)
    assert cfg.model["pipeline"]["llm"][0]["layer"] == 1
    with pytest.raises(ConfigError, match=r"--compression_layers \[3\]: .* in 1\.\.2 \(the model has 3 layers\)"):
        resolve("--base_model_name", str(hf), "--compression_layers", "3", "--use_progressive_compression")
    ours = tmp_path / "ours"
    LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": []}}).save_pretrained(ours)
    assert resolve("--model_name", str(ours)).init_from == str(ours)
    assert resolve("--base_model_name", "smollm_1p7b").model["llm"]["config"]["hidden_size"] == 2048
    with pytest.raises(ConfigError, match=r"neither a folder nor a named model config; named configs: \[.*'gpt2_small'"):
        resolve("--base_model_name", "gpt7")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="neither a llava-deft model's nor a transformers model's"):
        resolve("--base_model_name", str(tmp_path / "odd"))


class DropEveryOther(LayerStage):
    """Test stage: from its layer on, every other real token of each row is gone."""

    stage_name = "drop_every_other"

    def reduce(self, state, attention):
        rank = state.mask.long().cumsum(1)
        return state.take(state.mask & (rank % 2 == 0))


def test_lm_loss_skips_columns_a_stage_removed():
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": []}})
    ids = torch.randint(10, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    model.pipeline.llm = torch.nn.ModuleList([DropEveryOther(1)])
    out = model(ids, mask, labels)
    present = model.llm.bind_stages(model.pipeline.llm)
    logits, _ = model.llm(model.llm.embed(ids), mask, (mask.cumsum(1) - 1).clamp(min=0), stages=present)
    keep = present.present[:, :-1] & (labels[:, 1:] != IGNORE_INDEX)
    assert keep.sum() < (labels[:, 1:] != IGNORE_INDEX).sum()  # some columns were dropped
    ref = F.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep])
    torch.testing.assert_close(out.lm_loss, ref)
    # every dropped column's logits are zero: a loss on them would have been log(V)
    assert (logits[:, :-1][~present.present[:, :-1]] == 0).all()


def test_seed_text_lm_script_end_to_end(tmp_path):
    """eval/seed_text_lm.py at toy size: the seeds' flags train a GPT-2-shaped LM on fortunes, then progressive
    compression on the frozen base; llava-deft evaluate's report and the curves are written."""
    from safetensors.torch import load_file

    from eval import seed_text_lm

    result = seed_text_lm.main(["--layers", "2", "--width", "32", "--heads", "2", "--block", "32", "--batch", "4",
                                "--base-steps", "2", "--compress-steps", "2", "--eval-blocks", "6",
                                "--compression-layers", "1", "--similarity-threshold", "0.5",
                                "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res")])
    report = result["report"]
    assert report["stages"] == ["progressive_compression"] and report["blocks"] == 6
    (stage,) = report["compression"]["stages"]
    assert stage["layer"] == 1 and stage["tokens_in"] == report["compression"]["prompt_tokens"] == 6 * 32
    assert 0 < stage["tokens_out"] <= stage["tokens_in"] and report["positions"]["shared"] <= report["positions"]["all"]
    assert report["perplexity"]["compressed"] > 1 and report["perplexity"]["uncompressed"] > 1
    base = load_file(str(tmp_path / "runs" / "base" / "final" / "model.safetensors"))
    comp = load_file(str(tmp_path / "runs" / "compressed" / "final" / "model.safetensors"))
    assert all(torch.equal(base[k], comp[k]) for k in base)  # --freeze_base: only the stage trained
    assert any(k.startswith("pipeline.llm.0.core") for k in comp)
    for suffix in (".json", ".md", "_curves.json", "_curves.png"):
        assert (tmp_path / f"res{suffix}").is_file()
