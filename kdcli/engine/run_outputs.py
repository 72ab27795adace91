"""What a run writes and reports: the first write into its folder, step logs, evaluations,
checkpoints, and at the end the student, the projections and summary.json."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from kdcli import data as kdata
from kdcli.engine import resume_objective
from kdcli.engine.devices import autocast
from kdcli.engine.recipe_facts import recipe_sha256
from kdcli.engine.setup import RunState, to_cpu
from kdcli.errors import NonFiniteLossError, RunError
from kdcli.run_files import checkpoint as ckpt
from kdcli.run_files import run_log
from kdcli.tasks.base import Forward

PROJECTIONS_FILE = "projections.safetensors"
#: Files and folders a run writes into its output folder (besides the model's own files):
#: their leftover temporary files are cleaned when the folder is opened.
RUN_FILES = ("metrics.jsonl", "summary.json", "recipe.json", PROJECTIONS_FILE, "tensorboard", ckpt.CHECKPOINTS)


def begin_outputs(run: RunState) -> None:
    """Rank 0's first write: only now is a replaced run cleared; then the logs and recipe.json."""
    if not run.main:
        return
    recipe, out = run.recipe, run.out
    run.folder.begin({"recipe_sha256": recipe_sha256(recipe), "mode": run.mode})
    run.metrics = run_log.MetricsLog(out / "metrics.jsonl", resume_step=run.position.step if run.resume_from else None)
    run.tb = run_log.TensorBoard(out / "tensorboard")
    if recipe.source is not None:
        ckpt.atomic_write_text(out / "recipe.json", Path(recipe.source).read_text(encoding="utf-8"))
    else:
        ckpt.atomic_write_text(out / "recipe.json", recipe.model_dump_json(indent=2, by_alias=True))


def log_step(run: RunState, terms: dict[str, Tensor], throughput: run_log.Throughput) -> None:
    """The step's terms averaged over ranks: progress line, metrics.jsonl and TensorBoard."""
    step, total_steps = run.position.step, run.total_steps
    names = list(terms)
    values = torch.stack([terms[n] for n in names])
    if run.procs.distributed:
        torch.distributed.all_reduce(values)
        values /= run.procs.world_size
    numbers = dict(zip(names, values.tolist()))
    rate, eta = throughput.read(step, total_steps)
    info = run_log.StepInfo(
        step=step,
        total_steps=total_steps,
        epoch=run.position.samples_seen / max(1, len(run.train_set)),
        loss=numbers.pop("loss"),
        terms=numbers,
        lr=float(run.scheduler.get_last_lr()[0]),
        samples_per_s=rate,
        eta_s=eta,
        weights=run.objective.weights(step / total_steps),
        tokens_per_s=throughput.tokens_per_s() if _per_token(run) else None,
        memory_mb=run_log.peak_memory_mb(run.device.type) if _per_token(run) else None,
    )
    on_policy = run.on_policy
    generation = on_policy.read_figures(run.procs, run.device) if on_policy is not None and on_policy.generates else {}
    if run.main:
        # rank 0 opened them: `begin_outputs` (metrics, TensorBoard), the train loop (progress)
        assert run.console.progress is not None and run.metrics is not None and run.tb is not None
        run.console.progress.show(info)
        record = {**info.record(), **generation}
        run.metrics.write(record)
        run.tb.add(step, record)
    run.last_log = {**info.record(), **generation}


def _per_token(run: RunState) -> bool:
    """The task's terms and eval are per target token (its throughput is reported in tokens/s)."""
    return run.task.per_token


def evaluate_model(model: nn.Module | None, run: RunState) -> dict[str, float]:
    """The task's eval metrics (`Task.evaluate`) of `model` on the eval split, from the forwards
    the task reads (`Task.eval_models`: encoders the logits, causal-lm the next-token
    distributions against the teachers'). `model` None: the teachers' own figures."""
    dataset, device = run.eval_set, run.device
    teachers: list[Forward]
    if run.sharded:  # through the FSDP roots, on every rank (causal-lm only: `_sharded_per_token`)
        from kdcli.engine.fsdp import reshard_teachers

        if model is not None:
            subject = lambda batch: run.step_module(batch, [], 0.0, features_only=True)  # noqa: E731
            teachers = [c.run_teacher for c in run.captures_T]
        else:
            subject, teachers = run.captures_T[0].run_teacher, []
    else:
        subject, teachers = run.task.eval_models(model, run.teachers)

    def batches():
        for indices in kdata.eval_batches(len(dataset), run.training.eval_batch_size):
            batch = {k: v.to(device) for k, v in run.collator.batch(dataset, indices).items()}
            yield subject(batch), [t(batch) for t in teachers], batch["labels"]
            if run.sharded:
                reshard_teachers(run.captures_T)

    with torch.no_grad() if run.sharded else torch.inference_mode(), autocast(device, run.autocast_precision):
        return run.task.evaluate(batches(), run.data.labels)


