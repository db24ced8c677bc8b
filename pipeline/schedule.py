"""Retention curriculum: anneal every reducer's ``retention_ratio`` from 1.0 to its configured value.

    sched = RetentionSchedule(model.pipeline, total_steps=1000, hold_ratio=0.2, ramp_ratio=0.3)
    sched.apply(step)   # before each training step

Steps ``[0, hold)`` run at retention 1.0 (every token reaches the LLM, and a learned scorer such as
``fgcs`` gets feedback for every token); over ``[hold, hold + ramp)`` each stage's ratio falls linearly
to its target; from ``hold + ramp`` on it is the target. The schedule is a pure function of the step,
so a resumed run continues it exactly. The targets are read from the stages when the schedule is
built; ``pipeline.config`` keeps describing the targets (what an exported model runs with).
"""

from __future__ import annotations

import math

from torch import nn


class RetentionSchedule:
    def __init__(self, pipeline: nn.Module, total_steps: int, hold_ratio: float = 0.0, ramp_ratio: float = 0.0):
        if not (0 <= hold_ratio and 0 <= ramp_ratio and hold_ratio + ramp_ratio <= 1):
            raise ValueError(
                f"retention schedule needs hold_ratio >= 0, ramp_ratio >= 0 and hold + ramp <= 1; "
                f"got hold_ratio={hold_ratio}, ramp_ratio={ramp_ratio}"
            )
        self.stages = [s for s in getattr(pipeline, "stages", []) if hasattr(s, "retention_ratio")]
        # An empty pipeline is the no-reduction base: a recipe's curriculum has nothing to anneal there.
        # Stages none of which reduces are a configuration mistake.
        has_stages = bool(list(getattr(pipeline, "stages", [])))
        self.enabled = hold_ratio + ramp_ratio > 0 and bool(self.stages)
        if hold_ratio + ramp_ratio > 0 and has_stages and not self.stages:
            names = [getattr(s, "stage_name", type(s).__name__) for s in getattr(pipeline, "stages", [])]
            raise ValueError(
                f"a retention schedule (hold_ratio={hold_ratio}, ramp_ratio={ramp_ratio}) was asked for, but no "
                f"stage of the pipeline {names} has a retention_ratio; set both to 0 or add a reducer"
            )
        self.targets = [float(s.retention_ratio) for s in self.stages]
        self.hold = math.floor(hold_ratio * total_steps)
        self.ramp = math.floor(ramp_ratio * total_steps)

    def progress(self, step: int) -> float:
        """0.0 = full retention, 1.0 = the targets."""
        if not self.enabled or step >= self.hold + self.ramp:
            return 1.0
        if step < self.hold:
            return 0.0
        return (step - self.hold) / max(1, self.ramp)

    def ratios(self, step: int) -> list[float]:
        p = self.progress(step)
        if p >= 1.0:
            return list(self.targets)
        return [1.0 - (1.0 - t) * p for t in self.targets]

    def apply(self, step: int) -> list[float]:
        """Set every reducer's ratio for ``step``; returns them (in pipeline order)."""
        ratios = self.ratios(step)
        for stage, r in zip(self.stages, ratios):
            stage.retention_ratio = r
        return ratios
