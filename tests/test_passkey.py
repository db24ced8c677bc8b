"""The generated long-text pass-key task: record layout, one needle whose key is the answer, exact
passage lengths in tiny-tokenizer tokens (up to 8,192), depths spread over [0, 1], disjoint train/test
keys, determinism through the CLI, multi-needle (labelled key-value) passages, the single-needle records
unchanged by them, and the ``<text>`` placeholder's integration path on the tiny tokenizer."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from llava_deft.tasks.passkey import (
    KEY_RANGE,
    LABELLED_NEEDLE,
    LABELLED_QUESTION,
    LABELS,
    MIN_TOKENS,
    NEEDLE,
    QUESTION,
    TEXT_TOKEN,
    _ADVERBIALS,
    _SHORT_SENTENCES,
    _SUBJECTS,
    _TEMPLATES,
    filler_sentences,
    key_split,
    main,
    make_multi_passage,
    make_passage,
    make_passkey_task,
    make_sample,
    split_keys,
)
from llava_deft.model.tokenizer import MEDIA_TOKENS, TINY_TOKENIZER_DIR, load_tokenizer, media_token_ids

NEEDLE_RE = re.compile(r"The pass key is (\d{5})\. Remember it\.")
LABELLED_RE = re.compile(r"The pass key of the (\w+ \w+) is (\d{5})\. Remember it\.")


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


# ------------------------------------------------------------------ long passages, multi-needle passages

SINGLE_NEEDLE_SHA256 = "9f8f75ce7f558949ef716c9ec55af2a6a9ff9152e4702b4351cd3dd30ec6cece"
"""sha256 of the JSON of the 18 records below, written by the single-needle generator before ``needles``
existed (GENERATOR_VERSION 1): ``needles=1`` must keep giving these bytes."""


def test_single_needle_records_are_unchanged():
    records = [make_sample(seed, split, i, lo, hi)
               for seed, split, lo, hi in [(0, "train", 256, 1024), (3, "test", 64, 300), (7, "train", 2048, 8192)]
               for i in range(6)]
    assert [make_sample(3, "test", i, 64, 300, needles=1) for i in range(6)] == records[6:12]
    assert hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest() == SINGLE_NEEDLE_SHA256


@pytest.mark.parametrize("n, needles", [(2048, 1), (8192, 1), (8192, 4)])
def test_long_passages_have_their_exact_length(tok, n, needles):
    r = make_sample(5, "test", 0, min_tokens=n, max_tokens=n, needles=needles)
    assert r["text_tokens"] == n_tokens(tok, r["text"]) == n
    assert len(NEEDLE_RE.findall(r["text"]) if needles == 1 else LABELLED_RE.findall(r["text"])) == needles
    assert 0 <= r["depth"] <= 1


def test_multi_needle_sample(tok):
    r = make_sample(2, "train", 7, min_tokens=300, max_tokens=600, needles=3)
    assert set(r) == {"id", "text", "question_type", "passkey", "depth", "text_tokens", "needles", "label",
                      "distractors", "conversations"}
    assert (r["id"], r["question_type"], r["needles"]) == ("passkey-train-00007", "passkey", 3)
    text = r["text"]
    found = LABELLED_RE.findall(text)  # (label, key) in passage order
    assert len(found) == 3 and text.lower().count("pass key") == 3
    labels, keys = [f[0] for f in found], [f[1] for f in found]
    assert len(set(labels)) == 3 and len(set(keys)) == 3 and set(labels) <= set(LABELS)
    assert re.findall(r"\d+", text) == keys  # the keys are the passage's only numbers
    assert all(key_split(int(k)) == "train" for k in keys)
    assert r["conversations"] == [
        {"from": "human", "value": f"{TEXT_TOKEN}\nWhat is the pass key of the {r['label']}?"},
        {"from": "gpt", "value": r["passkey"]},
    ]
    assert dict(found)[r["label"]] == r["passkey"]
    assert r["distractors"] == [k for k in keys if k != r["passkey"]]
    # depth: the share of the rest of the passage (filler and the other needles) before the asked needle
    match = re.search(re.escape(LABELLED_NEEDLE.format(label=r["label"], key=r["passkey"])), text)
    before = n_tokens(tok, text[: match.start()].rstrip(" "))
    after = n_tokens(tok, text[match.end() :])
    assert r["depth"] == pytest.approx(before / (before + after), abs=1e-4)
    assert n_tokens(tok, text) == r["text_tokens"]
    # deterministic, and a function of (seed, split, index)
    assert make_sample(2, "train", 7, min_tokens=300, max_tokens=600, needles=3) == r
    assert make_sample(2, "train", 8, min_tokens=300, max_tokens=600, needles=3) != r


def test_multi_needle_keys_labels_and_depths_over_many_samples():
    asked_at = []
    for i in range(60):
        r = make_sample(0, "test", i, min_tokens=256, max_tokens=512, needles=4)
        found = LABELLED_RE.findall(r["text"])
        assert len({f[0] for f in found}) == len({f[1] for f in found}) == 4
        assert {key_split(int(f[1])) for f in found} == {"test"}
        assert [f[1] for f in found].index(r["passkey"]) == [f[0] for f in found].index(r["label"])
        asked_at.append([f[1] for f in found].index(r["passkey"]))
    assert set(asked_at) == {0, 1, 2, 3}  # the asked needle is not always the last (recency does not win)


def test_labels_never_occur_in_filler():
    words = set(re.findall(r"[a-z]+", " ".join(
        filler_sentences(np.random.default_rng(1), 3000) + list(_SHORT_SENTENCES) + list(_TEMPLATES)
        + list(_ADVERBIALS) + list(_SUBJECTS)).lower()))
    assert len(LABELS) == len(set(LABELS)) == 64
    assert not {label.split()[1] for label in LABELS} & words  # no label noun, so no label, in any filler
    assert all(label.isascii() and label.islower() and len(label.split()) == 2 for label in LABELS)


def test_multi_passage_with_one_needle_is_make_passage():
    one, d = make_passage(np.random.default_rng(4), 23456, 500, 0.3)
    assert make_multi_passage(np.random.default_rng(4), [NEEDLE.format(key=23456)], 500, [0.3]) == (one, [d])
    needles = [LABELLED_NEEDLE.format(label=LABELS[i], key=11111 * (i + 1)) for i in range(3)]
    text, depths = make_multi_passage(np.random.default_rng(0), needles, 400, [0.0, 1.0, 0.5])
    assert text.startswith(LABELLED_NEEDLE.format(label=LABELS[0], key=11111)) and depths[0] == 0
    assert text.endswith(LABELLED_NEEDLE.format(label=LABELS[1], key=22222)) and depths[1] == 1
    assert 0.4 < depths[2] < 0.6


def test_multi_needle_task_and_cli(tmp_path):
    out = tmp_path / "kv"
    main(["--out", str(out), "--n-train", "3", "--n-test", "2", "--min-tokens", "160", "--max-tokens", "200",
          "--needles", "4", "--seed", "1"])
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["needles"], meta["needle"], meta["question"], meta["labels"]) == (
        4, LABELLED_NEEDLE, LABELLED_QUESTION, list(LABELS))
    test = json.loads((out / "test.json").read_text())
    assert test == [make_sample(1, "test", i, 160, 200, needles=4) for i in range(2)]
    single = tmp_path / "one"
    make_passkey_task(single, n_train=1, n_test=1, min_tokens=64, max_tokens=80, progress=False)
    meta = json.loads((single / "meta.json").read_text())
    assert (meta["needles"], meta["needle"], meta["question"], "labels" in meta) == (1, NEEDLE, QUESTION, False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"needles": 0}, r"needles must be >= 1 \(1 is the single-needle task\), got 0"),
        ({"needles": 65, "min_tokens": 4096, "max_tokens": 4096}, r"needles must be <= 64 \(each needle has its own label\)"),
        ({"needles": 2.5}, r"needles must be an integer >= 1"),
        ({"needles": 4, "min_tokens": 100}, r"min_tokens must be >= 160 for needles=4 .*raise min_tokens or lower needles"),
    ],
)
def test_bad_needles_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_passkey_task(tmp_path, **{"n_train": 1, "n_test": 1, **kwargs}, progress=False)
    if "min_tokens" not in kwargs:
        with pytest.raises(ValueError, match=match):
            make_sample(0, "train", 0, **kwargs)


def test_cli_bad_needles_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "x", "--needles", "0"])
    assert "--needles must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", "x", "--needles", "3", "--min-tokens", "64"])
    assert "--min-tokens must be >= 128 for --needles=3" in capsys.readouterr().err
