"""Validation of a whole pipeline config before anything is built.

A pipeline config is a mapping ``{"stages": [{"name": "sam", ...}, {"name": "fgcs", ...}]}``
(a bare list of stages is accepted too), from a dict or a YAML file. Stages that act inside the
decoder (:mod:`pipeline.llm`: ``fastv``, ``tova``, ``h2o``, ...) go in a second list, ``llm:``;
at most one cache policy may cover a layer.  Every stage's options
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

from .registry import _STAGES, list_stages, placement_of
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
    tokens = tuple(cls.Config for cls in _STAGES.values() if placement_of(cls) == "tokens")
    llm = tuple(cls.Config for cls in _STAGES.values() if placement_of(cls) == "llm")
    return _union_model_of(tokens, llm)


def _union(configs: tuple[type[StageConfig], ...]) -> Any:
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="name")]


@functools.lru_cache(maxsize=None)
def _union_model_of(tokens: tuple[type[StageConfig], ...], llm: tuple[type[StageConfig], ...]) -> type[BaseModel]:
    """One model class per set of registered stages, so two validations of a config compare equal."""
    fields: dict[str, Any] = {"stages": (list[_union(tokens)], Field(default_factory=list))}
    if llm:
        fields["llm"] = (list[_union(llm)], Field(default_factory=list))
    return create_model("PipelineConfig", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def _format(err: dict[str, Any], raw: Any) -> str:
    loc = list(err["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    msg = err["msg"]
    where = "llm" if loc and loc[0] == "llm" else "tokens"
    if err["type"] == "union_tag_invalid":
        tag = err["input"].get("name")
        if tag in _STAGES and where == "tokens":
            msg = f"stage {tag!r} acts inside the LLM: list it under 'llm:', not 'stages:'"
        elif tag in _STAGES:
            msg = f"stage {tag!r} acts on media tokens before the LLM: list it under 'stages:', not 'llm:'"
        else:
            msg = f"unknown stage {tag!r}. Available: {list_stages(where)}"
    elif err["type"] == "union_tag_not_found":
        msg = f"each stage needs a 'name'. Available: {list_stages(where)}"
    elif err["type"] == "extra_forbidden" and len(loc) >= 3 and loc[2] in _STAGES:
        allowed = sorted(k for k in _STAGES[loc[2]].Config.model_fields if k != "name")
        msg = f"{msg} (allowed keys of {loc[2]!r}: {allowed})"
    elif err["type"] == "extra_forbidden" and len(loc) == 1:
        msg = f"{msg} (a pipeline config has the keys 'stages' and 'llm')"
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
        cfg = _union_model().model_validate(data)
    except ValidationError as e:
        raise PipelineConfigError([_format(err, data) for err in e.errors()], desc) from None
    overlaps = _policy_overlaps(getattr(cfg, "llm", []))
    if overlaps:
        raise PipelineConfigError(overlaps, desc)
    return cfg


def _policy_overlaps(llm: list) -> list[str]:
    """Errors for cache policies that cover the same layer (``layers: null`` covers every layer)."""
    from .llm import CachePolicy
    from .registry import get_stage

    errors, seen = [], []  # seen: (list position, name, layers or None)
    for i, stage in enumerate(llm):
        if not issubclass(get_stage(stage.name), CachePolicy):
            continue
        layers = getattr(stage, "layers", None)
        for j, other, other_layers in seen:
            if layers is None or other_layers is None or set(layers) & set(other_layers):
                both = "every layer" if layers is None or other_layers is None else sorted(set(layers) & set(other_layers))
                errors.append(f"llm.{i}.{stage.name}: cache policies llm.{j} ({other!r}) and llm.{i} ({stage.name!r}) "
                              f"both cover {both}; give each a disjoint 'layers' list")
        seen.append((i, stage.name, layers))
    return errors
