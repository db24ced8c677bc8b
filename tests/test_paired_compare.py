"""eval/paired_compare.py: the paired bootstrap of two methods' eval JSONs over seeds equals the library's, and
files that score different questions (or are not eval JSONs) are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_deft.errors import InvalidArgumentError
from llava_deft.evaluation.stats import paired_bootstrap


def _write(path, bits: str, digest: str = "d1"):
    path.write_text(json.dumps({"rows": [{"accuracy": {"all": bits.count("1") / len(bits)}, "correct": bits,
                                          "ids_digest": digest, "media_tokens_per_sample": 4.0}]}))
    return str(path)


def test_compare_equals_the_library_bootstrap(tmp_path):
    from eval import paired_compare

    rng = np.random.default_rng(0)
    a = rng.random((2, 40)) < 0.8
    b = rng.random((2, 40)) < 0.6
    files_a = [_write(tmp_path / f"a{i}.json", "".join("1" if x else "0" for x in a[i])) for i in range(2)]
    files_b = [_write(tmp_path / f"b{i}.json", "".join("1" if x else "0" for x in b[i])) for i in range(2)]
    r = paired_compare.main(["--a", *files_a, "--b", *files_b, "--resamples", "500", "--out", str(tmp_path),
                             "--name", "cmp"])
    ref = paired_bootstrap(a.astype(float), b.astype(float), resamples=500)
    assert r["diff_points"] == pytest.approx(100 * ref.diff) and r["ci_points"] == pytest.approx([100 * ref.low, 100 * ref.high])
    assert r["a_beats_b"] == ref.beats and r["seeds"] == 2 and r["questions"] == 40
    assert "A - B:" in (tmp_path / "cmp.md").read_text() and json.loads((tmp_path / "cmp.json").read_text())["seeds"] == 2


def test_refusals_name_the_file(tmp_path):
    from eval import paired_compare

    a = _write(tmp_path / "a.json", "1101")
    other = _write(tmp_path / "o.json", "1001", digest="d2")
    with pytest.raises(InvalidArgumentError, match="different questions"):
        paired_compare.main(["--a", a, "--b", other])
    with pytest.raises(InvalidArgumentError, match="one per seed"):
        paired_compare.main(["--a", a, a, "--b", a])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match=r"bad.json: not an eval JSON"):
        paired_compare.main(["--a", str(tmp_path / "bad.json"), "--b", a])
    with pytest.raises(InvalidArgumentError, match=r"nope.json: no such file"):
        paired_compare.main(["--a", str(tmp_path / "nope.json"), "--b", a])
