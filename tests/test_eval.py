"""eval/easyvqa.py end to end on a few questions: sweep rows, token accounting, files, last line."""

import json
import re

import pytest

from eval import easyvqa
from llava_deft.data import EasyVQADataset, pad_sequences
from llava_deft.model import LlavaDeftForCausalLM
from tests.conftest import TINY_PIPE


def answer_every_third(monkeypatch):
    """Generation that answers item i of easy-VQA test with its reference when i % 3 == 0, else "zzz"
    (the media-token count still comes from the real model)."""
    real = LlavaDeftForCausalLM.generate

    def fake(self, input_ids, attention_mask, references=None, ids=None, **kw):
        _, n_media = real(self, input_ids, attention_mask, ids=ids, **{**kw, "max_new_tokens": 1})
        texts = [ref if int(i.rsplit("-", 1)[1]) % 3 == 0 else "zzz" for ref, i in zip(references, ids)]
        out, _ = pad_sequences([self.tokenizer.encode(t, add_special_tokens=False) for t in texts], self.tokenizer.pad_token_id)
        return out, n_media

    monkeypatch.setattr(LlavaDeftForCausalLM, "generate", fake)


def test_retention_sweep_writes_table_json_and_plot(tiny_model, tmp_path, capsys, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "m")
    answer_every_third(monkeypatch)
    types = EasyVQADataset("test", limit=24).question_types
    rows = easyvqa.main(["--model", str(tmp_path / "m"), "--limit", "24", "--batch-size", "12",
                         "--retention", "1", "0.25", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert [r["retention"] for r in rows] == [1.0, 0.25]
    assert [r["tokens_per_image"] for r in rows] == [64.0, 16.0]  # ceil(ratio * 64) kept per image
    for r in rows:
        assert sum(r["counts"][k] for k in r["counts"] if k != "all") == r["counts"]["all"] == 24
        assert r["accuracy"]["all"] == pytest.approx(8 / 24)  # items 0, 3, ..., 21 answered right
        for t in set(types):
            right = sum(1 for i, q in enumerate(types) if q == t and i % 3 == 0)
            assert r["counts"][t] == types.count(t) and r["accuracy"][t] == pytest.approx(right / types.count(t))
    saved = json.loads((tmp_path / "out" / "easyvqa_test.json").read_text())
    assert saved["pipeline"] == ["sam", "fgcs"] and {"device", "date", "commit"} <= set(saved)
    assert saved["training"] is None  # saved by save_pretrained, not by a training run
    assert (tmp_path / "out" / "easyvqa_test.png").stat().st_size > 0
    assert "| 0.25 | 16.0 |" in (tmp_path / "out" / "easyvqa_test.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "easy-VQA test accuracy: 33.3%"


def test_retention_without_a_reducer_is_refused(tmp_path):
    from llava_deft.model import LlavaDeftForCausalLM

    LlavaDeftForCausalLM().save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="has none; add --pipeline configs/pipeline/fgcs.yaml"):
        easyvqa.main(["--model", str(tmp_path / "m"), "--limit", "4", "--retention", "0.5", "--out", str(tmp_path)])


def test_report_names_how_the_model_was_trained(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    record = {"command": "python -m llava_deft.train --config configs/train/easyvqa_tiny.yaml", "commit": "abc1234",
              "device": "CPU", "world_size": 1, "stages": [{"steps": 189, "final_loss": 0.31}], "finished": "2026-12-01 14:00 UTC"}
    (tmp_path / "m" / "training.json").write_text(json.dumps(record))
    easyvqa.main(["--model", str(tmp_path / "m"), "--limit", "4", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert json.loads((tmp_path / "out" / "easyvqa_test.json").read_text())["training"] == record
    assert ("Trained by `python -m llava_deft.train --config configs/train/easyvqa_tiny.yaml` (commit abc1234, CPU, "
            "world size 1, 189 steps, final training loss 0.3100, finished 2026-12-01 14:00 UTC).") \
        in (tmp_path / "out" / "easyvqa_test.md").read_text()
    (tmp_path / "m" / "training.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"'.*m/training.json' must hold a JSON object, got list"):
        easyvqa.main(["--model", str(tmp_path / "m"), "--limit", "4", "--out", str(tmp_path / "out"), "--device", "cpu"])
