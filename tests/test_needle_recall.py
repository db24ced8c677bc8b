"""eval/needle_recall.py: the key's tokens of a pass-key passage, and the recall it reports on a tiny model."""

import json

import pytest
import torch

from eval import needle_recall as nr
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.tokenizer import load_tokenizer
from llava_deft.tasks.passkey import make_sample
from tests.conftest import TINY_PIPE


def test_key_mask_marks_exactly_the_tokens_that_spell_the_key():
    """Slow reference: the tokens of the passage whose text holds a digit, which concatenated give the key."""
    tok = load_tokenizer(None)
    digit = nr.digit_token_table(tok)
    samples = [make_sample(0, "test", i, 64, 128) for i in range(6)]
    ids = [tok(s["text"], add_special_tokens=False)["input_ids"] for s in samples]
    width = max(map(len, ids))
    text_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    lengths = torch.tensor([len(x) for x in ids])
    mask = nr.passage_key_mask(text_ids, lengths, digit)
    for row, (s, x) in enumerate(zip(samples, ids)):
        expected = [i for i, t in enumerate(tok.convert_ids_to_tokens(x)) if any(c.isdigit() for c in t)]
        assert mask[row].nonzero().flatten().tolist() == expected
        assert "".join(tok.convert_ids_to_tokens([x[i] for i in expected])).replace("Ġ", "") == s["passkey"]
        assert not mask[row, len(x):].any()  # padding is never key


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    LlavaDeftForCausalLM({"pipeline": TINY_PIPE}).save_pretrained(path)
    return path


def test_report_counts_every_key_token_and_keeps_whole_keys_at_retention_one(saved_model, tmp_path):
    rows = nr.main(["--model", str(saved_model), "--n", "6", "--min-tokens", "64", "--max-tokens", "96",
                    "--ratios", "1", "0.25", "--batch-size", "3", "--device", "cpu", "--out", str(tmp_path)])
    tok = load_tokenizer(None)
    n_key = sum(any(c.isdigit() for c in t) for i in range(6) for t in tok.tokenize(make_sample(0, "test", i, 64, 96)["text"]))
    assert [r["ratio"] for r in rows] == [1.0, 0.25] and all(r["key_tokens"] == n_key and r["passages"] == 6 for r in rows)
    full, quarter = rows
    assert full["kept_recall"] == 1.0 and full["key_kept_whole"] == 1.0  # nothing is pruned at retention 1
    assert all(full["target_recall"][s] == 1.0 for s in nr.FEEDBACK_SIGNALS)  # the top-n of n tokens holds the key
    assert 0 <= quarter["kept_recall"] <= 1 and set(quarter["target_recall"]) == set(nr.FEEDBACK_SIGNALS)
    doc = json.loads((tmp_path / "needle_recall.json").read_text())
    assert doc["rows"] == rows and doc["meta"]["device"]
    md = (tmp_path / "needle_recall.md").read_text()
    assert "| 1 | 100.0 % | 100.0 % | 100.0 % (100.0 %) |" in md and "| 0.25 |" in md and "target: l1" in md


def test_a_pipeline_without_a_reducer_is_refused(tmp_path):
    path = tmp_path / "plain"
    LlavaDeftForCausalLM({}).save_pretrained(path)
    with pytest.raises(SystemExit, match="has no reducer; give --pipeline"):
        nr.main(["--model", str(path), "--n", "2", "--device", "cpu", "--out", str(tmp_path)])
