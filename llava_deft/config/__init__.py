"""Configs, validated whole before any weight is touched: the model config (``model.py``), the training
recipe (``train.py``) and what they share (``base.py``: strict models, ``a.b=value`` overrides).
Imports pydantic, yaml, ``llava_deft.errors`` and ``pipeline`` (whose stage registry is the pipeline
schema) only."""

from .base import Strict, apply_overrides
from .model import (
    DEFAULT_AUDIO_CONFIG,
    DEFT_KEYS,
    SAMPLING_RATE,
    AudioConfig,
    LimitsConfig,
    LLMConfig,
    ModelConfig,
    ProjectorConfig,
    VideoConfig,
    VisionConfig,
    load_model_config,
    read_model_config_file,
    resolve_audio_config,
)
from .train import DataSpec, StageSpec, TrainConfig, check_passkey_lengths, load_train_config

__all__ = [
    "DEFAULT_AUDIO_CONFIG", "DEFT_KEYS", "SAMPLING_RATE", "AudioConfig", "DataSpec", "LimitsConfig", "LLMConfig", "ModelConfig",
    "ProjectorConfig", "StageSpec", "Strict", "TrainConfig", "VideoConfig", "VisionConfig", "apply_overrides",
    "check_passkey_lengths", "load_model_config", "load_train_config", "read_model_config_file",
    "resolve_audio_config",
]
