"""What every config of this package shares: strict frozen pydantic models, ``a.b=value`` overrides,
YAML mappings read with the file named in errors, and pydantic errors as ``path: message`` lines."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.yamlio import load_yaml

from ..errors import ConfigError


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested copy of ``data``.

    A numeric part indexes a list (``stages.1.lr=1e-4``); missing mapping levels are created.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for depth, p in enumerate(parts):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {item!r}: '{p}' is not an index of a list of {len(node)}")
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: cannot go into '{p}', its parent is not a mapping or list")
            if depth == len(parts) - 1:
                break
            if isinstance(node, dict) and node.get(p) is None:
                node[p] = {}
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = load_yaml(raw)
    return data


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (an empty file is ``{}``); ``what`` names it in errors."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # the parser's message names no file
        raise ConfigError(f"{what} '{path}' is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must be a mapping, got {type(data).__name__}")
    return data


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds: its annotation, or the model member of ``Model | None``."""
    for ann in (annotation, *get_args(annotation)):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


def error_lines(e: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """Every error of ``e`` as ``path: message``; with ``root``, an unknown key's message lists the
    keys its model allows (found by walking ``root``'s nested models along the path)."""
    out = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if root is not None and err["type"] == "extra_forbidden":
            model: type[BaseModel] | None = root
            for part in err["loc"][:-1]:
                field = model.model_fields.get(str(part))
                model = nested_model(field.annotation) if field else None
                if model is None:
                    break
            if model is not None:
                msg = f"{msg} (allowed keys: {sorted(model.model_fields)})"
        out.append(f"{path}: {msg}")
    return out


def config_error(desc: str, lines: list[str]) -> ConfigError:
    """One :class:`ConfigError` listing every problem of ``desc``."""
    return ConfigError(f"{desc} has {len(lines)} error(s):\n  " + "\n  ".join(lines))
