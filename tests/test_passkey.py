"""The generated long-text pass-key task: record layout, one needle whose key is the answer, exact
passage lengths in tiny-tokenizer tokens, depths spread over [0, 1], disjoint train/test keys,
determinism through the CLI, and the ``<text>`` placeholder's integration path on the tiny tokenizer."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from llava_deft.tasks.passkey import (
    KEY_RANGE,
    MIN_TOKENS,
    NEEDLE,
    QUESTION,
    TEXT_TOKEN,
    _SHORT_SENTENCES,
    filler_sentences,
    key_split,
    main,
    make_passage,
    make_passkey_task,
    make_sample,
    split_keys,
)
from llava_deft.model.tokenizer import MEDIA_TOKENS, TINY_TOKENIZER_DIR, load_tokenizer, media_token_ids

NEEDLE_RE = re.compile(r"The pass key is (\d{5})\. Remember it\.")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small generated task: 40 train / 20 test passages of 64 to 300 tokens."""
    out = tmp_path_factory.mktemp("passkey_task")
    make_passkey_task(out, n_train=40, n_test=20, min_tokens=64, max_tokens=300, seed=3, progress=False)
    return out, {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "test")}


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def test_layout_and_records(task):
    out, splits = task
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["n_train"], meta["n_test"], meta["min_tokens"], meta["max_tokens"], meta["seed"]) == (40, 20, 64, 300, 3)
    assert meta["text_placeholder"] == TEXT_TOKEN == "<text>"
    assert meta["tokenizer_json_sha256"] == hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    for split, records in splits.items():
        assert len(records) == meta[f"n_{split}"]
        assert [r["id"] for r in records] == [f"passkey-{split}-{i:05d}" for i in range(len(records))]
        for r in records:
            assert set(r) == {"id", "text", "question_type", "passkey", "depth", "text_tokens", "conversations"}
            assert r["question_type"] == "passkey"
            human, gpt = r["conversations"]
            assert human == {"from": "human", "value": f"{TEXT_TOKEN}\n{QUESTION}"}
            assert gpt == {"from": "gpt", "value": r["passkey"]}
            assert not any(m in r["text"] for m in (*MEDIA_TOKENS.values(), TEXT_TOKEN))


def test_needle_appears_once_and_answer_matches(task):
    _, splits = task
    for r in splits["train"] + splits["test"]:
        text, answer = r["text"], r["conversations"][1]["value"]
        assert NEEDLE_RE.findall(text) == [answer]
        assert text.count(NEEDLE.format(key=answer)) == 1
        assert text.lower().count("pass key") == 1
        assert re.findall(r"\d+", text) == [answer]  # no other number anywhere in the passage
        assert KEY_RANGE[0] <= int(answer) <= KEY_RANGE[1]


def test_filler_has_no_digits_and_no_needle_words():
    sentences = filler_sentences(np.random.default_rng(0), 3000) + list(_SHORT_SENTENCES)
    text = " ".join(sentences).lower()
    assert not re.search(r"\d", text)
    assert not re.search(r"\b(pass|key|remember)\b", text)
    assert not re.search(r"\ba [aeiou]", text)  # articles agree: "an early", not "a early"


def test_lengths_are_exact_and_in_range(task, tok):
    _, splits = task
    for r in splits["train"] + splits["test"]:
        assert n_tokens(tok, r["text"]) == r["text_tokens"]
        assert 64 <= r["text_tokens"] <= 300


@pytest.mark.parametrize("lo, hi", [(64, 64), (97, 101), (1000, 1024)])
def test_requested_range_is_honoured(tok, lo, hi):
    for i in range(5):
        r = make_sample(11, "train", i, min_tokens=lo, max_tokens=hi)
        assert lo <= n_tokens(tok, r["text"]) == r["text_tokens"] <= hi


