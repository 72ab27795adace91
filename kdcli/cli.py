"""The `kdcli` command line: parse, call one library function, render.

Thin by design. Heavy libraries (torch, transformers, datasets) are imported inside the
commands that need them, so `kdcli --help` and `kdcli check-recipe` start fast. One error
boundary (`_boundary`) maps known errors to one-line messages and exit codes; with
`--json`, stdout carries exactly one JSON document and everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from kdcli import __version__
from kdcli.errors import EXIT_INTERRUPTED, KdcliError, printable
from kdcli.registry_tables import feature_choices, losses_document, render_losses

app = typer.Typer(
    name="kdcli",
    help="Knowledge distillation for Hugging Face transformers, driven by a JSON recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(soft_wrap=True)  # stdout: results
err = Console(stderr=True, soft_wrap=True)  # stderr: progress, logs, errors


def _error_document(exc: BaseException, exit_code: int) -> dict:
    """The `--json` document of a failed command: {"ok": false, "error": {...}}."""
    error = {"type": type(exc).__name__, "message": str(exc) or "interrupted", "exit_code": exit_code}
    problems = getattr(exc, "problems", None)
    if isinstance(problems, list):
        error["problems"] = [p.to_dict() for p in problems]
    return {"ok": False, "error": error}


@contextlib.contextmanager
def _boundary(as_json: bool = False) -> Iterator[None]:
    """The one error boundary: known errors become one message on stderr and an exit code;
    with `as_json`, stdout also gets the error as one JSON document (`_error_document`).

    The message is printed as data: it quotes file names, paths and values, so it is escaped
    (non-printable characters, rich markup) and printed with emoji codes off."""
    from rich.markup import escape

    try:
        yield
    except KdcliError as exc:
        if as_json and _rank0():  # under torchrun every rank fails alike; one document
            _print_json(_error_document(exc, exc.exit_code))
        text = "\n".join(escape(printable(line)) for line in str(exc).splitlines())
        err.print(f"[bold red]error:[/] {text}", markup=True, highlight=False, emoji=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if as_json and _rank0():
            _print_json(_error_document(exc, EXIT_INTERRUPTED))
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _rank0() -> bool:
    """Not a torchrun worker other than rank 0 (those print no results)."""
    return os.environ.get("RANK", "0") == "0"


def _print_json(doc) -> None:
    # ensure_ascii: any string (a lone surrogate from a file name included) is written as an escape
    sys.stdout.write(json.dumps(doc, indent=2, default=str, ensure_ascii=True) + "\n")
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


@app.command("list-losses")
def list_losses(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables."),
    feature: str | None = typer.Option(
        None,
        "--feature",
        metavar="[" + "|".join(feature_choices()) + "]",
        help="Only losses on this feature: " + ", ".join(feature_choices()) + ".",
    ),
) -> None:
    """List the losses (with aliases, shapes, size rules, formulas), projections and schedulers."""
    with _boundary():
        choices = feature_choices()
        if feature is not None and feature not in choices:
            from kdcli.errors import UsageError

            raise UsageError(f"--feature {feature!r} is not a feature; choose one of {', '.join(choices)}")
        doc = losses_document(feature)
        if as_json:
            _print_json(doc)
        else:
            render_losses(doc, out)


# --- check-recipe / schema ---------------------------------------------------------------

from enum import Enum  # noqa: E402  (kept inside this command's section)


class ReportFormat(str, Enum):
    text = "text"
    json = "json"
    github = "github"


@app.command("check-recipe")
def check_recipe(
    paths: list[Path] = typer.Argument(
        ..., help="Recipe files, or folders to search for *.json recipes.", show_default=False, metavar="PATH"
    ),
    report_format: ReportFormat = typer.Option(
        ReportFormat.text,
        "--format",
        "-f",
        case_sensitive=False,
        help="text (grouped per file), json (one document on stdout), github (workflow annotations).",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Rules that could not be checked (no config offline) are errors."
    ),
) -> None:
    """Validate recipes without loading any model: exit 0 valid, 1 invalid, 2 usage error.

    Reads only each model's config.json and each data file's header, so it fits a pre-commit hook or a CI lint step (see docs/recipe.md).
    """
    from kdcli.recipe import check_paths, render_github, render_text

    with _boundary(report_format is ReportFormat.json):
        report = check_paths(paths, strict=strict)
    if report_format is ReportFormat.json:
        _print_json(report.to_dict())
    elif report_format is ReportFormat.github:
        sys.stdout.write(render_github(report) + "\n")
    else:
        render_text(report, out)
    raise typer.Exit(0 if report.valid else 1)


@app.command("schema")
def schema() -> None:
    """Print the recipe's JSON Schema (point a recipe's "$schema" at it for editor completion)."""
    from kdcli.recipe import recipe_json_schema

    _print_json(recipe_json_schema())


# --- distill / train ---------------------------------------------------------------------

_RECIPE_ARG = typer.Argument(..., help="The recipe file (JSON).", show_default=False)
_OUTPUT_DIR = typer.Option(
    None, "--output-dir", "-o", help="Output folder (default: the recipe's training.output_dir)."
)
_MAX_STEPS = typer.Option(None, "--max-steps", help="Train for N optimizer steps (wins over num_epochs/num_steps).")
_DEVICE = typer.Option(None, "--device", help='"auto", "cpu", "cuda", "cuda:N" or "mps" (default: the recipe\'s).')
_SEED = typer.Option(
    None, "--seed", help="Random seed, in training.seed's range (default: the recipe's training.seed)."
)
_RESUME = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output folder.")
_OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Replace an earlier kdcli run in the output folder (only a folder kdcli wrote; cleared once models and data have loaded).",
)
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr (warnings still print).")
_JSON = typer.Option(
    False,
    "--json",
    help='Print one JSON document on stdout: the summary with "ok": true, or {"ok": false, "error": {...}}.',
)


def _run_recipe(
    mode: str, recipe_path: Path, output_dir, max_steps, device, seed, resume, overwrite, quiet, as_json
) -> None:
    with _boundary(as_json):
        from kdcli.errors import UsageError
        from kdcli.recipe import SEED_RANGE, check_max_steps, is_device, load_checked

        if device is not None:
            if not is_device(device):
                raise UsageError(f"--device {device!r} is not a device. Fix: use auto, cpu, cuda, cuda:N or mps")
        check_max_steps(max_steps)
        if seed is not None and seed not in SEED_RANGE:
            low, high = SEED_RANGE.start, SEED_RANGE.stop - 1
            raise UsageError(
                f"--seed {seed} is outside training.seed's range {low}..{high}. Fix: use a seed from {low} to {high}"
            )
        recipe = load_checked(recipe_path, mode=mode)
        from kdcli import distill
        from kdcli.engine.devices import is_main_process

        summary = distill.run(
            recipe,
            mode=mode,
            output_dir=output_dir,
            max_steps=max_steps,
            device=device,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
        )
        if not is_main_process():
            return
    if as_json:
        _print_json({"ok": True, **summary})
    else:
        from rich.markup import escape

        from kdcli.run_files.run_log import summary_table

        out.print(summary_table(summary, title=f"kdcli {mode}: {escape(printable(str(summary['output_dir'])))}"))


def _recipe_command(mode: str, doc: str):
    """The `kdcli distill` / `kdcli train` command: the same options, run in `mode`."""

    def command(
        recipe: Path = _RECIPE_ARG,
        output_dir: Path | None = _OUTPUT_DIR,
        max_steps: int | None = _MAX_STEPS,
        device: str | None = _DEVICE,
        seed: int | None = _SEED,
        resume: bool = _RESUME,
        overwrite: bool = _OVERWRITE,
        quiet: bool = _QUIET,
        as_json: bool = _JSON,
    ) -> None:
        _run_recipe(mode, recipe, output_dir, max_steps, device, seed, resume, overwrite, quiet, as_json)

    command.__name__ = f"{mode}_command"
    command.__doc__ = doc
    return app.command(mode)(command)


distill_command = _recipe_command(
    "distill",
    """Distil the recipe's teacher(s) into its student; writes the student, metrics and checkpoints.

    Under `torchrun --nproc-per-node N -m kdcli distill RECIPE` it runs data-parallel.
    Exit codes: 0 done, 1 invalid recipe or failed run, 2 usage error, 130 interrupted
    (after writing a checkpoint that --resume continues from).
    """,
)
train_command = _recipe_command(
    "train", """Fine-tune the recipe's student on its labels (no teacher); same loop and outputs as distill."""
)


