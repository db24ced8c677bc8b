"""Datasets and collator: labels from the assistant mask, typed refusals, LLaVA JSON validation, padding."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from llava_deft.data import (
    IGNORE_INDEX,
    EasyVQADataset,
    LlavaJsonDataset,
    LRUCache,
    MultimodalCollator,
    build_generation_inputs,
    export_easyvqa,
    pad_sequences,
)
from llava_deft.errors import (
    DatasetFormatError,
    EmptyLabelsError,
    MediaCountMismatchError,
    MediaFileError,
    SampleTooLongError,
)
from llava_deft.model.tokenizer import load_tokenizer

SIZE = 16


def transform(img: Image.Image) -> torch.Tensor:
    """(3, SIZE, SIZE) float in [0, 1]."""
    arr = np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, value, value))


def sample(sid, user, answer="yes", images=()):
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": sid, "messages": messages, "images": list(images)}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def test_split():
    return EasyVQADataset("test")


def chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, return_dict=True, **kw)["input_ids"])


def collator(tok, **kw):
    args = {"media_tokens_per_image": 4, "max_length": 128}
    args.update(kw)
    return MultimodalCollator(tok, transform, **args)


# ------------------------------------------------------------------------------------------- easy-VQA


def test_easyvqa_sizes_and_question_types(test_split):
    assert len(EasyVQADataset("train")) == 38_575
    assert len(test_split) == 9_673
    assert len(test_split.answers) == 13
    counts = Counter(test_split.question_types)
    assert set(counts) == {"shape", "color", "yes/no"}
    assert sum(counts.values()) == 9_673
    shapes = {test_split.targets[i] for i, t in enumerate(test_split.question_types) if t == "shape"}
    assert shapes == {"circle", "rectangle", "triangle"}


def test_easyvqa_item(test_split):
    item = test_split[0]
    assert item["id"] == "easyvqa-test-0"
    assert item["messages"][0]["content"] == "<image>\n" + test_split.questions[0]
    assert item["messages"][1] == {"role": "assistant", "content": test_split.targets[0]}
    (img,) = item["images"]
    assert img.mode == "RGB" and img.size == (64, 64)
    assert item["question_type"] in {"shape", "color", "yes/no"}
    assert item["image_keys"] == [f"easyvqa/test/{test_split.image_ids[0]}"]
    assert len(EasyVQADataset("test", limit=5)) == 5
    with pytest.raises(ValueError, match="'train' or 'test'"):
        EasyVQADataset("val")


def test_easyvqa_grouped_by_image(test_split):
    """One multi-turn conversation per image covering each question of that image exactly once."""
    grouped = EasyVQADataset("test", group_by_image=True)
    assert len(grouped) == 1_000
    seen = []
    for i in (0, 1, 999):
        item = grouped[i]
        msgs = item["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert msgs[0]["content"].startswith("<image>\n") and len(item["images"]) == 1
        assert item["image_keys"] == [f"easyvqa/test/{test_split.image_ids[grouped.groups[i][0]]}"]
        assert all("<image>" not in m["content"] for m in msgs[1:])
        qs = grouped.groups[i]
        assert {test_split.image_ids[q] for q in qs} == {test_split.image_ids[qs[0]]}
        assert [m["content"] for m in msgs[1::2]] == [test_split.targets[q] for q in qs]
    for g in grouped.groups:
        seen += g
    assert sorted(seen) == list(range(9_673))


def test_export_round_trip(tmp_path):
    ds = EasyVQADataset("test", limit=12)
    json_path = export_easyvqa(tmp_path, "test", limit=12)
    assert json_path == tmp_path / "test.json"
    loaded = LlavaJsonDataset(json_path, tmp_path / "images")
    assert len(loaded) == len(ds)
    for i in range(len(ds)):
        a, b = ds[i], loaded[i]
        assert a["id"] == b["id"] and a["messages"] == b["messages"]
        assert [np.asarray(x).tolist() for x in a["images"]] == [np.asarray(x).tolist() for x in b["images"]]


# ------------------------------------------------------------------------------------------- LLaVA JSON


def write_json(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


GOOD = {"id": "ok", "image": "a.png", "conversations": turns(("human", "<image>\nq"), ("gpt", "a"))}


@pytest.mark.parametrize(
    "data, pattern",
    [
        ("{not json", r"bad\.json: not valid JSON"),
        ({"id": "x"}, r"bad\.json: expected a JSON list of records, got dict"),
        ([GOOD, ["x"]], r"bad\.json: record 1: expected an object"),
        ([GOOD, {"conversations": []}], r"bad\.json: record 1: key 'id' is missing"),
        ([GOOD, {"id": "s7"}], r"bad\.json: record 1 \(id 's7'\): key 'conversations' is missing"),
        (
            [GOOD, {"id": "s8", "conversations": [{"from": "bot", "value": "hi"}]}],
            r"bad\.json: record 1 \(id 's8'\): key 'conversations\[0\]\.from' has unknown role 'bot'",
        ),
        (
            [GOOD, {"id": 9, "conversations": [{"from": "human"}]}],
            r"bad\.json: record 1 \(id '9'\): key 'conversations\[0\]\.value' is missing",
        ),
        (
            [GOOD, {"id": "s10", "image": 3, "conversations": [{"from": "human", "value": "q"}]}],
            r"bad\.json: record 1 \(id 's10'\): key 'image' must be a path",
        ),
    ],
)
def test_llava_json_format_errors(tmp_path, data, pattern):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DatasetFormatError, match=pattern):
        LlavaJsonDataset(path, tmp_path)


def test_llava_json_text_only_and_multi_image(tmp_path):
    solid(10).save(tmp_path / "a.png")
    solid(20).save(tmp_path / "b.png")
    records = [
        {"id": "t", "conversations": turns(("system", "sys"), ("human", "hi"), ("gpt", "yo"))},
        {"id": "m", "image": ["a.png", "b.png"], "conversations": turns(("human", "<image><image> d?"), ("gpt", "no"))},
    ]
    ds = LlavaJsonDataset(write_json(tmp_path / "d.json", records), tmp_path)
    assert ds[0]["images"] == [] and [m["role"] for m in ds[0]["messages"]] == ["system", "user", "assistant"]
    assert [img.getpixel((0, 0)) for img in ds[1]["images"]] == [(10, 10, 10), (20, 20, 20)]


def test_llava_json_missing_and_corrupt_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records = [
        dict(GOOD, id="gone", image="missing.png"),
        dict(GOOD, id="bad", image="broken.png"),
    ]
    path = write_json(tmp_path / "set.json", records)
    # a missing file is found when the dataset is built (a stat); a corrupt one when it is decoded
    with pytest.raises(DatasetFormatError, match=r"set\.json: record 0 \(id 'gone'\): key 'image' file 'missing\.png' does not exist"):
        LlavaJsonDataset(path, tmp_path)
    ds = LlavaJsonDataset(path, tmp_path, skip_invalid=True)
    with pytest.raises(MediaFileError, match=r"broken\.png.*sample 'bad' of .*set\.json.*cannot be decoded"):
        ds[0]


def test_llava_json_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        LlavaJsonDataset(tmp_path / "nothere.json", tmp_path)
    path = write_json(tmp_path / "d.json", [GOOD])
    with pytest.raises(MediaFileError, match="image folder .*no_images"):
        LlavaJsonDataset(path, tmp_path / "no_images")


# ------------------------------------------------------------------------------------------- collator


def test_labels_are_exactly_the_assistant_tokens(tok, test_split):
    items = [test_split[i] for i in range(4)]
    batch = collator(tok)(items)
    for row, item in enumerate(items):
        ids, labels, att = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        # the answer (with its leading space) and the eos, nothing else: not the prompt, not the placeholder
        assert tok.decode(ids[kept]) == " " + item["messages"][1]["content"] + "</s>"
        prompt = chat_ids(tok, item["messages"][:1], add_generation_prompt=True)
        assert kept.nonzero()[0].item() == len(prompt)
        assert not kept[att == 0].any()
        assert (ids[att == 0] == tok.pad_token_id).all()


def test_multi_turn_labels_cover_every_answer(tok):
    s = {
        "id": "mt",
        "messages": [
            {"role": "system", "content": "short answers"},
            {"role": "user", "content": "<image>\nshape?"},
            {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "color?"},
            {"role": "assistant", "content": "red"},
        ],
        "images": [solid(1)],
    }
    batch = collator(tok)([s])
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " circle</s> red</s>"


def test_media_count_mismatch_names_sample_and_counts(tok):
    c = collator(tok)
    fine = sample("fine", "<image>\nq", images=[solid(0)])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'two-for-1'.* 2 <image> placeholder\(s\) but 1 media"):
        c([fine, sample("two-for-1", "<image><image>\nq", images=[solid(0)])])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'none'.* 0 <image> placeholder\(s\) but 1 media"):
        c([sample("none", "what is it?", images=[solid(0)])])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'vid'.* 1 <video> placeholder\(s\) but 0 media"):
        c([sample("vid", "<video>\nwhat happens?")])


def test_empty_labels_names_sample(tok):
    with pytest.raises(EmptyLabelsError, match=r"sample 'q-only' has no assistant tokens.*no assistant turn"):
        collator(tok)([sample("fine", "hi"), sample("q-only", "hi", answer=None)])


def test_too_long_counts_media_tokens(tok):
    s = sample("long", "<image>\nwhat is the blue shape?", images=[solid(3)])
    n_ids = len(chat_ids(tok, s["messages"]))
    ok = collator(tok, media_tokens_per_image=10, max_length=n_ids - 1 + 10)([s])
    assert ok["input_ids"].shape == (1, n_ids)
    with pytest.raises(SampleTooLongError, match=r"sample 'long' is 41 tokens long .*max_length=40"):
        collator(tok, media_tokens_per_image=41 - (n_ids - 1), max_length=40)([s])
    with pytest.raises(SampleTooLongError, match=r"sample 'long'"):
        collator(tok, media_tokens_per_image=1, max_length=n_ids - 1)([s])


def test_mixed_text_only_and_image_samples(tok):
    samples = [
        sample("one", "<image>\nq", images=[solid(10)]),
        sample("text", "just text"),
        sample("two", "<image> and <image>", images=[solid(20), solid(30)]),
    ]
    batch = collator(tok)(samples)
    assert batch["media_counts"].tolist() == [1, 0, 2]
    assert batch["ids"] == ["one", "text", "two"]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    # images in sample order
    assert torch.allclose(batch["pixel_values"][:, 0, 0, 0], torch.tensor([10, 20, 30]) / 255.0)
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
    text_only = collator(tok)([sample("a", "hi"), sample("b", "hello there")])
    assert text_only["pixel_values"] is None and text_only["media_counts"].tolist() == [0, 0]


def test_left_padded_generation_batch(tok, test_split):
    longer = sample("txt", "a much longer text only question, please answer it", answer="no")
    items = [test_split[0], longer, test_split[1]]
    c = collator(tok, padding_side="left", generation=True)
    batch = c(items)
    assert "labels" not in batch
    assert batch["references"] == [item["messages"][1]["content"] for item in items]
    ids, att = batch["input_ids"], batch["attention_mask"]
    assert (att[:, -1] == 1).all()  # every row ends with its real last token: pads are on the left
    lengths = att.sum(1)
    for row, item in enumerate(items):
        prompt = chat_ids(tok, item["messages"][:1], add_generation_prompt=True)
        assert ids[row, ids.shape[1] - lengths[row] :].tolist() == prompt  # same ids as one at a time
        assert (ids[row, : ids.shape[1] - lengths[row]] == tok.pad_token_id).all()
        assert att[row].tolist() == sorted(att[row].tolist())  # 0s then 1s
    assert lengths.min() < lengths.max()
    assert tok.decode(ids[0, -2:]) == "ASSISTANT:"


def test_build_generation_inputs(tok):
    prompts, images = ["<image>\nwhat color is the shape?", "hello"], [[solid(5)], []]
    gen = MultimodalCollator(tok, transform, 4, 64, padding_side="left", generation=True)
    batch = build_generation_inputs(gen, prompts, images, system="Be brief.")
    assert batch["ids"] == ["prompt-0", "prompt-1"] and batch["media_counts"].tolist() == [1, 0]
    assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert batch["attention_mask"][1, 0] == 0 and batch["input_ids"][1, 0] == tok.pad_token_id
    assert tok.decode(batch["input_ids"][0]).startswith("<s>Be brief.\nUSER: <image>\nwhat color")
    with pytest.raises(MediaCountMismatchError, match="prompt-0"):
        build_generation_inputs(gen, ["no placeholder"], [[solid(5)]])


# ------------------------------------------------------------------------------------------- caches


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # bit for bit
        else:
            assert a[k] == b[k], k


def count_template_calls(monkeypatch, tok) -> list:
    calls = []
    real = tok.apply_chat_template

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    return calls


@pytest.mark.parametrize("generation", [False, True])
def test_cached_batches_equal_uncached_over_two_passes(tok, test_split, monkeypatch, generation):
    """Easy-VQA repeats conversations and images; the second pass is served from the caches alone."""
    items = [test_split[i] for i in range(48)]
    n_conv = len({tuple(m["content"] for m in it["messages"]) for it in items})
    n_img = len({k for it in items for k in it["image_keys"]})
    assert n_conv < len(items) and n_img < len(items)  # the first pass already hits
    side = "left" if generation else "right"
    cached = collator(tok, generation=generation, padding_side=side)
    plain = collator(tok, generation=generation, padding_side=side, cache_size=0)
    batches = [items[i : i + 16] for i in range(0, len(items), 16)]
    expected = [plain(b) for b in batches]
    calls = count_template_calls(monkeypatch, tok)
    for b, want in zip(batches, expected):  # cold
        assert_batches_equal(cached(b), want)
    assert len(calls) == n_conv and len(cached.token_cache) == n_conv and len(cached.image_cache) == n_img
    assert cached.token_cache.hits == len(items) - n_conv and cached.image_cache.hits == len(items) - n_img
    del calls[:]
    for b, want in zip(batches, expected):  # warm
        assert_batches_equal(cached(b), want)
    assert calls == []
    assert cached.token_cache.hits == 2 * len(items) - n_conv
    assert cached.image_cache.hits == 2 * len(items) - n_img
    assert plain.token_cache.hits == plain.image_cache.hits == len(plain.token_cache) == len(plain.image_cache) == 0


def test_cache_hands_out_copies(tok, test_split):
    items = [test_split[i] for i in range(4)]
    c, plain = collator(tok), collator(tok, cache_size=0)
    ids, labels, _ = c.encode(items[0])
    ids[:] = [0] * len(ids)
    labels.append(7)
    batch = c(items)
    batch["pixel_values"].zero_()
    batch["input_ids"].zero_()
    image_hits = c.image_cache.hits
    assert_batches_equal(c(items), plain(items))
    assert c.token_cache.hits >= 1 + len(items) and c.image_cache.hits == image_hits + len(items)


def test_cache_size_bounds_both_caches(tok):
    c = collator(tok, cache_size=3)
    samples = [sample(f"s{i}", f"<image>\nquestion {i}?", images=[solid(i)]) for i in range(5)]
    for s, key in zip(samples, "abcde"):
        s["image_keys"] = [key]
    c(samples)
    assert len(c.token_cache) == 3 and len(c.image_cache) == 3
    assert ["a" in c.image_cache, "e" in c.image_cache] == [False, True]  # oldest dropped first
    with pytest.raises(ValueError, match="cache size must be >= 0, got -1"):
        collator(tok, cache_size=-1)


def test_lru_cache_drops_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.get("b", "none") == "none"
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)
    off = LRUCache(0)
    off.put("a", 1)
    assert len(off) == 0 and off.get("a") is None


@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        (sample("{sid}", "hi", answer=None), EmptyLabelsError, r"sample '{sid}' has no assistant tokens"),
        (sample("{sid}", "<image><image>\nq", images=[solid(0)]), MediaCountMismatchError, r"sample '{sid}'.* 2 <image>"),
        (sample("{sid}", "<image>\n" + "very " * 200 + "long", images=[solid(0)]), SampleTooLongError, r"sample '{sid}' is"),
    ],
)
def test_bad_sample_raises_every_time(tok, bad, error, pattern):
    c = collator(tok)
    for sid in ("first", "again", "renamed"):  # same conversation; the error names the sample at hand
        s = dict(bad, id=sid if sid != "again" else "first")
        with pytest.raises(error, match=pattern.format(sid=s["id"])):
            c([sample("fine", "<image>\nq", images=[solid(1)]), s])


def test_cached_conversation_still_checks_media_count(tok):
    """The token cache is keyed by messages alone: a cached conversation with the wrong media still fails."""
    c = collator(tok)
    c([sample("ok", "<image>\nq", images=[solid(1)])])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'no-image'.* 1 <image> placeholder\(s\) but 0 media"):
        c([sample("no-image", "<image>\nq")])
    assert c.token_cache.hits == 1


def test_image_keys_are_not_confused(tok):
    c, plain = collator(tok), collator(tok, cache_size=0)
    a = dict(sample("a", "<image>\nq", images=[solid(10)]), image_keys=["img/a"])
    b = dict(sample("b", "<image>\nq", images=[solid(200)]), image_keys=["img/b"])
    two = dict(sample("ab", "<image><image>\nq", images=[solid(200), solid(10)]), image_keys=["img/b", "img/a"])
    for batch in ([a, b], [b, a, two], [two, b, a]):
        assert_batches_equal(c(batch), plain(batch))
    assert c.image_cache.hits == 0 + 4 + 4 and len(c.image_cache) == 2
    # a key names a picture: a different image under a cached key is not transformed again
    stale = dict(sample("a2", "<image>\nq", images=[solid(99)]), image_keys=["img/a"])
    assert torch.equal(c([stale])["pixel_values"], plain([a])["pixel_values"])
    keyless = sample("k", "<image>\nq", images=[solid(99)])
    assert torch.equal(c([keyless])["pixel_values"], plain([keyless])["pixel_values"])
    with pytest.raises(ValueError, match=r"sample 'bad' has image_keys \['x'\] for 2 image\(s\)"):
        c([dict(sample("bad", "<image><image>", images=[solid(1), solid(2)]), image_keys=["x"])])


def test_unhashable_messages_are_tokenised_uncached(tok):
    s = sample("meta", "hi")
    s["messages"][0]["meta"] = ["unhashable"]
    c = collator(tok)
    assert_batches_equal(c([s]), collator(tok, cache_size=0)([s]))
    assert len(c.token_cache) == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_sequences_matches_loop(side):
    seqs = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9]]
    values, mask = pad_sequences(seqs, -1, side)
    width = 5
    for row, s in enumerate(seqs):
        pad = [-1] * (width - len(s))
        expected = s + pad if side == "right" else pad + s
        assert values[row].tolist() == expected
        assert mask[row].tolist() == [int(v != -1) for v in expected]
