"""eval/deft_sweep.py: pipeline resolution, --only, JSON merging (atomic), report and acceptance checks
on synthetic rows (one seed and mean ± std over seeds), seeded run names, a failing training run, the
incremental evaluation under a time budget (fake training subprocesses, fake evaluator), and one tiny
end-to-end sweep on CPU (two 2-step runs)."""

import json
import os
import re
import sys
import time
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
    keep = {c.text.split(" at ")[1].split(":")[0]: c.status for c in checks if c.text.startswith("trained: deft (rtd fast) keeps")}
    assert keep == {"0.482": "PASS", "0.25": "FAIL", "0.11": "PASS"}  # 100.0 %, 98.5 % < 99, 97.98 %
    beats = [c for c in checks if " beats " in c.text]
    assert {c.text.split(" at ")[0].split()[-1] for c in beats} == {"random", "pool"}  # its ablation is not a rival
    assert [c.status for c in beats if "random" in c.text] == ["PASS", "FAIL", "PASS"]  # 0.25: 97.5 vs 98.0
    assert all(c.status != "PASS" for c in checks if c.text.startswith("training_free: deft (rtd fast) keeps"))
    info = [c.text for c in checks if c.status == "INFO"]
    assert any("trained: rtd modes of deft at 0.11: hybrid - fast = +0.5 pp" in t and "adaptive - fast = -1.0 pp" in t for t in info)
    assert any(t.startswith("trained: ablation deft - deft_nofb: 0.482: +0.5 pp, 0.25: +0.5 pp, 0.11: +2.0 pp") for t in info)
    assert checks and all(c.text.split(": ")[0] in ("trained", "training_free") for c in checks), [c.text for c in checks]
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


# ------------------------------------------------------------------------------ seeds
def test_report_shows_mean_and_std_over_seeds_and_checks_use_the_mean(tmp_path):
    rows = []
    for seed, (b, d, r) in enumerate([(0.99, 0.97, 0.95), (0.98, 0.95, 0.96), (0.97, 0.93, 0.97)]):
        rows += [row("base", "deft", 1.0, b, 64, mode="fast", seed=seed),
                 row("trained", "deft", 0.25, d, 16, mode="fast", seed=seed),
                 row("trained", "random", 0.25, r, 16, seed=seed)]
    rows.append(row("trained", "pool", 0.25, 0.90, 4, seed=0))  # one seed only: n=1, no std
    cells = {(c["reducer"], c["protocol"]): c for c in ds.aggregate(rows)}
    assert cells["deft", "trained"]["n"] == 3 and cells["deft", "trained"]["seeds"] == [0, 1, 2]
    assert cells["deft", "trained"]["accuracy"]["all"] == pytest.approx(0.95)
    assert cells["deft", "trained"]["acc_std"] == pytest.approx(2.0)  # sample std of 97, 95, 93
    assert cells["pool", "trained"]["n"] == 1 and cells["pool", "trained"]["acc_std"] == 0.0

    md = ds.build_report({"commands": ["c"], "rows": rows}, "x", "deft", 0.11, ["deft", "random", "pool"])
    trained = md.split("## Trained")[1].split("##")[0].strip().splitlines()
    assert trained[2] == "| reducer | rtd mode | 0.25: accuracy ± std (% of base) n seeds | 0.25: tokens/image |"
    assert trained[4] == "| no reduction (base, retention 1) | fast | 98.0 ± 1.0 (100.0) n=3 | 64.0 |"
    assert trained[5] == "| deft | fast | 95.0 ± 2.0 (96.9) n=3 | 16.0 |"  # 95 / 98 of the base's mean
    assert trained[6] == "| random |  | 96.0 ± 1.0 (98.0) n=3 | 16.0 |"
    assert trained[7] == "| pool |  | 90.0 (91.8) n=1 | 4.0 |"
    assert "Seeds 0, 1, 2: each cell is the mean ± sample std" in md
    assert "- **FAIL** trained: deft (rtd fast) keeps >= 99 % of base accuracy at 0.25: 96.94 % (95.0 vs 98.0; n=3 vs 3 seeds)" in md
    assert "- **FAIL** trained: deft beats random at 0.25: 95.0 ± 2.0 vs 96.0 ± 1.0 (-1.0 pp; n=3 vs 3 seeds)" in md
    assert "- **PASS** trained: deft beats pool at 0.25: 95.0 ± 2.0 vs 90.0 (+5.0 pp; n=3 vs 1 seeds)" in md
    assert md.strip().splitlines()[-1] == "x: base 98.0%; trained deft@0.25 95.0% (96.9% of base); acceptance 1 pass, 2 fail, 0 missing"
    ds.plot_sweep(rows, tmp_path / "x.png", "deft", ["deft"], "t")  # error bars
    assert (tmp_path / "x.png").stat().st_size > 10_000
    # rows written before seeds were recorded are seed 0's: a seed-0 row replaces them, seed 1 joins them
    merged = ds.merge_rows([row("trained", "deft", 0.25, 0.9, 16)], [row("trained", "deft", 0.25, 0.8, 16, seed=0),
                                                                     row("trained", "deft", 0.25, 0.7, 16, seed=1)])
    assert [(r["seed"], r["accuracy"]["all"]) for r in merged] == [(0, 0.8), (1, 0.7)]


