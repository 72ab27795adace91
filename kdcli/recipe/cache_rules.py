"""check-recipe's rules on `distillation.teacher_cache`: how large the cache will be (a note,
from the models' configs and the training file's row count), the causal-lm top_k it needs,
(the in-memory cache asked for at the same time: `rules.distillation_findings`)."""

from __future__ import annotations

import os

from kdcli import registry
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.messages import JsonPath, show
from kdcli.recipe.resolve import Models, teacher_path
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe

#: bytes per stored value of each teacher_cache.dtype
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
#: a causal-lm cache entry per target token: top_k ids (int32) and values, plus the tail (float32)
ID_BYTES = TAIL_BYTES = 4
_AT: JsonPath = ("distillation", "teacher_cache")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def count_rows(recipe: Recipe) -> int | None:
    """The training rows of a local csv/tsv/jsonl (lines) or parquet (metadata) file, at most
    data.max_train_samples; None when unknown (a hub dataset, a json array, unreadable)."""
    source = recipe.data.train
    path, fmt = source.path, source.format
    if not os.path.isfile(path):
        return None
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
        elif fmt in ("csv", "tsv", "jsonl"):
            with open(path, "rb") as f:
                data = f.read()
            rows = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
            rows -= 1 if fmt in ("csv", "tsv") else 0  # the header
            if fmt == "jsonl":
                rows = sum(1 for line in data.splitlines() if line.strip())
        else:
            return None
    except (OSError, ImportError, ValueError):
        return None
    limit = recipe.data.max_train_samples
    return min(rows, limit) if limit else max(rows, 0)


def row_bytes(recipe: Recipe, teacher, n_teachers: int) -> tuple[int | None, str]:
    """(bytes per training row at most, how they add up) from the first teacher's config facts;
    tokens are taken as max_length (the most a row has)."""
    config = recipe.distillation.teacher_cache
    size, tokens = DTYPE_BYTES[config.dtype], recipe.data.max_length
    parts, total = [], 0
    if recipe.task == "causal-lm":
        per_target = config.top_k * (ID_BYTES + size) + TAIL_BYTES
        total += tokens * per_target
        parts.append(f"{tokens} targets x {per_target} B (top_k {config.top_k} x ({ID_BYTES} + {size}) + {TAIL_BYTES})")
    else:
        classes = teacher.num_labels if teacher is not None else None
        if classes is None:
            return None, "the teacher's number of classes is unknown"
        per = classes * size * (tokens if recipe.task == "token-classification" else 1) * n_teachers
        total += per
        parts.append(f"logits {per} B")
    matches = recipe.distillation.intermediate_matches
    hidden = {x for m in matches if m.feature == "hidden" for x in _layers(m.layer_T)}
    attention = {x for m in matches if m.feature == "attention" for x in _layers(m.layer_T)}
    if hidden:
        if teacher is None or teacher.hidden_size is None:
            return None, "the teacher's hidden size is unknown"
        per = len(hidden) * tokens * teacher.hidden_size * size
        total += per
        parts.append(f"{len(hidden)} hidden layer(s) x {tokens} tokens x {teacher.hidden_size} = {per} B")
    if attention:
        if teacher is None or teacher.num_attention_heads is None:
            return None, "the teacher's head count is unknown"
        per = len(attention) * teacher.num_attention_heads * tokens * tokens * size
        total += per
        parts.append(
            f"{len(attention)} attention layer(s) x {teacher.num_attention_heads} heads x {tokens}^2 = {per} B"
        )
    return total, " + ".join(parts)


def _layers(layer) -> list[int]:
    return list(layer) if isinstance(layer, list) else [layer]


def cache_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    config = recipe.distillation.teacher_cache if recipe.distillation is not None else None
    if config is None or "distillation" not in loaded.sections:
        return []
    out: list[Finding] = []
    # nothing is read from (nor shown of) a model or data file outside the recipe's repository
    teacher = models.teachers[0].facts if models.teachers else None
    if teacher is not None and loaded.outside(teacher_path(recipe, 0) + ("model",), recipe.teachers[0].model):
        teacher = None
    inside = "data" in loaded.sections and not loaded.outside(loaded.data_path("train"), recipe.data.train.path)
    rows = count_rows(recipe) if inside else None
    if recipe.task == "causal-lm":
        out.extend(_top_k_findings(recipe, teacher, rows))
    if "data" not in loaded.sections:
        return out
    per_row, how = row_bytes(recipe, teacher, len(recipe.teachers))
    if per_row is None:
        note = f"{_where()}: size not estimated ({how})"
    elif rows is None:
        note = f"{_where()}: at most {format_bytes(per_row)} per training row ({how}); the row count is unknown"
    else:
        note = f"{_where()}: at most {format_bytes(rows * per_row)} on disk ({rows} rows x {per_row} B: {how})"
    loaded.notes.append(note)
    return out


def _where() -> str:
    return "distillation.teacher_cache"


def _top_k_findings(recipe: Recipe, teacher, rows: int | None) -> list[Finding]:
    """causal-lm: the KD loss reads the teacher's top-k (kd_loss_options.top_k, equal to the
    cache's); full-vocabulary caching is refused, with its size."""
    config, distillation = recipe.distillation.teacher_cache, recipe.distillation
    spec = registry.get_loss(distillation.kd_loss_type)
    at_options: JsonPath = ("distillation", "kd_loss_options")
    if spec.option("top_k") is None:
        return [
            Finding(
                ("distillation", "kd_loss_type"),
                f"teacher_cache keeps the teacher's top {config.top_k} tokens per target token, but {spec.name} reads the full vocabulary",
                "use a divergence with top_k (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd), or remove teacher_cache",
            )
        ]
    top_k = distillation.kd_loss_options.get("top_k")
    if top_k is None:
        vocab = teacher.vocab_size if teacher is not None else None
        size = DTYPE_BYTES[config.dtype]
        per_token = f"{vocab * size} B" if vocab else f"V x {size} B"
        total = (
            f" = {format_bytes(vocab * size * recipe.data.max_length * rows)} for {rows} rows of up to "
            f"{recipe.data.max_length} targets"
            if vocab and rows
            else ""
        )
        return [
            Finding(
                at_options,
                f"teacher_cache on causal-lm keeps the teacher's top-k tokens; full-vocabulary logits would take {per_token} per target token{total}",
                f'set "top_k": {config.top_k} in kd_loss_options (the teacher_cache\'s top_k)',
            )
        ]
    if top_k != config.top_k:
        return [
            Finding(
                at_options + ("top_k",),
                f"kd_loss_options.top_k is {show(top_k)} but teacher_cache.top_k is {config.top_k}: the cache keeps the teacher's top {config.top_k} tokens",
                f'set both to the same value, e.g. "top_k": {config.top_k}',
            )
        ]
    return []
