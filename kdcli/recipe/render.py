"""check-recipe reports as rich text and GitHub workflow annotations."""

from __future__ import annotations

from kdcli.errors import printable
from kdcli.recipe.report import CheckReport


def render_text(report: CheckReport, console) -> None:
    """Rich text, grouped per file, on `console` (a rich Console).

    Every string that comes from a user's files (file names, paths, messages quoting values,
    keys or column names) is printed as data: non-printable characters escaped (`printable`),
    rich markup escaped, and emoji codes (`:x:`) and highlighting off.
    """
    from rich.markup import escape

    def data(text: str) -> str:
        return escape(printable(text))

    def line(markup: str) -> None:
        console.print(markup, highlight=False, emoji=False)

    for file in report.files:
        if file.valid:
            status = "[green]ok[/]"
            if file.warnings:
                status += f" [yellow]({len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})[/]"
        else:
            status = f"[red]invalid[/] ({len(file.errors)} error{'s' * (len(file.errors) != 1)}" + (
                f", {len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})" if file.warnings else ")"
            )
        kind = f" [dim]{data(file.kind)}[/]" if file.kind else ""
        line(f"[bold]{data(file.file)}[/]{kind}: {status}")
        for p in file.problems:
            where = f"{p.line}:{p.col}" if p.line is not None else "-"
            color = "red" if p.severity == "error" else "yellow"
            at = f" [cyan]{data(p.path)}[/]:" if p.path else ""
            line(f"  [dim]{where}[/] [{color}]{data(p.severity)}[/]{at} {data(p.message)}")
            if p.fix:
                line(f"      [dim]fix:[/] {data(p.fix)}")
        for note in file.notes:
            line(f"  [dim]note: {data(note)}[/]")
    s = report.summary()
    line(
        f"{s['files']} file{'s' * (s['files'] != 1)} checked: {s['valid']} valid, {s['invalid']} invalid "
        f"({s['errors']} error{'s' * (s['errors'] != 1)}, {s['warnings']} warning{'s' * (s['warnings'] != 1)})"
    )


def _escape_data(text: str) -> str:
    """A workflow command's message: non-printable characters escaped (`printable`: no raw
    control character or lone surrogate reaches the log), then %, CR and LF as GitHub wants."""
    return printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: CheckReport) -> str:
    """GitHub Actions workflow commands: one `::error`/`::warning` annotation per problem."""
    lines = []
    for file in report.files:
        for p in file.problems:
            command = "error" if p.severity == "error" else "warning"
            props = [f"file={_escape_property(p.file)}"]
            if p.line is not None:
                props.append(f"line={p.line}")
            if p.col is not None:
                props.append(f"col={p.col}")
            props.append(f"title={_escape_property('kdcli check-recipe' + (': ' + p.path if p.path else ''))}")
            message = p.message + (f". Fix: {p.fix}" if p.fix else "")
            lines.append(f"::{command} {','.join(props)}::{_escape_data(message)}")
    s = report.summary()
    lines.append(
        f"kdcli check-recipe: {s['files']} file{'s' * (s['files'] != 1)}, {s['valid']} valid, {s['invalid']} invalid, "
        f"{s['errors']} error{'s' * (s['errors'] != 1)}, {s['warnings']} warning{'s' * (s['warnings'] != 1)}"
    )
    return "\n".join(lines)
