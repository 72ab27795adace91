"""The loop: `kdcli distill` and `kdcli train`, on one device or under torchrun.

`run()` reads top to bottom, nanoGPT-style; the pieces live in `kdcli.engine`:

    setup     processes, output folder, seed, device, precision, tokenizer, data, models,
              objective, optimizer (AdamW; no decay on biases/LayerNorm; projections in their
              own groups), linear warm-up then decay, GradScaler, resume   (engine.setup)
    loop      per optimizer step: for each micro-batch (gradient accumulation) the teachers
              (eval, inference_mode, or the logit cache), the student + objective, backward;
              then the non-finite / Ctrl-C checks, clipping (student + projections), the
              optimizer and scheduler step (engine.step); log, evaluate and checkpoint every
              N steps (engine.run_outputs)
    finish    final evaluation, checkpoint, the student (save_pretrained + tokenizer),
              projections.safetensors, summary.json

Output folder (`kdcli.run_files.outdir`): checked, created, probed for writing and locked (rank 0)
before anything loads; with --overwrite the previous run is cleared only just before the
first write, so a run that fails while loading leaves it intact. A full disk while saving is
one message with the space needed; the last good checkpoint is kept. Resuming with another
`training.learning_rate` continues the schedule at the new rate.

Data parallel: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
process group is initialised (gloo on CPU, nccl on CUDA), the student and the objective's
projections are wrapped together in one DistributedDataParallel (the teachers never are),
every rank takes its own share of each global batch (`data.train_batches`), and rank 0 alone
evaluates and writes files and progress. `training.batch_size` is the batch per process.

Teacher-logit caching (`is_caching_logits`): each example's teacher logits are computed the
first time the example is seen and kept on the CPU, keyed by its row in the training set, so
the cache works with shuffling, length grouping, `num_steps` and resuming (the reference
refuses `num_steps` and fixes its batches). Intermediate matches need the teacher's hidden
states or attention scores on every step, so a recipe file asking for both is refused by
`load_recipe`; a Recipe built in code that asks for both runs without the cache, with a
warning. `distillation.teacher_cache` keeps the teacher's outputs on disk instead, the
matched features included (kdcli.engine.teacher_cache; `kdcli cache-teacher` fills it ahead).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kdcli.engine import build
from kdcli.engine.batches import BatchStream
from kdcli.engine.devices import Processes
from kdcli.engine.non_finite import non_finite_error
from kdcli.engine.recipe_facts import Mode, read_paths
from kdcli.engine.run_outputs import (
    RUN_FILES,
    begin_outputs,
    close_all,
    evaluate_student,
    evaluate_teachers,
    log_step,
    save_checkpoint,
    save_final,
    write_summary,
)
from kdcli.engine.setup import RunState, resume_position, setup
from kdcli.engine.step import StopFlags, StopRequest, optimizer_step, train_step
from kdcli.errors import Interrupted, RunError, UsageError, first_line
from kdcli.recipe.schema import check_max_steps
from kdcli.run_files import checkpoint as ckpt
from kdcli.run_files import outdir, run_log


def run(
    recipe,
    *,
    mode: Mode = "distill",
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Distil (or, with mode="train", fine-tune) the recipe's student; returns the summary.

    Overrides: `output_dir`, `max_steps` (optimizer steps; wins over num_epochs/num_steps),
    `device`, `seed`. `resume` continues from the latest checkpoint in the output folder;
    `overwrite` replaces a previous run's folder (only one kdcli wrote, and only once the
    models and data have loaded; else a non-empty folder is refused). Raises
    `UsageError`, `RunError` (e.g. `NonFiniteLossError`) or `Interrupted` (Ctrl-C, after a
    resumable checkpoint was written).
    """
    if mode not in ("distill", "train"):
        raise ValueError(f"mode must be 'distill' or 'train', not {mode!r}")
    if mode == "distill" and (recipe.distillation is None or not recipe.teachers):
        raise UsageError(
            "`kdcli distill` needs a recipe with `teacher` and `distillation`. Fix: use `kdcli train` for fine-tuning"
        )
    check_max_steps(max_steps)
    procs = Processes.from_env()
    with build.process_group(procs, device or recipe.training.device):
        return _run(recipe, mode, procs, output_dir, max_steps, device, seed, resume, overwrite, quiet)


