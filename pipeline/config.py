"""Validation of a whole pipeline config before anything is built.

A pipeline config is a mapping ``{"stages": [{"name": "sam", ...}, {"name": "fgcs", ...}]}``
(a bare list of stages is accepted too), from a dict or a YAML file.  Every stage's options
are checked by that stage's own pydantic ``Config`` (derived from its ``__init__`` signature by
``@register``, see :mod:`pipeline.registry`); all errors are reported at once, each
with its path, e.g. ``stages.1.fgcs.retention_ratoi: Extra inputs are not permitted
(allowed keys of 'fgcs': ...)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .registry import _STAGES, list_stages
from .types import StageConfig
from .yamlio import load_yaml

__all__ = ["PipelineConfigError", "StageConfig", "load_config_source", "validate_config"]


class PipelineConfigError(ValueError):
    """A pipeline config failed validation; ``errors`` lists every problem as ``path: message``."""

    def __init__(self, errors: list[str], source: str = "pipeline config"):
        self.errors = errors
        self.source = source
        super().__init__(f"{source} has {len(errors)} error(s):\n  " + "\n  ".join(errors))


def _union_model() -> type[BaseModel]:
    return _union_model_of(tuple(cls.Config for cls in _STAGES.values()))


@functools.lru_cache(maxsize=None)
def _union_model_of(configs: tuple[type[StageConfig], ...]) -> type[BaseModel]:
    """One model class per set of registered stages, so two validations of a config compare equal."""
    if len(configs) == 1:
        stage_t: Any = configs[0]
    else:
        stage_t = Annotated[Union[configs], Field(discriminator="name")]
    return create_model(
        "PipelineConfig",
        __config__=ConfigDict(extra="forbid", frozen=True),
        stages=(list[stage_t], Field(default_factory=list)),
    )


def _format(err: dict[str, Any], raw: Any) -> str:
    loc = list(err["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    msg = err["msg"]
    if err["type"] == "union_tag_invalid":
        msg = f"unknown stage {err['input'].get('name')!r}. Available: {list_stages()}"
    elif err["type"] == "union_tag_not_found":
        msg = f"each stage needs a 'name'. Available: {list_stages()}"
    elif err["type"] == "extra_forbidden" and len(loc) >= 3 and loc[2] in _STAGES:
        allowed = sorted(k for k in _STAGES[loc[2]].Config.model_fields if k != "name")
        msg = f"{msg} (allowed keys of {loc[2]!r}: {allowed})"
    elif err["type"] == "extra_forbidden" and len(loc) == 1:
        msg = f"{msg} (a pipeline config has only the key 'stages')"
    return f"{path}: {msg}"


def load_config_source(source: str | Path | dict | list | None) -> tuple[Any, str]:
    """Read YAML/dict/list into plain data; returns (data, description for messages)."""
    if source is None:
        return {"stages": []}, "pipeline config"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline config file '{path}' does not exist")
        try:
            data = load_yaml(path.read_text())
        except yaml.YAMLError as e:
            raise PipelineConfigError([f"<file>: not valid YAML: {e}"], f"pipeline config '{path}'") from None
        return (data if data is not None else {}), f"pipeline config '{path}'"
    return source, "pipeline config"


def validate_config(source: str | Path | dict | list | None) -> BaseModel:
    """Validate a whole pipeline config; raise :class:`PipelineConfigError` listing every error."""
    data, desc = load_config_source(source)
    if isinstance(data, BaseModel):
        return data
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict):
        raise PipelineConfigError([f"<root>: expected a mapping with 'stages', got {type(data).__name__}"], desc)
    try:
        return _union_model().model_validate(data)
    except ValidationError as e:
        raise PipelineConfigError([_format(err, data) for err in e.errors()], desc) from None
