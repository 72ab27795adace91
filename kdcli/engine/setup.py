"""Everything a run builds before its first step, in order, returned as one `RunState`:
seed, device, precision, tokenizer, data, models, objective, feature captures, the logit
cache, the optimizer and schedule, and the position a resumed run continues from."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedTokenizerBase

from kdcli import data as kdata
from kdcli import models as kmodels
from kdcli.compress.blocks import sample_batches
from kdcli.engine import build, resume_objective
from kdcli.engine.devices import Processes
from kdcli.engine.optim import (
    follow_learning_rates,
    make_optimizer,
    make_scheduler,
    param_groups,
)
from kdcli.engine.recipe_facts import Mode, resume_command
from kdcli.engine.recipe_models import load_models
from kdcli.engine.teachers import StudentStep, TeacherLogitCache
from kdcli.run_files import checkpoint as ckpt
from kdcli.run_files import outdir, run_log

if TYPE_CHECKING:  # pragma: no cover
    from kdcli.compress.prune import PrunePlan
    from kdcli.engine.generate import OnPolicy
    from kdcli.engine.teacher_cache import TeacherDiskCache
from kdcli.compress.block_ranking import BlockRanking
from kdcli.errors import RunError, UsageError, first_line
from kdcli.features import FeatureCapture
from kdcli.objective import Objective
from kdcli.recipe.prune_schema import DEFAULT_ROWS
from kdcli.recipe.schema import Recipe
from kdcli.tasks import task_for
from kdcli.tasks.base import LogitCacheRows, Task


class Console:
    """Lines on stderr from rank 0: progress and log lines (not under --quiet) and warnings
    (always; they are kept for the summary). Above the progress bar once it runs."""

    def __init__(self, main: bool, quiet: bool) -> None:
        self.main, self.quiet = main, quiet
        self.warnings: list[str] = []
        self.progress: run_log.Progress | None = None

    def say(self, text: str, *, even_if_quiet: bool = False) -> None:
        if self.main and (even_if_quiet or not self.quiet):
            if self.progress is not None:
                self.progress.message(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """A warning: on stderr even under --quiet (which silences progress and log lines,
        not what the user must know, such as code that trust_remote_code will run)."""
        self.warnings.append(text)
        self.say(text, even_if_quiet=True)


#: The fields of `RunState` that change after `setup()` returns, each with the one module that
#: writes it (`run.<field> = ...`); every other field is built once, in `setup()` (through
#: engine/build.py), and only read. tests/test_layout.py pins both.
ADVANCED_BY: dict[str, str] = {
    "position": "distill",  # the loop's step, epoch and batch (resume sets it there too)
    "samples_this_session": "engine.step",
    "tokens_this_session": "engine.step",
    "metrics": "engine.run_outputs",  # opened by rank 0's first write
    "tb": "engine.run_outputs",
    "last_log": "engine.run_outputs",
    "last_eval": "engine.run_outputs",
    "teacher_eval": "engine.run_outputs",
    "last_saved": "engine.run_outputs",
}


@dataclass
class RunState:
    """One run's pieces and where it stands. Built once in `setup()`: everything but the
    fields of `ADVANCED_BY`, which the loop advances, each from one module."""

    recipe: Recipe
    mode: Mode
    procs: Processes
    folder: outdir.RunFolder
    console: Console
    seed: int
    device: torch.device
    precision: str
    tokenizer: PreTrainedTokenizerBase
    tokenizer_ref: str
    task: Task
    data: kdata.TaskData
    collator: kdata.Collator
    teachers: list[nn.Module]
    student: nn.Module
    objective: Objective
    capture_S: FeatureCapture
    captures_T: list[FeatureCapture]
    cache: TeacherLogitCache | TeacherDiskCache | None  # is_caching_logits, or teacher_cache on disk
    step_module: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    total_steps: int
    command: str
    position: ckpt.Position
    resume_from: Path | None
    last_saved: Path | None = None
    last_log: dict | None = None
    last_eval: dict | None = None
    teacher_eval: dict | None = None
    metrics: run_log.MetricsLog | None = None
    tb: run_log.TensorBoard | None = None
    samples_this_session: int = 0
    tokens_this_session: int = 0
    #: how `student.init_from_teacher` chose the blocks, when it measured them
    block_ranking: BlockRanking | None = None
    #: what `student.prune` kept (a `kdcli.compress.prune.PrunePlan`), when it pruned
    student_prune: PrunePlan | None = None
    #: FSDP2 (training.parallel "fsdp" under torchrun): sharded models, DCP checkpoints
    sharded: bool = False
    #: distillation.on_policy (kdcli.engine.generate.OnPolicy)
    on_policy: OnPolicy | None = None

    @property
    def autocast_precision(self) -> str:
        """The autocast the forward runs under: none under FSDP2 (its policy casts parameters)."""
        return "fp32" if self.sharded else self.precision

    closers: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.folder.path

    @property
    def main(self) -> bool:
        return self.procs.is_main

    @property
    def training(self):
        return self.recipe.training

    @property
    def train_set(self):
        return self.data.train

    @property
    def eval_set(self):
        return self.data.eval


def _measure_rows(recipe, train_rows: int) -> int | None:
    """The rows `init_from_teacher` or `student.prune` measure on (None: nothing is measured);
    more prune rows than the training set has is a UsageError before any model loads."""
    measure = getattr(recipe.student, "init_measure", None)
    prune = getattr(recipe.student, "prune", None)
    if prune is not None and prune.rows is not None and prune.rows > train_rows:
        raise UsageError(
            f"student.prune.rows {prune.rows} is more than the {train_rows} training rows. "
            f"Fix: use rows <= {train_rows}, or more training data"
        )
    if prune is not None:
        return prune.rows or DEFAULT_ROWS
    return measure.rows if measure is not None else None


def setup(
    folder: outdir.RunFolder, recipe, mode: Mode, procs: Processes, *, max_steps, device_name, seed, quiet
) -> RunState:
    training, main = recipe.training, procs.is_main
    console = Console(main, quiet)
    if main and not folder.locked:
        console.warn(
            f"warning: cannot lock {folder.path} (its file system has no file locks); make sure no other run writes there"
        )
    resume_objective.check_resume(folder.latest, recipe)  # before anything loads
    run_seed, device, precision = build.devices(training, procs, device_name, seed)
    tokenizer, ref = build.tokenizer(recipe, console.warn)
    task_data = build.data(recipe, tokenizer, console.warn, procs)

    # models, objective, captures
    task = task_for(recipe.task)
    rows = _measure_rows(recipe, len(task_data.train))
    recipe_prunes = getattr(recipe.student, "prune", None) is not None
    teachers, student, ranking = load_models(
        recipe,
        mode,
        task_data.labels,
        console.warn,
        sample_batches(task_data, tokenizer, rows) if rows is not None else None,
        console.say,
    )
    kmodels.check_vocabularies(  # every model reads the tokenizer's ids as its own tokens
        tokenizer,
        ref,
        [("teacher", t.model, m) for t, m in zip(recipe.teachers, teachers)]
        + [("student", getattr(recipe.student, "model", None), student)],
    )
    objective = build.objective(recipe, mode, task, student, teachers)
    teachers = [t.to(device) for t in teachers]
    student.to(device).train()
    objective.to(device)
    capture_S, captures_T = build.captures(task, objective, teachers, student)
    assert capture_S is not None
    cache = _logit_cache(recipe, mode, objective, task, console)
    if mode == "distill" and recipe.distillation.teacher_cache is not None:
        cache = _disk_cache(
            recipe, task, objective, task_data, teachers, ref, precision, device, procs, folder, console
        )
    step_module: nn.Module = StudentStep(student, objective, capture_S)
    sharded = procs.distributed and training.parallel == "fsdp"
    if sharded:  # FSDP2: student and teachers sharded per block (kdcli.engine.fsdp)
        from kdcli.engine import fsdp

        step_module = fsdp.ShardedStudentStep(step_module)
        captures_T = fsdp.shard(step_module, student, captures_T, device, procs.world_size, precision)
    elif procs.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
        )
    # different dropout masks per rank, the same model everywhere (DDP broadcast rank 0's)
    torch.manual_seed(run_seed + procs.rank)

    # steps, optimizer, learning rate
    bs, accum = training.batch_size, training.gradient_accumulation_steps
    batches_per_epoch = len(
        kdata.train_batches(task_data.train_lengths, bs, run_seed, 0, False, procs.rank, procs.world_size)
    )
    total_steps = max_steps or training.num_steps or training.num_epochs * math.ceil(batches_per_epoch / accum)
    optimizer = make_optimizer(param_groups(student, objective, training.weight_decay), training)
    run = RunState(
        recipe=recipe,
        mode=mode,
        procs=procs,
        folder=folder,
        console=console,
        seed=run_seed,
        device=device,
        precision=precision,
        tokenizer=tokenizer,
        tokenizer_ref=ref,
        task=task,
        data=task_data,
        collator=kdata.Collator.for_tokenizer(tokenizer),
        teachers=teachers,
        student=student,
        objective=objective,
        capture_S=capture_S,
        captures_T=captures_T,
        cache=cache,
        step_module=step_module,
        trainable=[p for p in step_module.parameters() if p.requires_grad],
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, total_steps, math.ceil(training.warmup_ratio * total_steps)),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        total_steps=total_steps,
        command=resume_command(mode, recipe, folder.path, procs, max_steps=max_steps, device=device_name, seed=seed),
        position=ckpt.Position(step=0, epoch=0, batch_in_epoch=0, samples_seen=0),
        resume_from=folder.latest,
        last_saved=folder.latest,
        closers=[capture_S, *captures_T, *([cache] if hasattr(cache, "close") else [])],
        block_ranking=None if recipe_prunes else ranking,
        student_prune=ranking if recipe_prunes else None,
        sharded=sharded,
        on_policy=_on_policy(recipe, mode, tokenizer, run_seed, procs, sharded, cache, console),
    )
    return run


def _on_policy(recipe, mode: Mode, tokenizer, seed: int, procs: Processes, sharded: bool, cache, console: Console):
    """distillation.on_policy's generation (shares 0: its eval figures only; `UsageError` before
    step 1 for a tokenizer with no end marker or generation prompt)."""
    config = recipe.distillation.on_policy if mode == "distill" else None
    if config is None:
        return None
    from kdcli.engine.generate import OnPolicy

    if cache is not None and config.generates:
        console.say(
            "on_policy: the teacher cache serves the dataset's share of rows only; generated rows run the teacher"
        )
    data = recipe.data
    return OnPolicy(config, tokenizer, data.row_format, data.max_length, seed, procs, sharded)


def _logit_cache(recipe, mode: Mode, objective: Objective, task: Task, console: Console) -> TeacherLogitCache | None:
    """The teacher-logit cache when the recipe asks for it. A recipe file cannot ask for it
    together with intermediate matches (`load_recipe` refuses that); a Recipe built in code
    that does runs without the cache, with a warning."""
    if mode != "distill" or not recipe.distillation.is_caching_logits:
        return None
    if objective.matches:
        console.warn(
            "warning: is_caching_logits is off for this run: the intermediate matches need the "
            "teacher's features on every step, so caching its logits would save nothing"
        )
        return None
    # is_caching_logits is refused for causal-lm (recipe rules): an encoder task keeps the rows
    return TeacherLogitCache(cast(LogitCacheRows, task))


def _disk_cache(recipe, task, objective, task_data, teachers, ref, precision, device, procs, folder, console):
    """`distillation.teacher_cache`: the teachers' outputs on disk (kdcli.engine.teacher_cache)."""
    from kdcli.engine.cache_fill import open_for_run

    return open_for_run(
        recipe,
        task,
        objective,
        task_data.train,
        teachers,
        ref,
        precision,
        device,
        procs,
        folder.path,
        console.say,
        console.warn,
    )


