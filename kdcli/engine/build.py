"""One builder per thing a run needs, as the recipe names it: the process group, the seed and
devices, the tokenizer, the data, the teachers, the objective and the feature captures.

`kdcli distill`/`train` (engine/setup.py), `kdcli cache-teacher` (engine/cache_fill.py),
`kdcli rank-blocks` (compress/rank_blocks.py) and `kdcli prune` (compress/prune_report.py) call
these; no other module loads a tokenizer, prepares a dataset or hooks a capture by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from kdcli import data as kdata
from kdcli import models as kmodels
from kdcli.engine.devices import Processes, resolve_device, resolve_precision, seed_everything
from kdcli.engine.recipe_facts import Mode
from kdcli.engine.recipe_models import load_teachers, tokenizer_ref
from kdcli.features import FeatureCapture
from kdcli.objective import Objective

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kdcli.tasks.base import Task


@contextmanager
def process_group(procs: Processes, device_name: str) -> Iterator[None]:
    """torch.distributed under torchrun: NCCL when the run is on GPUs (each rank's GPU set
    first), else gloo; torn down on the way out (only when this call started it; after a
    barrier when the body ended normally)."""
    started = False
    if procs.distributed and not torch.distributed.is_initialized():
        on_gpu = device_name.startswith(("cuda", "auto")) and torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(procs.local_rank)  # before NCCL initialises
        torch.distributed.init_process_group(backend="nccl" if on_gpu else "gloo")
        started = True
    try:
        yield
    except BaseException:
        if started:
            torch.distributed.destroy_process_group()
        raise
    if started:
        # every rank is done before any tears down: a gloo peer whose socket closes while it
        # still reads aborts (SIGABRT, "Connection reset by peer")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def devices(training, procs: Processes, device_name: str | None, seed: int | None) -> tuple[int, torch.device, str]:
    """(seed, device, precision): `--seed` over training.seed (every RNG seeded with it),
    `--device` over training.device, training.precision resolved for that device."""
    run_seed = training.seed if seed is None else seed
    seed_everything(run_seed)
    device = resolve_device(device_name or training.device, procs)
    return run_seed, device, resolve_precision(training.precision, device)


def tokenizer(recipe, warn: Callable[[str], None] | None = None):
    """(tokenizer, reference): the recipe's tokenizer, else its first teacher's, else the
    student's (a GGUF model's is the one inside its file)."""
    ref, revision, trust, gguf = tokenizer_ref(recipe)
    return kmodels.load_tokenizer(ref, revision=revision, trust_remote_code=trust, warn=warn, gguf_file=gguf), ref


def data(recipe, tok, warn: Callable[[str], None], procs: Processes | None = None) -> kdata.TaskData:
    """The recipe's tokenised data (rank 0 tokenises first, the others read datasets' cache),
    datasets' own progress bars off; rows left with no target token are announced."""
    if procs is not None and not procs.is_main:
        procs.barrier()
    task_data = _quietly(kdata.prepare_from_recipe, recipe, tok)
    if procs is not None and procs.is_main:
        procs.barrier()
    for split, count in task_data.dropped.items():
        if count:
            warn(
                f"warning: dropped {count} {split} row{'s' * (count != 1)} with no target token left "
                f"(empty, or cut away by data.max_length {recipe.data.max_length})"
            )
    return task_data


def teachers(recipe, labels: kdata.Labels | None, warn: Callable[[str], None]) -> list[nn.Module]:
    """The recipe's teachers, eval mode and frozen, for its task and labels."""
    return load_teachers(recipe, labels, warn)


def objective(recipe, mode: Mode, task: Task, student: nn.Module | None, teachers: Sequence[nn.Module]) -> Objective:
    """The run's objective (None config for `train`) around the task's KD term, built here once
    (`Task.kd_term`: from the recipe, and the loaded models when there are a student and a
    teacher); its size rules checked against the models' hidden sizes."""
    distillation = recipe.distillation if mode == "distill" else None
    models = (student, *teachers) if student is not None and teachers else ()
    return Objective(
        distillation,
        hidden_S=kmodels.model_dims(_hf(student)).hidden_size if student is not None else None,
        hidden_T=kmodels.model_dims(_hf(teachers[0])).hidden_size if teachers and student is not None else None,
        kd_term=task.kd_term(distillation, models),
    )


def _hf(model: nn.Module) -> PreTrainedModel:
    """The run's models are Hugging Face models (`kdcli.models.load_model`), held as nn.Module."""
    return cast("PreTrainedModel", model)


def captures(
    task: Task, objective: Objective, teachers: Sequence[nn.Module], student: nn.Module | None = None
) -> tuple[FeatureCapture | None, list[FeatureCapture]]:
    """(student's capture or None, teachers' captures): exactly the layers the objective's
    matches read (the first teacher's), read out as the task's models are (`Task.readout`)."""
    capture_S = None
    if student is not None:
        capture_S = FeatureCapture(
            student,
            objective.hidden_layers("S"),
            objective.attention_layers("S"),
            role="student",
            readout=task.readout,
        )
    captures_T = [
        FeatureCapture(
            t,
            objective.hidden_layers("T") if i == 0 else (),
            objective.attention_layers("T") if i == 0 else (),
            role=f"teacher {i + 1}" if len(teachers) > 1 else "teacher",
            readout=task.readout,
        )
        for i, t in enumerate(teachers)
    ]
    return capture_S, captures_T


def _quietly(fn, *args):
    """Call `fn` with datasets' own progress bars off (kdcli shows its own progress)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return fn(*args)
    finally:
        if bars:
            datasets.enable_progress_bars()
