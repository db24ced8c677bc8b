"""A model config without a vision tower (``vision: null``) is a plain causal LM through the same model,
training entry and inference API (issue 17 item 3: the seeds' text LMs)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_deft.data import build_collator
from llava_deft.errors import UnsupportedInputError
from llava_deft.inference import load_model
from llava_deft.model import LlavaDeftForCausalLM
from pipeline import build_pipeline

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.fixture(scope="module")
def text_lm():
    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": []}})


def test_no_tower_no_projector_and_a_plain_lm_loss(text_lm):
    assert text_lm.vision is None and text_lm.projector is None
    assert not any(k.startswith(("vision.", "projector.")) for k in text_lm.state_dict())
    batch = build_collator(text_lm.processors)([{"id": f"s{i}", "messages": CHAT} for i in range(2)])
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = text_lm(**tensors)
    # the loss is the LLM's own next-token loss on the spliced (here: unchanged) prompt
    logits = text_lm.llm(text_lm.llm.embed(batch["input_ids"]), batch["attention_mask"],
                         (batch["attention_mask"].cumsum(1) - 1).clamp(min=0))[0]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                            ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert all(p.grad is not None for p in text_lm.llm.parameters() if p.requires_grad)


def test_images_and_videos_are_refused_by_name(text_lm):
    item = {"id": "pic", "messages": [{"role": "user", "content": "<image>\nWhat is it?"}],
            "images": [Image.new("RGB", (16, 16))]}
    with pytest.raises(UnsupportedInputError, match=r"sample 'pic' holds 1 image\(s\), but this model has no vision tower"):
        build_collator(text_lm.processors)([item])
    with pytest.raises(UnsupportedInputError, match="no vision tower"):
        text_lm.encode_images(torch.zeros(1, 3, 16, 16))


def test_text_only_model_with_a_learned_pipeline_on_passages(tmp_path):
    torch.manual_seed(1)
    model = LlavaDeftForCausalLM({"vision": None, "pipeline": {"stages": [{"name": "fgcs", "retention_ratio": 0.5,
                                                                           "hidden_dim": 16}]}})
    plain = {"id": "a", "messages": CHAT}
    passage = {"id": "b", "messages": [{"role": "user", "content": "<text>\nWhat is the key?"},
                                       {"role": "assistant", "content": "42"}], "texts": ["The key is 42. " * 6]}
    for items in ([plain], [plain, passage]):  # without passages the pipeline still runs (a blank text row)
        batch = build_collator(model.processors)(items)
        out = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        out.loss.backward()
        fgcs = model.pipeline.stages[0]
        assert any(p.grad is not None for p in fgcs.parameters())
        model.zero_grad()


def test_trains_through_the_entry_and_generates_through_the_api(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--config", "configs/train/mfu_1b.yaml", f"output_dir={tmp_path / 'run'}", "model.vision=null",
            "stages.0.max_steps=3", "model.llm.config.hidden_size=64", "model.llm.config.intermediate_size=128",
            "model.llm.config.num_hidden_layers=2", "model.llm.config.num_attention_heads=4",
            "model.llm.config.num_key_value_heads=2", "data.min_tokens=64", "data.max_tokens=64",
            "per_device_batch_size=2", "bf16=false", "num_workers=0", "log_steps=1"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-m", "llava_deft.train", *args], check=True, cwd=root, env=env,
                   capture_output=True)  # its own process: the entry sets up torch.distributed
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["vision"] is None
    api = load_model(final, device="cpu")
    assert api.model.vision is None
    text = api.generate("What is the pass key?", max_new_tokens=4)
    assert isinstance(text, str)
    with pytest.raises(UnsupportedInputError, match="no vision tower"):
        api.generate("<image>\nWhat is it?", images=[Image.new("RGB", (16, 16))], max_new_tokens=2)


def test_pair_compression_recipe_trains_only_the_compressor_on_a_frozen_base(tmp_path):
    """configs/train/passkey_long_pair.yaml through the entry at toy size: a text-only base, then the recipe
    (init_from it, pair_compress before layer 2, frozen LLM, windowed loss): only the stage trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    tiny = ["model.llm.config.hidden_size=64", "model.llm.config.intermediate_size=128",
            "model.llm.config.num_hidden_layers=3", "model.llm.config.num_attention_heads=4",
            "model.llm.config.num_key_value_heads=2", "data.min_tokens=64", "data.max_tokens=96"]
    common = ["per_device_batch_size=2", "bf16=false", "num_workers=0", "log_steps=1", "stages.0.max_steps=2"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "llava_deft.train", *a], check=True, cwd=root, env=env,  # noqa: E731
                                    capture_output=True)
    run("--config", "configs/train/mfu_1b.yaml", f"output_dir={tmp_path / 'base'}", "model.vision=null", *tiny, *common)
    run("--config", "configs/train/passkey_long_pair.yaml", f"output_dir={tmp_path / 'pair'}",
        f"init_from={tmp_path / 'base' / 'final'}",
        "model.pipeline={llm: [{name: pair_compress, layer: 2, window: 16, ratio: 0.2, memory_floor: 4, num_heads: 2}]}",
        "data.sources.0.min_tokens=64", "data.sources.0.max_tokens=96", "data.sources.1.min_tokens=160",
        "data.sources.1.max_tokens=192", *common)
    record = json.loads((tmp_path / "pair" / "stage0_compress" / "stage.json").read_text())
    stage = build_pipeline({"llm": [{"name": "pair_compress", "layer": 2, "window": 16, "num_heads": 2}]}, dim=64)
    assert record["trainable_params"] == sum(p.numel() for p in stage.parameters())  # the compressor and scorer only
    base = load_file(str(tmp_path / "base" / "final" / "model.safetensors"))
    pair = load_file(str(tmp_path / "pair" / "final" / "model.safetensors"))
    assert all(torch.equal(base[k], pair[k]) for k in base)  # the LLM did not move
    assert any(k.startswith("pipeline.llm.0.compressor") for k in pair)
    # eval/long_context.py compares the saved stages ('model') with the same frozen base without them ('full')
    from eval import long_context

    rows = long_context.main(["--model", str(tmp_path / "pair" / "final"), "--policies", "full", "model",
                              "--lengths", "160", "--needles", "1", "--n", "3", "--device", "cpu", "--batch-size", "3",
                              "--data-dir", str(tmp_path / "lc"), "--out", str(tmp_path / "lc_out"), "--name", "lc"])
    assert [r["policy"] for r in rows] == ["full", "model"]
    (stats,) = rows[1]["stages"]
    assert stats["name"] == "PairCompress" and stats["layer"] == 2 and stats["tokens_out"] < stats["tokens_in"]
    assert "stages" not in rows[0]
    md = (tmp_path / "lc_out" / "lc.md").read_text()
    assert f"| 160 | 1 | PairCompress | 2 | {stats['tokens_in']} | {stats['tokens_out']} |" in md