def resume_position(run: RunState) -> ckpt.Position:
    """Load the latest checkpoint into the run's models, optimizer, schedule, scaler and RNGs and
    return where it stood (the loop, `distill.run`, sets `run.position`: its one writer). With
    another learning rate than the checkpoint's run, the schedule continues at the new one."""
    resume_from, procs = run.resume_from, run.procs
    assert resume_from is not None  # called only when resuming
    recipe_lrs = list(run.scheduler.base_lrs)  # this recipe's rates, before the checkpoint's
    try:
        state = ckpt.load_checkpoint(resume_from, map_location=run.device)
    except Exception as exc:  # unpickling refused (weights_only), truncated file, ...
        raise RunError(
            f"cannot read the checkpoint {resume_from} ({type(exc).__name__}: {first_line(exc)}). "
            "Fix: delete that folder to resume from the one before, or start again with --overwrite"
        ) from None
    try:
        if state.sharded:
            if not run.sharded:
                raise ValueError(
                    "it holds sharded (fsdp) state; resume under torchrun with the same parallel and world size"
                )
            from kdcli.engine import fsdp

            fsdp.load_shards(run.step_module, run.optimizer, resume_from)
        else:
            if run.sharded:
                raise ValueError("it holds unsharded (ddp) state; resume with training.parallel ddp")
            run.student.load_state_dict(state.student)
            run.objective.load_state_dict(state.objective)
            run.optimizer.load_state_dict(state.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            run.scaler.load_state_dict(state.scaler)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UsageError(
            f"the checkpoint {resume_from} does not fit this recipe's models or matches "
            f"({first_line(exc)}). Fix: resume with the recipe that started the run, or pass "
            "--overwrite to start again"
        ) from None
    if list(run.scheduler.base_lrs) != recipe_lrs:
        run.console.warn(
            f"warning: resuming with learning_rate {recipe_lrs[0]:g} (the checkpoint's run used "
            f"{run.scheduler.base_lrs[0]:g}): the schedule continues from step {state.position.step} at the new rate"
        )
        follow_learning_rates(run.optimizer, run.scheduler, recipe_lrs)
    ranks = state.rng.get("ranks", [state.rng])
    if len(ranks) == procs.world_size:
        ckpt.restore_rng(to_cpu(ranks[procs.rank]))
    else:
        run.console.warn(
            f"warning: the checkpoint was written by {len(ranks)} process(es), this run has {procs.world_size}; the data order is kept, dropout draws differ"
        )
    run.console.say(f"resuming from {resume_from} (step {state.position.step} of {run.total_steps})")
    return state.position


def to_cpu(state):
    """RNG states with every tensor on the CPU (for gathering and for torch.set_rng_state)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
