"""check-recipe on files: every rule, placed in the file; load_checked for the run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kdcli.errors import RecipeError
from kdcli.recipe.data_rules import data_findings, values_shown
from kdcli.recipe.discover import expand_paths, find_producers
from kdcli.recipe.load import read_recipe
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.messages import show
from kdcli.recipe.model_rules import model_findings, unchecked_rules
from kdcli.recipe.report import CheckReport, FileReport
from kdcli.recipe.resolve import Resolver, resolve_models
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe
from kdcli.recipe.validation import Mode


def _place(loaded: LoadedRecipe, finding: Finding, strict: bool) -> None:
    severity = finding.severity
    fix = finding.fix
    if severity == "unchecked":
        severity = "error" if strict else "warning"
        if not strict:
            fix = f"{fix} (--strict makes this an error)" if fix else "--strict makes this an error"
    loaded.add(finding.path, finding.message, fix, severity, at_key=finding.at_key)


def _reported_missing(ref: str, loaded: LoadedRecipe) -> bool:
    """A local folder that neither exists nor is produced: read_recipe has reported it."""
    return os.path.isabs(ref) and not Path(ref).exists() and os.path.normpath(ref) not in loaded.produced


def check_loaded(loaded: LoadedRecipe, resolver: Resolver, strict: bool = False) -> None:
    """Add the model-aware and data rules' problems to a recipe read by `read_recipe`."""
    recipe = loaded.view
    if recipe is None:
        return
    models = resolve_models(recipe, loaded, resolver)
    reported: set[str] = set()
    for path, _, ref, resolved in models.refs:
        if resolved.facts is not None and not resolved.partial or resolved.reported:
            continue
        if ref in reported or _reported_missing(ref, loaded):
            continue
        reported.add(ref)
        written = loaded.written(path)
        roles = list(dict.fromkeys(role for _, role, other, _ in models.refs if other == ref))
        rules = list(dict.fromkeys(rule for role in roles for rule in unchecked_rules(recipe, loaded, role)))
        message = (
            f"could not read the config of {' and '.join(roles)} {show(written if isinstance(written, str) else ref)}: "
            f"{resolved.reason}; not checked: {', '.join(rules)}"
        )
        fix = "make its config.json available (a local folder, the Hugging Face cache, or network access)"
        _place(loaded, Finding(path, message, fix, "unchecked"), strict)
    for finding in model_findings(recipe, loaded, models, resolver):
        _place(loaded, finding, strict)
    if "data" in loaded.sections:
        for finding in data_findings(recipe, loaded):
            _place(loaded, finding, strict)
        labels = resolver.labels(recipe.data) if recipe.task != "causal-lm" else None  # no labels: next tokens
        problem = labels.problem(values_shown(recipe, loaded)) if labels is not None else None  # csv/tsv records
        if problem is not None:
            _place(loaded, problem, strict)


def check_file(
    path: str | Path,
    *,
    strict: bool = False,
    mode: Mode | None = None,
    producers: dict[str, list[Path]] | None = None,
    resolver: Resolver | None = None,
) -> tuple[FileReport, LoadedRecipe]:
    """Check one recipe file completely; returns its report and what was read."""
    producers = producers if producers is not None else find_producers([Path(path)])
    resolver = resolver or Resolver(producers)
    loaded = read_recipe(path, mode, producers)
    check_loaded(loaded, resolver, strict)
    report = FileReport(loaded.display, loaded.kind, loaded.sorted_problems(), list(loaded.notes))
    return report, loaded


def check_paths(paths: Iterable[str | Path], *, strict: bool = False, mode: Mode | None = None) -> CheckReport:
    """Check recipe files and folders; a model folder produced by any recipe checked in the run
    (or a sibling of one) counts as available."""
    files = expand_paths(paths)
    producers = find_producers(files)
    resolver = Resolver(producers)
    return CheckReport(
        [check_file(f, strict=strict, mode=mode, producers=producers, resolver=resolver)[0] for f in files]
    )


def load_checked(path: str | Path, mode: Mode | None = None, *, strict: bool = False) -> Recipe:
    """`load_recipe` plus the model-aware and data rules: the entry point for running a recipe.

    Raises RecipeError with every error (warnings alone do not raise), UsageError when the
    file does not exist.
    """
    report, loaded = check_file(path, strict=strict, mode=mode)
    if not report.valid or loaded.view is None:
        raise RecipeError(problems=report.problems)
    return loaded.view
