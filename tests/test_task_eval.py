"""eval/tasks.py on a tiny generated task folder: the report's structure, one row per task and ratio,
accuracy computed from the predictions, the comparison with a reference run (``--reference``), and the
errors for missing data and bad references."""

import json
import re

import pytest
import torch

from eval import tasks as task_eval
from llava_deft.errors import ReferenceResultError, TaskDataError
from llava_deft.model import LlavaDeftForCausalLM
from tests.conftest import TINY_PIPE

GENERATED = ["video_shapes", "audio_words", "passkey"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A random tiny model with every modality and a sam -> fgcs reducer, saved as a checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    LlavaDeftForCausalLM({"pipeline": TINY_PIPE, "audio": {"enabled": True, "encoder": {"chunk_length": 2}},
                          "video": {"num_frames": 4}}).save_pretrained(path)
    return path


def run(saved_model, tasks_dir, out, *extra):
    return task_eval.main(["--model", str(saved_model), "--tasks-dir", str(tasks_dir), "--out", str(out),
                           "--device", "cpu", "--batch-size", "4", "--max-new-tokens", "2", *extra])


def test_sweep_report_one_row_per_task_and_ratio(saved_model, tiny_tasks_dir, tmp_path, capsys):
    rows = run(saved_model, tiny_tasks_dir, tmp_path, "--tasks", *GENERATED, "--ratios", "1", "0.25",
               "--limit", "6", "--save-predictions")
    assert [(r["task"], r["retention"]) for r in rows] == [(t, x) for x in (1.0, 0.25) for t in GENERATED]
    n_test = {"video_shapes": 6, "audio_words": 6, "passkey": 3}  # --limit 6; the passkey test split has 3
    for r in rows:
        preds = r["predictions"]
        assert r["counts"]["all"] == len(preds) == n_test[r["task"]]
        # the score is the exact-match rate of the saved predictions, overall and per type
        hits = [p["prediction"].strip().lower() == p["reference"].strip().lower() for p in preds]
        assert r["accuracy"]["all"] == pytest.approx(sum(hits) / len(hits))
        for qtype in set(r["counts"]) - {"all"}:
            mine = [h for h, p in zip(hits, preds) if p["question_type"] == qtype]
            assert r["counts"][qtype] == len(mine) and r["accuracy"][qtype] == pytest.approx(sum(mine) / len(mine))
        assert r["media_tokens_per_sample"] == pytest.approx(sum(p["media_tokens"] for p in preds) / len(preds))
    by = {(r["task"], r["retention"]): r for r in rows}
    assert set(by["video_shapes", 1.0]["counts"]) == {"all", "direction", "shape", "color_first", "color_last", "color_change"}
    assert set(by["audio_words", 1.0]["counts"]) - {"all"} <= {"color", "shape", "number"}
    assert by["passkey", 1.0]["counts"].keys() == {"all", "passkey"}
    # ratio 0.25 keeps ceil(0.25 n) tokens of each media row: 4 frames x 64 tokens -> 64
    assert by["video_shapes", 1.0]["media_tokens_per_sample"] == 256 and by["video_shapes", 0.25]["media_tokens_per_sample"] == 64
    for t in GENERATED:
        assert by[t, 0.25]["media_tokens_per_sample"] < by[t, 1.0]["media_tokens_per_sample"]

    saved = json.loads((tmp_path / "tasks_test.json").read_text())
    assert {"device", "date", "commit", "model", "pipeline", "ratios", "results"} <= set(saved)
    assert saved["pipeline"] == ["sam", "fgcs"] and saved["ratios"] == [1.0, 0.25] and len(saved["results"]) == 6
    md = (tmp_path / "tasks_test.md").read_text()
    assert "| task | r=1 | r=0.25 |" in md and md.count("## ") == 3 and "| 0.25 | 64.0 |" in md
    assert (tmp_path / "tasks_test.png").stat().st_size > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tasks test: video_shapes \d+\.\d%, audio_words \d+\.\d%, passkey \d+\.\d%", last)


def answer_right(monkeypatch, saved_model, tasks_dir, right):
    """Replace generation: a sample is answered right when its id contains one of ``right[ratio]`` (the
    retention the pipeline is set to), else wrong; every sample reports 7 media tokens."""
    answers = {}
    for task in GENERATED:
        for r in json.loads((tasks_dir / task / "test.json").read_text()):
            answers[str(r["id"])] = r["conversations"][-1]["value"]
    tok = LlavaDeftForCausalLM.from_pretrained(saved_model).tokenizer

    def fake_generate(self, input_ids, attention_mask, ids=None, return_media_tokens=False, **kw):
        ratio = next(s.retention_ratio for s in self.pipeline.stages if hasattr(s, "retention_ratio"))
        texts = [answers[i] if any(k in i for k in right[ratio]) else "nonsense" for i in ids]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
        return enc, torch.full((len(ids),), 7)

    monkeypatch.setattr(LlavaDeftForCausalLM, "generate", fake_generate)


def test_training_record_of_the_model_reaches_json_and_report(tiny_tasks_dir, tmp_path):
    """A training export's training.json is copied into the results and named in the report; a model
    saved otherwise has none, and a corrupt record is an error naming the file."""
    model_dir = tmp_path / "trained"
    LlavaDeftForCausalLM({"video": {"num_frames": 4}}).save_pretrained(model_dir)
    run(model_dir, tiny_tasks_dir, tmp_path / "plain", "--tasks", "passkey", "--limit", "1")
    assert json.loads((tmp_path / "plain" / "tasks_test.json").read_text())["training"] is None
    assert "Trained by" not in (tmp_path / "plain" / "tasks_test.md").read_text()
    record = {"command": "python -m llava_deft.train --config configs/train/mix_tiny_deft25.yaml", "commit": "abc1234",
              "device": "NVIDIA H200", "world_size": 1, "stages": [{"steps": 3753, "final_loss": 0.2521}],
              "started": "2026-12-01 13:27 UTC", "finished": "2026-12-01 13:34 UTC", "train_config": "train_config.yaml"}
    (model_dir / "training.json").write_text(json.dumps(record))
    run(model_dir, tiny_tasks_dir, tmp_path / "rec", "--tasks", "passkey", "--limit", "1")
    assert json.loads((tmp_path / "rec" / "tasks_test.json").read_text())["training"] == record
    assert ("Trained by `python -m llava_deft.train --config configs/train/mix_tiny_deft25.yaml` (commit abc1234, "
            "NVIDIA H200, world size 1, 3753 steps, final training loss 0.2521, finished 2026-12-01 13:34 UTC).") \
        in (tmp_path / "rec" / "tasks_test.md").read_text()
    (model_dir / "training.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"'.*trained/training.json' is not valid JSON"):
        run(model_dir, tiny_tasks_dir, tmp_path / "bad", "--tasks", "passkey", "--limit", "1")


def test_accuracy_comes_from_the_predictions(saved_model, tiny_tasks_dir, tmp_path, monkeypatch):
    """A model that answers direction and colour-first questions and the pass key right and every other
    question wrong scores exactly that, per type and overall; relative accuracy follows."""
    right = ("-direction", "-color_first", "passkey-")
    answer_right(monkeypatch, saved_model, tiny_tasks_dir, {1.0: right, 0.5: right})
    rows = run(saved_model, tiny_tasks_dir, tmp_path, "--tasks", "video_shapes", "passkey", "--ratios", "1", "0.5")
    by = {(r["task"], r["retention"]): r for r in rows}
    video = by["video_shapes", 1.0]
    assert video["accuracy"] == {"all": pytest.approx(4 / 10), "direction": 1.0, "color_first": 1.0, "shape": 0.0,
                                 "color_last": 0.0, "color_change": 0.0}
    assert by["passkey", 0.5]["accuracy"] == {"all": 1.0, "passkey": 1.0}
    assert by["video_shapes", 0.5]["relative"] == pytest.approx(1.0) and video["media_tokens_per_sample"] == 7


def test_of_reference_is_accuracy_over_the_reference_at_ratio_1(saved_model, tiny_tasks_dir, tmp_path, monkeypatch,
                                                                capsys):
    """``--reference``: each row's accuracy over the reference run's ratio-1 accuracy on the task, from the
    two JSONs; None where the reference scored 0 (passkey) or lacks the task (audio_words)."""
    # the reference ("no-reduction model"): 4 of 10 video questions right, no pass key
    answer_right(monkeypatch, saved_model, tiny_tasks_dir, {1.0: ("-direction", "-color_first")})
    run(saved_model, tiny_tasks_dir, tmp_path / "ref", "--tasks", "video_shapes", "passkey", "--name", "base")
    ref_path = tmp_path / "ref" / "base.json"
    ref = json.loads(ref_path.read_text())
    assert "of_reference" not in ref["results"][0] and ref["reference"] is None  # no --reference, no column
    capsys.readouterr()

    # this model: 6 of 10 at ratio 1, 2 of 10 at ratio 0.5
    answer_right(monkeypatch, saved_model, tiny_tasks_dir, {1.0: ("-direction", "-color_first", "-color_last"),
                                                            0.5: ("-direction",)})
    run(saved_model, tiny_tasks_dir, tmp_path, "--tasks", "video_shapes", "passkey", "audio_words",
        "--ratios", "1", "0.5", "--reference", str(ref_path))
    saved = json.loads((tmp_path / "tasks_test.json").read_text())
    assert {k: saved["reference"][k] for k in ("path", "model", "commit", "date")} == {
        "path": str(ref_path), "model": ref["model"], "commit": ref["commit"], "date": ref["date"]}
    base = {r["task"]: r["accuracy"]["all"] for r in ref["results"] if r["retention"] == 1.0}
    assert base == {"video_shapes": pytest.approx(0.4), "passkey": 0.0}
    for r in saved["results"]:
        expected = r["accuracy"]["all"] / base[r["task"]] if base.get(r["task"]) else None
        assert r["of_reference"] == (None if expected is None else pytest.approx(expected)), r
    by = {(r["task"], r["retention"]): r["of_reference"] for r in saved["results"]}
    assert by["video_shapes", 1.0] == pytest.approx(1.5) and by["video_shapes", 0.5] == pytest.approx(0.5)
    assert by["passkey", 1.0] is None and by["audio_words", 0.5] is None

    md = (tmp_path / "tasks_test.md").read_text()
    assert f"model `{ref['model']}` (commit {ref['commit']}" in md
    assert "| task | r=1 | r=0.5 | reference r=1 | r=1 % of reference | r=0.5 % of reference |" in md
    assert "| video_shapes | 60.0 | 20.0 (33.3 % of r=1) | 40.0 | 150.0 | 50.0 |" in md
    assert "| passkey | 0.0 | 0.0 | 0.0 | – | – |" in md and "| audio_words | 0.0 | 0.0 | – | – | – |" in md
    assert "| retention | media tokens / sample | all | % of r=1 | % of reference |" in md
    assert "| 0.5 | 7.0 | 20.0 | 33.3 | 50.0 |" in md
    out, err = capsys.readouterr()
    assert f"--reference '{ref_path}' has no ratio-1 row for audio_words" in err
    assert out.strip().splitlines()[-2] == (f"% of reference ({ref['model']}): video_shapes r=1 150.0% r=0.5 50.0%, "
                                            "passkey r=1 – r=0.5 –, audio_words r=1 – r=0.5 –")
    assert out.strip().splitlines()[-1].startswith("tasks test: video_shapes 60.0%")


def _reference(tmp_path, **over):
    """A minimal eval/tasks.py result (passkey at 50 % at ratio 1) with ``over`` replacing its keys."""
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"model": "runs/base/final", "commit": "abc1234", "date": "2026-01-01 00:00 UTC",
                                "split": "test", "limit": None,
                                "results": [{"task": "passkey", "retention": 1.0, "accuracy": {"all": 0.5}}], **over}))
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda p: p / "absent.json", "does not exist"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "r.json").write_text("{not json") and p / "r.json", "is not a readable JSON file"),
    (lambda p: (p / "r.json").write_text("[1, 2]") and p / "r.json", "is not an eval/tasks.py result"),
    (lambda p: _reference(p, results=[]), "is not an eval/tasks.py result"),
    (lambda p: _reference(p, results=[{"task": "passkey", "retention": 1.0}]), "is not an eval/tasks.py result"),
    (lambda p: _reference(p, split="train"), "was evaluated on the 'train' split and this run on 'test'"),
])
def test_bad_reference_names_the_file(saved_model, tiny_tasks_dir, tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ReferenceResultError, match=re.escape(f"--reference '{path}' {problem}")):
        run(saved_model, tiny_tasks_dir, tmp_path, "--tasks", "passkey", "--reference", str(path))


