"""eval/bench_reducers.py in its CPU smoke mode: every row present, the ideal and the ratios derived from the
timings, files written. Timings themselves are not asserted (benchmarks measure, tests check structure)."""

import json

import pytest

from eval import bench_reducers as br


def test_smoke_rows_ratios_and_files(tmp_path):
    rows = br.main(["--smoke", "--reducers", "random", "deft", "--ratios", "0.25", "--out", str(tmp_path), "--name", "b"])
    assert [(r["reducer"], r["ratio"]) for r in rows] == [("none", None), ("ideal", 0.25), ("random", 0.25), ("deft", 0.25)]
    by = {r["reducer"]: r for r in rows}
    assert by["none"]["tokens_per_image"] == 64 and all(by[n]["tokens_per_image"] == 16 for n in ("ideal", "random", "deft"))
    assert by["ideal"]["pct_of_ideal"] == pytest.approx(100.0)
    for r in rows:
        assert r["speedup"] == pytest.approx(by["none"]["ttft_ms"] / r["ttft_ms"])
        if r["reducer"] != "none":
            assert r["pct_of_ideal"] == pytest.approx(100 * by["ideal"]["ttft_ms"] / r["ttft_ms"])
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["rows"] == rows and doc["meta"]["device"].startswith("CPU")
    md = (tmp_path / "b.md").read_text()
    assert "## tiny, batch 1" in md and "| ideal | 0.25 | 16.0 |" in md and (tmp_path / "b.png").stat().st_size > 0


def test_every_registered_reducer_is_benchmarked_by_default():
    from pipeline import get_stage, list_stages

    names = br.parse_args(["--smoke"]).reducers
    assert {n for n in list_stages("tokens") if "retention_ratio" in get_stage(n).Config.model_fields} <= set(names)
    assert {"deft", "deft_q"} <= set(names)


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        br.parse_args(["--reducers", "fastest"])
    assert "unknown reducers ['fastest']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        br.parse_args(["--ratios", "1.5"])
    assert "ratios must be in (0, 1), got [1.5]" in capsys.readouterr().err


def test_every_reducer_runs_in_the_smoke_mode(tmp_path):
    """Each default reducer (question-aware and encoder-attention ones included) yields a row without an error."""
    rows = br.main(["--smoke", "--ratios", "0.25", "--out", str(tmp_path), "--name", "all"])
    failed = {r["reducer"]: r["error"] for r in rows if "error" in r}
    assert not failed, failed
    assert [r["reducer"] for r in rows] == ["none", "ideal", *br.reducer_names()]
