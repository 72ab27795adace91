"""Projections that map student features (dim_S) to the teacher's size (dim_T).

TextBrewer 0.2.1's `projections.py`, by the registry's names (`kdcli.registry.PROJECTIONS`):
``linear`` is a `torch.nn.Linear(dim_S, dim_T)`; ``relu`` and ``tanh`` are
`torch.nn.Sequential(Linear, activation)`, so state-dict keys match the reference's
(``weight``/``bias`` and ``0.weight``/``0.bias``). Initialisation as the reference's
`initializer_builder(0.02)`: weights ~ N(0, 0.02), bias 0.

The objective owns the projection modules and optimises them with the student.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcli import registry

#: Standard deviation of the reference's projection weights.
INIT_STD = 0.02


def init_projection_(module: nn.Module, std: float = INIT_STD) -> None:
    """In place: every Linear's weight ~ N(0, std) and bias = 0 (the reference's initializer)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                layer.weight.normal_(mean=0.0, std=std)
                if layer.bias is not None:
                    layer.bias.zero_()


def build_projection(kind: str, dim_S: int, dim_T: int) -> nn.Module:
    """A fresh projection of registry kind `kind` from (..., dim_S) to (..., dim_T).

    Raises `ValueError` for an unknown kind (naming the valid ones) or a non-positive size.
    """
    names = registry.projection_names()
    if kind not in names:
        raise ValueError(f"unknown projection {kind!r}; choose one of {', '.join(names)}")
    for name, dim in (("dim_S", dim_S), ("dim_T", dim_T)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"projection {kind!r}: {name} must be a positive integer, got {dim!r}")
    spec = registry.get_projection(kind)
    linear = nn.Linear(dim_S, dim_T, bias=True)
    module: nn.Module = linear if spec.activation is None else nn.Sequential(linear, getattr(nn, spec.activation)())
    init_projection_(module)
    return module
