"""The comparison harness (llava_deft.evaluation.sweep / .report, eval/deft_sweep.py over it): pipeline
resolution, spec validation, --only, JSON merging (atomic), report and acceptance checks with the paired
bootstrap on synthetic rows (one seed and mean ± std over seeds), seeded run names, a failing training run,
the incremental evaluation under a time budget (fake training subprocesses, fake evaluator), and a
2-reducer x 1-ratio x 2-seed spec end to end on CPU."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from eval import deft_sweep as entry
from llava_deft.evaluation import report as rp
from llava_deft.evaluation import sweep as ds
from pipeline import PipelineConfigError

REPO = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def make_spec(tmp_path: Path, **kw) -> ds.SweepSpec:
    data = {"name": "x", "recipe": str(tiny_recipe(tmp_path)), "data": {"task": "easyvqa"},
            "reducers": {"deft": str(write_yaml(tmp_path / "deft.yaml", TINY_PIPE)), "random": "configs/pipeline/random.yaml"},
            "method": "deft", "ratios": [0.25], "rtd": {"modes": ["fast"], "ratio": 0.25},
            "runs": str(tmp_path / "runs"), "out": str(tmp_path / "out")}
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return ds.SweepSpec.model_validate(data)


def rspec(method="deft", reducers=("deft", "deft_nofb", "random", "pool"), thresholds=None, beats=("random", "pool"),
          ablations=None, rtd_ratio=0.11, resamples=2000) -> rp.ReportSpec:
    return rp.ReportSpec("x", method, tuple(reducers), dict(thresholds or {0.482: 99.5, 0.25: 99.0, 0.11: 97.0}),
                         tuple(beats), dict(ablations if ablations is not None else {"deft_nofb": "deft"}), rtd_ratio,
                         resamples=resamples)


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
    with pytest.raises(ValueError, match=r"ratio 0.3 is not in ratios"):
        ds.parse_only(["deft@0.3"], ["deft"], ratios)
    assert list(entry.parse_reducers(["b=x.yaml", "a=y.yaml"])) == ["b", "a"]
    for bad, msg in [(["deft"], "not NAME=YAML"), (["a=x", "a=y"], "given twice")]:
        with pytest.raises(ValueError, match=msg):
            entry.parse_reducers(bad)


@pytest.mark.parametrize("change, msg", [
    ({"method": "pool"}, r"method 'pool' is not one of the reducers \['deft', 'random'\]"),
    ({"ratios": [1.0]}, r"ratios must be a non-empty list in \(0, 1\)"),
    ({"ratios": [0.25, 0.25]}, r"names a ratio twice"),
    ({"seeds": [1, 1]}, r"seeds \[1, 1\] must be distinct"),
    ({"reducers": {"base": "configs/pipeline/random.yaml"}, "method": "base"}, r"reserved"),
    ({"beats": ["tome"]}, r"beats/ablations name \['tome'\], which are not reducers"),
    ({"thresholds": {0.25: 120}}, r"thresholds .*% of base in \(0, 100\]"),
    ({"training": {"overrides": ["seed=3"]}}, r"seeds, run folders and pipelines are the sweep's"),
    ({"data": {"task": "nope"}}, r"data.task 'nope' is not a built-in task"),
    ({"data": {"task": "easyvqa", "test": "t.json"}}, r"give `task` or `train`/`test` files, not both"),
    ({"rtd": {"modes": ["slow"]}}, r"rtd.modes \['slow'\]: each must be one of"),
    ({"name": "../x"}, r"must be a file stem"),
])
def test_spec_validation_names_the_key(tmp_path, change, msg):
    with pytest.raises(Exception, match=msg):
        make_spec(tmp_path, **change)


def test_load_spec_errors_name_the_file_and_every_key(tmp_path):
    with pytest.raises(ds.SweepSpecError, match=r"sweep spec '.*nope.yaml' does not exist"):
        ds.load_spec(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", {"name": "x", "recipe": "r.yaml", "data": {"task": "easyvqa"},
                                             "reducers": {"a": "a.yaml"}, "method": "a", "ratios": [0.25], "ratioz": 1})
    with pytest.raises(ds.SweepSpecError, match=r"sweep spec '.*bad.yaml': ratioz: Extra inputs are not permitted"):
        ds.load_spec(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ds.SweepSpecError, match="must be a mapping"):
        ds.load_spec(tmp_path / "list.yaml")
    good = write_yaml(tmp_path / "good.yaml", {"name": "x", "recipe": "r.yaml", "data": {"task": "easyvqa"},
                                               "reducers": {"a": "a.yaml", "b": "b.yaml"}, "method": "a", "ratios": [0.25]})
    spec = ds.load_spec(good, ["seeds=[0, 1]", "data.limit=10", "evaluation.ttft_batch=0"])
    assert spec.seeds == [0, 1] and spec.data.limit == 10 and spec.evaluation.ttft_batch == 0
    assert spec.beaten == ("b",) and spec.runs_dir == Path("runs/sweeps/x")


@pytest.mark.parametrize("path", sorted((REPO / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_specs_validate_and_resolve(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = ds.load_spec(path)
    _, items = ds.plan(spec, 0)
    assert items[0].protocol == "base" and all(Path(p).is_file() for p in spec.reducers.values())
    assert Path(spec.recipe).is_file()


@pytest.mark.parametrize("argv, msg", [
    (["--reducers", "random=configs/pipeline/random.yaml", "--base", "deft"], r"method 'deft' is not one of the reducers \['random'\]"),
    (["--reducers", "deft=configs/pipeline/missing.yaml", "--base", "deft"], r"reducer 'deft': pipeline config '.*missing.yaml' does not exist"),
    (["--reducers", "deft=configs/pipeline/fgcs.yaml", "--base", "deft", "--only", "pool"], r"unknown reducer 'pool' in --only"),
    (["--reducers", "deft=configs/pipeline/fgcs.yaml", "--base", "deft", "--ratios", "1.0"], r"ratios must be a non-empty list in \(0, 1\)"),
])
def test_entry_refuses_bad_arguments_before_training(tmp_path, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        entry.main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def bits(accuracy: float, n: int = 200) -> str:
    """A per-question record with round(accuracy * n) leading ones (rows of higher accuracy contain lower ones)."""
    k = round(accuracy * n)
    return "1" * k + "0" * (n - k)


def row(protocol, reducer, ratio, accuracy, tokens, mode=None, **extra):
    return {"protocol": protocol, "reducer": reducer, "ratio": ratio, "rtd_mode": mode,
            "accuracy": {"all": accuracy, "color": accuracy}, "tokens_per_image": tokens, "questions": 200,
            "correct": bits(accuracy), "ids_digest": "d", "ttft_ms": 10 * tokens / 64 + 2,
            "date": "2026-11-23 10:00 UTC", "device": "NVIDIA H100", "commit": "abc1234",
            "checkpoint": "runs/base/final", "checkpoint_sha": "s", **extra}


def test_merge_rows_replaces_by_key_and_save_keeps_commands(tmp_path):
    old = [row("trained", "deft", 0.25, 0.9, 16), row("trained", "random", 0.25, 0.8, 16)]
    new = [row("trained", "deft", 0.25, 0.95, 16), row("trained", "deft", 0.25, 0.96, 28, mode="hybrid")]
    merged = rp.merge_rows(old, new)
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
    checks = rp.acceptance_checks(synthetic_rows(), rspec())
    keep = {c.text.split(" at ")[1].split(":")[0]: c.status for c in checks if c.text.startswith("trained: deft keeps")}
    assert keep == {"0.482": "PASS", "0.25": "FAIL", "0.11": "PASS"}  # 100.0 %, 98.5 % < 99, 97.98 %
    assert any("98.48 % (97.5 vs 99.0, 0.52 points short)" in c.text for c in checks)
    beats = [c for c in checks if c.text.startswith("trained:") and " beats " in c.text]
    assert {c.text.split(" at ")[0].split()[-1] for c in beats} == {"random", "pool"}  # its ablation is not a rival
    # 0.482: +1 pp from 2 of 200 questions, the CI touches 0 (not decided); 0.25: 97.5 vs 98.0
    assert [c.status for c in beats if "random" in c.text] == ["FAIL", "FAIL", "PASS"]
    assert "CI [+0.00, +2.50] over 200 questions x 1 seed(s); not decided (the CI contains 0)" in beats[0].text
    # the CI is printed beside each decision: 0.11, 97.0 vs 90.0 on 200 paired questions, every difference >= 0
    at_011 = next(c.text for c in beats if "random at 0.11" in c.text)
    assert re.search(r"97.0 vs 90.0: \+7.00 pp, 95 % CI \[\+\d\.\d\d, \+\d+\.\d\d\] over 200 questions x 1 seed", at_011), at_011
    assert all(c.status == "INFO" for c in checks if c.text.startswith("training_free:") and " beats " in c.text)
    assert all(c.status != "PASS" for c in checks if c.text.startswith("training_free: deft keeps"))
    info = [c.text for c in checks if c.status == "INFO"]
    assert any("trained: rtd modes of deft at 0.11: hybrid - fast = +0.5 pp" in t and "adaptive - fast = -1.0 pp" in t for t in info)
    assert any(t.startswith("trained: ablation deft - deft_nofb: 0.482: 99.0 vs 98.5: +0.50 pp") for t in info)
    assert checks and all(c.text.split(": ")[0] in ("trained", "training_free") for c in checks), [c.text for c in checks]
    only_half = [r for r in synthetic_rows() if r["ratio"] in (1.0, 0.25)]  # thresholds only for ratios in the sweep
    assert not [c for c in rp.acceptance_checks(only_half, rspec(thresholds={0.5: 90.0})) if " keeps " in c.text]


def test_beats_without_per_question_scores_is_not_decided():
    rows = [{k: v for k, v in r.items() if k != "correct"} for r in synthetic_rows()]
    checks = rp.acceptance_checks(rows, rspec())
    at = {c.text.split(" at ")[1].split(":")[0]: c for c in checks if c.text.startswith("trained: deft beats random")}
    assert at["0.11"].status == "MISSING" and "no CI: rows without per-question scores" in at["0.11"].text
    assert at["0.25"].status == "FAIL"  # lower on average: fails whatever the CI would say


def test_bootstrap_check_equals_the_statistic_on_paired_seeds():
    """A 2-seed cell against another: the check's interval is paired_bootstrap over (seeds, questions)."""
    import numpy as np

    from llava_deft.evaluation import paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.random((2, 150)) < 0.8
    b = rng.random((2, 150)) < 0.7
    rows = [row("base", "deft", 1.0, 0.9, 64, seed=0), row("base", "deft", 1.0, 0.9, 64, seed=1)]
    for s in range(2):
        for name, x in (("deft", a), ("random", b)):
            r = row("trained", name, 0.25, float(x[s].mean()), 16, seed=s)
            r["correct"] = "".join("1" if v else "0" for v in x[s])
            rows.append(r)
    check = next(c for c in rp.acceptance_checks(rows, rspec(beats=("random",), resamples=500))
                 if "beats random" in c.text)
    want = paired_bootstrap(a.astype(float), b.astype(float), resamples=500)
    assert f"{100 * want.diff:+.2f} pp, 95 % CI [{100 * want.low:+.2f}, {100 * want.high:+.2f}] over 150 questions x 2 seed(s)" in check.text
    assert check.status == ("PASS" if want.low > 0 else "FAIL")
    other = [dict(r, ids_digest="e") if r["reducer"] == "random" else r for r in rows]  # other questions: no pairing
    assert "rows scored on different questions" in next(c.text for c in rp.acceptance_checks(other, rspec(beats=("random",)))
                                                         if "beats random" in c.text)