def test_seeded_runs_are_named_and_get_the_seed_and_save_steps(tmp_path):
    deft = write_yaml(tmp_path / "deft.yaml", TINY_PIPE)
    common = ["--train-config", str(tiny_recipe(tmp_path)), "--reducers", f"deft={deft}", "random=configs/pipeline/random.yaml",
              "--ratios", "0.25", "--rtd-ratio", "0.25", "--runs", str(tmp_path / "runs")]
    reducers = ds.parse_reducers(ds.parse_args(common).reducers)

    args = ds.parse_args([*common, "--seeds", "0", "1", "--save-steps", "50"])
    runs, items = ds.plan(args, reducers, recipe_seed=0)
    assert list(runs) == ["base#s0", "base#s1", "deft@0.25#s0", "random@0.25#s0", "deft@0.25#s1", "random@0.25#s1"]  # bases first
    assert runs["deft@0.25#s1"].dir == (tmp_path / "runs/trained/deft@0.25#s1").resolve()
    assert {(it.protocol, it.reducer, it.seed, it.run) for it in items if it.protocol != "trained"} == {
        ("base", "deft", 0, "base#s0"), ("base", "deft", 1, "base#s1"),
        ("training_free", "deft", 0, "base#s0"), ("training_free", "deft", 1, "base#s1"),  # each seed's base
        ("training_free", "random", 0, "base#s0"), ("training_free", "random", 1, "base#s1")}
    cmd = ds.Launcher(args, 1).command(runs["random@0.25#s1"])
    assert cmd[-3:] == ["save_steps=50", "seed=1", f"model.pipeline={runs['random@0.25#s1'].pipeline_yaml}"]

    args = ds.parse_args(common)  # the recipe's seed alone: folders keep their names, no seed override
    runs, items = ds.plan(args, reducers, recipe_seed=0)
    assert list(runs) == ["base", "deft@0.25", "random@0.25"] and {it.seed for it in items} == {0}
    assert not any(a.startswith(("seed=", "save_steps=")) for a in ds.Launcher(args, 1).command(runs["base"]))
    assert list(ds.plan(ds.parse_args([*common, "--seeds", "3"]), reducers, recipe_seed=0)[0]) == ["base#s3", "deft@0.25#s3", "random@0.25#s3"]
    for bad, msg in [(["--seeds", "1", "1"], "names a seed twice"), (["--override", "seed=2"], "use --seeds"),
                     (["--time-budget", "60", "--launch-margin", "60"], "--launch-margin")]:
        with pytest.raises(SystemExit):
            ds.parse_args([*common, *bad])


