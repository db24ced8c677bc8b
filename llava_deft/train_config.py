"""Training recipe config (pydantic, validated whole): model, data, LLaVA stages, optimisation.

Precedence: defaults < YAML file < command-line flags < ``a.b=value`` overrides.  The resolved
config is written into the run folder as ``train_config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import apply_overrides, read_model_config_file
from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """``easyvqa`` (the bundled dataset) or ``llava_json`` (LLaVA conversation JSON + image folder)."""

    type: Literal["easyvqa", "llava_json"] = "easyvqa"
    split: Literal["train", "test"] = "train"
    path: str | None = None
    image_folder: str | None = None
    limit: int | None = Field(None, gt=0)
    group_by_image: bool = False  # easyvqa: one multi-turn conversation per image (LLaVA-style)


class StageSpec(_Strict):
    """One LLaVA training stage. Stage 1 ("align"): LLM and encoder frozen, projector and pipeline
    train; stage 2 ("finetune"): the LLM trains too."""

    name: str = "finetune"
    freeze_vision: bool = False
    freeze_llm: bool = False
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # Retention curriculum (pipeline.RetentionSchedule): the first retention_hold_ratio of the steps
    # run every reducer at retention 1.0, the next retention_ramp_ratio lower it linearly to its target.
    retention_hold_ratio: float = Field(0.0, ge=0, le=1)
    retention_ramp_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _schedule_fits(self) -> "StageSpec":
        if self.retention_hold_ratio + self.retention_ramp_ratio > 1:
            raise ValueError(
                f"retention_hold_ratio + retention_ramp_ratio must be <= 1 (a share of the stage's steps); "
                f"got {self.retention_hold_ratio} + {self.retention_ramp_ratio}"
            )
        return self


class TrainConfig(_Strict):
    model: dict[str, Any] | str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageSpec] = Field(default_factory=lambda: [StageSpec()], min_length=1)
    per_device_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_clipping: float = Field(1.0, ge=0)
    bf16: Literal["auto"] | bool = "auto"
    seed: int = 0
    save_steps: int = Field(500, gt=0)
    save_total_limit: int = Field(2, gt=0)
    log_steps: int = Field(10, gt=0)
    num_workers: int = Field(0, ge=0)
    output_dir: str = "runs/default"
    deepspeed: str = "configs/deepspeed/zero2.json"


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict = {}
    desc = "train config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"train config file '{p}' does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        desc = f"train config '{p}'"
        if isinstance(data.get("model"), str):  # model config paths are relative to the train config
            m = Path(data["model"])
            data["model"] = str(m if m.is_absolute() or m.exists() else p.parent / m)
    if isinstance(data.get("model"), str):  # embed the model YAML: the run's config is self-contained
        data["model"] = read_model_config_file(data["model"])
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        errs = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{desc} has {len(errs)} error(s):\n  " + "\n  ".join(errs)) from None


def build_dataset(spec: DataSpec, video: dict[str, Any] | None = None):
    """The dataset a :class:`DataSpec` names; ``video`` is the model's frame sampling
    (``VideoConfig.sampling()``) for LLaVA JSON records with a "video" key."""
    from .data import EasyVQADataset, LlavaJsonDataset

    if spec.type == "easyvqa":
        return EasyVQADataset(split=spec.split, limit=spec.limit, group_by_image=spec.group_by_image)
    if spec.group_by_image:
        raise ConfigError("data.group_by_image applies to data.type 'easyvqa' only")
    if spec.path is None or spec.image_folder is None:
        raise ConfigError("data.type 'llava_json' needs data.path (the JSON file) and data.image_folder")
    ds = LlavaJsonDataset(spec.path, spec.image_folder, **(video or {}))
    if spec.limit is not None and spec.limit < len(ds):
        from torch.utils.data import Subset

        ds = Subset(ds, range(spec.limit))
    return ds
