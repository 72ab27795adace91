"""Temperature and weight schedulers, as in TextBrewer 0.2.1's `schedulers.py`, with a floor.

Temperature schedulers map ``(logits_S, logits_T, base_temperature)`` to the temperature
for `kd_ce_loss` / `kd_mse_loss`: a float (``constant``) or a per-example tensor of the
logits' shape without the class dimension, (B,) or (B, L) (``flsw``, ``cwsm``; Wen et al.
2019, Preparing Lessons, arXiv:1911.07471). They never carry a gradient. Unlike the
reference, a scheduled temperature is clamped to at least `registry.MIN_TEMPERATURE`: the
reference's ``T + (mean(w) - w) * beta`` can reach zero or go negative, dividing the logits
by zero or flipping them. Above the floor the values equal the reference's.

Weight schedulers map the training progress ``step / total_steps`` in [0, 1] to a factor
for the KD loss weight or the hard-label weight (``linear_decay``, ``linear_growth``).

The registry (`kdcli.registry.SCHEDULERS`) holds the names; each temperature entry names a
*builder* here that takes the recipe's parameters and returns the scheduler, and each weight
entry names the scheduler itself. The objective calls `build_temperature_scheduler` and
`build_weight_scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdcli import registry
from kdcli.recipe.temperature import parse_temperature_scheduler, scheduler_arguments

TemperatureScheduler = Callable[[Tensor, Tensor, float], float | Tensor]
WeightScheduler = Callable[[float], float]

#: TextBrewer's `flsw` adds this to the logits' norms before normalising them.
FLSW_EPS = 1e-4
#: TextBrewer's `cwsm` adds this to the student's top probability before inverting it.
CWSM_EPS = 1e-3


def _per_example(base_temperature: float, w: Tensor, beta: float) -> Tensor:
    """``max(T + (mean(w) - w) * beta, MIN_TEMPERATURE)``; the mean is over every entry of w."""
    return (base_temperature + (w.mean() - w) * beta).clamp_min_(registry.MIN_TEMPERATURE)


def _float_logits(logits: Tensor) -> Tensor:
    """Detached logits, half precision raised to float32 (as the losses do)."""
    logits = logits.detach()
    if logits.dtype in (torch.float16, torch.bfloat16) or not logits.dtype.is_floating_point:
        return logits.float()
    return logits


def constant_temperature() -> TemperatureScheduler:
    """Builder of the constant scheduler: returns `base_temperature` unchanged (a float)."""

    def constant(logits_S: Tensor, logits_T: Tensor, base_temperature: float) -> float:
        return base_temperature

    return constant


def flsw_temperature(beta: float, gamma: float, eps: float = FLSW_EPS) -> TemperatureScheduler:
    """Builder of the focal-loss-style-weights scheduler (flsw; arXiv:1911.07471).

    With v = logits_S / (|logits_S| + eps) and t = logits_T / (|logits_T| + eps) along the
    class dimension, ``w = (1 - <v, t>)**gamma`` per example and
    ``T_i = max(T + (mean(w) - w_i) * beta, MIN_TEMPERATURE)``: examples where the student
    disagrees with the teacher get a lower temperature. Logits (B, C) give (B,); (B, L, C)
    give (B, L), the mean then running over all B*L entries (as in the reference).
    """

    def flsw(logits_S: Tensor, logits_T: Tensor, base_temperature: float) -> Tensor:
        with torch.no_grad():
            v = _float_logits(logits_S)
            t = _float_logits(logits_T)
            v = v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)
            t = t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + eps)
            w = torch.pow(1 - (v * t).sum(dim=-1), gamma)
            return _per_example(base_temperature, w, beta)

    return flsw


def cwsm_temperature(beta: float) -> TemperatureScheduler:
    """Builder of the confidence-weighted-by-student-max scheduler (cwsm; arXiv:1911.07471).

    ``w = 1 / (max_c softmax(logits_S)_c + 1e-3)`` per example and
    ``T_i = max(T + (mean(w) - w_i) * beta, MIN_TEMPERATURE)``: examples where the student is
    unsure get a lower temperature. Shapes as in `flsw_temperature`; the teacher is unused.
    """

    def cwsm(logits_S: Tensor, logits_T: Tensor, base_temperature: float) -> Tensor:
        with torch.no_grad():
            v_max = torch.softmax(_float_logits(logits_S), dim=-1).amax(dim=-1)
            w = 1 / (v_max + CWSM_EPS)
            return _per_example(base_temperature, w, beta)

    return cwsm


def linear_growth_weight(x: float) -> float:
    """Weight ``x`` for training progress x = step / total_steps: grows from 0 to 1."""
    return x


def linear_decay_weight(x: float) -> float:
    """Weight ``1 - x`` for training progress x = step / total_steps: decays from 1 to 0."""
    return 1 - x


def scheduler_function(name: str) -> Callable:
    """The function of a registered scheduler: the attribute of this module its registry entry
    names (a temperature builder, or a weight scheduler)."""
    return globals()[registry.get_scheduler(name).function]


def build_temperature_scheduler(spec: object) -> TemperatureScheduler:
    """The scheduler for a recipe's ``temperature_scheduler`` value.

    `spec` is ``"none"`` / ``None`` (the constant scheduler), a name (``"constant"``), or a list
    ``[name, *params]`` as in the reference, e.g. ``["flsw", 1, 2]`` (beta=1, gamma=2) or
    ``["cwsm", 1]``; ``[name, {"beta": 1, "gamma": 2}]`` also works. It is parsed by the same
    code as the recipe's (`kdcli.recipe.temperature`), which raises `TemperatureSpecError` (a
    ValueError) naming the scheduler, the problem and the fix.
    """
    parsed = parse_temperature_scheduler("none" if spec is None else spec)
    if parsed == "none":
        return constant_temperature()
    return scheduler_function(parsed[0])(**scheduler_arguments(parsed))


def build_weight_scheduler(name: str | None) -> WeightScheduler | None:
    """The weight scheduler for a recipe name; None for ``"none"`` / None (a constant weight)."""
    if name is None or name == "none":
        return None
    names = registry.scheduler_names("weight")
    if name not in names:
        raise ValueError(f"unknown weight scheduler {name!r}; choose one of none, {', '.join(names)}")
    return scheduler_function(name)
