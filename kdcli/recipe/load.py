"""Reading a recipe file: parse, validate, cross-field rules, files; load_recipe."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from kdcli.errors import Problem, RecipeError, UsageError
from kdcli.facts.safe_files import NotRegularFile, exists, is_dir, open_regular
from kdcli.recipe.discover import RECIPE_MAX_BYTES, find_producers
from kdcli.recipe.files import check_files
from kdcli.recipe.jsonpos import JsonSyntaxError, SourceMap, parse_json
from kdcli.recipe.loaded import LoadedRecipe, display_name
from kdcli.recipe.messages import dotted, show
from kdcli.recipe.on_policy_rules import on_policy_findings
from kdcli.recipe.paths import resolve_model_ref
from kdcli.recipe.rules import section_findings
from kdcli.recipe.schema import DistillationConfig, Match, Recipe, TrainingSection, apply_defaults
from kdcli.recipe.sources import DataSection, Student, Teacher
from kdcli.recipe.translate import describe_error
from kdcli.recipe.validation import Mode, RecipeContext
from kdcli.tasks import TASKS


@functools.cache
def _adapter(kind: str) -> TypeAdapter:
    return TypeAdapter(Teacher | None if kind == "teacher" else Student)


def best_effort(raw: dict, ctx: RecipeContext) -> tuple[Recipe, frozenset[str], list[tuple[int, Match]]]:
    """A Recipe assembled from the sections that validate on their own (see LoadedRecipe.view)."""
    ok: set[str] = set()
    values: dict[str, Any] = {}

    def attempt(name: str, validate, value: Any, fallback: Any) -> None:
        try:
            values[name] = validate(value)
            ok.add(name)
        except (ValidationError, PydanticCustomError):
            values[name] = fallback

    attempt("teacher", lambda v: _adapter("teacher").validate_python(v, context=ctx), raw.get("teacher"), None)
    attempt("student", lambda v: _adapter("student").validate_python(v, context=ctx), raw.get("student"), None)
    attempt("data", lambda v: DataSection.model_validate(v, context=ctx), raw.get("data"), None)
    attempt(
        "training", lambda v: TrainingSection.model_validate(v, context=ctx), raw.get("training", {}), TrainingSection()
    )
    tokenizer = raw.get("tokenizer")
    values["tokenizer"] = None
    if isinstance(tokenizer, str):
        try:
            values["tokenizer"] = resolve_model_ref(tokenizer, ctx.base)
            ok.add("tokenizer")
        except PydanticCustomError:
            pass
    elif tokenizer is None:
        ok.add("tokenizer")
    default_task = Recipe.model_fields["task"].default
    task = raw.get("task", default_task)
    values["task"] = task if task in TASKS else default_task
    if task == values["task"]:
        ok.add("task")
    matches: list[tuple[int, Match]] = []
    distillation = raw.get("distillation")
    attempt(
        "distillation",
        lambda v: None if v is None else DistillationConfig.model_validate(v, context=ctx),
        distillation,
        None,
    )
    if values["distillation"] is not None:
        matches = list(enumerate(values["distillation"].intermediate_matches))
    elif isinstance(distillation, dict) and isinstance(distillation.get("intermediate_matches"), list):
        for i, item in enumerate(distillation["intermediate_matches"]):
            try:
                matches.append((i, Match.model_validate(item, context=ctx)))
            except ValidationError:
                pass
    view = Recipe.model_construct(**values)
    apply_defaults(view, ctx)
    return view, frozenset(ok), matches


def _recipe_text(path: str | Path, loaded: LoadedRecipe) -> str | None:
    """The text of the recipe file, or None with the problem added to `loaded` (a file that is
    not regular, over RECIPE_MAX_BYTES, or not UTF-8); UsageError when it cannot be read."""
    try:
        with open_regular(loaded.source) as f:
            data = f.read(RECIPE_MAX_BYTES + 1)
    except NotRegularFile as exc:
        loaded.problems.append(
            Problem(loaded.display, "", f"not read: {exc}", "pass a recipe file (a regular JSON file)")
        )
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    if len(data) > RECIPE_MAX_BYTES:
        loaded.problems.append(
            Problem(
                loaded.display,
                "",
                f"the file is over {RECIPE_MAX_BYTES >> 20} MiB; a recipe is a few KiB",
                "pass a recipe file",
            )
        )
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        loaded.problems.append(
            Problem(loaded.display, "", f"the file is not UTF-8 text (byte {exc.start})", "save it as UTF-8")
        )
        return None


def read_recipe(
    path: str | Path, mode: Mode | None = None, producers: dict[str, list[Path]] | None = None
) -> LoadedRecipe:
    """Read and validate one recipe file, collecting every problem (never raises RecipeError).

    `mode` is the command about to run it ("distill" or "train"; None to lint). Raises
    UsageError when the file does not exist. `producers` maps output folders to recipe files
    (`find_producers`); by default the recipe's own folder is searched.
    """
    source = Path(os.path.abspath(Path(path).expanduser()))
    if not exists(source):
        raise UsageError(f"no such recipe file: {path}")
    if is_dir(source):
        raise UsageError(f"{path} is a folder; pass a recipe file (check-recipe also takes folders)")
    loaded = LoadedRecipe(source=source, display=display_name(source))
    text = _recipe_text(path, loaded)
    if text is None:
        return loaded
    try:
        raw, positions = parse_json(text)
    except JsonSyntaxError as exc:
        pos = SourceMap(text).position(exc.offset)
        loaded.problems.append(
            Problem(
                loaded.display,
                "",
                f"invalid JSON: {exc.message}",
                exc.fix or "fix the JSON syntax at this spot",
                pos.line,
                pos.col,
            )
        )
        return loaded
    loaded.raw, loaded.positions = raw, positions
    if not isinstance(raw, dict):
        loaded.add(
            (),
            f"a recipe is a JSON object, got {show(raw, 30)}",
            'start from {"student": ..., "data": ...} (see docs/recipe.md)',
        )
        return loaded
    for dup in positions.duplicates:
        loaded.add(
            dup, f"key {show(dup[-1])} appears twice in {dotted(dup[:-1]) or 'the top level'}", "keep one", at_key=True
        )

    ctx = RecipeContext(base=source.parent, stem=source.stem)
    try:
        recipe = Recipe.model_validate(raw, context=ctx)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            rpath, message, fix, at_key = describe_error(err, raw)
            loaded.add(rpath, message, fix, at_key=at_key)
        loaded.view, loaded.sections, loaded.matches = best_effort(raw, ctx)
    else:
        recipe._source = source
        loaded.recipe = loaded.view = recipe
        loaded.sections = frozenset({"teacher", "student", "data", "training", "tokenizer", "task", "distillation"})
        loaded.matches = list(enumerate(recipe.distillation.intermediate_matches if recipe.distillation else []))
    for finding in section_findings(raw, loaded.view, loaded.sections, mode):
        loaded.add_finding(finding)
    for finding in on_policy_findings(raw, loaded.view, loaded.sections):
        loaded.add_finding(finding)
    check_files(loaded, producers if producers is not None else find_producers([source]), mode)
    if not loaded.ok:
        loaded.recipe = None
    return loaded


def load_recipe(path: str | Path, mode: Mode | None = None) -> Recipe:
    """Load a recipe, or raise RecipeError listing every problem (UsageError: no such file).

    `mode="distill"` needs `teacher` and `distillation`; `mode="train"` needs neither; with a
    mode, every local model folder must already exist. Model-aware rules are not applied here:
    see `kdcli.recipe.check.load_checked`.
    """
    loaded = read_recipe(path, mode)
    if not loaded.ok or loaded.recipe is None:
        raise RecipeError(problems=loaded.sorted_problems())
    return loaded.recipe
