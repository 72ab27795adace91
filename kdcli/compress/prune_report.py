"""`kdcli prune`: what `student.prune` would keep, measured on the recipe's rows, without
training: the sizes, the kept blocks, heads, KV groups and channels, and the importances."""

from __future__ import annotations

from collections.abc import Callable


def prune_recipe(recipe, rows: int | None, warn: Callable[[str], None]) -> dict:
    """The recipe's `student.prune` measured on its first training rows (`rows`, default the
    recipe's), as one JSON document; UsageError when the recipe has no prune."""
    from kdcli.compress.blocks import sample_batches
    from kdcli.compress.prune import prune_model
    from kdcli.engine import build
    from kdcli.engine.recipe_models import prune_source
    from kdcli.errors import UsageError
    from kdcli.recipe.prune_schema import DEFAULT_ROWS

    spec = getattr(recipe.student, "prune", None)
    if spec is None:
        raise UsageError(
            'the recipe has no student.prune. Fix: add e.g. "prune": {"hidden_size": 384} to its student '
            "(or use kdcli rank-blocks for depth alone)"
        )
    tokenizer, _ = build.tokenizer(recipe, warn)
    task_data = build.data(recipe, tokenizer, warn)
    count = rows or spec.rows or DEFAULT_ROWS
    if count > len(task_data.train) and (rows or spec.rows):
        raise UsageError(
            f"{count} calibration rows, but the training set has {len(task_data.train)}. "
            f"Fix: use at most {len(task_data.train)}"
        )
    source = prune_source(recipe, [], warn)
    student, plan = prune_model(source, spec, sample_batches(task_data, tokenizer, count), recipe.student.overrides)
    s = recipe.student
    return {
        "model": s.config if s.gguf_file is None else f"{s.config} ({s.gguf_file})",
        "source_parameters": sum(p.numel() for p in source.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "source_sizes": {k: getattr(source.config, k, None) for k in plan.sizes},
        "rows": min(count, len(task_data.train)),
        **plan.to_dict(),
    }


def prune_table(doc: dict):
    """`prune_recipe`'s document as a rich table (what `kdcli prune` prints)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"{escape(doc['model'])}: {doc['source_parameters']:,} -> {doc['student_parameters']:,} parameters "
        f"({doc['rows']} rows, {doc['tokens']} tokens, {doc['seconds']} s)"
    )
    for column in ("what", "source", "student", "kept"):
        table.add_column(column)
    imp = doc["importance"]
    for key, size in doc["sizes"].items():
        table.add_row(key, str(doc["source_sizes"].get(key)), str(size), "")
    table.add_row("blocks", "", str(len(doc["layers"])), str(doc["layers"]))
    table.add_row("hidden importance kept", "", "", f"{imp['hidden_kept_share']:.1%}")
    for i, layer in enumerate(doc["layers"]):
        heads, mlp = imp["heads_kept_share"][i], imp["mlp_kept_share"][i]
        table.add_row(
            f"block {layer}",
            "",
            f"heads {doc['heads'][i]} (KV groups {doc['kv_groups'][i]})",
            f"head importance {heads:.1%}, MLP importance {mlp:.1%}",
        )
    return table
