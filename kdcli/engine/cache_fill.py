"""Opening a run's `distillation.teacher_cache` (its key from the run's inputs) and filling it
ahead of training (`kdcli cache-teacher`).

The cache folder is `teacher_cache.dir` (default `<output folder>/teacher-cache`, which the
output-folder rules treat as kdcli's own: it neither makes the folder "not empty" nor is it
cleared by --overwrite) plus the first 16 hex digits of the key.

`cache-teacher` loads the tokenizer, the data and the teachers only (no student), runs the
teachers over every training row not yet cached (rows in length order, `training.batch_size`
at a time; under torchrun each rank takes every world_size-th batch) and stores them: a later
`kdcli distill` of the same recipe skips the teacher's forward from its first step. Rows
already cached are checked as a run reads them, and damaged ones computed again (`replaced`).
It takes its rank's cache files for writing before any work, and refuses (naming the PID)
when another process writes them: it would compute every row and keep none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdcli.engine.cache_key import files_digest, model_folder, rows_digest, state_digest
from kdcli.engine.teacher_cache import DEFAULT_DIR, TeacherDiskCache, open_cache

#: tokenizer files hashed into the key (those a folder has)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def cache_root(recipe, out: str | Path) -> Path:
    config = recipe.distillation.teacher_cache
    return Path(config.dir) if config.dir else Path(out) / DEFAULT_DIR


def key_parts(recipe, objective, row_format, train_set, teachers, tokenizer_ref: str, precision: str, device) -> dict:
    """What the cached outputs depend on (see `kdcli.engine.cache_key`); `row_format`: what a row
    holds (the task's `cache_rows`: its hashed columns and its own parts)."""
    config = recipe.distillation.teacher_cache
    weights = []
    for ref, model in zip(recipe.teachers, teachers):
        folder = model_folder(ref.model, ref.revision)
        if folder is not None:
            weights.append(files_digest(folder, [ref.gguf_file] if ref.gguf_file else None))
        else:
            weights.append({"state": state_digest(model)})
    folder = model_folder(tokenizer_ref)
    tokenizer = files_digest(folder, TOKENIZER_FILES) if folder is not None else tokenizer_ref
    columns = list(row_format.key_columns)
    parts = {
        "task": recipe.task,
        "teachers": weights,
        "tokenizer": tokenizer,
        "rows": rows_digest(train_set, columns),
        "max_length": recipe.data.max_length,
        "hidden_layers": objective.hidden_layers("T"),
        "attention_layers": objective.attention_layers("T"),
        "dtype": config.dtype,
        "precision": precision,
        "device": torch.device(device).type,
    }
    parts.update(row_format.key_parts())
    return parts


def open_for_run(
    recipe, task, objective, train_set, teachers, tokenizer_ref, precision, device, procs, out, say: Callable, warn=None
) -> TeacherDiskCache:
    """The run's cache, its rows as `task` keeps them; under FSDP2 (sharded teachers) the ranks
    agree on each batch's lookup. `warn`: warnings (damaged rows, another cache's files); default `say`."""
    config = recipe.distillation.teacher_cache
    row_format = task.cache_rows(recipe.distillation)
    parts = key_parts(recipe, objective, row_format, train_set, teachers, tokenizer_ref, precision, device)
    return open_cache(
        cache_root(recipe, out),
        parts,
        procs.rank,
        say,
        warn,
        vocab=_vocab(teachers),
        dtype=config.dtype,
        row_format=row_format,
        collective=procs.distributed and getattr(recipe.training, "parallel", "ddp") == "fsdp",
    )


def _vocab(teachers) -> int | None:
    """The teachers' output vocabulary (the rows a cached token id may name), when known
    (checked only where rows keep token ids)."""
    sizes = []
    for model in teachers:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not hasattr(head, "weight"):
            return None
        sizes.append(int(head.weight.shape[0]))
    return min(sizes) if sizes else None


def run_command(recipe_path, output_dir, say: Callable[[str], None], device: str | None = None) -> dict | None:
    """`kdcli cache-teacher`: the recipe checked, the cache filled; the summary (None off rank 0)."""
    from kdcli.engine.devices import is_main_process
    from kdcli.errors import UsageError
    from kdcli.recipe import is_device, load_checked

    if device is not None and not is_device(device):
        raise UsageError(f"--device {device!r} is not a device. Fix: use auto, cpu, cuda, cuda:N or mps")
    main = is_main_process()
    doc = fill(
        load_checked(recipe_path, mode="distill"), output_dir=output_dir, device_name=device, say=say if main else None
    )
    if not main:
        return None
    replaced = f", {doc['replaced']} damaged rows replaced" if doc["replaced"] else ""
    doc["line"] = (
        f"teacher cache {doc['cache']}: {doc['rows']} of {doc['train_rows']} rows cached "
        f"({doc['filled']} computed now{replaced}, {doc['bytes']:,} bytes on disk, {doc['seconds']:.1f} s)"
    )
    return doc


def fill(recipe, *, output_dir=None, device_name: str | None = None, say: Callable[[str], None] | None = None) -> dict:
    """`kdcli cache-teacher`: every training row's teacher outputs into the recipe's cache."""
    from kdcli import data as kdata
    from kdcli.engine import build
    from kdcli.engine.devices import Processes
    from kdcli.errors import UsageError
    from kdcli.tasks import task_for

    if recipe.distillation is None or recipe.distillation.teacher_cache is None or not recipe.teachers:
        raise UsageError(
            "`kdcli cache-teacher` needs a distill recipe with distillation.teacher_cache. "
            'Fix: add "teacher_cache": {} to the recipe\'s distillation section'
        )
    start = time.perf_counter()
    say = say or (lambda text: None)
    procs = Processes.from_env()
    training = recipe.training
    with build.process_group(procs, device_name or training.device):
        _, device, precision = build.devices(training, procs, device_name, None)
        tokenizer, ref = build.tokenizer(recipe, say)
        task_data = build.data(recipe, tokenizer, say, procs)
        teachers = [t.to(device) for t in build.teachers(recipe, task_data.labels, say)]
        task = task_for(recipe.task)
        objective = build.objective(recipe, "distill", task, None, teachers)
        _, captures = build.captures(task, objective, teachers)
        out = output_dir or training.output_dir
        cache = open_for_run(
            recipe, task, objective, task_data.train, teachers, ref, precision, device, procs, out, say
        )
        try:
            _claim(cache)
            before = len(cache)
            written, replaced = _fill_rows(
                cache, captures, task_data, kdata.Collator.for_tokenizer(tokenizer), training, procs, device, precision
            )
            procs.barrier()
            cache.rows.refresh()
            rows = len(cache)
        finally:
            cache.close()
            for c in captures:
                c.close()
        size = sum(p.stat().st_size for p in cache.folder.glob("rank*.data"))
        return {
            "cache": str(cache.folder),
            "rows": rows,
            "train_rows": len(task_data.train),
            "already_cached": before - replaced,
            "filled": written - replaced,
            "replaced": replaced,
            "bytes": size,
            "seconds": round(time.perf_counter() - start, 3),
        }


def _claim(cache: TeacherDiskCache) -> None:
    """Take this rank's cache files for writing, or refuse: filling a cache that another
    process writes would compute every row and keep none."""
    from kdcli.errors import UsageError

    why = cache.rows.claim()
    if cache.rows.holder is not None:
        who = f"PID {cache.rows.holder}" if cache.rows.holder else "PID unknown"
        raise UsageError(
            f"teacher cache {cache.folder} is being written by another kdcli process ({who}, a `distill` or "
            "`cache-teacher` of the same recipe). Fix: wait for it to finish (or stop it), then run cache-teacher again"
        )
    if why is not None:
        raise UsageError(
            f"cannot fill the teacher cache {cache.folder}: {why}. Fix: make the folder writable, or set "
            "distillation.teacher_cache.dir to a writable folder"
        )


def _fill_rows(cache, captures, task_data, collator, training, procs, device, precision) -> tuple[int, int]:
    """Run the teachers over this rank's share of the batches (length order) whose rows are not
    all cached and sound; returns (rows written, rows of them that replaced damaged ones),
    summed over the ranks."""
    from kdcli.engine.devices import autocast

    lengths = task_data.train_lengths
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + training.batch_size] for i in range(0, len(order), training.batch_size)]
    written = 0
    for n, indices in enumerate(batches):
        if n % procs.world_size != procs.rank:
            continue
        batch = collator.batch(task_data.train, indices)
        if cache.verify(indices, batch):
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            feats = [c.run_teacher(batch) for c in captures]
        written += cache.store(indices, feats, batch)
    counts = torch.tensor([written, len(cache.damaged)])
    if procs.distributed:
        gloo = torch.distributed.get_backend() == "gloo"
        counts = counts.to("cpu" if gloo else device)
        torch.distributed.all_reduce(counts)
    return int(counts[0]), int(counts[1])
