"""check-recipe's causal-lm data rule: a `messages` column holds, in its first rows, lists of
{"role", "content"} turns (what the chat template renders). Only the structure of a row is
described in messages, never its text."""

from __future__ import annotations

import os
from typing import Any

from kdcli.recipe.data_files import DataHeader, first_values
from kdcli.recipe.messages import show
from kdcli.recipe.rules import Finding
from kdcli.recipe.sources import DataSource

_MESSAGES_FIX = (
    'store each row\'s turns as a JSON list of {"role": "system"|"user"|"assistant", "content": "<text>"} objects'
)
_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), "a value")


def turns_problem(value: Any) -> str | None:
    """Why a messages cell is not a list of {"role", "content"} turns (one clause), or None."""
    if not isinstance(value, list):
        return f"is {_kind(value)}, not a list of turns"
    if not value:
        return "is an empty list of turns"
    for j, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            return f"has turn {j} {_kind(turn)}, not a {{role, content}} object"
        if not isinstance(turn.get("role"), str):
            return f'has turn {j} without a "role" string'
        if not isinstance(turn.get("content"), (str, list)):
            return f'has turn {j} without a "content" string'
    return None


def messages_findings(split: str, source: DataSource, column: str, header: DataHeader) -> list[Finding]:
    """The first rows of a local file's messages column are lists of turns; a csv/tsv cannot
    hold them (its cells are text)."""
    name = os.path.basename(source.path)
    if source.format in ("csv", "tsv"):
        return [
            Finding(
                ("data", split),
                f'row_format "messages" needs a list of {{"role", "content"}} turns per row, but data.{split} file '
                f"{name} is a {source.format} file, whose cells are text",
                "use a json, jsonl or parquet file",
            )
        ]
    for i, value in enumerate(first_values(source, column), 1):
        problem = turns_problem(value)
        if problem is not None:
            return [
                Finding(
                    ("data", "messages_column"),
                    f"row {i} of data.{split} file {name}: column {show(column)} {problem}",
                    _MESSAGES_FIX,
                )
            ]
    return []
