"""``build_pipeline(config, dim)``: validated config -> :class:`Pipeline` of registered stages."""

from __future__ import annotations

import inspect
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from .batch import TokenBatch
from .config import validate_config
from .registry import get_stage


class Pipeline(nn.Module):
    """An ordered list of stages; ``forward(TokenBatch) -> TokenBatch``.

    ``config`` is the validated pydantic config it was built from (``config.model_dump()``
    round-trips through :func:`build_pipeline`).
    """

    def __init__(self, stages: list[nn.Module], config: BaseModel | None = None, dim: int | None = None,
                 llm: list[nn.Module] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.llm = nn.ModuleList(llm or [])  # stages inside the decoder (pipeline.llm); run by the LLM's loop
        self.config = config
        self.dim = dim

    def forward(self, batch: TokenBatch) -> TokenBatch:
        for stage in self.stages:
            batch = stage(batch)
        return batch

    @property
    def names(self) -> list[str]:
        return [s.stage_name for s in self.stages]

    @property
    def llm_names(self) -> list[str]:
        return [s.stage_name for s in self.llm]

    def set_retention(self, ratio: float) -> None:
        """Set ``retention_ratio`` on every stage that has one (eval sweeps)."""
        if not 0 < ratio <= 1:
            raise ValueError(f"retention ratio must be in (0, 1], got {ratio}")
        found = False
        for stage in self.stages:
            if hasattr(stage, "retention_ratio"):
                stage.retention_ratio = float(ratio)
                found = True
        if not found:
            raise ValueError(f"no stage of pipeline {self.names} has a retention_ratio to set")
        if self.config is not None:  # keep ``config`` describing what runs (it is written into run folders)
            stages = [
                s.model_copy(update={"retention_ratio": float(ratio)}) if "retention_ratio" in type(s).model_fields else s
                for s in self.config.stages
            ]
            self.config = self.config.model_copy(update={"stages": stages})

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def build_pipeline(config: str | Path | dict | list | BaseModel | None, dim: int) -> Pipeline:
    """Validate ``config`` (YAML path, dict, list of stages or validated model) and build it.

    ``dim`` is the token width ``D`` of the batches the pipeline will see. Every stage is
    built as ``cls(dim=dim, **options)``. Feature widths flow forward: a stage that writes
    ``batch.features`` says its width in an instance attribute ``feature_dim_out``; a later
    stage whose ``__init__`` has a ``feature_dim`` parameter receives the latest such width
    (``None`` when no earlier stage writes features, e.g. ``fgcs`` without ``sam``).
    """
    cfg = validate_config(config)
    stages = []
    feature_dim: int | None = None
    for stage_cfg in cfg.stages:
        cls = get_stage(stage_cfg.name)
        kwargs = stage_cfg.model_dump(exclude={"name"})
        if "feature_dim" in inspect.signature(cls.__init__).parameters:
            kwargs["feature_dim"] = feature_dim
        stage = cls(dim=dim, **kwargs)
        feature_dim = getattr(stage, "feature_dim_out", feature_dim)
        stages.append(stage)
    llm = [get_stage(c.name)(dim=dim, **c.model_dump(exclude={"name"})) for c in getattr(cfg, "llm", [])]
    return Pipeline(stages, cfg, dim, llm)


def build(config, dim: int) -> Pipeline:
    """Alias of :func:`build_pipeline` (``pipeline.build(cfg, dim)(batch)``)."""
    return build_pipeline(config, dim)
