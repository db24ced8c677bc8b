"""eval/deft_sweep.py: pipeline resolution, --only, JSON merging, report and acceptance checks on
synthetic rows, a failing training run, and one tiny end-to-end sweep on CPU (two 2-step runs)."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from eval import deft_sweep as ds
from pipeline import PipelineConfigError

REPO = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------ pure parts
def test_resolve_pipeline_sets_every_retention_ratio_including_defaults(tmp_path):
    src = write_yaml(tmp_path / "p.yaml", {"stages": [
        {"name": "sam", "semantic_dim": 32},
        {"name": "fgcs", "retention_ratio": 0.482, "hidden_dim": 32},
        {"name": "random"},  # retention_ratio left at its default: still set
    ]})
    cfg = ds.resolve_pipeline(src, 0.11)
    assert [s.get("retention_ratio") for s in cfg["stages"]] == [None, 0.11, 0.11]
    assert cfg["stages"][1]["hidden_dim"] == 32 and "semantic_dim" not in cfg["stages"][1]
    listed = write_yaml(tmp_path / "l.yaml", [{"name": "pool", "retention_ratio": 0.5}])  # a bare list works too
    assert ds.resolve_pipeline(listed, 1.0)["stages"][0]["retention_ratio"] == 1.0
    assert ds.configured_rtd_mode(cfg) is None
    assert ds.configured_rtd_mode(ds.resolve_pipeline(
        write_yaml(tmp_path / "r.yaml", {"stages": [{"name": "fgcs"}, {"name": "rtd", "mode": "hybrid"}]}), 0.25)) == "hybrid"


def test_resolve_pipeline_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline config '.*nope.yaml' does not exist"):
        ds.resolve_pipeline(tmp_path / "nope.yaml", 0.25)
    with pytest.raises(ValueError, match=r"has no stage with a retention_ratio"):
        ds.resolve_pipeline(REPO / "configs/pipeline/none.yaml", 0.25)
    typo = write_yaml(tmp_path / "t.yaml", {"stages": [{"name": "fgcs", "retention_ratoi": 0.2}]})
    with pytest.raises(PipelineConfigError, match="stages.0.fgcs.retention_ratoi: Extra inputs"):
        ds.resolve_pipeline(typo, 0.25)


def test_parse_only_and_reducers():
    ratios = [0.482, 0.25, 0.11]
    assert ds.parse_only(None, ["deft", "random"], ratios) is None
    sel = ds.parse_only(["deft@0.11", "random", "base"], ["deft", "random"], ratios)
    assert sel == {"deft": {0.11}, "random": set(ratios), "base": {1.0}}
    assert ds.selected(sel, "deft", 0.11) and not ds.selected(sel, "deft", 0.25) and not ds.selected(sel, "pool", 0.11)
    with pytest.raises(ValueError, match=r"unknown reducer 'rnd' in --only 'rnd@0.11'; available: \['base', 'deft', 'random'\]"):
        ds.parse_only(["rnd@0.11"], ["deft", "random"], ratios)
    with pytest.raises(ValueError, match=r"ratio 0.3 is not in --ratios"):
        ds.parse_only(["deft@0.3"], ["deft"], ratios)
    assert list(ds.parse_reducers(["b=x.yaml", "a=y.yaml"])) == ["b", "a"]
    for bad, msg in [(["deft"], "not NAME=YAML"), (["a=x", "a=y"], "given twice"), (["base=x"], "reserved")]:
        with pytest.raises(ValueError, match=msg):
            ds.parse_reducers(bad)


@pytest.mark.parametrize("argv, msg", [
    (["--reducers", "random=configs/pipeline/random.yaml", "--base", "deft"], r"--base 'deft' is not one of --reducers \['random'\]"),
    (["--reducers", "deft=configs/pipeline/missing.yaml", "--base", "deft"], r"reducer 'deft': pipeline config '.*missing.yaml' does not exist"),
    (["--reducers", "deft=configs/pipeline/fgcs.yaml", "--base", "deft", "--only", "pool"], r"unknown reducer 'pool' in --only"),
    (["--reducers", "deft=configs/pipeline/fgcs.yaml", "--base", "deft", "--ratios", "1.0"], r"--ratios must be in \(0, 1\)"),
])
def test_main_refuses_bad_arguments_before_training(tmp_path, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        ds.main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def row(protocol, reducer, ratio, accuracy, tokens, mode=None, **extra):
    return {"protocol": protocol, "reducer": reducer, "ratio": ratio, "rtd_mode": mode,
            "accuracy": {"all": accuracy, "color": accuracy}, "tokens_per_image": tokens, "questions": 100,
            "date": "2026-11-23 10:00 UTC", "device": "NVIDIA H100", "commit": "abc1234",
            "checkpoint": "runs/base/final", "checkpoint_sha": "s", **extra}


def test_merge_rows_replaces_by_key_and_save_keeps_commands(tmp_path):
    old = [row("trained", "deft", 0.25, 0.9, 16), row("trained", "random", 0.25, 0.8, 16)]
    new = [row("trained", "deft", 0.25, 0.95, 16), row("trained", "deft", 0.25, 0.96, 28, mode="hybrid")]
    merged = ds.merge_rows(old, new)
    assert [(r["reducer"], r["rtd_mode"], r["accuracy"]["all"]) for r in merged] == [
        ("random", None, 0.8), ("deft", None, 0.95), ("deft", "hybrid", 0.96)]
    path = tmp_path / "r.json"
    ds.save_rows(path, old, "cmd A")
    ds.save_rows(path, new, "cmd B")
    ds.save_rows(path, [], "cmd A")
    doc = json.loads(path.read_text())
    assert doc["commands"] == ["cmd A", "cmd B"] and len(doc["rows"]) == 3


def synthetic_rows():
    accs = {  # reducer -> accuracy at 0.482, 0.25, 0.11 (trained); training-free 5 points lower
        "deft": [0.99, 0.975, 0.97], "deft_nofb": [0.985, 0.97, 0.95], "random": [0.98, 0.98, 0.90], "pool": [0.97, 0.96, 0.93]}
    rows = [row("base", "deft", 1.0, 0.99, 64, mode="fast")]
    for proto, drop in [("trained", 0.0), ("training_free", 0.05)]:
        for name, a in accs.items():
            mode = "fast" if name.startswith("deft") else None
            rows += [row(proto, name, r, x - drop, 64 * r, mode=mode) for r, x in zip([0.482, 0.25, 0.11], a)]
        rows += [row(proto, "deft", 0.11, 0.975 - drop, 10, mode="hybrid"), row(proto, "deft", 0.11, 0.96 - drop, 9, mode="adaptive")]
    return rows


def test_acceptance_checks_are_computed_from_the_numbers():
    checks = ds.acceptance_checks(synthetic_rows(), "deft", 0.11)
    by = {c.text.split(":")[0] + ":" + c.text.split(":")[1]: c for c in checks}
    keep = {c.text.split(" at ")[1].split(":")[0]: c.status for c in checks if c.text.startswith("trained: deft (rtd fast) keeps")}
    assert keep == {"0.482": "PASS", "0.25": "FAIL", "0.11": "PASS"}  # 100.0 %, 98.5 % < 99, 97.98 %
    beats = [c for c in checks if " beats " in c.text]
    assert {c.text.split(" at ")[0].split()[-1] for c in beats} == {"random", "pool"}  # its ablation is not a rival
    assert [c.status for c in beats if "random" in c.text] == ["PASS", "FAIL", "PASS"]  # 0.25: 97.5 vs 98.0
    assert all(c.status != "PASS" for c in checks if c.text.startswith("training_free: deft (rtd fast) keeps"))
    info = [c.text for c in checks if c.status == "INFO"]
    assert any("trained: rtd modes of deft at 0.11: hybrid - fast = +0.5 pp" in t and "adaptive - fast = -1.0 pp" in t for t in info)
    assert any(t.startswith("trained: ablation deft - deft_nofb: 0.482: +0.5 pp, 0.25: +0.5 pp, 0.11: +2.0 pp") for t in info)
    assert by  # every check has a protocol prefix
    # thresholds apply only to the ratios in the sweep
    only_half = [r for r in synthetic_rows() if r["ratio"] in (1.0, 0.25)]
    assert not [c for c in ds.acceptance_checks(only_half, "deft", 0.11, {0.5: 90.0}) if " keeps " in c.text]


def test_report_tables_summary_and_plot(tmp_path):
    rows = synthetic_rows()
    md = ds.build_report({"commands": ["python eval/deft_sweep.py --name x"], "rows": rows}, "x", "deft", 0.11,
                         ["deft", "deft_nofb", "random", "pool"])
    lines = md.strip().splitlines()
    assert lines[-1] == ("x: base 99.0%; training_free deft@0.11 92.0% (92.9% of base); trained deft@0.11 97.0% (98.0% of base); "
                         "acceptance 7 pass, 5 fail, 0 missing")  # keeps: 2+0 pass; beats: 5 of 6
    assert "    python eval/deft_sweep.py --name x" in lines and "NVIDIA H100" in md and "abc1234" in md
    trained = md.split("## Trained")[1].split("##")[0].strip().splitlines()
    assert trained[2] == "| reducer | rtd mode | 0.482: accuracy (% of base) | 0.482: tokens/image | 0.25: accuracy (% of base) | 0.25: tokens/image | 0.11: accuracy (% of base) | 0.11: tokens/image |"
    assert trained[4].startswith("| no reduction (base, retention 1) | fast | 99.0 (100.0) | 64.0 |")
    assert trained[5] == "| deft | fast | 99.0 (100.0) | 30.8 | 97.5 (98.5) | 16.0 | 97.0 (98.0) | 7.0 |"
    assert trained[6] == "| deft | hybrid | — | — | — | — | 97.5 (98.5) | 10.0 |"
    assert [ln.split(" | ")[0] for ln in trained[4:]] == ["| no reduction (base, retention 1)", "| deft", "| deft", "| deft",
                                                         "| deft_nofb", "| random", "| pool"]
    ds.plot_sweep(rows, tmp_path / "x.png", "deft", ["deft"], "t")
    assert (tmp_path / "x.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------ runs
TINY_PIPE = {"stages": [{"name": "sam", "semantic_dim": 32}, {"name": "fgcs", "retention_ratio": 0.482, "hidden_dim": 32},
                        {"name": "rtd"}]}


def tiny_recipe(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "train.yaml", {
        "model": str(REPO / "configs/model/tiny.yaml"),
        "data": {"type": "easyvqa", "split": "train", "limit": 64},
        "stages": [{"name": "finetune", "max_steps": 2}],
        "per_device_batch_size": 8, "bf16": False, "log_steps": 1,
        "deepspeed": "configs/deepspeed/zero2.json",
    })


def test_a_failed_run_is_reported_with_its_log_tail(tmp_path, monkeypatch, capsys):
    args = ds.parse_args(["--train-config", str(tiny_recipe(tmp_path)), "--parallel", "1"])
    launcher = ds.Launcher(args, 1)
    monkeypatch.setattr(launcher, "command", lambda run: [sys.executable, "-c", "print('loss went nan'); raise SystemExit(3)"])
    run = ds.Run("random@0.25", tmp_path / "random@0.25", {"stages": []}, Path("x.yaml"), 0.25)
    launcher.train_and_report(run)
    launcher.terminate()
    assert launcher.failed == {"random@0.25": "exit code 3"}
    err = capsys.readouterr()
    assert re.search(r"run random@0.25 FAILED \(exit code 3\); last lines of .*random@0.25.log:\n.*\n\s+loss went nan", err.out + err.err)


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """Base + deft@0.25 trained for 2 steps each (two subprocesses at once), training-free rows in
    two calls merged into one JSON, then --report-only."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    deft = write_yaml(tmp_path / "deft.yaml", TINY_PIPE)
    common = ["--train-config", str(tiny_recipe(tmp_path)), "--reducers", f"deft={deft}", "random=configs/pipeline/random.yaml",
              "--base", "deft", "--ratios", "0.25", "--rtd-ratio", "0.25", "--rtd-modes", "fast", "hybrid",
              "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--name", "smoke",
              "--parallel", "2", "--limit", "16", "--batch-size", "16", "--device", "cpu"]
    assert ds.main([*common, "--only", "base", "deft"]) == 0
    runs = tmp_path / "runs"
    assert (runs / "base/final/config.json").is_file() and (runs / "trained/deft@0.25/final/config.json").is_file()
    assert yaml.safe_load((runs / "base/pipeline.yaml").read_text())["stages"][1]["retention_ratio"] == 1.0
    assert yaml.safe_load((runs / "trained/deft@0.25/pipeline.yaml").read_text())["stages"][1]["retention_ratio"] == 0.25
    first = json.loads((tmp_path / "out/smoke.json").read_text())["rows"]

    capsys.readouterr()
    assert ds.main([*common, "--only", "random", "--protocols", "training_free"]) == 0  # no training, one new row
    assert "0 training run(s) to do" in capsys.readouterr().out
    assert ds.main([*common, "--report-only"]) == 0
    out = capsys.readouterr().out

    doc = json.loads((tmp_path / "out/smoke.json").read_text())
    keys = {(r["protocol"], r["reducer"], r["ratio"], r["rtd_mode"]) for r in doc["rows"]}
    assert keys == {("base", "deft", 1.0, "fast"), ("training_free", "deft", 0.25, "fast"), ("training_free", "deft", 0.25, "hybrid"),
                    ("trained", "deft", 0.25, "fast"), ("trained", "deft", 0.25, "hybrid"), ("training_free", "random", 0.25, None)}
    base = next(r for r in doc["rows"] if r["protocol"] == "base")
    assert base == next(r for r in first if r["protocol"] == "base")  # current: not evaluated again by the second call
    tokens = {(r["protocol"], r["reducer"], r["rtd_mode"]): r["tokens_per_image"] for r in doc["rows"]}
    assert base["tokens_per_image"] == 64.0 and tokens["trained", "deft", "fast"] == tokens["training_free", "random", None] == 16.0
    assert tokens["trained", "deft", "hybrid"] > 16.0  # rtd hybrid brings pruned tokens back
    assert all(r["questions"] == 16 and {"device", "date", "commit"} <= set(r) for r in doc["rows"])
    assert len(doc["commands"]) == 2
    md = (tmp_path / "out/smoke.md").read_text()
    assert "| random |  | " in md and "| deft | hybrid | " in md and "## Acceptance checks" in md
    assert (tmp_path / "out/smoke.png").stat().st_size > 10_000
    assert re.fullmatch(r"smoke: base \d+\.\d%; .*acceptance \d+ pass, \d+ fail, \d+ missing", out.strip().splitlines()[-1])