# ------------------------------------------------------------------------------ incremental, time budget
def test_save_rows_writes_atomically(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    ds.save_rows(path, [row("trained", "deft", 0.25, 0.9, 16)], "cmd")
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ds.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ds.save_rows(path, [row("trained", "random", 0.25, 0.8, 16)])
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left


def test_is_trained_wants_a_complete_final(tmp_path):
    export = tmp_path / "stage0_finetune/export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"x" * 100)
    assert not ds.is_trained(tmp_path)
    (tmp_path / "final").mkdir()
    (tmp_path / "final/config.json").write_text("{}")
    (tmp_path / "final/model.safetensors").write_bytes(b"x" * 40)  # stopped during the copy
    assert not ds.is_trained(tmp_path)
    (tmp_path / "final/model.safetensors").write_bytes(b"x" * 100)
    assert ds.is_trained(tmp_path)


def fake_training(sleeps: dict[str, float]):
    """``Launcher.command`` stand-in: run ``name`` sleeps ``sleeps[name]`` s (recording its pid), then exports final/."""
    def command(self, run):
        script = (f"import os, pathlib, time; d = pathlib.Path({str(run.dir)!r}); d.mkdir(parents=True, exist_ok=True); "
                  f"(d / 'pid').write_text(str(os.getpid())); time.sleep({sleeps[run.name]}); "
                  "(d / 'final').mkdir(exist_ok=True); (d / 'final/config.json').write_text('{}')")
        return [sys.executable, "-c", script]
    return command


def test_time_budget_evaluates_finished_runs_as_they_finish_and_lists_the_unfinished(tmp_path, monkeypatch, capsys):
    """Two runs at once: the base (1.5 s) finishes and its rows are evaluated and saved one item at a
    time while deft@0.25 (30 s) still trains; random@0.25 would start with less than the margin left
    and is not launched; at the deadline deft@0.25 is stopped. Exit 0, the unfinished runs named;
    the next call (no budget) trains them and evaluates only what is missing."""
    deft = write_yaml(tmp_path / "deft.yaml", TINY_PIPE)
    out = tmp_path / "out"
    argv = ["--train-config", str(tiny_recipe(tmp_path)), "--reducers", f"deft={deft}", "random=configs/pipeline/random.yaml",
            "--ratios", "0.25", "--rtd-ratio", "0.25", "--rtd-modes", "fast", "--runs", str(tmp_path / "runs"),
            "--out", str(out), "--name", "tb", "--parallel", "2", "--device", "cpu"]
    sleeps = {"base": 1.5, "deft@0.25": 30, "random@0.25": 0}
    monkeypatch.setattr(ds.Launcher, "command", fake_training(sleeps))
    calls = []

    def make_evaluator(args):
        def evaluate(it, runs):
            on_disk = ds.load_results(out / "tb.json")["rows"]
            calls.append((it.protocol, it.reducer, time.monotonic(), len(on_disk)))
            return [row(it.protocol, it.reducer, it.ratio, 0.9 if it.protocol == "base" else 0.8, 64 * it.ratio, mode=m,
                        seed=it.seed, limit=None, steps=None, overrides=[], pipeline_config=it.pipeline) for m in it.modes]
        return evaluate

    monkeypatch.setattr(ds, "make_evaluator", make_evaluator)
    t0 = time.monotonic()
    assert ds.main([*argv, "--time-budget", "4", "--launch-margin", "3"]) == 0
    took = time.monotonic() - t0
    printed = capsys.readouterr().out
    assert [(p, r, n) for p, r, _, n in calls] == [("base", "deft", 0), ("training_free", "deft", 1), ("training_free", "random", 2)]
    assert all(t < t0 + 4 for _, _, t, _ in calls)  # evaluated while deft@0.25 was still training
    assert 4 <= took < 4 + ds.TERMINATE_GRACE_S
    pid = int((tmp_path / "runs/trained/deft@0.25/pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped at the deadline
    assert not (tmp_path / "runs/trained/random@0.25").exists()  # never launched
    assert re.search(r"\[sweep\] unfinished \(time budget; the same command resumes them\): deft@0.25 \(stopped \(time budget "
                     r"reached\); resumes from its last checkpoint\), random@0.25 \(not started: \d s left < --launch-margin 3 s\)", printed)
    md = (out / "tb.md").read_text()
    assert "unfinished at the last call's time budget** (the same command resumes them from their last checkpoint): deft@0.25, random@0.25" in md
    assert md.strip().splitlines()[-1].endswith("(88.9% of base); acceptance 0 pass, 1 fail, 0 missing; 2 training run(s) unfinished")
    assert len(ds.load_results(out / "tb.json")["rows"]) == 3

    calls.clear()
    sleeps["deft@0.25"] = 0
    assert ds.main(argv) == 0
    assert sorted((p, r) for p, r, _, _ in calls) == [("trained", "deft"), ("trained", "random")]
    assert "unfinished" not in capsys.readouterr().out
    assert len(ds.load_results(out / "tb.json")["rows"]) == 5


def test_report_breaks_accuracy_down_by_question_type_over_seeds():
    def typed(protocol, reducer, ratio, yes_no, seed, mode=None):
        r = row(protocol, reducer, ratio, (1.0 + yes_no) / 2, 16, mode=mode, seed=seed)
        r["accuracy"] = {"all": (1.0 + yes_no) / 2, "color": 1.0, "yes/no": yes_no}
        return r

    rows = [typed("base", "deft", 1.0, 0.98, 0, "fast"), typed("base", "deft", 1.0, 0.90, 1, "fast"),
            typed("trained", "deft", 0.25, 0.96, 0, "fast"), typed("trained", "deft", 0.25, 0.86, 1, "fast"),
            typed("trained", "deft", 0.25, 0.50, 0, "hybrid"),  # not rtd fast: left out
            typed("training_free", "deft", 0.25, 0.10, 0, "fast"),  # not trained: left out
            typed("trained", "random", 0.25, 0.92, 0)]
    md = ds.build_report({"commands": ["c"], "rows": rows}, "x", "deft", 0.11, ["deft", "random"])
    table = md.split("## By question type")[1].split("## Acceptance")[0].strip().splitlines()
    assert table[4] == "| run | ratio | n | all | color | yes/no |"
    assert table[6] == "| no reduction (base) | 1 | 2 | 97.0 ± 2.8 [95.0-99.0] | 100.0 ± 0.0 [100.0-100.0] | 94.0 ± 5.7 [90.0-98.0] |"
    assert table[7] == "| deft | 0.25 | 2 | 95.5 ± 3.5 [93.0-98.0] | 100.0 ± 0.0 [100.0-100.0] | 91.0 ± 7.1 [86.0-96.0] |"
    assert table[8] == "| random | 0.25 | 1 | 96.0 | 100.0 | 92.0 |"
    assert table[-1] == "Range over every run above, by type: color 100.0-100.0, yes/no 86.0-98.0."
