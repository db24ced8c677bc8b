"""eval/bench_pair_compress.py in its CPU smoke mode: every row, the count formula, the report."""

from __future__ import annotations

from eval import bench_pair_compress as bench


def test_smoke_rows_counts_and_report(tmp_path):
    r = bench.main(["--device", "cpu", "--layers", "3", "--layer", "1", "--hidden", "32", "--heads", "2",
                    "--intermediate", "64", "--vocab", "100", "--contexts", "96", "--window", "16", "--memory-floor", "8",
                    "--ratios", "1", "0.2", "--steps", "2", "--iters", "1", "--repeats", "1", "--out", str(tmp_path / "b")])
    rows = {row["row"]: row for row in r["rows"]}
    assert list(rows) == ["none", "pair r=1", "ideal@layer r=1", "ideal fed r=1", "pair r=0.2", "ideal@layer r=0.2",
                          "ideal fed r=0.2"]
    assert rows["pair r=1"]["tokens_after_layer"] == 96  # ratio 1 expands every pair: the base model
    kept = bench.compressed_length(96, 16, 0.2, 8)
    assert kept == 96 - 40 + 11 and rows["pair r=0.2"]["tokens_after_layer"] == kept  # 40 pairs, round(0.2*40 + 8*0.8/2)
    assert rows["ideal fed r=0.2"]["kv_share"] < rows["pair r=0.2"]["kv_share"] < 1  # layer 0 keeps every token
    assert 0 < rows["pair r=0.2"]["prefill_share_of_ideal"] and rows["none"]["prefill_speedup"] == 1
    md = (tmp_path / "b.md").read_text()
    assert "| 96 | pair r=0.2 | 67 | 30 % |" in md and (tmp_path / "b.png").is_file() and (tmp_path / "b.json").is_file()