def test_report_tables_summary_and_plot(tmp_path):
    rows = synthetic_rows()
    md = rp.build_report({"commands": ["python eval/deft_sweep.py --name x"], "rows": rows}, rspec())
    lines = md.strip().splitlines()
    assert lines[-1] == ("x: base 99.0%; training_free deft@0.11 92.0% (92.9% of base); trained deft@0.11 97.0% (98.0% of base); "
                         "acceptance 5 pass, 7 fail, 0 missing")  # keeps: 2+0 pass; beats: 3 of 6
    assert "    python eval/deft_sweep.py --name x" in lines and "NVIDIA H100" in md and "abc1234" in md
    trained = md.split("## Trained")[1].split("##")[0].strip().splitlines()
    assert trained[2] == ("| reducer | rtd mode | 0.482: accuracy (% of base) | 0.482: tokens/item | 0.482: TTFT ms | "
                          "0.25: accuracy (% of base) | 0.25: tokens/item | 0.25: TTFT ms | 0.11: accuracy (% of base) | "
                          "0.11: tokens/item | 0.11: TTFT ms |")
    assert trained[4].startswith("| no reduction (base, retention 1) | fast | 99.0 (100.0) | 64.0 | 12.0 |")
    assert trained[5] == "| deft | fast | 99.0 (100.0) | 30.8 | 6.8 | 97.5 (98.5) | 16.0 | 4.5 | 97.0 (98.0) | 7.0 | 3.1 |"
    assert trained[6] == "| deft | hybrid | — | — | — | — | — | — | 97.5 (98.5) | 10.0 | 3.6 |"
    assert [ln.split(" | ")[0] for ln in trained[4:]] == ["| no reduction (base, retention 1)", "| deft", "| deft", "| deft",
                                                         "| deft_nofb", "| random", "| pool"]
    rp.plot_sweep(rows, tmp_path / "x.png", rspec())
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
    launcher = ds.Launcher(make_spec(tmp_path, training={"parallel": 1}), 1)
    monkeypatch.setattr(launcher, "command", lambda run: [sys.executable, "-c", "print('loss went nan'); raise SystemExit(3)"])
    run = ds.Run("random@0.25", tmp_path / "random@0.25", {"stages": []}, Path("x.yaml"), 0.25)
    launcher.train_and_report(run)
    launcher.terminate()
    assert launcher.failed == {"random@0.25": "exit code 3"}
    err = capsys.readouterr()
    assert re.search(r"run random@0.25 FAILED \(exit code 3\); last lines of .*random@0.25.log:\n.*\n\s+loss went nan", err.out + err.err)


