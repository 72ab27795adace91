"""`kdcli plan`: what a run will need, from config files alone (torch-free).

    plan_recipe(path, world_size=1, parallel="ddp", device_memory=None) -> dict

reads the recipe (with check-recipe's rules), every model's config.json or GGUF header, and
estimates per device: parameters (`params.shape_of`, exact), weights, gradients, AdamW states,
activations and the KD logits (`memory`), FLOPs per optimizer step, and with a device memory
whether it fits and what to change. `parse_size("80GiB")` reads a memory size. docs/plan.md
gives the formulas and their measured error. Modules: `params` (counts), `configs` (config
dicts of references), `memory` (the arithmetic), `render` (the table).
"""

from __future__ import annotations

import re
from pathlib import Path

from kdcli.errors import UsageError
from kdcli.plan.configs import Configs, gguf_config
from kdcli.plan.generation import generation_plan
from kdcli.plan.memory import Setup, flops, kd_logit_bytes, memory, suggestions
from kdcli.plan.params import SUPPORTED, ModelShape, shape_of
from kdcli.tasks import CHUNK_SIZE

__all__ = [
    "SUPPORTED",
    "Configs",
    "ModelShape",
    "Setup",
    "flops",
    "gguf_config",
    "kd_logit_bytes",
    "memory",
    "parse_size",
    "plan_recipe",
    "shape_of",
    "suggestions",
]

PARALLEL = ("ddp", "fsdp")
MAX_SIZE = 2**60  # 1 EiB: the largest --device-memory read (1e400 is a typo, not a device)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of a size such as `80GiB`, `80 GB`, `512MiB` or `1e9` (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    size = float(match.group(1)) * _UNITS[unit] if match and unit in _UNITS else 0.0
    if not 1 <= size <= MAX_SIZE:  # 1e400 reads as inf, which has no int
        raise UsageError(
            f"--device-memory {text!r} is not a memory size. Fix: write a positive number with a unit, "
            "at most 1 EiB, e.g. 80GiB, 40GB or 512MiB"
        )
    return int(size)


def _precision(training) -> str:
    """The precision kdcli would run at on a GPU (`auto`: bf16), fp32 on cpu/mps."""
    if training.precision != "auto":
        return training.precision
    return "fp32" if training.device in ("cpu", "mps") else "bf16"


def _projection_parameters(distillation) -> int:
    if distillation is None:
        return 0
    return sum(m.proj.dim_S * m.proj.dim_T + m.proj.dim_T for m in distillation.intermediate_matches if m.proj)


def _match_counts(distillation) -> tuple[int, int]:
    """(teacher hidden layers kept, attention score pairs kept) by the intermediate matches."""
    if distillation is None:
        return 0, 0
    hidden: set[int] = set()
    attention = 0
    for m in distillation.intermediate_matches:
        layers = m.layer_T if isinstance(m.layer_T, list) else [m.layer_T]
        if m.feature == "attention":
            attention += len(layers)
        else:
            hidden.update(layers)
    return len(hidden), attention


def _num_labels(recipe, producers) -> int | None:
    if recipe.task == "causal-lm":
        return None
    from kdcli.recipe.resolve import Resolver

    labels = Resolver(producers).labels(recipe.data).labels
    return labels.num_labels if labels is not None else None


