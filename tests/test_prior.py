"""The question prior (llava_deft/evaluation/prior.py) and the report's 'base beats the prior' check."""

import pytest

from llava_deft.evaluation import prior as pr
from llava_deft.evaluation import report as rp
from llava_deft.evaluation.loop import ids_digest
from tests.test_sweep import make_spec, rspec


def rec(i, q, a, qtype="t", media="<image>\n"):
    return {"id": f"r{i}", "question_type": qtype, "image": "x.png",
            "conversations": [{"from": "human", "value": media + q}, {"from": "gpt", "value": a}]}


TRAIN = [rec(0, "What colour?", "red"), rec(1, "what  colour?", "red"), rec(2, "What colour?", "blue"),
         rec(3, "Is it big?", "yes", "yn"), rec(4, "Is it small?", "no", "yn"), rec(5, "Is it small?", "no", "yn")]


def test_question_key_drops_placeholders_case_and_spaces():
    assert pr.question_key("<image>\nWhat   COLOUR?<video>") == "what colour?"
    assert pr.question_key("<audio><text> Is it big?") == "is it big?"


def test_qa_pair_is_the_last_answer_and_its_question():
    r = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "1"},
                           {"from": "human", "value": "b"}, {"from": "gpt", "value": "2"}]}
    assert pr.qa_pair(r) == ("b", "2")
    assert pr.qa_pair({"conversations": [{"from": "human", "value": "a"}]}) is None


def test_prior_answers_by_question_then_type_then_overall():
    test = [rec(10, "WHAT colour?", "red"),       # seen: red (2 of 3)
            rec(11, "what colour?", "blue"),      # seen: red -> wrong
            rec(12, "Is it huge?", "no", "yn"),   # unseen question: the type's answer, no (2 of 3)
            rec(13, "Who?", "red", "other")]      # unseen type: the split's answer, red/no tie -> the first counted
    out = pr.question_prior(TRAIN, test)
    assert out["correct"] == "1011"
    assert out["accuracy"] == {"all": 0.75, "other": 1.0, "t": 0.5, "yn": 1.0}
    assert out["counts"] == {"all": 4, "other": 1, "t": 2, "yn": 1}
    assert out["questions_seen_in_train"] == 2 and out["train_answers"] == 6
    assert out["ids_digest"] == ids_digest(["r10", "r11", "r12", "r13"])
    assert pr.question_prior(TRAIN, test, limit=2)["correct"] == "10"


def test_prior_needs_answers_and_takes_a_type_function():
    assert pr.question_prior([], [rec(0, "q", "a")]) is None
    out = pr.question_prior(TRAIN, [rec(9, "Is it tiny?", "no", "yn")], qtype=lambda r: "all")
    assert out["accuracy"]["all"] == 0.0  # one type: the split's most frequent answer, red


def test_sweep_prior_rows_for_a_user_pair_and_none_without_training_answers(tmp_path):
    import json

    (tmp_path / "my").mkdir()
    (tmp_path / "my/train.json").write_text(json.dumps(TRAIN))
    (tmp_path / "my/test.json").write_text(json.dumps([rec(10, "What colour?", "red"), rec(11, "Is it small?", "yes", "yn")]))
    spec = make_spec(tmp_path, seeds=[0, 1], data={"task": None, "train": str(tmp_path / "my/train.json"),
                                                    "test": str(tmp_path / "my/test.json")})
    from llava_deft.evaluation import sweep as ds

    rows = ds.prior_rows(spec)
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(r["protocol"] == rp.PRIOR and r["correct"] == "10" and r["ratio"] == 1.0 for r in rows)
    (tmp_path / "my/train.json").write_text("[]")  # answers generated on the fly (pass-key): no prior
    assert ds.prior_rows(spec) == []
    assert ds.prior_rows(make_spec(tmp_path)) == []  # easy-VQA ships no LLaVA-JSON training split


def _row(protocol, reducer, ratio, seed, bits, **kw):
    n = len(bits)
    return {"protocol": protocol, "reducer": reducer, "ratio": ratio, "rtd_mode": None, "seed": seed,
            "accuracy": {"all": bits.count("1") / n, "t": bits.count("1") / n}, "tokens_per_image": 4.0, "correct": bits,
            "ids_digest": "d", **kw}


@pytest.mark.parametrize("base_bits, status", [("1" * 90 + "0" * 10, "PASS"), ("1" * 50 + "0" * 50, "FAIL")])
def test_report_checks_the_base_against_the_prior(base_bits, status):
    prior = "1" * 50 + "0" * 50
    rows = [_row(rp.BASE, "deft", 1.0, s, base_bits, rtd_mode="fast") for s in (0, 1)]
    rows += [_row(rp.PRIOR, "question_prior", 1.0, s, prior) for s in (0, 1)]
    checks = [c for c in rp.acceptance_checks(rows, rspec()) if "question prior" in c.text]
    assert len(checks) == 1 and checks[0].status == status
    assert ("cannot rank reducers" in checks[0].text) == (status == "FAIL")
    assert rp.sweep_ratios(rows) == [] and rp.reducer_order(rows, ("deft",)) == []  # the prior is no reducer cell
    table = rp.type_table(rows, ["deft"], "deft")
    assert table.splitlines()[2].startswith("| question prior (text only) |")


def test_read_records_wants_a_list(tmp_path):
    from llava_deft.errors import DatasetFormatError

    p = tmp_path / "train.json"
    p.write_text('{"id": 1}')
    with pytest.raises(DatasetFormatError, match=r"train.json: a LLaVA-JSON file holds a list of records; got a JSON dict"):
        pr.read_records(p)
