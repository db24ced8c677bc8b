"""LLaVA's projectors from an encoder's width into the LLM's."""

from __future__ import annotations

from torch import nn


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's projectors: ``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; choose 'linear' or 'mlp2x_gelu'")