def evaluate_teachers(run: RunState) -> None:
    """The teachers' eval metrics, once, before training (rank 0; every rank under FSDP2)."""
    if (run.main or run.sharded) and run.eval_set is not None and run.teachers:
        if run.sharded:
            _sharded_per_token(run)
        else:
            for t in run.teachers:
                t.eval()
        run.teacher_eval = evaluate_model(None, run)
        run.teacher_eval.update(_generation_eval(run, run.teachers[0], with_kl=False))
        run.console.say("teacher eval: " + _metrics_line(run.teacher_eval))


def _generation_eval(run: RunState, model: nn.Module, *, with_kl: bool = True) -> dict[str, float]:
    """distillation.on_policy's eval figures (kdcli.engine.generation_eval; on_policy is causal-lm's
    alone); none under FSDP2."""
    if run.on_policy is None or run.sharded:
        return {}
    from kdcli.engine.generation_eval import generation_metrics

    return generation_metrics(model, run, with_kl=with_kl)


def _sharded_per_token(run: RunState) -> None:
    if not _per_token(run):
        raise RunError(
            'training.parallel "fsdp" evaluates causal-lm runs only. Fix: use "ddp" for this task, or drop data.eval'
        )


def evaluate_student(run: RunState) -> None:
    """The student's eval metrics on rank 0 (every rank computes them under FSDP2), logged
    (train mode restored); every rank waits."""
    if run.main or run.sharded:
        student = run.student
        was_training = student.training
        student.eval()
        try:
            if run.sharded:
                _sharded_per_token(run)
            run.last_eval = evaluate_model(student, run)
            run.last_eval.update(_generation_eval(run, student))
        finally:
            student.train(was_training)
    if run.main:
        # set above (rank 0 always evaluates); opened by `begin_outputs`
        assert run.last_eval is not None and run.metrics is not None and run.tb is not None
        step = run.position.step
        record = {"step": step, **{f"eval/{k}": v for k, v in run.last_eval.items()}}
        run.metrics.write(record)
        run.tb.add(step, record)
        run.console.say(f"step {step} eval: " + _metrics_line(run.last_eval))


def save_checkpoint(run: RunState) -> None:
    """A checkpoint at the current step boundary (every rank joins: RNG states are gathered)."""
    pos = run.position
    if not (_all_finite(run.student) and _all_finite(run.objective)):
        raise NonFiniteLossError(
            f"the student's weights became non-finite by step {pos.step}; no checkpoint was "
            f"written (the last good one stays in {run.out / ckpt.CHECKPOINTS}). Fix: lower "
            "training.learning_rate or use fp32/bf16"
        )
    rng = ckpt.capture_rng()
    shards = None
    if run.sharded:  # every rank writes its shards first (DCP); rank 0 then moves them in
        from kdcli.engine import fsdp

        shards = run.out / ckpt.CHECKPOINTS / f".step-{pos.step}.shards"
        with disk_full_keeps(run):
            fsdp.save_shards(run.step_module, run.optimizer, shards, run.main)
    if run.procs.distributed:
        rng_all: list = [None] * run.procs.world_size
        torch.distributed.all_gather_object(rng_all, to_cpu(rng))
    else:
        rng_all = [rng]
    path = None
    if run.main:
        with disk_full_keeps(run):
            path = ckpt.save_checkpoint(
                run.out,
                ckpt.Checkpoint(
                    position=pos,
                    student={} if run.sharded else run.student.state_dict(),
                    objective={} if run.sharded else run.objective.state_dict(),
                    optimizer={} if run.sharded else run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(),
                    scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                    rng={"ranks": rng_all},
                    meta={resume_objective.META_KEY: resume_objective.objective_values(run.recipe)},
                ),
                shards=shards,
            )
    run.procs.barrier()
    run.last_saved = path


