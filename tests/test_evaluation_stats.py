"""The comparison statistics (llava_deft/evaluation/stats.py): mean ± std over seeds, and the paired
bootstrap confidence interval of "A beats B", against a slow reference."""

import math

import numpy as np
import pytest

from llava_deft.evaluation import mean_std, paired_bootstrap


def slow_paired_bootstrap(a, b, resamples, confidence, seed):
    """The same draws, one resample and one answer at a time in plain Python."""
    a = [list(map(float, row)) for row in np.atleast_2d(a)]
    b = [list(map(float, row)) for row in np.atleast_2d(b)]
    s, q = len(a), len(a[0])
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        qi = rng.integers(0, q, size=q).tolist()
        si = rng.integers(0, s, size=s).tolist()
        total = sum(a[i][j] - b[i][j] for i in si for j in qi)
        means.append(total / (s * q))
    means.sort()
    tail = (1 - confidence) / 2

    def quantile(p):  # numpy's default (linear) interpolation
        pos = p * (len(means) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    diff = sum(a[i][j] - b[i][j] for i in range(s) for j in range(q)) / (s * q)
    return diff, quantile(tail), quantile(1 - tail)


@pytest.mark.parametrize("shape, chunk", [((3, 40), 7), ((1, 25), 256), ((25,), 3)])
def test_paired_bootstrap_equals_the_slow_reference(shape, chunk):
    rng = np.random.default_rng(1)
    a = (rng.random(shape) < 0.7).astype(float)
    b = (rng.random(shape) < 0.6).astype(float)
    got = paired_bootstrap(a, b, resamples=300, confidence=0.95, seed=4, chunk=chunk)
    want = slow_paired_bootstrap(a, b, 300, 0.95, 4)
    assert got.diff == pytest.approx(want[0], abs=1e-12)
    assert (got.low, got.high) == pytest.approx(want[1:], abs=1e-12)


def test_chunking_does_not_change_the_interval():
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 50)), rng.random((3, 50))
    one = paired_bootstrap(a, b, resamples=200, chunk=1)
    many = paired_bootstrap(a, b, resamples=200, chunk=200)
    assert (one.low, one.high) == (many.low, many.high)


def test_a_clear_win_beats_and_a_tie_does_not():
    rng = np.random.default_rng(3)
    base = (rng.random((3, 400)) < 0.6).astype(float)
    better = np.maximum(base, (rng.random((3, 400)) < 0.3))  # right wherever base is, and more
    win = paired_bootstrap(better, base, resamples=2000)
    assert win.beats and win.low > 0 and win.diff > 0.05
    tie = paired_bootstrap(base, base.copy(), resamples=500)
    assert not tie.beats and tie.low == tie.high == tie.diff == 0
    lose = paired_bootstrap(base, better, resamples=2000)
    assert not lose.beats and lose.high < 0
    assert "beats" in str(win) and "95 % CI" in str(win)


def test_mean_std_over_seeds():
    m = mean_std([0.9, 0.92, 0.94])
    assert m.mean == pytest.approx(0.92) and m.std == pytest.approx(0.02) and m.n == 3
    assert mean_std([0.5]).std == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


@pytest.mark.parametrize("a, b, kw, match", [
    (np.zeros((2, 5)), np.zeros((3, 5)), {}, r"same \(seeds, questions\): got \(2, 5\) and \(3, 5\)"),
    (np.zeros((2, 0)), np.zeros((2, 0)), {}, r"a must be \(seeds, questions\)"),
    (np.zeros(4), np.zeros(4), {"resamples": 0}, "resamples must be >= 1"),
    (np.zeros(4), np.zeros(4), {"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
])
def test_bad_inputs_name_the_problem(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kw)
