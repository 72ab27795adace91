"""Error types that the CLI's one error boundary turns into one-line messages and exit codes.

Every error a user can cause (a bad recipe, a missing file, an output folder in the way, a
non-finite loss) is a `KdcliError`; anything else escaping a command is a bug in kdcli.
This module imports nothing heavy: the CLI loads it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_FAILURE = 1  # invalid recipe, failed run
EXIT_USAGE = 2  # bad flag, missing file, output folder in the way
EXIT_INTERRUPTED = 130  # Ctrl-C (after a resumable checkpoint was written)


def printable(text: str) -> str:
    """`text` with every character a terminal or log would not show as itself written as an
    escape: control characters (\\x1b, \\x07, line breaks...), invisible format characters
    (U+202E...) and lone surrogates (\\udcff, which no encoder writes). Strings from users' files
    go through it before they are printed, so they are shown as data and always encode."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


@dataclass(frozen=True)
class Problem:
    """One finding in a recipe: where it is, what is wrong, and how to fix it."""

    file: str
    path: str  # dotted recipe path, e.g. "distillation.intermediate_matches[2].proj"
    message: str  # what is wrong, naming the bad value
    fix: str = ""  # how to fix it
    line: int | None = None
    col: int | None = None
    severity: str = "error"  # "error" or "warning"

    def location(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return where

    def one_line(self) -> str:
        at = f" at {self.path}" if self.path else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.location()}{at}: {self.message.rstrip('.')}.{fix}"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "path": self.path,
            "line": self.line,
            "col": self.col,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
        }


class KdcliError(Exception):
    """A user-facing error: `str(err)` is the one line the CLI prints."""

    exit_code = EXIT_FAILURE


class UsageError(KdcliError):
    """Bad command-line usage: missing file, bad flag value, output folder in the way."""

    exit_code = EXIT_USAGE


@dataclass
class RecipeError(KdcliError):
    """A recipe failed validation; holds every problem found, not just the first."""

    problems: list[Problem] = field(default_factory=list)
    exit_code = EXIT_FAILURE

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        errors = [p for p in self.problems if p.severity == "error"]
        return "\n".join(p.one_line() for p in errors or self.problems)


class RunError(KdcliError):
    """A distillation/training run stopped for a reason the user can act on."""


class NonFiniteLossError(RunError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(KdcliError):
    """Ctrl-C: a resumable checkpoint was written before exiting."""

    exit_code = EXIT_INTERRUPTED


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line one."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