@contextmanager
def disk_full_keeps(run: RunState):
    """A full disk: one message naming the space needed, what is kept and how to go on."""
    try:
        yield
    except ckpt.DiskFullError as exc:
        need = ckpt.format_bytes(exc.needed)
        if run.last_saved is not None:
            raise RunError(
                f"{exc}; the last good checkpoint {run.last_saved} is kept. Fix: make at least "
                f"{need} free on that disk, then continue with `{run.command}`"
            ) from None
        raise RunError(
            f"{exc}; no checkpoint had been written yet. Fix: make at least {need} free on that "
            "disk, or choose an --output-dir on another one, and start again with --overwrite"
        ) from None


def save_final(run: RunState) -> None:
    """The last evaluation and checkpoint, then (rank 0) the student with its tokenizer and
    the projections."""
    if run.eval_set is not None:
        evaluate_student(run)
    save_checkpoint(run)
    student: nn.Module | None = run.student
    if run.sharded:  # every rank joins the gather; rank 0 gets the whole student on its CPU
        from kdcli.engine import fsdp

        student = fsdp.full_student(run.step_module, run.student, run.main)
    if run.main:
        out, objective = run.out, run.objective
        student = _in_save_dtype(student, run.training.save_dtype)
        with disk_full_keeps(run):
            with ckpt.disk_full_as_error("the student model", out, ckpt.nbytes(student.state_dict())):
                ckpt.atomic_save_pretrained_files(student, run.tokenizer, out)
            if len(objective.projections):
                with ckpt.disk_full_as_error(PROJECTIONS_FILE, out, ckpt.nbytes(objective.state_dict())):
                    ckpt.atomic_save_safetensors(objective.state_dict(), out / PROJECTIONS_FILE)


def _in_save_dtype(student, save_dtype: str):
    """The student as `training.save_dtype` saves it: itself (fp32), or a copy in bf16 / fp16
    (the run's own student and its checkpoints stay as they are)."""
    if save_dtype == "fp32":
        return student
    import copy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[save_dtype]
    half = copy.deepcopy(student).to(dtype)
    half.config.dtype = dtype
    return half


def write_summary(run: RunState, *, start_step: int, train_time: float, wall_start: float) -> dict:
    """summary.json (rank 0) and the summary `run()` returns."""
    recipe, position, train_set, last_log = run.recipe, run.position, run.train_set, run.last_log
    summary = {
        "mode": run.mode,
        "recipe": str(recipe.source) if recipe.source else None,
        "output_dir": str(run.out),
        "task": recipe.task,
        "device": str(run.device),
        "precision": run.precision,
        "processes": run.procs.world_size,
        "steps": position.step,
        "total_steps": run.total_steps,
        "epochs": round(position.samples_seen / max(1, len(train_set)), 4),
        "train_examples": len(train_set),
        "dropped_rows": dict(run.data.dropped) or None,
        "train_tokens_per_s": round(run.tokens_this_session / train_time, 1)
        if _per_token(run) and train_time > 0 and position.step > start_step
        else None,
        "resumed_from_step": start_step if run.resume_from is not None else None,
        "final_loss": last_log["loss"] if last_log else None,
        "final_terms": {k[len("loss/") :]: v for k, v in (last_log or {}).items() if k.startswith("loss/")},
        "eval": run.last_eval,
        "teacher_eval": run.teacher_eval,
        "student_parameters": sum(p.numel() for p in run.student.parameters()),
        "student_blocks": run.block_ranking.to_dict() if run.block_ranking is not None else None,
        "student_prune": run.student_prune.to_dict() if run.student_prune is not None else None,
        "train_time_s": round(train_time, 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),
        "samples_per_s": round(run.samples_this_session / train_time, 3)
        if train_time > 0 and position.step > start_step
        else None,
        "peak_memory_mb": round(run_log.peak_memory_mb(run.device.type), 1),
        "checkpoint": str(run.last_saved) if run.last_saved else None,
        "teacher_cache_rows": len(run.cache) if run.cache is not None else None,
        "warnings": run.console.warnings,
    }
    if run.main:
        out = run.out
        with disk_full_keeps(run), ckpt.disk_full_as_error("summary.json", out, 1 << 16):
            ckpt.atomic_write_json(out / "summary.json", summary)
            summary["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            ckpt.atomic_write_json(out / "summary.json", summary)
    return summary


def close_all(run: RunState | None, *, progress: bool = True) -> None:
    """Close the progress bar, the logs and the feature hooks (what exists of them)."""
    if run is None:
        return
    things = ([run.console.progress] if progress else []) + [run.metrics, run.tb, *run.closers]
    for thing in things:
        if thing is not None:
            thing.close()


def _all_finite(module: nn.Module) -> bool:
    """Every parameter finite (a sharded one: this rank's shard)."""
    return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in module.parameters())


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