def test_depth_is_the_filler_share_before_the_needle(task, tok):
    _, splits = task
    for r in splits["train"]:
        match = NEEDLE_RE.search(r["text"])
        before = n_tokens(tok, r["text"][: match.start()].rstrip(" "))
        after = n_tokens(tok, r["text"][match.end() :])  # starts with its space, as inside the passage
        assert r["depth"] == pytest.approx(before / (before + after), abs=1e-4)


def test_depths_cover_the_unit_interval():
    depths = np.array([make_sample(0, "test", i, min_tokens=256, max_tokens=384)["depth"] for i in range(200)])
    assert depths.min() >= 0 and depths.max() <= 1
    counts, _ = np.histogram(depths, bins=10, range=(0, 1))
    assert counts.min() > 0, counts
    assert counts.max() < 3 * 200 / 10, counts  # roughly uniform, not piled up somewhere


def test_depth_endpoints_put_the_needle_first_or_last():
    rng = np.random.default_rng(0)
    first, d0 = make_passage(rng, 12345, 200, 0.0)
    last, d1 = make_passage(rng, 12345, 200, 1.0)
    assert first.startswith("The pass key is 12345. Remember it.") and d0 == 0
    assert last.endswith("The pass key is 12345. Remember it.") and d1 == 1


def test_train_and_test_keys_are_disjoint(task):
    train, test = set(split_keys("train")), set(split_keys("test"))
    assert not train & test
    assert train | test == set(range(KEY_RANGE[0], KEY_RANGE[1] + 1))
    assert 0.45 < len(test) / (len(train) + len(test)) < 0.55
    # a hash split, not digit ranges: every leading digit occurs in both splits
    assert {str(k)[0] for k in train} == {str(k)[0] for k in test} == set("123456789")
    _, splits = task
    for split, records in splits.items():
        assert {key_split(int(r["passkey"])) for r in records} == {split}
    assert not {r["passkey"] for r in splits["train"]} & {r["passkey"] for r in splits["test"]}


def test_cli_is_deterministic(tmp_path, task):
    out, _ = task
    again = tmp_path / "again"
    main(["--out", str(again), "--n-train", "40", "--n-test", "20", "--min-tokens", "64", "--max-tokens", "300",
          "--seed", "3"])
    for name in ("train.json", "test.json", "meta.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # sample i does not depend on how many are made, and another seed gives other passages
    fewer = tmp_path / "fewer"
    main(["--out", str(fewer), "--n-train", "5", "--n-test", "0", "--min-tokens", "64", "--max-tokens", "300",
          "--seed", "3"])
    assert json.loads((fewer / "train.json").read_text()) == json.loads((out / "train.json").read_text())[:5]
    assert json.loads((fewer / "test.json").read_text()) == []
    assert make_sample(4, "train", 0, 64, 300) != make_sample(3, "train", 0, 64, 300)


def test_cli_defaults_and_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "x", "--n-tokens", "5"])
    assert "unrecognized arguments: --n-tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_tokens": MIN_TOKENS - 1}, f"min_tokens must be >= {MIN_TOKENS}"),
        ({"min_tokens": 300, "max_tokens": 200}, r"max_tokens must be >= min_tokens \(300\)"),
        ({"n_train": -1}, "n_train must be >= 0"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_passkey_task(tmp_path, **{"n_train": 1, "n_test": 1, **kwargs}, progress=False)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        make_sample(0, "val", 0)


def test_text_placeholder_is_one_token_of_the_tiny_tokenizer(tok):
    """``<text>`` was appended after the BPE vocabulary: the next id, every earlier id unchanged."""
    assert MEDIA_TOKENS["text"] == TEXT_TOKEN
    assert media_token_ids(tok) == {"image": 4, "video": 5, "audio": 6, "text": 1162}
    assert len(tok) == 1163 and tok.convert_ids_to_tokens(1162) == TEXT_TOKEN
    prompt = tok.encode(f"{TEXT_TOKEN}\n{QUESTION}", add_special_tokens=False)
    assert prompt[0] == 1162 and TEXT_TOKEN not in tok.decode(prompt[1:])
    assert tok.decode(prompt) == f"{TEXT_TOKEN}\n{QUESTION}"
