"""One recipe file read as far as it can be, and the problems placed in it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.errors import Problem
from kdcli.recipe.jsonpos import SourceMap
from kdcli.recipe.messages import JsonPath, dotted
from kdcli.recipe.paths import leaves_repository, repository_root
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Match, Recipe
from kdcli.recipe.validation import Mode, kind_of


@dataclass
class LoadedRecipe:
    """One recipe file read as far as it can be.

    `recipe` is the validated Recipe (None when any structural problem remains). `view` is the
    best effort for later rules: the Recipe itself, or one assembled from the sections that
    validated on their own (`sections` names them; other sections hold defaults or None), so
    that every rule whose inputs are well-formed runs even when others fail. `matches` are the
    intermediate matches that validated, with their index in the file.
    """

    source: Path
    display: str
    recipe: Recipe | None = None
    view: Recipe | None = None
    sections: frozenset[str] = frozenset()
    matches: list[tuple[int, Match]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    raw: Any = None
    positions: SourceMap | None = None
    #: local model folders that do not exist yet, and the recipe that produces each
    produced: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> Mode | None:
        return kind_of(self.raw)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def add(
        self, path: JsonPath, message: str, fix: str = "", severity: str = "error", *, at_key: bool = False
    ) -> None:
        """Record a problem at a JSON path (line/col looked up in the source map)."""
        pos = self.positions.at(tuple(path), key=at_key) if self.positions else None
        problem = Problem(
            file=self.display,
            path=dotted(path),
            message=message,
            fix=fix,
            line=pos.line if pos else None,
            col=pos.col if pos else None,
            severity=severity,
        )
        if problem not in self.problems:
            self.problems.append(problem)

    def add_finding(self, finding: Finding) -> None:
        self.add(finding.path, finding.message, finding.fix, finding.severity, at_key=finding.at_key)

    def data_path(self, split: str) -> JsonPath:
        """Where the file of `data.<split>` is written: the split itself (a path string) or its
        `path` key (an object)."""
        where: JsonPath = ("data", split)
        return where if isinstance(self.written(where), str) else where + ("path",)

    def written(self, path: JsonPath) -> Any:
        """The raw value at a JSON path, as the user wrote it (None if absent)."""
        node = self.raw
        for part in path:
            if isinstance(node, dict) and isinstance(part, str) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return None
        return node

    def sorted_problems(self) -> list[Problem]:
        """Problems in file order (those without a position first)."""
        return sorted(self.problems, key=lambda p: (p.line or 0, p.col or 0))

    @functools.cached_property
    def root(self) -> Path:
        """The repository the recipe belongs to (see `repository_root`)."""
        return repository_root(self.source)

    def outside(self, path: JsonPath, resolved: str) -> str | None:
        """How the local path written at `path` (resolved: `resolved`) leaves the repository,
        or None (see `leaves_repository`; None too when nothing is written there)."""
        written = self.written(path)
        return leaves_repository(written, resolved, self.root) if isinstance(written, str) else None


def display_name(path: Path) -> str:
    """A file name for messages: relative to the working directory when below it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except (ValueError, OSError):  # not below the working directory, or no working directory
        return str(path)