def test_reference_with_another_limit_warns(saved_model, tiny_tasks_dir, tmp_path, capsys):
    path = _reference(tmp_path)
    rows = run(saved_model, tiny_tasks_dir, tmp_path, "--tasks", "passkey", "--limit", "2", "--reference", str(path))
    assert rows[0]["of_reference"] == pytest.approx(rows[0]["accuracy"]["all"] / 0.5)
    err = capsys.readouterr().err
    assert f"warning: --reference '{path}' was evaluated with --limit None and this run with --limit 2" in err


def test_missing_task_folder_names_the_command(saved_model, tmp_path):
    with pytest.raises(TaskDataError, match=r"task 'video_shapes': .*video_shapes/test.json' does not exist \(the folder "
                       rf"does not exist\); generate the tasks with `python -m llava_deft.tasks --out {tmp_path}/none`"):
        run(saved_model, tmp_path / "none", tmp_path, "--tasks", "video_shapes")


def test_scenes_and_video_small_are_scored_per_question_type(saved_model, tmp_path):
    from llava_deft.tasks.prepare import prepare_tasks

    prepare_tasks(tmp_path / "t", "small", ["scenes", "video_small"], progress=False, overrides={
        "scenes": {"n_train": 1, "n_test": 2}, "video_small": {"n_train": 1, "n_test": 1, "frames": 4}})
    rows = run(saved_model, tmp_path / "t", tmp_path, "--tasks", "scenes", "video_small", "--ratios", "1", "0.25")
    by = {(r["task"], r["retention"]): r for r in rows}
    assert set(by["scenes", 1.0]["counts"]) - {"all"} <= {"relation_color", "shape", "color", "count", "presence"}
    assert {"count", "presence"} <= set(by["scenes", 1.0]["counts"])
    assert by["video_small", 1.0]["counts"]["all"] == 5
    assert by["scenes", 0.25]["media_tokens_per_sample"] < by["scenes", 1.0]["media_tokens_per_sample"]


def test_ratios_need_a_reducer(tiny_tasks_dir, tmp_path):
    LlavaDeftForCausalLM({"video": {"num_frames": 4}}).save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit, match=r"--ratios needs a reducer .*add --pipeline configs/pipeline/deft.yaml"):
        run(tmp_path / "plain", tiny_tasks_dir, tmp_path, "--tasks", "passkey", "--ratios", "1", "0.5")
    with pytest.raises(SystemExit, match=r"has no audio encoder .*--tasks passkey"):
        run(tmp_path / "plain", tiny_tasks_dir, tmp_path, "--tasks", "audio_words", "passkey")
