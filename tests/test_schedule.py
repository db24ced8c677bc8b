"""RetentionSchedule: hold at 1.0, linear ramp to each reducer's target, errors that name the fix."""

import pytest
import torch

from llava_deft.config import StageSpec
from pipeline import RetentionSchedule, TokenBatch, build_pipeline


def pipe(stages):
    return build_pipeline({"stages": stages}, dim=16)


def test_hold_then_linear_ramp_then_target_for_every_reducer():
    p = pipe([{"name": "random", "retention_ratio": 0.5}, {"name": "pool", "retention_ratio": 0.25}])
    s = RetentionSchedule(p, total_steps=10, hold_ratio=0.2, ramp_ratio=0.4)  # hold steps 0-1, ramp 2-5
    got = [r for step in range(10) for r in s.ratios(step)]
    expect = []
    for step in range(10):
        prog = 0.0 if step < 2 else min(1.0, (step - 2) / 4)
        expect += [1 - 0.5 * prog, 1 - 0.75 * prog]
    assert got == pytest.approx(expect)
    assert s.apply(3) == pytest.approx([0.875, 0.8125])
    assert [st.retention_ratio for st in p.stages] == pytest.approx([0.875, 0.8125])
    s.apply(10)
    assert [st.retention_ratio for st in p.stages] == [0.5, 0.25]
    assert p.config.stages[0].retention_ratio == 0.5  # the config keeps describing the target


def test_ratio_applied_changes_what_the_reducer_keeps():
    p = pipe([{"name": "fgcs", "retention_ratio": 0.25, "hidden_dim": 8}])
    s = RetentionSchedule(p, total_steps=4, hold_ratio=0.5, ramp_ratio=0.0)
    batch = TokenBatch.from_tokens(torch.randn(2, 16, 16), layout=(1, 4, 4))
    s.apply(0)
    assert p(batch).tokens.shape == (2, 16, 16)  # held at retention 1.0: nothing pruned
    s.apply(2)
    assert p(batch).tokens.shape == (2, 4, 16)


def test_disabled_schedule_leaves_ratios_alone():
    p = pipe([{"name": "random", "retention_ratio": 0.3}])
    s = RetentionSchedule(p, total_steps=5)
    assert not s.enabled and s.apply(0) == [0.3] and p.stages[0].retention_ratio == 0.3


def test_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"no stage of the pipeline \['sam'\] has a retention_ratio"):
        RetentionSchedule(pipe([{"name": "sam", "semantic_dim": 8}]), total_steps=5, hold_ratio=0.1)
    with pytest.raises(ValueError, match="hold \\+ ramp <= 1"):
        RetentionSchedule(pipe([{"name": "random"}]), total_steps=5, hold_ratio=0.6, ramp_ratio=0.6)
    with pytest.raises(ValueError, match="retention_hold_ratio \\+ retention_ramp_ratio must be <= 1"):
        StageSpec(retention_hold_ratio=0.5, retention_ramp_ratio=0.7)


def test_empty_pipeline_is_the_no_reduction_base():
    # A reducer recipe with a curriculum also trains the base (model.pipeline = no stages): nothing to anneal.
    p = pipe([])
    s = RetentionSchedule(p, total_steps=10, hold_ratio=0.3, ramp_ratio=0.3)
    assert not s.enabled and s.apply(0) == [] and s.apply(9) == []
