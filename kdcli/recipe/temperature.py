"""A recipe's `distillation.temperature_scheduler`, parsed once: the recipe validates it with
this parser and the run (`kdcli.schedules`) builds its scheduler from the same result."""

from __future__ import annotations

import math
from typing import Any

from kdcli import registry
from kdcli.recipe.messages import did_you_mean, show

USAGE = 'write "none", ["constant"], ["flsw", beta, gamma], ["flsw", beta, gamma, eps] or ["cwsm", beta]'


class TemperatureSpecError(ValueError):
    """A temperature_scheduler value kdcli cannot build: one-line `message` and `fix`."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(f"{message}. Fix: {fix}")
        self.message = message
        self.fix = fix


def parse_temperature_scheduler(value: Any) -> str | list:
    """`"none"`, or `[name, *params]` with every parameter a finite number, the optional ones
    (flsw's eps) only up to the last one given. Accepts a bare name (`"constant"`) and
    `[name, {param: value}]`; else TemperatureSpecError."""
    names = registry.scheduler_names("temperature")
    if value == "none":
        return value
    if isinstance(value, str):
        if value not in names:
            raise TemperatureSpecError(
                f"unknown temperature scheduler {show(value)}", did_you_mean(value, ["none", *names])
            )
        value = [value]
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise TemperatureSpecError(f'temperature_scheduler must be "none" or [name, *params], got {show(value)}', USAGE)
    name, params = value[0], value[1:]
    if name not in names:
        raise TemperatureSpecError(f"unknown temperature scheduler {show(name)}", did_you_mean(name, names))
    spec = registry.get_scheduler(name)
    optional = list(spec.defaults)  # optional positional parameters after the required ones
    allowed = [*spec.params, *optional]
    signature = ", ".join([*spec.params, *(f"[{p}]" for p in optional)]) or "no parameters"
    if len(params) == 1 and isinstance(params[0], dict):
        given = params[0]
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise TemperatureSpecError(
                f"temperature scheduler {name} has no parameter {show(unknown[0])}",
                did_you_mean(unknown[0], allowed) if allowed else f"{name} takes no parameters",
            )
        missing = [p for p in spec.params if p not in given]
        if missing:
            raise TemperatureSpecError(f"temperature scheduler {name} needs {', '.join(missing)}", USAGE)
        last = max([i + 1 for i, p in enumerate(optional) if p in given], default=0)
        params = [given[p] for p in spec.params] + [given.get(p, spec.defaults[p]) for p in optional[:last]]
    if not len(spec.params) <= len(params) <= len(allowed):
        raise TemperatureSpecError(
            f"temperature scheduler {name} takes {signature}; got {len(params)} value(s)",
            f"write {show([name, *[1.0] * len(spec.params)])}",
        )
    for param_name, param in zip(allowed, params):
        if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
            raise TemperatureSpecError(
                f"{name} parameter {param_name} must be a finite number, got {show(param)}", USAGE
            )
    return [name, *params]


def scheduler_arguments(parsed: list) -> dict[str, float]:
    """The keyword arguments of a parsed `[name, *params]` for its builder in kdcli.schedules."""
    spec = registry.get_scheduler(parsed[0])
    return {key: float(value) for key, value in zip((*spec.params, *spec.defaults), parsed[1:])}
