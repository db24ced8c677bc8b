"""eval/train_curves.py: loss tables and plots from the training entry's train_log.jsonl files."""

import json

import pytest

from eval import train_curves as tc


def write_log(path, points):
    path.write_text("".join(json.dumps(p) + "\n" for p in points))
    return path


def test_global_steps_follow_stages_and_loss_at_takes_the_last_logged_point():
    pts = [{"stage": 0, "step": 10, "loss": 3.0}, {"stage": 0, "step": 20, "loss": 2.0},
           {"stage": 1, "step": 5, "loss": 1.5}, {"stage": 1, "step": 10, "loss": 1.0}]
    steps = tc.global_steps(pts)
    assert steps == [10, 20, 25, 30]
    losses = [p["loss"] for p in pts]
    assert tc.loss_at(steps, losses, 5) is None
    assert tc.loss_at(steps, losses, 20) == 2.0
    assert tc.loss_at(steps, losses, 24) == 2.0
    assert tc.loss_at(steps, losses, 1000) == 1.0


def test_moving_mean_equals_a_slow_reference():
    vals = [float(v) for v in [5, 1, 4, 2, 8, 3, 3]]
    for w in (1, 2, 3, 10):
        ref = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
        assert tc.moving_mean(vals, w) == pytest.approx(ref)


def test_main_writes_json_markdown_and_plot(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    write_log(a / "train_log.jsonl", [{"stage": 0, "step": s, "loss": 1.0 / s, "samples_per_s": 100.0}
                                      for s in (1, 2, 4)])
    b = write_log(tmp_path / "b.jsonl", [{"stage": 0, "step": 2, "loss": 0.9}])
    doc = tc.main(["--runs", f"A={a}", f"B={b}", "--name", "curves", "--out", str(tmp_path / "out"),
                   "--steps", "2", "4", "--measured-on", "GPU X", "--commit", "abc1234"])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"curves.json", "curves.md", "curves.png"}
    saved = json.loads((out / "curves.json").read_text())
    assert saved["meta"]["device"] == "GPU X" and saved["meta"]["commit"] == "abc1234"
    assert "torch" not in saved["meta"]  # this machine's versions do not describe logs made elsewhere
    rows = {r["run"]: r for r in doc["summary"]}
    assert rows["A"]["loss_at"] == {"2": 0.5, "4": 0.25} and rows["A"]["last_step"] == 4
    assert rows["B"]["loss_at"]["4"] == 0.9 and rows["B"]["samples_per_s"] is None
    md = (out / "curves.md").read_text()
    assert "| A | 0.500 | 0.250 | 4 | 0.250 | 0.250 | 100 |" in md
    assert "| B | 0.900 | — | 2 | 0.900 | 0.900 | — |" in md  # B never reached step 4


@pytest.mark.parametrize("content, message", [
    ("not json\n", "not JSON"),
    ('{"step": 1}\n', "needs 'step' and 'loss'"),
    ("\n", "holds no logged step"),
])
def test_bad_logs_name_the_file_and_line(tmp_path, content, message):
    p = tmp_path / "log.jsonl"
    p.write_text(content)
    with pytest.raises(tc.TrainLogError, match=message):
        tc.read_log(p)


def test_bad_run_arguments(tmp_path):
    with pytest.raises(tc.TrainLogError, match="must be NAME=PATH"):
        tc.parse_run("no-equals-sign")
    with pytest.raises(tc.TrainLogError, match="no training log at"):
        tc.parse_run(f"x={tmp_path / 'missing'}")
    with pytest.raises(SystemExit):
        tc.main(["--runs", f"x={tmp_path / 'missing'}", "--name", "n", "--out", str(tmp_path)])
