"""The `kdcli` command line: parse, call one library function, render.

Thin by design. Heavy libraries (torch, transformers, datasets) are imported inside the
commands that need them, so `kdcli --help` and `kdcli check-recipe` start fast. One error
boundary (`_boundary`) maps known errors to one-line messages and exit codes; with
`--json`, stdout carries exactly one JSON document and everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console

from kdcli import __version__
from kdcli.errors import EXIT_INTERRUPTED, KdcliError

app = typer.Typer(
    name="kdcli",
    help="Knowledge distillation for Hugging Face transformers, driven by a JSON recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(soft_wrap=True)  # stdout: results
err = Console(stderr=True, soft_wrap=True)  # stderr: progress, logs, errors


@contextlib.contextmanager
def _boundary() -> Iterator[None]:
    """The one error boundary: known errors become one message and an exit code."""
    try:
        yield
    except KdcliError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        out.print(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Knowledge distillation for Hugging Face transformers, driven by a JSON recipe."""


# --- list-losses -------------------------------------------------------------------------

# --- check-recipe / schema ---------------------------------------------------------------

# --- distill / train ---------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
