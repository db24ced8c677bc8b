"""eval/clustering_sweep.py end to end on the tiny model (CPU, a few easy-VQA questions), before the LLM and
inside it (``--layer``), and the eval loop's per-stage token share that the in-LLM rows are read from."""

from __future__ import annotations

import json

import pytest

from llava_deft.evaluation.loop import score


def test_llm_token_share_sums_over_items():
    preds = [{"id": str(i), "question_type": "t", "prediction": "a", "reference": "a", "media_tokens": 4,
              "media_items": 1, "llm_tokens": {"s@2": (10.0, t_out)}} for i, t_out in enumerate([5.0, 3.0])]
    assert score(preds)["llm_token_share"] == {"s@2": pytest.approx(8 / 20)}
    assert "llm_token_share" not in score([{k: v for k, v in p.items() if k != "llm_tokens"} for p in preds])


@pytest.mark.parametrize("layer", [None, 1], ids=["before_llm", "in_llm"])
def test_sweep_rows_shares_and_check(tmp_path, tiny_model, layer):
    from eval import clustering_sweep

    tiny_model.save_pretrained(tmp_path / "m")
    argv = ["--model", str(tmp_path / "m"), "--task", "easyvqa", "--limit", "6", "--thresholds", "0.99999", "-0.5",
            "--device", "cpu", "--batch-size", "6", "--out", str(tmp_path / "out"), "--name", "s"]
    argv += ["--layer", str(layer), "--reducers", "fastv"] if layer else ["--reducers", "random"]
    result = clustering_sweep.main(argv)
    rows = result["rows"]
    method = "recursive_compression" if layer is None else f"recursive_compression_llm@{layer}"
    assert [r["method"] for r in rows[:3]] == ["none", method, method]
    assert rows[0]["share_of_tokens"] == 1.0
    low = next(r for r in rows if r["setting"] == -0.5)  # a floor below any cosine: every media run merges
    assert 0 < low["share_of_tokens"] <= rows[1]["share_of_tokens"] <= 1.0
    baselines = [r for r in rows if r["method"] == ("random" if layer is None else "fastv")]
    assert baselines and all(0 < r["share_of_tokens"] < 1 for r in baselines)
    assert set(result["check"]) == {"target_percent", "max_share", "passed", "best"}
    doc = json.loads((tmp_path / "out/s.json").read_text())
    assert doc["rows"] == json.loads(json.dumps(rows)) and (tmp_path / "out/s.png").is_file()
    assert ("after decoder layer 0" in (tmp_path / "out/s.md").read_text()) == (layer == 1)
