"""Stage registry: ``@register("name")`` on a stage class is the only list of stages.

A stage is an ``nn.Module`` with ``forward(TokenBatch) -> TokenBatch`` and a nested pydantic
``Config`` class (``extra="forbid"``, frozen, defaults = the seed's) whose ``name`` field is a
``Literal`` of the registered name.  ``build`` constructs it from a validated config plus the
token width ``dim`` that the caller knows.

Optional attributes a stage may declare (read by the builder, ``Pipeline`` and the contract test):

- ``retention_ratio`` (instance): the stage reduces each row to at most ``ceil(ratio * n)``
  tokens; ``Pipeline.set_retention`` sets it.
- ``selects_tokens`` (class, bool; an instance may override it when an option makes it merge):
  True when every output token is an input row at its ``index`` (selectors keep exactly the
  budget); False for mergers such as ``pool`` or ``fgcs`` with ``merge_pruned``.
- ``feature_dim_out`` (instance, int): width ``S`` of the ``batch.features`` the stage writes;
  later stages with a ``feature_dim`` constructor argument receive it from the builder.
- ``needs_pruned`` (class, bool): the stage acts on ``batch.pruned`` (e.g. ``rtd``), so it only
  makes sense after a reducer; the contract test runs it after one.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_STAGES: dict[str, type[nn.Module]] = {}


class UnknownStageError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a stage under ``name``; a duplicate name raises ``ValueError``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _STAGES:
            raise ValueError(
                f"stage name {name!r} is already registered by {_STAGES[name].__module__}."
                f"{_STAGES[name].__qualname__}; choose another name"
            )
        if not hasattr(cls, "Config"):
            raise TypeError(f"stage {cls.__qualname__} must define a nested pydantic `Config` class")
        cls.stage_name = name
        _STAGES[name] = cls
        return cls

    return wrap


def list_stages() -> list[str]:
    """Registered stage names, sorted."""
    return sorted(_STAGES)


def get_stage(name: str) -> type[nn.Module]:
    try:
        return _STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}. Available: {list_stages()}") from None