def _run(
    recipe, mode: Mode, procs: Processes, output_dir, max_steps, device_name, seed, resume, overwrite, quiet
) -> dict:
    wall_start = time.perf_counter()
    # the output folder: checked, created, probed and locked before anything loads; the
    # previous run is cleared (--overwrite) only just before the first write (folder.begin)
    out = Path(os.path.abspath(output_dir or recipe.training.output_dir))

    def open_folder() -> outdir.RunFolder:
        return outdir.RunFolder.open(
            out,
            resume=resume,
            overwrite=overwrite,
            protected=read_paths(recipe),
            main=procs.is_main,
            file_names=RUN_FILES,
        )

    folder = open_folder() if procs.is_main else None
    procs.barrier()
    if not procs.is_main:
        folder = open_folder()
    try:
        state = setup(folder, recipe, mode, procs, max_steps=max_steps, device_name=device_name, seed=seed, quiet=quiet)
        if state.resume_from is not None:
            state.position = resume_position(state)
        return _train_and_finish(state, wall_start)
    except OSError as exc:  # a full disk anywhere else (metrics.jsonl, TensorBoard): one message too
        if not ckpt.is_no_space(exc):
            raise
        raise RunError(
            f"no space left on the disk of {out} ({first_line(exc)}). Fix: free space there, then "
            f"continue from the last checkpoint in {out / ckpt.CHECKPOINTS} with --resume"
        ) from None
    finally:
        folder.close()


def _train_and_finish(run: RunState, wall_start: float) -> dict:
    evaluate_teachers(run)
    begin_outputs(run)
    start_step = run.position.step
    train_start = time.perf_counter()
    try:
        _loop(run)
    except BaseException:
        close_all(run)
        raise
    run.console.progress.close()
    try:
        train_time = time.perf_counter() - train_start
        save_final(run)
    finally:
        close_all(run, progress=False)
    return write_summary(run, start_step=start_step, train_time=train_time, wall_start=wall_start)


def _loop(run: RunState) -> None:
    """Optimizer steps until `total_steps`: each one's micro-batches, the stop checks every
    rank agrees on, the update, then logging, evaluation and checkpoints when due."""
    training, procs, total = run.training, run.procs, run.total_steps
    run.console.progress = run_log.Progress(
        run_log.progress_mode(run.console.quiet or not run.main),
        total,
        initial_step=run.position.step,
        description=run.mode,
    )
    stream = BatchStream(
        run.data.train_lengths,
        training.batch_size,
        run.seed,
        run.recipe.data.group_by_length,
        procs.rank,
        procs.world_size,
        run.position,
    )
    throughput = run_log.Throughput(run.position.step)
    with StopRequest() as stop:
        while run.position.step < total:
            chunk = stream.next_chunk(training.gradient_accumulation_steps)
            epoch = stream.epoch
            result = train_step(run, chunk, stream.batch_in_epoch, throughput)
            flags = StopFlags.agree(procs, run.device, result.non_finite is not None, stop.requested)
            if flags.non_finite:
                raise non_finite_error(run, result.non_finite, epoch)
            optimizer_step(run)
            run.position = stream.advance(chunk, run.position.step + 1)
            step = run.position.step
            run.console.progress.advance(step)

            if step % training.log_every == 0 or step == total:
                log_step(run, result.terms, throughput)
            if run.eval_set is not None and training.eval_every and step % training.eval_every == 0 and step < total:
                evaluate_student(run)
                procs.barrier()
            if flags.interrupted or (stop.requested and not procs.distributed):
                save_checkpoint(run)
                raise Interrupted(
                    f"interrupted at step {step} of {total}; a checkpoint was written to "
                    f"{run.last_saved or run.out / ckpt.CHECKPOINTS}. Resume with: {run.command}"
                )
            if training.save_every and step % training.save_every == 0 and step < total:
                save_checkpoint(run)
