"""What the recipe's pydantic validators share: the recipe file's context, the error type, the section base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic_core import PydanticCustomError

from kdcli.tasks import ROW_FORMATS, TASKS

Task = Literal[TASKS]  # type: ignore[valid-type]
RowFormat = Literal[ROW_FORMATS]  # type: ignore[valid-type]
DataFormat = Literal["csv", "tsv", "json", "jsonl", "parquet"]
Mode = Literal["distill", "train"]


def kind_of(raw: Any) -> Mode | None:
    """Which command a recipe (as written: parsed JSON) is for: "distill" when it has a
    distillation section, else "train"; None when it is not a JSON object."""
    if not isinstance(raw, dict):
        return None
    return "distill" if raw.get("distillation") is not None else "train"


@dataclass(frozen=True)
class RecipeContext:
    """What validators need to know about the recipe file: its folder and name."""

    base: Path
    stem: str = "recipe"


def context_of(info: ValidationInfo) -> RecipeContext:
    ctx = info.context
    return ctx if isinstance(ctx, RecipeContext) else RecipeContext(Path.cwd())


def recipe_error(message: str, fix: str = "") -> PydanticCustomError:
    return PydanticCustomError("kdcli", "{message}", {"message": message, "fix": fix})


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true/false are never numbers in a recipe)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