@app.command("rank-blocks")
def rank_blocks(
    recipe: Path = _RECIPE_ARG,
    keep: int | None = typer.Option(None, "--keep", help="Blocks to keep (default: the recipe's student)."),
    rows: int | None = typer.Option(None, "--rows", help="Training rows to measure on (default 32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Rank the teacher's blocks for a shallower student: which `keep` blocks to copy, by angular
    distance (Gromov et al. 2024), block influence (ShortGPT) and even spacing."""
    with _boundary(as_json):
        from kdcli.compress.rank_blocks import rank_recipe_blocks
        from kdcli.errors import UsageError
        from kdcli.recipe import load_checked

        if rows is not None and rows < 1:  # 0 is not "all rows"
            raise UsageError(f"--rows {rows} is not a number of rows. Fix: pass 1 or more (default 32)")
        doc = rank_recipe_blocks(load_checked(recipe), keep, rows, lambda text: err.print(text, markup=False))
    if as_json:
        _print_json({"ok": True, **doc})
        return
    from kdcli.compress.rank_blocks import rankings_table

    out.print(rankings_table(doc))


@app.command("prune")
def prune(
    recipe: Path = _RECIPE_ARG,
    rows: int | None = typer.Option(None, "--rows", help="Training rows to measure on (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """What student.prune keeps, without training: sizes, blocks, heads, KV groups, channels and
    their activation importance (Minitron; docs/compress.md)."""
    with _boundary(as_json):
        from kdcli.compress.prune_report import prune_recipe
        from kdcli.recipe import load_checked

        doc = prune_recipe(load_checked(recipe), rows, lambda text: err.print(text, markup=False))
    if as_json:
        _print_json({"ok": True, **doc})
        return
    from kdcli.compress.prune_report import prune_table

    out.print(prune_table(doc))


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="A run's output folder (or any causal-LM model folder)."),
    gguf_path: Path = typer.Option(..., "--gguf", help="The GGUF file to write."),
    qtype: str = typer.Option("f16", "--type", metavar="[f16|q8_0|q4_0]", help="Tensor type of the weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT.gguf if it exists (that file only)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Write a Llama-family student as a GGUF file (tokenizer, chat template and generation
    settings included) for llama.cpp / Ollama."""
    with _boundary(as_json):
        from kdcli.compress.export_gguf import export_gguf

        doc = export_gguf(run_dir, gguf_path, qtype, overwrite=overwrite)
    if as_json:
        _print_json({"ok": True, **doc})
        return
    out.print(f"wrote {doc['path']} ({doc['type']}, {doc['bytes']:,} bytes, {doc['tensors']} tensors)")


# --- plan --------------------------------------------------------------------------------


@app.command("plan")
def plan(
    recipe: Path = _RECIPE_ARG,
    world_size: int = typer.Option(1, "--world-size", help="Processes (devices) the run uses."),
    parallel: str = typer.Option("ddp", "--parallel", metavar="[ddp|fsdp]", help="ddp (replicated) or fsdp."),
    device_memory: str | None = typer.Option(
        None, "--device-memory", help="Memory of one device, e.g. 80GiB, 40GB or 512MiB: says whether the run fits."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Preflight from config files alone: parameters, memory per device (ddp vs fsdp), FLOPs per
    step, and whether the run fits (see docs/plan.md). Loads no weights and no torch."""
    with _boundary(as_json):
        from kdcli.plan import parse_size, plan_recipe

        limit = parse_size(device_memory) if device_memory is not None else None
        doc = plan_recipe(recipe, world_size=world_size, parallel=parallel, device_memory=limit)
    if as_json:
        _print_json(doc)
        return
    from kdcli.plan.tables import render_plan

    render_plan(doc, out)


# --- cache-teacher -----------------------------------------------------------------------


@app.command("cache-teacher")
def cache_teacher(recipe: Path = _RECIPE_ARG, output_dir: Path | None = _OUTPUT_DIR, as_json: bool = _JSON) -> None:
    """Fill the recipe's distillation.teacher_cache ahead of `kdcli distill` (every training row not yet cached)."""
    with _boundary(as_json):
        from kdcli.engine.cache_fill import run_command

        doc = run_command(recipe, output_dir, lambda text: err.print(text, markup=False))
    if doc is not None:
        _print_json({"ok": True, **doc}) if as_json else out.print(doc["line"], markup=False, highlight=False)


# --- report ------------------------------------------------------------------------------


@app.command("report")
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR", help="Run output folders.", show_default=False),
    output: Path | None = typer.Option(None, "--output", "-o", help="report.png or report.html (else: the table)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Compare runs, finished or running: loss terms, lr, throughput and eval curves (metrics.jsonl),
    and a table of their summary.json. Drawing needs matplotlib: pip install 'kdcli[plot]'."""
    with _boundary(as_json):
        from kdcli.run_report import render
        from kdcli.run_report import report as build_report

        doc = build_report(run_dirs, output, overwrite=overwrite, say=lambda text: err.print(text, markup=False))
    _print_json({"ok": True, **doc}) if as_json else render(doc, out)


def _json_requested(argv: list[str]) -> bool:
    """Whether the command line asks for JSON on stdout (`--json`, or check-recipe's
    `--format json`), read before click parses it: a command line click rejects still gets
    its one JSON document."""
    for i, arg in enumerate(argv):
        if arg == "--json" or arg.lower() in ("--format=json", "-fjson"):
            return True
        if arg in ("--format", "-f") and i + 1 < len(argv) and argv[i + 1].lower() == "json":
            return True
    return False


def main() -> None:
    if not _json_requested(sys.argv[1:]):
        app()
        return
    import click

    # typer >= 0.24 vendors click (its errors derive from typer.TyperException); older ones raise click's
    parse_errors = tuple(t for t in (getattr(typer, "TyperException", None), click.ClickException) if t)
    aborts = tuple({typer.Abort, click.Abort})
    try:
        code = app(standalone_mode=False)
    except aborts:
        sys.exit(EXIT_INTERRUPTED)
    except parse_errors as exc:  # unknown flag, missing argument, bad value
        exit_code = getattr(exc, "exit_code", 2)
        _print_json(_error_document(exc, exit_code))
        exc.show()
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
