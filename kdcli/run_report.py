"""`kdcli report RUN_DIR [RUN_DIR ...] [-o report.png|report.html]`: the curves of any runs (loss
terms, learning rate, throughput, evaluations from their metrics.jsonl) and a table of their
summary.json, compared side by side.

`report()` returns one document: the runs (status, how much was logged, notes) and the table
(fields x runs, the numbers as summary.json has them). The PNG holds the curves; the HTML page
holds the same picture (embedded) and the table. The output is written atomically and an
existing file is replaced only with `overwrite`. Reading the runs is kdcli.run_files.run_metrics';
drawing is kdcli.plots'.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdcli.errors import UsageError, printable
from kdcli.facts import safe_files
from kdcli.run_files.atomic_files import atomic_write, disk_full_as_error, is_no_space
from kdcli.run_files.run_metrics import Run, read_runs

FORMATS = {".png": "png", ".html": "html", ".htm": "html"}
#: summary.json fields the table shows, in this order (then eval.*, teacher_eval.*, final_terms.*)
FIELDS = (
    "mode",
    "task",
    "steps",
    "total_steps",
    "epochs",
    "final_loss",
    "student_parameters",
    "train_tokens_per_s",
    "samples_per_s",
    "train_time_s",
    "wall_time_s",
    "peak_memory_mb",
    "precision",
    "device",
    "processes",
    "resumed_from_step",
)
GROUPS = ("eval", "teacher_eval", "final_terms")
#: eval keys that count rather than measure (not drawn)
COUNTS = ("eval/tokens", "eval/examples")
#: the most panels one picture holds (the rest are named in a note)
MAX_PANELS = 15


def report(
    folders: Sequence[Path],
    output: Path | None,
    *,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Read the runs, write `output` (if given), return the document; `say` gets the notes (for
    stderr). Every problem with the folders and the output at once, as one UsageError."""
    problems, kind, runs = [], None, []
    try:
        kind = None if output is None else _check_output(output, overwrite)
    except UsageError as exc:
        problems.append(str(exc))
    try:
        runs = read_runs(folders)
    except UsageError as exc:
        problems.append(str(exc))
    if problems:
        raise UsageError("\n".join(problems))
    notes = [note for run in runs for note in run.notes]
    doc = {
        "output": None if output is None else str(output),
        "format": kind,
        "runs": [_run_entry(run) for run in runs],
        "table": table_document(runs),
    }
    if output is not None:
        panels, left_out = panels_of(runs)
        if left_out:
            notes.append(f"not drawn (over {MAX_PANELS} panels): {', '.join(left_out)}")
        from kdcli.plots import draw, png_bytes

        title = f"kdcli report: {len(runs)} run{'s' * (len(runs) != 1)}"
        png = png_bytes(draw(panels, title=title, level_name="the run's teacher, evaluated (summary.json)"))
        data = png if kind == "png" else html_page(runs, doc["table"], png, notes).encode("utf-8")
        _write(output, data)
        doc["bytes"] = len(data)
    for note in notes if say is not None else ():
        say(note)
    doc["notes"] = notes
    return doc


def _check_output(output: Path, overwrite: bool) -> str:
    shown = printable(str(output))
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise UsageError(
            f"-o {shown}: the report is a .png picture or an .html page. Fix: end the name in .png or .html"
        )
    if safe_files.is_dir(output):
        raise UsageError(f"-o {shown} is a folder. Fix: name a file, e.g. {shown}/report.{kind}")
    if safe_files.exists(output) or output.is_symlink():
        if not overwrite:
            raise UsageError(f"-o {shown} exists. Fix: pass --overwrite to replace it, or name another file")
        if not safe_files.is_file(output):
            raise UsageError(f"-o {shown} is not a regular file; kdcli replaces only a file. Fix: name another file")
    return kind


def _write(output: Path, data: bytes) -> None:
    with disk_full_as_error(f"the report {output.name}", output.parent, len(data)):
        try:
            atomic_write(output, lambda tmp: tmp.write_bytes(data))
        except OSError as exc:
            if is_no_space(exc):
                raise
            reason = exc.strerror or type(exc).__name__
            raise UsageError(
                f"-o {printable(str(output))}: cannot be written ({reason}). Fix: name another file"
            ) from None


def _run_entry(run: Run) -> dict:
    return {
        "run": run.label,
        "folder": str(run.folder),
        "status": run.status,
        "step_logs": len(run.steps),
        "evaluations": len(run.evals),
        "last_step": run.last_step,
        "notes": run.notes,
    }


# --- the table ----------------------------------------------------------------------------


