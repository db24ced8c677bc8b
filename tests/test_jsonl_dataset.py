"""LLaVA records as JSON Lines, read lazily (issue 17: corpora larger than memory): the same samples as
the JSON list, errors that name the line, paths kept inside the media folder, worker processes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from llava_deft.config.train import DataSpec
from llava_deft.data.llava_json import LlavaJsonDataset, LlavaJsonlDataset
from llava_deft.data.sources import build_dataset
from llava_deft.errors import DatasetFormatError, MediaPathError


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"<text>\nQuestion {i}?"},
                                                {"from": "gpt", "value": f"answer {i}"}], "text": f"passage number {i}"}
        if i % 3 == 0:
            rec["image"] = "pic.png"
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        out.append(rec)
    return out


@pytest.fixture
def corpus(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pic.png")
    recs = _records(7)
    (tmp_path / "data.json").write_text(json.dumps(recs))
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, "")  # blank lines are not records
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    return tmp_path


def test_jsonl_gives_the_json_lists_samples(corpus):
    lazy, whole = LlavaJsonlDataset(corpus / "data.jsonl"), LlavaJsonDataset(corpus / "data.json")
    assert len(lazy) == len(whole) == 7
    for i in range(7):
        a, b = lazy[i], whole[i]
        assert a["id"] == b["id"] and a["messages"] == b["messages"] and a["texts"] == b["texts"]
        assert len(a["images"]) == len(b["images"])
    assert lazy[-1]["id"] == "r6"
    with pytest.raises(IndexError, match="index 7 out of range for 7 records"):
        lazy[7]


def test_a_bad_line_names_the_file_and_line_when_read(corpus):
    lines = (corpus / "data.jsonl").read_text().splitlines()
    lines[1] = "{broken"
    lines[5] = json.dumps({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]})
    lines[6] = json.dumps({**_records(1)[0], "image": "../outside.png"})
    (corpus / "bad.jsonl").write_text("\n".join(lines))
    ds = LlavaJsonlDataset(corpus / "bad.jsonl")  # nothing parsed yet
    assert ds[0]["id"] == "r0"
    with pytest.raises(DatasetFormatError, match=r"bad.jsonl: line 2: not a JSON record"):
        ds[1]
    with pytest.raises(DatasetFormatError, match=r"bad.jsonl: line 6: record 4 \(id 'x'\): .*unknown role 'robot'"):
        ds[4]
    with pytest.raises(MediaPathError, match=r"line 7: .*leads outside the media folder"):
        ds[5]


def test_worker_processes_and_pickling(corpus):
    ds = LlavaJsonlDataset(corpus / "data.jsonl")
    ds[0]  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(ds))  # the handle is not pickled; the clone opens its own
    assert clone[2]["id"] == "r2"
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s["id"])
    assert sorted(loader) == [f"r{i}" for i in range(7)]


def test_a_jsonl_source_in_a_recipe(corpus):
    ds = build_dataset(DataSpec(type="llava_json", path=str(corpus / "data.jsonl"), limit=5))
    assert len(ds) == 5 and ds[4]["id"] == "r4"
    with pytest.raises(DatasetFormatError, match="skip_invalid checks every record at start"):
        build_dataset(DataSpec(type="llava_json", path=str(corpus / "data.jsonl"), skip_invalid=True))
