"""The results of check-recipe: one per file, and one per run."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcli.errors import Problem


@dataclass
class FileReport:
    """The result of checking one recipe file."""

    file: str
    kind: str | None  # "distill" / "train"; None when the file is not a readable recipe
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "valid": self.valid,
            "kind": self.kind,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


@dataclass
class CheckReport:
    """The result of one `check-recipe` run over several files."""

    files: list[FileReport]

    @property
    def valid(self) -> bool:
        return all(f.valid for f in self.files)

    def summary(self) -> dict:
        return {
            "files": len(self.files),
            "valid": sum(f.valid for f in self.files),
            "invalid": sum(not f.valid for f in self.files),
            "errors": sum(len(f.errors) for f in self.files),
            "warnings": sum(len(f.warnings) for f in self.files),
        }

    def to_dict(self) -> dict:
        return {"valid": self.valid, "summary": self.summary(), "files": [f.to_dict() for f in self.files]}
