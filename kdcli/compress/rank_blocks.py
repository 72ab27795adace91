"""`kdcli rank-blocks`: the recipe's block source measured by every measure, one JSON document."""

from __future__ import annotations

from collections.abc import Callable

from kdcli.compress.blocks import choose_blocks, sample_batches


def rank_recipe_blocks(recipe, keep: int | None, rows: int | None, warn: Callable[[str], None]) -> dict:
    """`kdcli rank-blocks`: the recipe's block source (its first teacher, else the student's
    config model) measured on the recipe's first training rows by every measure, as one JSON
    document. `keep` default: the recipe's `init_from_teacher` count (or
    `overrides.num_hidden_layers`); `rows` default: the recipe's measurement rows (else 32)."""
    from kdcli import models as kmodels
    from kdcli.engine import build
    from kdcli.errors import UsageError
    from kdcli.recipe.sources import INIT_MEASURES, ConfigStudent

    student = recipe.student
    measure = getattr(student, "init_measure", None)
    if keep is None and isinstance(student, ConfigStudent):
        keep = measure.keep if measure is not None else student.overrides.get("num_hidden_layers")
        if keep is None and student.init_blocks is not None:
            keep = len(student.init_blocks)
    if keep is None:
        raise UsageError("how many blocks to keep? Fix: pass --keep K (or set student.init_from_teacher.keep)")
    rows = rows or (measure.rows if measure is not None else 32)
    if recipe.teachers:
        source = recipe.teachers[0]
        ref, revision, trust, gguf = source.model, source.revision, source.trust_remote_code, source.gguf_file
    elif isinstance(student, ConfigStudent):
        ref, revision, trust, gguf = student.config, student.revision, student.trust_remote_code, student.gguf_file
    else:
        ref, revision, trust, gguf = student.model, student.revision, student.trust_remote_code, student.gguf_file
    tokenizer, _ = build.tokenizer(recipe, warn)
    task_data = build.data(recipe, tokenizer, warn)
    labels = task_data.labels
    model = kmodels.load_model(
        ref,
        recipe.task,
        id2label=labels.id2label if labels is not None else None,
        revision=revision,
        trust_remote_code=trust,
        role="teacher" if recipe.teachers else "student.config",
        warn=warn,
        gguf_file=gguf,
    ).model.eval()
    total = len(kmodels.encoder_blocks(model))
    if not 1 <= keep <= total:
        raise UsageError(f"--keep {keep}: the model has blocks 1..{total}. Fix: keep 1 to {total} blocks")
    batches = sample_batches(task_data, tokenizer, rows)
    rankings = {by: choose_blocks(model, batches, keep, by) for by in INIT_MEASURES}
    return {
        "model": ref if gguf is None else f"{ref} ({gguf})",
        "num_blocks": total,
        "keep": keep,
        "rows": min(rows, len(task_data.train)),
        "rankings": {by: {**r.to_dict(), "describe": r.describe()} for by, r in rankings.items()},
    }


def rankings_table(doc: dict):
    """`rank_recipe_blocks`'s document as a rich table (what `kdcli rank-blocks` prints)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"{escape(doc['model'])}: keep {doc['keep']} of {doc['num_blocks']} blocks ({doc['rows']} rows)"
    )
    for column in ("by", "kept", "dropped", "why"):
        table.add_column(column)
    for by, ranking in doc["rankings"].items():
        table.add_row(by, str(ranking["kept"]), str(ranking["dropped"]), escape(ranking["describe"]))
    return table