@pytest.mark.slow
def test_two_reducers_one_ratio_two_seeds_end_to_end(tmp_path, monkeypatch, capsys):
    """The acceptance spec: 2 reducers x 1 ratio x 2 seeds, both protocols, through `llava-deft sweep run`
    (6 two-step training subprocesses, two at a time), then `sweep report`; a second run evaluates nothing."""
    from llava_deft import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_path = write_yaml(tmp_path / "spec.yaml", {
        "name": "smoke", "recipe": str(tiny_recipe(tmp_path)), "data": {"task": "easyvqa", "limit": 16},
        "reducers": {"deft": str(write_yaml(tmp_path / "deft.yaml", TINY_PIPE)), "random": "configs/pipeline/random.yaml"},
        "method": "deft", "ratios": [0.25], "seeds": [0, 1], "thresholds": {0.25: 99.0},
        "rtd": {"modes": ["fast", "hybrid"], "ratio": 0.25},
        "training": {"parallel": 2}, "evaluation": {"batch_size": 16, "device": "cpu", "ttft_repeats": 1},
        "bootstrap": {"resamples": 200}, "runs": str(tmp_path / "runs"), "out": str(tmp_path / "out")})
    assert cli.main(["sweep", "run", str(spec_path)]) == 0
    runs = tmp_path / "runs"
    for name in ["base#s0", "base#s1", "trained/deft@0.25#s0", "trained/random@0.25#s1"]:
        assert (runs / name / "final/config.json").is_file(), name
    assert yaml.safe_load((runs / "base#s0/pipeline.yaml").read_text())["stages"][1]["retention_ratio"] == 1.0
    assert "seed=1" in (runs / "trained/random@0.25#s1.log").read_text().splitlines()[0]
    doc = json.loads((tmp_path / "out/smoke.json").read_text())
    keys = {(r["protocol"], r["reducer"], r["rtd_mode"], r["seed"]) for r in doc["rows"]}
    assert keys == {(p, n, m, s) for s in (0, 1) for p, n, m in [
        ("base", "deft", "fast"), ("training_free", "deft", "fast"), ("training_free", "deft", "hybrid"),
        ("trained", "deft", "fast"), ("trained", "deft", "hybrid"), ("training_free", "random", None), ("trained", "random", None)]}
    for r in doc["rows"]:
        assert r["questions"] == 16 and len(r["correct"]) == 16 and set(r["correct"]) <= {"0", "1"}
        assert r["ttft_ms"] > 0 and r["ttft_batch"] == 1 and {"device", "date", "commit"} <= set(r)
        assert r["ttft_concurrent_trainings"] in (0, 1, 2)  # at most `parallel` runs train beside the evaluation
        assert sum(map(int, r["correct"])) == round(16 * r["accuracy"]["all"])
    tokens = {(r["protocol"], r["reducer"], r["rtd_mode"]): r["tokens_per_image"] for r in doc["rows"] if r["seed"] == 0}
    assert tokens["base", "deft", "fast"] == 64.0 and tokens["trained", "deft", "fast"] == tokens["training_free", "random", None] == 16.0
    assert tokens["trained", "deft", "hybrid"] > 16.0
    md = (tmp_path / "out/smoke.md").read_text()
    assert "n=2" in md and re.search(r"trained: deft beats random at 0.25: .* CI \[.*\] over 16 questions x 2 seed\(s\)", md)
    assert (tmp_path / "out/smoke.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert re.fullmatch(r"smoke: base \d+\.\d%; .*acceptance \d+ pass, \d+ fail, \d+ missing", out.strip().splitlines()[-1])

    assert cli.main(["sweep", "run", str(spec_path)]) == 0  # everything current: nothing trained or evaluated
    assert "0 model(s) to evaluate; 0 training run(s) to do" in capsys.readouterr().out
    assert cli.main(["sweep", "report", str(spec_path), "title=again"]) == 0
    assert capsys.readouterr().out.startswith("# again: reducer x retention ratio")


# ------------------------------------------------------------------------------ seeds
def test_report_shows_mean_and_std_over_seeds_and_checks_use_the_mean(tmp_path):
    rows = []
    for seed, (b, d, r) in enumerate([(0.99, 0.97, 0.95), (0.98, 0.95, 0.96), (0.97, 0.93, 0.97)]):
        rows += [row("base", "deft", 1.0, b, 64, mode="fast", seed=seed),
                 row("trained", "deft", 0.25, d, 16, mode="fast", seed=seed),
                 row("trained", "random", 0.25, r, 16, seed=seed)]
    rows.append(row("trained", "pool", 0.25, 0.90, 4, seed=0))  # one seed only: n=1, no std
    cells = {(c["reducer"], c["protocol"]): c for c in rp.aggregate(rows)}
    assert cells["deft", "trained"]["n"] == 3 and cells["deft", "trained"]["seeds"] == [0, 1, 2]
    assert cells["deft", "trained"]["accuracy"]["all"] == pytest.approx(0.95)
    assert cells["deft", "trained"]["acc_std"] == pytest.approx(2.0)  # sample std of 97, 95, 93
    assert cells["pool", "trained"]["n"] == 1 and cells["pool", "trained"]["acc_std"] == 0.0

    md = rp.build_report({"commands": ["c"], "rows": rows}, rspec(reducers=("deft", "random", "pool"), ablations={}))
    trained = md.split("## Trained")[1].split("##")[0].strip().splitlines()
    assert trained[2] == "| reducer | rtd mode | 0.25: accuracy ± std (% of base) n seeds | 0.25: tokens/item | 0.25: TTFT ms |"
    assert trained[4] == "| no reduction (base, retention 1) | fast | 98.0 ± 1.0 (100.0) n=3 | 64.0 | 12.0 |"
    assert trained[5] == "| deft | fast | 95.0 ± 2.0 (96.9) n=3 | 16.0 | 4.5 |"  # 95 / 98 of the base's mean
    assert trained[6] == "| random |  | 96.0 ± 1.0 (98.0) n=3 | 16.0 | 4.5 |"
    assert trained[7] == "| pool |  | 90.0 (91.8) n=1 | 4.0 | 2.6 |"
    assert "Seeds 0, 1, 2: each cell is the mean ± sample std" in md
    assert "- **FAIL** trained: deft keeps >= 99 % of base accuracy at 0.25: 96.94 % (95.0 vs 98.0; n=3 vs 3 seeds, 2.06 points short)" in md
    assert re.search(r"- \*\*FAIL\*\* trained: deft beats random at 0.25: 95.0 ± 2.0 vs 96.0 ± 1.0: -1.00 pp, .* x 3 seed\(s\)", md)
    assert re.search(r"- \*\*PASS\*\* trained: deft beats pool at 0.25: 95.0 ± 2.0 vs 90.0: \+7.00 pp, .* x 1 seed\(s\)", md)  # seed 0 only
    assert md.strip().splitlines()[-1] == "x: base 98.0%; trained deft@0.25 95.0% (96.9% of base); acceptance 1 pass, 2 fail, 0 missing"
    rp.plot_sweep(rows, tmp_path / "x.png", rspec())  # error bars
    assert (tmp_path / "x.png").stat().st_size > 10_000
    # rows written before seeds were recorded are seed 0's: a seed-0 row replaces them, seed 1 joins them
    merged = rp.merge_rows([row("trained", "deft", 0.25, 0.9, 16)], [row("trained", "deft", 0.25, 0.8, 16, seed=0),
                                                                     row("trained", "deft", 0.25, 0.7, 16, seed=1)])
    assert [(r["seed"], r["accuracy"]["all"]) for r in merged] == [(0, 0.8), (1, 0.7)]


def test_seeded_runs_are_named_and_get_the_seed_and_save_steps(tmp_path):
    spec = make_spec(tmp_path, seeds=[0, 1], training={"save_steps": 50})
    runs, items = ds.plan(spec, recipe_seed=0)
    assert list(runs) == ["base#s0", "base#s1", "deft@0.25#s0", "random@0.25#s0", "deft@0.25#s1", "random@0.25#s1"]  # bases first
    assert runs["deft@0.25#s1"].dir == (tmp_path / "runs/trained/deft@0.25#s1").resolve()
    assert {(it.protocol, it.reducer, it.seed, it.run) for it in items if it.protocol != "trained"} == {
        ("base", "deft", 0, "base#s0"), ("base", "deft", 1, "base#s1"),
        ("training_free", "deft", 0, "base#s0"), ("training_free", "deft", 1, "base#s1"),  # each seed's base
        ("training_free", "random", 0, "base#s0"), ("training_free", "random", 1, "base#s1")}
    cmd = ds.Launcher(spec, 1).command(runs["random@0.25#s1"])
    assert cmd[-3:] == ["save_steps=50", "seed=1", f"model.pipeline={runs['random@0.25#s1'].pipeline_yaml}"]

    spec = make_spec(tmp_path)  # the recipe's seed alone: folders keep their names, no seed override
    runs, items = ds.plan(spec, recipe_seed=0)
    assert list(runs) == ["base", "deft@0.25", "random@0.25"] and {it.seed for it in items} == {0}
    assert not any(a.startswith(("seed=", "save_steps=")) for a in ds.Launcher(spec, 1).command(runs["base"]))
    assert list(ds.plan(make_spec(tmp_path, seeds=[3]), recipe_seed=0)[0]) == ["base#s3", "deft@0.25#s3", "random@0.25#s3"]


def test_a_user_llava_json_pair_trains_on_its_train_file(tmp_path):
    (tmp_path / "my").mkdir()
    for split in ("train", "test"):
        (tmp_path / "my" / f"{split}.json").write_text("[]")
    spec = make_spec(tmp_path, data={"task": None, "train": str(tmp_path / "my/train.json"),
                                     "test": str(tmp_path / "my/test.json"), "image_folder": str(tmp_path / "my")})
    runs, _ = ds.plan(spec, 0)
    cmd = ds.Launcher(spec, 1).command(runs["base"])
    data = next(a for a in cmd if a.startswith("data="))
    assert json.loads(data[5:]) == {"type": "llava_json", "path": str((tmp_path / "my/train.json").resolve()),
                                    "image_folder": str((tmp_path / "my").resolve())}
    assert spec.data.label == "my"
    gone = make_spec(tmp_path, data={"task": None, "train": str(tmp_path / "no.json"), "test": str(tmp_path / "my/test.json")})
    with pytest.raises(FileNotFoundError, match=r"data.train '.*no.json' does not exist"):
        ds.run(gone)


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
    and is not launched; at the deadline deft@0.25 is stopped. The unfinished runs are named; the next
    call (no budget) trains them and evaluates only what is missing."""
    spec = make_spec(tmp_path, name="tb", training={"parallel": 2}, evaluation={"device": "cpu"}, thresholds={0.25: 99.0})
    out = Path(spec.out)
    sleeps = {"base": 1.5, "deft@0.25": 30, "random@0.25": 0}
    monkeypatch.setattr(ds.Launcher, "command", fake_training(sleeps))
    calls = []

    def evaluate(it, runs):
        on_disk = ds.load_results(out / "tb.json")["rows"]
        calls.append((it.protocol, it.reducer, time.monotonic(), len(on_disk)))
        return [row(it.protocol, it.reducer, it.ratio, 0.9 if it.protocol == "base" else 0.8, 64 * it.ratio, mode=m,
                    seed=it.seed, limit=None, steps=None, overrides=[], pipeline_config=it.pipeline) for m in it.modes]

    t0 = time.monotonic()
    outcome = ds.run(spec, time_budget=4, launch_margin=3, evaluator=evaluate)
    took = time.monotonic() - t0
    printed = capsys.readouterr().out
    assert [(p, r, n) for p, r, _, n in calls] == [("base", "deft", 0), ("training_free", "deft", 1), ("training_free", "random", 2)]
    assert all(t < t0 + 4 for _, _, t, _ in calls)  # evaluated while deft@0.25 was still training
    assert 4 <= took < 4 + ds.TERMINATE_GRACE_S
    pid = int((tmp_path / "runs/trained/deft@0.25/pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped at the deadline
    assert not (tmp_path / "runs/trained/random@0.25").exists()  # never launched
    assert outcome.unfinished == ["deft@0.25", "random@0.25"] and not outcome.failed
    assert re.search(r"\[sweep\] unfinished \(time budget; the same command resumes them\): deft@0.25 \(stopped \(time budget "
                     r"reached\); resumes from its last checkpoint\), random@0.25 \(not started: \d s left < launch margin 3 s\)", printed)
    md = (out / "tb.md").read_text()
    assert "unfinished at the last call's time budget** (the same command resumes them from their last checkpoint): deft@0.25, random@0.25" in md
    assert md.strip().splitlines()[-1].endswith("(88.9% of base); acceptance 0 pass, 1 fail, 0 missing; 2 training run(s) unfinished")
    assert len(ds.load_results(out / "tb.json")["rows"]) == 3

    calls.clear()
    sleeps["deft@0.25"] = 0
    assert not ds.run(spec, evaluator=evaluate).unfinished
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
    md = rp.build_report({"commands": ["c"], "rows": rows}, rspec(reducers=("deft", "random"), ablations={}))
    table = md.split("## By question type")[1].split("## Acceptance")[0].strip().splitlines()
    assert table[4] == "| run | ratio | n | all | color | yes/no |"
    assert table[6] == "| no reduction (base) | 1 | 2 | 97.0 ± 2.8 [95.0-99.0] | 100.0 ± 0.0 [100.0-100.0] | 94.0 ± 5.7 [90.0-98.0] |"
    assert table[7] == "| deft | 0.25 | 2 | 95.5 ± 3.5 [93.0-98.0] | 100.0 ± 0.0 [100.0-100.0] | 91.0 ± 7.1 [86.0-96.0] |"
    assert table[8] == "| random | 0.25 | 1 | 96.0 | 100.0 | 92.0 |"
    assert table[-1] == "Range over every run above, by type: color 100.0-100.0, yes/no 86.0-98.0."


def test_missing_task_data_names_the_command_that_writes_it(tmp_path):
    from llava_deft.errors import TaskDataError
    from llava_deft.evaluation.data import EvalData

    with pytest.raises(TaskDataError, match=r"task 'scenes': '.*scenes/test.json' does not exist \(the folder does not exist\); "
                                            r"generate the tasks with `python -m llava_deft.tasks --out .* --only scenes`"):
        EvalData(task="scenes", tasks_dir=str(tmp_path)).check("test")
    with pytest.raises(TaskDataError, match=r"data.test '.*t.json' does not exist"):
        EvalData(test=str(tmp_path / "t.json")).check("test")


def test_skip_and_limit_pick_a_held_out_part_of_the_test_split(tmp_path):
    from PIL import Image

    from llava_deft.evaluation.data import EvalData, load_dataset
    from llava_deft.evaluation.loop import first
    from llava_deft.model import LlavaDeftForCausalLM

    items = list(range(10))
    assert [first(items, 3, 4)[i] for i in range(3)] == [4, 5, 6]
    assert list(first(items, None, 8)) == [8, 9] and list(first(items, 5, 8)) == [8, 9]
    assert len(first(items, None, 12)) == 0 and first(items, None) is items
    records = []
    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": str(i)}]})
    (tmp_path / "t.json").write_text(json.dumps(records))
    from llava_deft.config import load_model_config

    model = LlavaDeftForCausalLM(load_model_config(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"))
    ds = load_dataset(EvalData(test=str(tmp_path / "t.json"), skip=2, limit=3), model)
    assert [ds[i]["id"] for i in range(len(ds))] == ["q2", "q3", "q4"]
    with pytest.raises(ValueError, match="skip"):
        EvalData(test="t.json", skip=-1)


@pytest.mark.slow
def test_the_readme_command_runs_the_spec_on_a_users_llava_json_pair(tmp_path, monkeypatch, capsys):
    """configs/sweeps/llava_json.yaml on an exported easy-VQA pair, one command (the README's, with a
    tiny recipe and one seed): the base trains on the pair's train file and is scored on its test file."""
    from llava_deft import cli
    from llava_deft.data.easyvqa import export_easyvqa

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pair = tmp_path / "my"
    export_easyvqa(pair, "train", limit=64)
    export_easyvqa(pair, "test", limit=12)
    argv = ["sweep", "run", str(REPO / "configs/sweeps/llava_json.yaml"), f"data.train={pair}/train.json",
            f"data.test={pair}/test.json", f"data.image_folder={pair}/images", "name=my_sweep", f"runs={tmp_path}/runs",
            f"out={tmp_path}/out", f"recipe={tiny_recipe(tmp_path)}", "seeds=[0]", "ratios=[0.25]",
            "protocols=[training_free]", "evaluation.device=cpu", "evaluation.ttft_repeats=1", "bootstrap.resamples=100"]
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 0
    log = (tmp_path / "runs/base.log").read_text()  # seed 0 is the recipe's: the folder keeps its name
    assert f'"path": "{(pair / "train.json").resolve()}"' in log.splitlines()[0]  # the recipe's data replaced by the pair
    doc = json.loads((tmp_path / "out/my_sweep.json").read_text())
    assert {r["reducer"] for r in doc["rows"] if r["protocol"] != "prior"} == {"deft_q", "deft", "random", "pool", "tome", "divprune"}
    assert [r["reducer"] for r in doc["rows"] if r["protocol"] == "prior"] == ["question_prior"]  # its train answers
    assert all(r["questions"] == 12 and r["data"] == "my" for r in doc["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("my_sweep: base ")


def test_report_warns_when_ttft_was_measured_beside_training_runs():
    rows = [{"protocol": "base", "reducer": "deft", "ratio": 1.0, "rtd_mode": "fast", "seed": 0, "accuracy": {"all": 0.5},
             "tokens_per_image": 64.0, "ttft_ms": 3.0, "ttft_batch": 1, "device": "cpu", "ttft_concurrent_trainings": c}
            for c in (0,)]
    rows.append({**rows[0], "protocol": "trained", "ratio": 0.25, "tokens_per_image": 16.0, "ttft_concurrent_trainings": 7})
    md = rp.build_report({"commands": [], "rows": rows}, rspec(ablations={}))
    assert "the TTFT of 1 of 2 rows was measured while up to 7 training runs shared the device" in md
    rows[1]["ttft_concurrent_trainings"] = 0
    assert "shared the device" not in rp.build_report({"commands": [], "rows": rows}, rspec(ablations={}))


# ------------------------------------------------------------------------------ finetuned from the base
def test_finetuned_runs_start_from_their_seeds_base_with_their_own_steps_and_overrides(tmp_path):
    spec = make_spec(tmp_path, seeds=[0, 1], protocols=["finetuned"],
                     training={"steps": 40, "overrides": ["lr=1"], "finetune_steps": 7,
                               "finetune_overrides": ["stages.0.retention_hold_ratio=0"]})
    runs, items = ds.plan(spec, recipe_seed=0)
    assert list(runs) == ["base#s0", "base#s1", "ft_deft@0.25#s0", "ft_random@0.25#s0", "ft_deft@0.25#s1", "ft_random@0.25#s1"]
    ft = runs["ft_random@0.25#s1"]
    assert (ft.protocol, ft.after, ft.init_from) == ("finetuned", "base#s1", runs["base#s1"].dir / "final")
    assert ft.dir == (tmp_path / "runs/finetuned/random@0.25#s1").resolve()
    assert {(it.protocol, it.run) for it in items if it.reducer == "random"} == {
        ("finetuned", "ft_random@0.25#s0"), ("finetuned", "ft_random@0.25#s1")}
    launcher = ds.Launcher(spec, 1)
    cmd = launcher.command(ft)
    assert "stages.0.max_steps=7" in cmd and f"init_from={runs['base#s1'].dir / 'final'}" in cmd
    assert cmd[-3:] == ["lr=1", "stages.0.retention_hold_ratio=0", f"model.pipeline={ft.pipeline_yaml}"]
    base_cmd = launcher.command(runs["base#s1"])
    assert "stages.0.max_steps=40" in base_cmd and not any(a.startswith(("init_from=", "stages.0.retention")) for a in base_cmd)
    launcher.terminate()
    assert spec.training.steps_for("finetuned") == 7 and spec.training.steps_for("trained") == 40
    assert make_spec(tmp_path, training={"steps": 40}).training.steps_for("finetuned") == 40  # None: as `steps`
    with pytest.raises(ValueError, match=r"training.overrides \['init_from=x'\]: the finetuned protocol sets init_from"):
        make_spec(tmp_path, training={"finetune_overrides": ["init_from=x"]})
    assert make_spec(tmp_path).protocols == ["training_free", "trained"]  # the default leaves finetuned out


def test_a_finetuned_run_waits_for_its_base_and_inherits_a_failed_one(tmp_path, monkeypatch, capsys):
    """One sweep call trains the base and then the runs that start from it (never before it has exported
    final/); when the base fails, its finetuned runs are failed without being launched."""
    spec = make_spec(tmp_path, name="ft", protocols=["finetuned"], training={"parallel": 3},
                     evaluation={"device": "cpu"}, thresholds={0.25: 99.0})
    sleeps = {"base": 1.0, "ft_deft@0.25": 0, "ft_random@0.25": 0}
    started = {}

    def command(self, run):
        started[run.name] = time.monotonic()
        return fake_training(sleeps)(self, run)

    monkeypatch.setattr(ds.Launcher, "command", command)

    def evaluate(it, runs):
        assert (runs[it.run].dir / "final/config.json").is_file()
        return [row(it.protocol, it.reducer, it.ratio, 0.9 if it.protocol == "base" else 0.8, 64 * it.ratio, mode=m,
                    seed=it.seed, limit=None, steps=None, overrides=[], pipeline_config=it.pipeline) for m in it.modes]

    outcome = ds.run(spec, evaluator=evaluate)
    assert not outcome.failed and not outcome.unfinished
    base_done = (tmp_path / "runs/base/final/config.json").stat().st_mtime
    assert started["ft_deft@0.25"] >= started["base"] + 1.0 and started["ft_random@0.25"] >= started["base"] + 1.0
    assert (tmp_path / "runs/finetuned/deft@0.25/final/config.json").stat().st_mtime >= base_done
    doc = ds.load_results(Path(spec.out) / "ft.json")
    assert sorted((r["protocol"], r["reducer"]) for r in doc["rows"]) == [("base", "deft"), ("finetuned", "deft"), ("finetuned", "random")]
    md = (Path(spec.out) / "ft.md").read_text()
    assert "## Fine-tuned from the base" in md and "- **FAIL** finetuned: deft keeps >= 99 % of base accuracy at 0.25" in md

    (tmp_path / "b").mkdir()
    spec = make_spec(tmp_path / "b", name="ft", protocols=["finetuned"], training={"parallel": 3}, evaluation={"device": "cpu"})
    monkeypatch.setattr(ds.Launcher, "command", lambda self, run: [sys.executable, "-c", "raise SystemExit(3)"]
                        if run.name == "base" else pytest.fail(f"{run.name} launched after its base failed"))
    outcome = ds.run(spec, evaluator=evaluate)
    assert outcome.failed == ["base", "ft_deft@0.25", "ft_random@0.25"]
    assert "run ft_deft@0.25 FAILED (its base base FAILED)" in capsys.readouterr().out
