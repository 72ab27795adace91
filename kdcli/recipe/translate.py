"""Pydantic errors translated into one-line problems at the JSON path the user wrote."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

from kdcli.recipe.messages import JsonPath, PathKey, did_you_mean, dotted, show
from kdcli.recipe.schema import DistillationConfig, Match, Proj, Recipe, TrainingSection
from kdcli.recipe.sources import ConfigStudent, DataSection, DataSource, PretrainedModel

_KEYS_OF: dict[str, type[BaseModel]] = {
    "": Recipe,
    "teacher": PretrainedModel,
    "teacher[*]": PretrainedModel,
    "data": DataSection,
    "data.train": DataSource,
    "data.eval": DataSource,
    "training": TrainingSection,
    "distillation": DistillationConfig,
    "distillation.intermediate_matches[*]": Match,
    "distillation.intermediate_matches[*].proj": Proj,
}


def _allowed_keys(parent: JsonPath, raw: Any) -> list[str]:
    pattern = dotted("*" if isinstance(p, int) else p for p in parent).replace(".*", "[*]")
    if pattern == "student":
        node = raw.get("student") if isinstance(raw, dict) else None
        model = PretrainedModel if isinstance(node, dict) and "model" in node else ConfigStudent
    else:
        model = _KEYS_OF.get(pattern)
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


_PROJ_INDEX = {"kind": 0, "dim_S": 1, "dim_T": 2, "options": 3}


def _raw_path(loc: tuple, raw: Any) -> JsonPath:
    """Map a pydantic location onto the JSON the user wrote (union tags dropped, `proj`
    fields mapped to list indices, cut where the user wrote a scalar)."""
    path: list[PathKey] = []
    node = raw
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):
            continue  # a union tag, not a key
        if isinstance(node, list) and isinstance(part, str) and part in _PROJ_INDEX:
            part = _PROJ_INDEX[part]
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        else:
            break  # the user wrote a scalar where the model expected more structure
    return tuple(path)


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "tuple_type": "a list",
}
_COMPARISONS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else show(value)


def describe_error(err: dict, raw: Any) -> tuple[JsonPath, str, str, bool]:
    """(path, message, fix, at_key) for one pydantic error; messages name the field by its
    last key (the dotted path travels separately in the Problem)."""
    kind = err["type"]
    path = _raw_path(err["loc"], raw)
    keys = [p for p in err["loc"] if isinstance(p, str) and not p.startswith("<")]
    name = keys[-1] if keys else "the recipe"
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "kdcli":
        return path, ctx.get("message", err["msg"]), ctx.get("fix", ""), False
    if kind == "extra_forbidden":
        key = path[-1] if path else ""
        allowed = _allowed_keys(path[:-1], raw)
        parent = dotted(path[:-1]) or "the top level"
        if path[:1] == ("student",) and key in ("config", "overrides", "init_from_teacher"):
            return (
                path,
                f"a student given by `model` takes no `{key}`",
                'use either {"model": ...} or {"config": ..., "overrides": {...}, "init_from_teacher": [...]}',
                True,
            )
        return path, f"unknown key {show(key)} in {parent}", did_you_mean(key, allowed), True
    if kind == "missing":
        parent = dotted(path[:-1]) or "the top level"
        return (
            path,
            f"missing required key {show(path[-1] if path else '')} in {parent}",
            "add it (see docs/recipe.md)",
            False,
        )
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return path, f"{name} is {show(value)}, not one of: {', '.join(expected)}", did_you_mean(value, expected), False
    if kind in _TYPE_WORDS:
        return (
            path,
            f"{name} must be {_TYPE_WORDS[kind]}, got {show(value)}",
            f"write {name} as {_TYPE_WORDS[kind]}",
            False,
        )
    if kind in _COMPARISONS:
        symbol, key = _COMPARISONS[kind]
        limit = _number(ctx.get(key))
        return path, f"{name} must be {symbol} {limit}, got {_number(value)}", f"use a value {symbol} {limit}", False
    if kind in ("finite_number", "float_parsing"):
        return path, f"{name} must be a finite number, got {show(value)}", "write a finite number", False
    if kind in ("too_short", "too_long"):
        return path, f"{name}: {err['msg'].lower()}", "fix the number of items", False
    return path, f"{name}: {err['msg']} (got {show(value)})", "see docs/recipe.md", False
