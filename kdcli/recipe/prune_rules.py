"""check-recipe's `student.prune` rules: the source can be pruned to those sizes (the one rule
in `kdcli.recipe.prune_schema`), the task is causal-lm, and the calibration rows exist."""

from __future__ import annotations

from kdcli.recipe.cache_rules import count_rows
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.prune_schema import prune_targets
from kdcli.recipe.resolve import Models
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe
from kdcli.recipe.sources import ConfigStudent


def facts_config(facts) -> dict:
    """A config dict of the sizes `ModelFacts` know (what `prune_targets` reads)."""
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    config = {k: getattr(facts, k) for k in keys if getattr(facts, k) is not None}
    if facts.model_type is not None:
        config["model_type"] = facts.model_type
    return config


def prune_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """Sizes above the source's, heads that do not divide, an unsupported architecture, a task
    other than causal-lm, and more calibration rows than the training file has."""
    student = recipe.student
    if not isinstance(student, ConfigStudent) or student.prune is None:
        return []
    spec, at = student.prune, ("student", "prune")
    out: list[Finding] = []
    if recipe.task != "causal-lm":
        out.append(
            Finding(
                at,
                f"student.prune builds causal language models; this recipe's task is {recipe.task}",
                'use "task": "causal-lm", or remove student.prune',
            )
        )
    source = models.base.facts if models.base is not None else None
    if source is not None:
        _, problems = prune_targets(facts_config(source), spec)
        for p in problems:
            out.append(Finding(at if p.field == "prune" else at + (p.field,), p.message, p.fix))
    if "data" in loaded.sections and spec.rows is not None:
        rows = count_rows(recipe)
        if rows is not None and spec.rows > rows:
            out.append(
                Finding(
                    at + ("rows",),
                    f"prune.rows {spec.rows} is more than the {rows} training rows",
                    f"use rows <= {rows}, or more training data",
                )
            )
    return out
