"""Model-agnostic token-reduction pipeline (torch only).

    from pipeline import TokenBatch, build_pipeline
    pipe = build_pipeline({"stages": [{"name": "sam"}, {"name": "fgcs", "retention_ratio": 0.25}]}, dim=64)
    out = pipe(TokenBatch.from_tokens(torch.randn(2, 64, 64), layout=(1, 8, 8)))

A stage's options are its constructor's keyword arguments; ``stage_defaults("fgcs")`` lists them
with their defaults, and ``get_stage("fgcs").Config`` is the pydantic model derived from them.
"""

from . import stages as _stages  # noqa: F401  (registers every stage)
from .batch import Modality, PrunedTokens, TokenBatch
from .builder import Pipeline, build, build_pipeline
from .deft import DeFTModule, deft_pipeline_config
from .config import PipelineConfigError, StageConfig, validate_config
from .ops import read_stats, static_budget
from .registry import UnknownStageError, get_stage, list_stages, register, stage_defaults
from .schedule import RetentionSchedule

__all__ = [
    "DeFTModule",
    "Modality",
    "Pipeline",
    "PipelineConfigError",
    "PrunedTokens",
    "RetentionSchedule",
    "StageConfig",
    "TokenBatch",
    "UnknownStageError",
    "build",
    "build_pipeline",
    "deft_pipeline_config",
    "get_stage",
    "list_stages",
    "read_stats",
    "register",
    "stage_defaults",
    "static_budget",
    "validate_config",
]
