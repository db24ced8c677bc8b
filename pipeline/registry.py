"""Stage registry: ``@register("name")`` on a stage class is the only list of stages.

A stage is an ``nn.Module`` with ``forward(TokenBatch) -> TokenBatch`` whose ``__init__``
signature is the one declaration of its options: every parameter other than ``self`` and the
builder-provided ``dim`` / ``feature_dim`` is an option, with a type annotation (constraints in
it, e.g. ``retention_ratio: Ratio = 0.482``, see :mod:`pipeline.types`) and a default (the
seed's). ``register`` derives the stage's pydantic ``Config`` from it (a
:class:`pipeline.types.StageConfig`: ``extra="forbid"``, frozen, plus ``name: Literal[name]``)
and sets it as ``cls.Config``; :func:`stage_defaults` reads the defaults back. ``build``
constructs a stage from a validated config plus the token width ``dim`` that the caller knows.

Optional attributes a stage may declare (read by the builder, ``Pipeline`` and the contract test):

- ``retention_ratio`` (instance): the stage reduces each row to at most ``ceil(ratio * n)``
  tokens; ``Pipeline.set_retention`` sets it.
- ``selects_tokens`` (class, bool; an instance may override it when an option makes it merge):
  True when every output token is an input row at its ``index`` (selectors keep exactly the
  budget); False for mergers such as ``pool`` or ``fgcs`` with ``merge_pruned``.
- ``feature_dim_out`` (instance, int): width ``S`` of the ``batch.features`` the stage writes;
  later stages with a ``feature_dim`` constructor argument receive it from the builder.
- ``variable_count`` (class, bool): the stage has no budget; how many tokens a row keeps (1..n) depends
  on the data (``recursive_compression`` merges by a similarity threshold). Its output is as wide as its
  input (no host read), real tokens first.
- ``needs_pruned`` (class, bool): the stage acts on ``batch.pruned`` (e.g. ``rtd``), so it only
  makes sense after a reducer; the contract test runs it after one.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Literal

from pydantic import ValidationError, create_model
from pydantic.fields import FieldInfo
from torch import nn

from .types import StageConfig

_STAGES: dict[str, type[nn.Module]] = {}

# constructor parameters the builder fills in itself; they are not options
BUILDER_ARGS = ("dim", "feature_dim")


class UnknownStageError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def stage_config_from_signature(name: str, cls: type) -> type[StageConfig]:
    """The pydantic ``Config`` of stage ``name`` from ``cls.__init__``'s signature.

    One field per option: its annotation (``Annotated`` constraints and ``Literal`` choices kept)
    and its default; plus ``name: Literal[name] = name``, the pipeline union's discriminator.
    Raises ``TypeError`` naming the stage and parameter when an option has no annotation or no
    default, is ``*args`` / ``**kwargs`` / positional-only, is called ``name``, has a pydantic
    ``Field`` as its default, or has a default that breaks its own constraint.
    """
    where = f"stage {name!r} ({cls.__module__}.{cls.__qualname__}.__init__)"
    if "Config" in cls.__dict__:
        raise TypeError(
            f"{where}: remove the nested `Config` class; options are declared once, in the "
            "__init__ signature, and @register derives the Config from it"
        )
    params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]  # drop self
    options = [p for p in params if p.name not in BUILDER_ARGS]
    for p in options:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{where}: parameter {p.name!r} must be an ordinary keyword option, not {p.kind.description}")
        if p.name == "name":
            raise TypeError(f"{where}: parameter 'name' is reserved for the registry name")
        if p.annotation is inspect.Parameter.empty:
            raise TypeError(f"{where}: option {p.name!r} needs a type annotation (e.g. `{p.name}: float = ...`)")
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{where}: option {p.name!r} needs a default (the seed's value)")
        if isinstance(p.default, FieldInfo):
            raise TypeError(
                f"{where}: option {p.name!r} has a pydantic Field as its default; put the constraint in the "
                f"annotation (`{p.name}: Annotated[float, Field(gt=0)] = 0.5`) so plain calls get a plain default"
            )
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except (NameError, TypeError, AttributeError) as e:  # a string annotation that does not resolve
        raise TypeError(f"{where}: cannot resolve the option annotations: {e}") from None
    fields: dict[str, Any] = {"name": (Literal[name], name)}
    fields.update({p.name: (hints[p.name], p.default) for p in options})
    config = create_model(
        f"{cls.__name__}Config",
        __base__=StageConfig,
        __module__=cls.__module__,
        __doc__=f"Options of stage {name!r}, derived from the signature of {cls.__qualname__}.__init__.",
        **fields,
    )
    config.__qualname__ = f"{cls.__qualname__}.Config"
    try:  # pydantic does not check defaults; a default outside its own constraint is a declaration bug
        config.model_validate({p.name: p.default for p in options})
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}={err['input']!r}: {err['msg']}" for err in e.errors())
        raise TypeError(f"{where}: a default breaks its own constraint: {bad}") from None
    return config


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a stage under ``name`` and deriving ``cls.Config`` from ``cls.__init__``.

    A duplicate name raises ``ValueError``; an ill-declared option ``TypeError`` (see
    :func:`stage_config_from_signature`). Nothing is registered when it raises.
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _STAGES:
            raise ValueError(
                f"stage name {name!r} is already registered by {_STAGES[name].__module__}."
                f"{_STAGES[name].__qualname__}; choose another name"
            )
        for other, registered in _STAGES.items():
            if registered is cls:
                raise ValueError(f"{cls.__qualname__} is already registered as stage {other!r}; one name per class")
        cls.Config = stage_config_from_signature(name, cls)
        cls.stage_name = name
        _STAGES[name] = cls
        return cls

    return wrap


PLACEMENTS = ("tokens", "llm")
"""Where a stage acts: ``"tokens"`` on a :class:`TokenBatch` before the LLM (a pipeline's ``stages:``),
``"llm"`` inside the decoder (its ``llm:`` list; :mod:`pipeline.llm`). A stage class says it with the
class attribute ``placement`` (default ``"tokens"``)."""


def placement_of(name_or_cls: "str | type") -> str:
    cls = get_stage(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    return getattr(cls, "placement", "tokens")


def list_stages(placement: str | None = None) -> list[str]:
    """Registered stage names, sorted; ``placement`` ("tokens" or "llm") keeps those acting there."""
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return sorted(n for n, cls in _STAGES.items() if placement is None or placement_of(cls) == placement)


def get_stage(name: str) -> type[nn.Module]:
    try:
        return _STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}. Available: {list_stages()}") from None


def stage_defaults(name: str) -> dict[str, Any]:
    """Option -> default of stage ``name`` (from its derived ``Config``; ``name`` itself left out).

    A fresh dict each call. Unknown names raise :class:`UnknownStageError` listing the valid ones.
    """
    fields = get_stage(name).Config.model_fields
    return {k: f.default for k, f in fields.items() if k != "name"}