def plan_recipe(
    path: str | Path, *, world_size: int = 1, parallel: str = "ddp", device_memory: int | None = None
) -> dict:
    """The plan of the recipe at `path` as one JSON-ready document (`"ok": true`).

    Raises RecipeError (an invalid recipe) or UsageError (a bad option, an unreadable config,
    an architecture without a formula)."""
    if world_size < 1:
        raise UsageError(f"--world-size {world_size} is not a number of processes. Fix: pass 1 or more")
    if parallel not in PARALLEL:
        raise UsageError(f"--parallel {parallel!r} is not a strategy. Fix: use ddp or fsdp")
    from kdcli.recipe import find_producers, load_checked

    recipe = load_checked(path)
    producers = find_producers([Path(path)])
    configs = Configs(producers)
    labels = _num_labels(recipe, producers)
    teachers = []
    for i, t in enumerate(recipe.teachers):
        role = f"teacher {i + 1}" if len(recipe.teachers) > 1 else "teacher"
        teachers.append(
            (role, t.model, shape_of(configs.model(t.model, t.revision, t.gguf_file, role), recipe.task, labels, role))
        )
    student_ref = getattr(recipe.student, "model", None) or recipe.student.config
    student = shape_of(configs.student(recipe.student), recipe.task, labels, "student")
    dist = recipe.distillation
    hidden_layers, attention = _match_counts(dist)
    training = recipe.training
    setup = Setup(
        task=recipe.task,
        teachers=tuple(s for _, _, s in teachers),
        student=student,
        projection_parameters=_projection_parameters(dist),
        batch_size=training.batch_size,
        max_length=recipe.data.max_length,
        accumulation=training.gradient_accumulation_steps,
        chunk_size=dist.chunk_size if dist is not None else CHUNK_SIZE,
        precision=_precision(training),
        world_size=world_size,
        parallel=parallel,
        device="cpu" if training.device == "cpu" else "cuda",
        classes=labels or 2,
        teacher_hidden_layers=hidden_layers,
        attention_matches=attention,
    )
    by_strategy = {p: memory(Setup(**{**setup.__dict__, "parallel": p})) for p in PARALLEL}
    chosen = by_strategy[parallel]["total"]
    fits = None if device_memory is None else chosen <= device_memory
    return {
        "ok": True,
        "recipe": str(recipe.source),
        "task": recipe.task,
        "settings": {
            "world_size": world_size,
            "parallel": parallel,
            "batch_size_per_process": setup.batch_size,
            "max_length": setup.max_length,
            "gradient_accumulation_steps": setup.accumulation,
            "chunk_size": setup.chunk_size if recipe.task == "causal-lm" else None,
            "precision": setup.precision,
            "activation_bytes": setup.act_bytes,
            "device": setup.device,
            "attention": "sdpa, math kernel with dropout (L x L kept)"
            if setup.device == "cpu"
            else "sdpa, fused kernels (no L x L kept)",
        },
        "models": [{"role": role, "ref": ref, **s.to_dict()} for role, ref, s in teachers]
        + [{"role": "student", "ref": student_ref, **student.to_dict()}],
        "projection_parameters": setup.projection_parameters,
        "trainable_parameters": setup.trainable,
        "memory_per_device": by_strategy,
        "kd_logits": kd_logit_bytes(setup),
        "flops_per_step": flops(setup),
        "device_memory": device_memory,
        "fits": fits,
        "suggestions": suggestions(setup, device_memory) if fits is False else [],
        "teacher_cache_bytes": _teacher_cache_bytes(recipe, teachers, labels),
        "generation": generation_plan(
            dist.on_policy if dist is not None else None,
            student,
            teachers[0][2] if teachers else None,
            batch_size=setup.batch_size,
            accumulation=setup.accumulation,
            max_length=setup.max_length,
            act_bytes=setup.act_bytes,
            world_size=world_size,
        ),
    }


def _teacher_cache_bytes(recipe, teachers, labels: int | None) -> int | None:
    """`distillation.teacher_cache`'s size on disk at most (check-recipe's rule: rows x bytes per
    row, tokens taken as max_length); None without a cache or when the row count is unknown."""
    from types import SimpleNamespace

    from kdcli.recipe.cache_rules import count_rows, row_bytes

    dist = recipe.distillation
    if dist is None or dist.teacher_cache is None or not teachers:
        return None
    first = teachers[0][2]
    facts = SimpleNamespace(num_labels=labels or 2, hidden_size=first.hidden, num_attention_heads=first.heads)
    per_row, _ = row_bytes(recipe, facts, len(teachers))
    rows = count_rows(recipe)
    return None if per_row is None or rows is None else per_row * rows
