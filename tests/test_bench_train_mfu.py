"""eval/bench_train_mfu.py (issue 16, item 4): the smoke run goes through the real training entry and its
FLOPs count equals the decoder's own parameters (the timing itself belongs to the GPU run)."""

from __future__ import annotations

import json

import pytest

from eval import bench_train_mfu
from llava_deft.model.llm import build_llm


def test_matmul_params_equal_the_model_without_its_embedding_table():
    llm = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    hf = build_llm(llm, vocab_size=101)
    expected = sum(p.numel() for name, p in hf.named_parameters() if "embed_tokens" not in name)
    assert bench_train_mfu.matmul_params(llm, 101) == expected


def test_smoke_run_logs_tokens_and_writes_the_report(tmp_path):
    res = bench_train_mfu.main(["--smoke", "--out", str(tmp_path), "--name", "mfu", "--profile", "2"])
    saved = json.loads((tmp_path / "mfu.json").read_text())
    assert saved["result"] == pytest.approx(res)
    assert res["steps_timed"] == 3 and res["seconds"] > 0
    # every sample is a fixed-length passage: 2 samples a step, real tokens <= padded, S = padded / samples
    assert 0 < res["tokens_per_s"] <= res["padded_tokens_per_s"]
    assert res["mean_padded_seq"] == pytest.approx(res["padded_tokens_per_s"] / res["samples_per_s"])
    assert res["mfu"] is None  # no peak for a CPU
    assert "| 3 |" in (tmp_path / "mfu.md").read_text()
    # --profile 2: two more steps under torch.profiler, after the timed ones (not in the rate)
    assert res["profile"] == "mfu_profile.txt" and "`mfu_profile.txt`" in (tmp_path / "mfu.md").read_text()
    assert (tmp_path / "mfu_profile.txt").read_text().startswith("# torch.profiler over optimizer steps 5..6 (2 steps)")
    assert (tmp_path / "mfu_profile.json.gz").stat().st_size > 0


def test_skip_must_leave_steps_to_time():
    with pytest.raises(SystemExit):
        bench_train_mfu.parse_args(["--steps", "10", "--skip", "10"])
    with pytest.raises(SystemExit):
        bench_train_mfu.parse_args(["--profile", "-1"])
