"""A run's output folder read back for `kdcli report`: `metrics.jsonl` (the step logs and the
evaluations, up to the last complete line) and `summary.json` (absent while the run goes on).

A line the run is still writing (the last one, without its line break, cut mid-record) is left
out with a note; a complete line that is not one JSON object with an integer "step" is a
problem, named by file and line. Every problem of every folder is collected, then raised as one
`UsageError`. Torch-free; imports nothing that draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdcli.errors import UsageError, printable
from kdcli.facts import safe_files

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class Run:
    """One run folder as `kdcli report` reads it."""

    label: str  # the folder as the user wrote it
    folder: Path
    steps: list[dict] = field(default_factory=list)  # step logs ("loss", "loss/<term>", "lr", ...)
    evals: list[dict] = field(default_factory=list)  # evaluations ("eval/<metric>")
    summary: dict | None = None  # summary.json; None while the run goes on (or after a crash)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "finished" if self.summary is not None else "running or stopped"

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in (*self.steps, *self.evals)]
        return max(steps) if steps else None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of `key` in step order: finite numbers only (a NaN step is a gap)."""
        records = self.evals if key.startswith("eval/") else self.steps
        points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
        return sorted((s, v) for s, v in points if math.isfinite(v))

    def keys(self) -> list[str]:
        """The numeric keys of its records, in order of first appearance."""
        seen: dict[str, None] = {}
        for record in (*self.steps, *self.evals):
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    seen.setdefault(key, None)
        return list(seen)


class _Bad(Exception):
    """One problem with one folder or file (collected by `read_runs`)."""


def read_runs(folders: Sequence[Path]) -> list[Run]:
    """Every folder read; all problems at once as one UsageError."""
    runs, problems, seen = [], [], {}
    for folder in folders:
        label = printable(str(folder))
        try:
            run = read_run(Path(folder), label)
        except _Bad as exc:
            problems.append(str(exc))
            continue
        key = run.folder.resolve()
        if key in seen:
            problems.append(f"{label}: the same run as {seen[key]}. Fix: name each run folder once")
            continue
        seen[key] = label
        runs.append(run)
    if problems:
        raise UsageError("\n".join(problems))
    return runs


def read_run(folder: Path, label: str) -> Run:
    """One run folder (or its metrics.jsonl named directly)."""
    if folder.name == METRICS and safe_files.is_file(folder):
        folder = folder.parent
    if not safe_files.exists(folder):
        raise _Bad(f"{label}: no such folder. Fix: pass the output folder of a kdcli distill or train run")
    if not safe_files.is_dir(folder):
        raise _Bad(f"{label}: not a folder. Fix: pass the output folder of a kdcli distill or train run")
    if not safe_files.exists(folder / METRICS):
        raise _Bad(f"{label}: no {METRICS} in this folder, so it is not a kdcli run folder. Fix: {_hint(folder)}")
    run = Run(label, folder)
    run.steps, run.evals, run.notes = read_metrics(folder / METRICS, f"{label}/{METRICS}")
    if safe_files.exists(folder / SUMMARY):
        run.summary = _read_summary(folder / SUMMARY, f"{label}/{SUMMARY}")
    else:
        at = "nothing logged yet" if run.last_step is None else f"read up to step {run.last_step}"
        run.notes.append(f"{label}: no {SUMMARY} (the run is still going, or stopped before its end): {at}")
    return run


def _hint(folder: Path) -> str:
    """Run folders inside `folder` (the user named their parent), else where runs write."""
    try:
        inside = sorted(p for p in folder.iterdir() if safe_files.is_file(p / METRICS))
    except OSError:
        inside = []
    if inside:
        shown = " ".join(printable(str(p)) for p in inside[:6]) + (" ..." if len(inside) > 6 else "")
        return f"pass the run folders inside it: {shown}"
    return f"pass a folder that kdcli distill or train wrote (training.output_dir; it holds {METRICS})"


def read_metrics(path: Path, label: str) -> tuple[list[dict], list[dict], list[str]]:
    """(step records, evaluation records, notes) of a metrics.jsonl, up to its last complete line."""
    try:
        data = safe_files.read_regular_bytes(path)
    except (OSError, safe_files.NotRegularFile) as exc:
        raise _Bad(f"{label}: cannot be read ({exc}). Fix: make it a readable file (kdcli writes it as one)") from None
    lines = data.split(b"\n")
    notes = []
    if lines[-1].strip() and _record(lines[-1]) is None:  # the line the run is writing now
        notes.append(
            f"{label}: line {len(lines)} is incomplete (still being written?): read up to line {len(lines) - 1}"
        )
        lines = lines[:-1]
    steps, evals, bad = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            bad.append(number)
        elif any(key.startswith("eval/") for key in record):
            evals.append(record)
        else:
            steps.append(record)
    if bad:
        more = f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else ""
        excerpt = printable(lines[bad[0] - 1][:60].decode("utf-8", "replace"))
        raise _Bad(
            f"{label}:{bad[0]}: not a JSON object with an integer step{more}: {excerpt!r}. Fix: delete or "
            "repair the line (kdcli writes one JSON object a line)"
        )
    return steps, evals, notes


def _record(line: bytes) -> dict | None:
    """A metrics line as a dict with an integer "step" >= 0, or None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return record
    return None


def _read_summary(path: Path, label: str) -> dict:
    try:
        doc = json.loads(safe_files.read_regular_bytes(path).decode("utf-8"))
    except (OSError, safe_files.NotRegularFile) as exc:
        raise _Bad(f"{label}: cannot be read ({exc}). Fix: make it a readable file (kdcli writes it as one)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _Bad(f"{label}: not JSON ({exc}). Fix: delete it (kdcli writes it at the end of a run)") from None
    if not isinstance(doc, dict):
        raise _Bad(f"{label}: not a JSON object. Fix: delete it (kdcli writes it at the end of a run)")
    return doc


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
