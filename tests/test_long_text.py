"""Long-context text sources (issue 17): Super-NaturalInstructions task files and LongBench v2's data.json
read from a local folder into LLaVA-JSON pairs (fixtures written in those schemas), the generated
short-math set, and their bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llava_deft.data import build_collator
from llava_deft.data.llava_json import LlavaJsonDataset
from llava_deft.errors import DatasetFormatError, TaskDataError
from llava_deft.tasks.long_text import convert_longbench, convert_sni, main, make_short_math

FIX = Path(__file__).parent / "fixtures"


def _records(folder: Path, split: str) -> list[dict]:
    return json.loads((folder / f"{split}.json").read_text())


def test_sni_tasks_become_llava_json_with_the_passage_as_text(tmp_path, tiny_model):
    meta = convert_sni(FIX / "sni", tmp_path / "sni", test_fraction=0.2)
    assert (meta["train"], meta["test"]) == (8 + 5, 2 + 1)  # per task: round(0.2 * 10) and round(0.2 * 6) to test
    train = _records(tmp_path / "sni", "train")
    rec = next(r for r in train if r["id"].startswith("task901"))
    src = json.loads((FIX / "sni/tasks/task901_colour_of_object.json").read_text())
    inst = next(i for i in src["Instances"] if rec["id"] == f"task901_colour_of_object-{i['id']}")
    assert rec["text"] == inst["input"] and rec["conversations"][1]["value"] == inst["output"][0]
    assert rec["conversations"][0]["value"] == "<text>\n" + "\n".join(src["Definition"])
    ids = {r["id"] for r in train} | {r["id"] for r in _records(tmp_path / "sni", "test")}
    assert len(ids) == 16  # every instance once
    # the project reads them as any LLaVA-JSON pair: the passage reaches the collator as a text row
    ds = LlavaJsonDataset(tmp_path / "sni" / "train.json")
    batch = build_collator(tiny_model.processors)([ds[0], ds[1]])
    assert batch["text_ids"].shape[0] == 2 and batch["text_lengths"].min() > 0


def test_sni_split_is_deterministic_and_options_apply(tmp_path):
    convert_sni(FIX / "sni", tmp_path / "a", seed=3)
    convert_sni(FIX / "sni", tmp_path / "b", seed=3)
    assert _records(tmp_path / "a", "train") == _records(tmp_path / "b", "train")
    meta = convert_sni(FIX / "sni" / "tasks", tmp_path / "c", max_per_task=4, test_fraction=0.25,
                       tasks=["task902_count_words"])
    assert meta["tasks"] == ["task902_count_words"] and (meta["train"], meta["test"]) == (3, 1)
    with pytest.raises(TaskDataError, match=r"no task files \['task999'\]"):
        convert_sni(FIX / "sni", tmp_path / "d", tasks=["task999"])
    with pytest.raises(TaskDataError, match="no task\\*.json files"):
        convert_sni(tmp_path / "c", tmp_path / "e")


def test_longbench_items_become_multiple_choice_records(tmp_path):
    meta = convert_longbench(FIX / "longbench_v2", tmp_path / "lb", test_fraction=0.5)
    assert (meta["train"], meta["test"]) == (2, 2)
    src = {i["_id"]: i for i in json.loads((FIX / "longbench_v2/data.json").read_text())}
    for rec in _records(tmp_path / "lb", "train") + _records(tmp_path / "lb", "test"):
        item = src[rec["id"].removeprefix("longbench-")]
        prompt = rec["conversations"][0]["value"]
        assert rec["text"] == item["context"] and rec["conversations"][1]["value"] == item["answer"]
        assert prompt.startswith("<text>\n" + item["question"]) and f"D. {item['choice_D']}" in prompt
    short = convert_longbench(FIX / "longbench_v2" / "data.json", tmp_path / "lb2", max_chars=10)
    assert short["skipped_longer"] == 4 and short["train"] == short["test"] == 0


def test_bad_sources_name_the_file_and_key(tmp_path):
    src = tmp_path / "sni" / "tasks"
    src.mkdir(parents=True)
    task = json.loads((FIX / "sni/tasks/task902_count_words.json").read_text())
    task["Instances"][2]["output"] = []
    (src / "task1_bad.json").write_text(json.dumps(task))
    with pytest.raises(DatasetFormatError, match=r"task1_bad.json: key 'Instances\[2\].output' must be a non-empty list"):
        convert_sni(tmp_path / "sni", tmp_path / "out")
    (src / "task1_bad.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="task1_bad.json: not valid UTF-8 JSON"):
        convert_sni(tmp_path / "sni", tmp_path / "out")
    (src / "task1_bad.json").unlink()
    outside = tmp_path / "elsewhere.json"
    shutil.copy(FIX / "sni/tasks/task902_count_words.json", outside)
    (src / "task2_link.json").symlink_to(outside)
    with pytest.raises(DatasetFormatError, match="leads outside the source folder"):
        convert_sni(tmp_path / "sni", tmp_path / "out")
    lb = tmp_path / "lb"
    lb.mkdir()
    items = json.loads((FIX / "longbench_v2/data.json").read_text())
    items[1]["answer"] = "E"
    (lb / "data.json").write_text(json.dumps(items))
    with pytest.raises(DatasetFormatError, match=r"item 1 \(id 'lb0001'\): key 'answer' must be one of"):
        convert_longbench(lb, tmp_path / "out")
    del items[1]["context"]
    items[1]["answer"] = "A"
    (lb / "data.json").write_text(json.dumps(items))
    with pytest.raises(DatasetFormatError, match=r"key 'context' must be a non-empty string"):
        convert_longbench(lb, tmp_path / "out")
    with pytest.raises(TaskDataError, match="not a file"):
        convert_longbench(tmp_path / "nowhere", tmp_path / "out")


def test_short_math_is_distinct_correct_and_seeded(tmp_path):
    meta = make_short_math(tmp_path / "m", n_train=300, n_test=40, seed=1, max_operand=20)
    train, test = _records(tmp_path / "m", "train"), _records(tmp_path / "m", "test")
    assert (meta["train"], meta["test"]) == (300, 40)
    questions = [r["conversations"][0]["value"] for r in train + test]
    assert len(set(questions)) == 340  # no question twice, none shared by the splits
    for r in train[:50] + test:
        a, op, b = r["conversations"][0]["value"].removeprefix("What is ").removesuffix("?").split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert r["conversations"][1]["value"] == str(expected)
    make_short_math(tmp_path / "m2", n_train=300, n_test=40, seed=1, max_operand=20)
    assert _records(tmp_path / "m2", "train") == train
    assert len(LlavaJsonDataset(tmp_path / "m" / "test.json")) == 40  # text only: no media needed
    with pytest.raises(ValueError, match="exist with operands up to 2"):
        make_short_math(tmp_path / "m3", n_train=30, n_test=0, max_operand=2)


def test_command_line(tmp_path, capsys):
    assert main(["math", "--out", str(tmp_path / "m"), "--n-train", "10", "--n-test", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["train"] == 10
