"""Model facts for check-recipe: local folders, the hub, and folders other recipes produce;
the facts of every model a recipe names."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdcli.errors import UsageError
from kdcli.facts.modelinfo import (
    ConfigUnavailable,
    GGUFUnreadable,
    ModelFacts,
    cached_hub_file,
    gguf_facts,
    hub_facts,
    local_facts,
    with_overrides,
)
from kdcli.facts.safe_files import exists
from kdcli.recipe.data_rules import LabelScan, scan_labels
from kdcli.recipe.load import read_recipe
from kdcli.recipe.loaded import LoadedRecipe, display_name
from kdcli.recipe.messages import JsonPath
from kdcli.recipe.schema import Recipe
from kdcli.recipe.sources import PretrainedModel


@dataclass(frozen=True)
class Resolved:
    """A model's facts, or why they could not be had. `partial`: only overrides are known;
    `reported`: an error of its own already says why (a missing or damaged GGUF file)."""

    facts: ModelFacts | None
    reason: str = ""
    partial: bool = False
    reported: bool = False


class Resolver:
    """Facts of model references, cached for one check run."""

    def __init__(self, producers: dict[str, list[Path]]) -> None:
        self.producers = producers
        self._cache: dict[tuple, Resolved] = {}
        self._visiting: set[Path] = set()
        self._labels: dict[tuple, LabelScan] = {}

    def model(self, ref: str, revision: str | None = None, gguf_file: str | None = None) -> Resolved:
        key = ("model", ref, revision, gguf_file)
        if key not in self._cache:
            self._cache[key] = self._gguf(ref, revision, gguf_file) if gguf_file else self._model(ref, revision)
        return self._cache[key]

    def _gguf(self, ref: str, revision: str | None, gguf_file: str) -> Resolved:
        """Facts from the header of a GGUF file in a local folder or the Hugging Face cache."""
        if os.path.isabs(ref):
            path = Path(ref) / gguf_file
            if not exists(path):
                return Resolved(None, f"{gguf_file} is not in {ref}", reported=True)
        else:
            path = cached_hub_file(ref, gguf_file, revision)
            if path is None:
                return Resolved(
                    None, f"{gguf_file} is not in the Hugging Face cache (GGUF headers are read locally only)"
                )
        try:
            return Resolved(gguf_facts(path))
        except GGUFUnreadable as exc:
            return Resolved(None, exc.reason, reported=True)

    def _model(self, ref: str, revision: str | None) -> Resolved:
        if os.path.isabs(ref):
            folder = Path(ref)
            if (folder / "config.json").is_file():
                try:
                    return Resolved(local_facts(folder))
                except ConfigUnavailable as exc:
                    return Resolved(None, exc.reason)
            makers = self.producers.get(os.path.normpath(ref), [])
            if makers:
                return self.produced(makers[0])
            return Resolved(None, f"{ref} has no config.json")
        try:
            return Resolved(hub_facts(ref, revision))
        except ConfigUnavailable as exc:
            return Resolved(None, exc.reason)

    def produced(self, recipe_file: Path) -> Resolved:
        """Facts of the model `recipe_file` will write: its student, with its data's labels."""
        name = display_name(recipe_file)
        if recipe_file in self._visiting:
            return Resolved(None, f"recipes produce each other in a cycle through {name}")
        self._visiting.add(recipe_file)
        try:
            try:
                loaded = read_recipe(recipe_file, producers=self.producers)
            except UsageError as exc:
                return Resolved(None, str(exc))
            if loaded.recipe is None:
                return Resolved(None, f"{name}, which produces it, is not a valid recipe")
            recipe = loaded.recipe
            student = self.student(recipe)
            if student.facts is None:
                return Resolved(None, f"the student of {name}, which produces it: {student.reason}")
            labels = self.labels(recipe.data).labels if recipe.task != "causal-lm" else None
            facts = replace(
                student.facts,
                source=f"produced by {name}",
                head=recipe.task,
                num_labels=labels.num_labels if labels is not None else student.facts.num_labels,
            )
            return Resolved(facts, partial=student.partial, reason=student.reason)
        finally:
            self._visiting.discard(recipe_file)

    def student(self, recipe: Recipe) -> Resolved:
        """The student's facts: its model's, or its base config's with the overrides applied."""
        student = recipe.student
        if isinstance(student, PretrainedModel):
            return self.model(student.model, student.revision, student.gguf_file)
        base = (
            self.model(student.config, student.revision, student.gguf_file)
            if student.config
            else Resolved(None, "no config given")
        )
        if base.facts is None:
            partial = with_overrides(ModelFacts(source="student.overrides"), student.overrides)
            return Resolved(partial, base.reason, partial=True)
        return Resolved(with_overrides(base.facts, student.overrides), partial=base.partial, reason=base.reason)

    def labels(self, data: Any) -> LabelScan:
        """The labels of a recipe's `data` section, train and eval together (cached)."""
        splits = [("train", data.train)] + ([("eval", data.eval)] if data.eval is not None else [])
        key = (tuple((s, d.path, d.format, d.delimiter) for s, d in splits), data.label_column)
        if key not in self._labels:
            self._labels[key] = scan_labels(splits, data.label_column)
        return self._labels[key]


def teacher_path(recipe: Recipe, i: int) -> JsonPath:
    return ("teacher", i) if isinstance(recipe.teacher, list) else ("teacher",)


def gguf_file_at(recipe: Recipe, path: JsonPath) -> str | None:
    """The `gguf_file` of the model referenced at `path` (a `Models.refs` path), if any."""
    if path[0] == "teacher":
        return recipe.teachers[path[1] if isinstance(path[1], int) else 0].gguf_file
    return getattr(recipe.student, "gguf_file", None)


def student_ref_path(recipe: Recipe, loaded: LoadedRecipe) -> JsonPath:
    if isinstance(recipe.student, PretrainedModel):
        return ("student", "model")
    if loaded.written(("student", "config")) is not None:
        return ("student", "config")
    return ("student",)


@dataclass
class Models:
    """The facts of every model a recipe names, and where each is named (for warnings)."""

    teachers: list[Resolved]
    student: Resolved
    base: Resolved | None  # the config a config-student starts from
    init_source: Resolved | None  # the model init_from_teacher copies blocks from
    #: (JSON path, role, reference, facts) of each model reference
    refs: list[tuple[JsonPath, str, str, Resolved]]


def resolve_models(recipe: Recipe, loaded: LoadedRecipe, resolver: Resolver) -> Models:
    has_student = "student" in loaded.sections
    teachers = (
        [resolver.model(t.model, t.revision, t.gguf_file) for t in recipe.teachers]
        if "teacher" in loaded.sections
        else []
    )
    student = resolver.student(recipe) if has_student else Resolved(None, "the student section is invalid")
    refs = [
        (teacher_path(recipe, i) + ("model",), "teacher", t.model, r)
        for i, (t, r) in enumerate(zip(recipe.teachers, teachers))
    ]
    base = None
    if has_student and isinstance(recipe.student, PretrainedModel):
        refs.append((("student", "model"), "student", recipe.student.model, student))
    elif has_student and recipe.student.config:
        base = resolver.model(recipe.student.config, recipe.student.revision, recipe.student.gguf_file)
        refs.append((student_ref_path(recipe, loaded), "student config", recipe.student.config, base))
    init_source = None
    if has_student and recipe.init_source is not None:
        init_source = teachers[0] if recipe.teachers else base
    return Models(teachers, student, base, init_source, refs)
