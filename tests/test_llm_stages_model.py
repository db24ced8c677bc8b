"""Stages inside the LLM through the model, the inference API and the CLI: a pipeline's ``llm:`` list runs
in generate() (token kinds from the splice, per-layer cache statistics in GenerationInfo) and in the
training forward. The stage mechanics themselves are tested in tests/test_llm_stages.py."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from llava_deft.cli import main
from llava_deft.inference import LlavaDeft
from llava_deft.model import LlavaDeftForCausalLM
from conftest import TINY_PIPE

PROMPT = "what shape is this?"


@pytest.fixture(scope="module")
def api(tiny_model):
    return LlavaDeft(tiny_model, device="cpu")


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def with_llm(*stages) -> dict:
    return {**TINY_PIPE, "llm": list(stages)}


def test_keep_everything_gives_the_model_s_own_answer(api):
    images = [picture(1)]
    plain, info = api.generate(PROMPT, images=images, max_new_tokens=12, return_stats=True)
    assert info.cache is None and info.llm_stats is None  # no LLM stage: the stock cache
    kept, info = api.generate(PROMPT, images=images, max_new_tokens=12, return_stats=True,
                              pipeline=with_llm({"name": "fastv", "layer": 1, "drop_ratio": 0.0},
                                                {"name": "tova", "cache_max_size": 4096}))
    assert kept == plain
    assert [c["evicted"] for c in info.cache] == [0, 0]


def test_fastv_drops_only_media_and_later_layers_cache_less(api):
    text, info = api.generate(PROMPT, images=[picture(2)], max_new_tokens=3, return_stats=True,
                              pipeline=with_llm({"name": "fastv", "layer": 1, "drop_ratio": 0.5}))
    media = 16  # fgcs at 0.25 keeps 16 of the 64 patch tokens before the LLM
    assert info.llm_stats["fastv"] == {"media_in": media, "media_kept": math.ceil(media * 0.5)}
    first, second = info.cache
    assert first["slots"] - second["slots"] == media // 2  # layer 1 never saw the dropped tokens
    assert info.llm_tokens[0] + 2 == first["slots"]  # the prompt + 2 generated tokens fed back


def test_tova_keeps_its_budget_in_every_layer_and_reports_debug_stats(api):
    budget = 10
    _, info = api.generate(PROMPT, images=[picture(3)], max_new_tokens=6, return_stats=True,
                           pipeline=with_llm({"name": "tova", "cache_max_size": budget, "debug": True}))
    assert [c["slots"] for c in info.cache] == [budget, budget]
    assert all(c["tokens_mean"] == budget and c["evicted"] > 0 for c in info.cache)
    stats = info.llm_stats["tova"]
    assert set(stats) == {0, 1} and stats[1]["kept"] == budget and stats[1]["phase"] == "decode"


def test_cli_stats_print_one_line_per_cache_layer(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    picture(4).save(tmp_path / "x.png")
    (tmp_path / "p.yaml").write_text("stages:\n  - {name: sam, semantic_dim: 32}\n  - {name: fgcs, retention_ratio: 0.25, hidden_dim: 32}\n"
                                     "llm:\n  - {name: streaming_llm, cache_max_size: 8, num_sinks: 2}\n")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--pipeline",
                 str(tmp_path / "p.yaml"), "--max-new-tokens", "4", "--stats", PROMPT]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cache layer")]
    assert [ln.split(":")[0] for ln in lines] == ["cache layer 0", "cache layer 1"]
    assert all("slots=8 " in ln for ln in lines)


def test_training_forward_with_fastv_in_the_model_pipeline():
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"pipeline": with_llm({"name": "fastv", "layer": 1, "drop_ratio": 0.5})}).train()
    from llava_deft.data import build_collator

    collate = build_collator(model.processors)
    batch = collate([{"id": "a", "images": [picture(5)], "messages": [{"role": "user", "content": "<image>\nwhat?"},
                                                                       {"role": "assistant", "content": "circle"}]},
                     {"id": "b", "images": [picture(6)], "messages": [{"role": "user", "content": "<image>\nwhich colour is it?"},
                                                                       {"role": "assistant", "content": "red"}]}])
    out = model(**batch)
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "ids", "references")}
    with torch.no_grad():
        spliced, _, _ = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], **media)
    # logits at every prompt column (FastV's dropped media columns hold zeros), so the labels still line up
    assert out.logits.shape == (*spliced.embeds.shape[:2], model.llm.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector[0].weight.grad is not None and model.projector[0].weight.grad.abs().sum() > 0


def test_fastv_random_scoring_drops_the_same_count_reproducibly(api):
    runs = []
    for _ in range(2):
        _, info = api.generate(PROMPT, images=[picture(7)], max_new_tokens=2, return_stats=True,
                               pipeline=with_llm({"name": "fastv", "layer": 1, "drop_ratio": 0.75, "scoring": "random", "seed": 3}))
        runs.append(info)
    assert runs[0].llm_stats["fastv"] == {"media_in": 16, "media_kept": 4}
    assert runs[0].cache == runs[1].cache