def table_document(runs: Sequence[Run]) -> dict:
    """{"runs": [labels], "rows": [{"field": name, "values": [one per run]}]}: each run's status
    and last step in metrics.jsonl, then the summary.json fields some run has, the values as
    they are there (None where a run has none)."""
    flat = [_flatten(run.summary or {}) for run in runs]
    names = [f for f in FIELDS if any(f in d for d in flat)]
    for group in GROUPS:
        names += list(dict.fromkeys(k for d in flat for k in d if k.startswith(group + ".")))
    rows = [{"field": name, "values": [_plain(d.get(name)) for d in flat]} for name in names]
    rows = [row for row in rows if any(v is not None for v in row["values"])]
    status = {"field": "status", "values": [run.status for run in runs]}
    logged = {"field": "last_logged_step", "values": [run.last_step for run in runs]}  # from metrics.jsonl
    return {"runs": [run.label for run in runs], "rows": [status, logged, *rows]}


def _flatten(summary: dict) -> dict:
    out = {k: v for k, v in summary.items() if k in FIELDS}
    for group in GROUPS:
        if isinstance(summary.get(group), dict):
            out.update({f"{group}.{k}": v for k, v in summary[group].items()})
    return out


def _plain(value):
    """A table cell: a number, a string or None (a non-finite number is None: JSON has none)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return printable(str(value))


def cell(value) -> str:
    """How the table shows a value: 4 significant digits, integers with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return printable(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def rich_table(doc: dict) -> Table:
    """The table as rich shows it (every text as data: no markup from folder names or values)."""
    out = Table(title="kdcli report: summary.json of each run")
    out.add_column("field", overflow="fold")  # a narrow terminal folds a figure, never cuts it
    for label in doc["table"]["runs"]:
        out.add_column(Text(label), justify="right", overflow="fold")
    for row in doc["table"]["rows"]:
        out.add_row(Text(row["field"]), *(Text(cell(v)) for v in row["values"]))
    return out


def render(doc: dict, console: Console) -> None:
    console.print(rich_table(doc), markup=False, highlight=False)
    if doc["output"]:
        console.print(f"report written to {printable(doc['output'])} ({doc['bytes']:,} bytes)", markup=False)


# --- the curves ---------------------------------------------------------------------------


def panels_of(runs: Sequence[Run]) -> tuple[list, list[str]]:
    """The panels: total loss, each loss term, learning rate, throughput, each eval metric (with
    the teacher's value as a dashed level where summary.json has it); and the keys left out."""
    from kdcli.plots import Panel

    keys = list(dict.fromkeys(k for run in runs for k in run.keys()))
    losses = [k for k in keys if k == "loss" or k.startswith("loss/")]
    rates = ["tokens_per_s"] if "tokens_per_s" in keys else []
    if any(run.series("samples_per_s") and not run.series("tokens_per_s") for run in runs):
        rates.append("samples_per_s")
    evals = [k for k in keys if k.startswith("eval/") and k not in COUNTS]
    chosen = [*losses, *(["lr"] if "lr" in keys else []), *rates, *evals]
    panels = []
    for key in chosen:
        levels = {run.label: level for run in runs if (level := _teacher_level(run, key)) is not None}
        series = {run.label: run.series(key) for run in runs}
        panels.append(Panel(_title(key), series, levels, markers=key.startswith("eval/")))
    return panels[:MAX_PANELS], chosen[MAX_PANELS:]


def _teacher_level(run: Run, key: str) -> float | None:
    """The teacher's value of eval metric `key` in the run's summary.json (None without one)."""
    teacher = (run.summary or {}).get("teacher_eval")
    value = teacher.get(key[len("eval/") :]) if key.startswith("eval/") and isinstance(teacher, dict) else None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _title(key: str) -> str:
    titles = {"loss": "loss (total)", "lr": "learning rate", "tokens_per_s": "tokens/s", "samples_per_s": "samples/s"}
    if key in titles:
        return titles[key]
    group, _, name = key.partition("/")
    return f"eval: {name}" if group == "eval" else f"loss: {name}"


# --- the page -----------------------------------------------------------------------------


def html_page(runs: Sequence[Run], table: dict, png: bytes, notes: Sequence[str]) -> str:
    """One self-contained page: the curves (the PNG inline), the table, the notes."""
    e = html.escape
    head = "".join(f"<th>{e(label)}</th>" for label in table["runs"])
    body = "".join(
        f"<tr><th>{e(row['field'])}</th>" + "".join(f"<td>{e(cell(v))}</td>" for v in row["values"]) + "</tr>"
        for row in table["rows"]
    )
    folders = "".join(f"<li><code>{e(run.label)}</code>: {e(run.status)}</li>" for run in runs)
    noted = "".join(f"<li>{e(note)}</li>" for note in notes)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kdcli report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; }}
td {{ text-align: right; font-variant-numeric: tabular-nums; }} th {{ text-align: left; background: #f4f4f4; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>kdcli report</h1>
<ul>{folders}</ul>
<h2>Curves</h2>
<p>From each run's metrics.jsonl; dashed: the teacher's evaluation (summary.json).</p>
<img alt="loss terms, learning rate, throughput and eval curves" src="data:image/png;base64,{image}">
<h2>Summary</h2>
<table><thead><tr><th>field</th>{head}</tr></thead><tbody>{body}</tbody></table>
{f"<h2>Notes</h2><ul>{noted}</ul>" if noted else ""}
</body></html>
"""
