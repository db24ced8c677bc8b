"""Option types for stage constructors, and the base of the configs derived from them.

A stage declares each option once, in its ``__init__`` signature; constraints ride in the
annotation so the same line serves a notebook call and config validation::

    def __init__(self, dim: int, retention_ratio: Ratio = 0.482, hidden_dim: PosInt = 256): ...

``@register`` (:mod:`pipeline.registry`) turns that signature into the stage's pydantic
``Config`` (a :class:`StageConfig`). The constraints are checked only when a config is
validated; ``FGCS(dim=32, retention_ratio=1.5)`` in a notebook is not checked.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Ratio = Annotated[float, Field(gt=0, le=1)]  # a fraction of tokens kept / recovered: (0, 1]
PosInt = Annotated[int, Field(gt=0)]  # a width or a count that must be at least 1
NonNegInt = Annotated[int, Field(ge=0)]  # a count or radius where 0 switches the thing off
NonNegFloat = Annotated[float, Field(ge=0)]  # a weight, threshold or temperature; 0 switches it off


class StageConfig(BaseModel):
    """Base of every stage's ``Config``: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
