"""One optimizer step: the micro-batches of gradient accumulation (teachers, student and
objective, backward), the stop flags every rank agrees on, then clipping and the update."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdcli.engine.devices import autocast
from kdcli.engine.non_finite import teacher_blame
from kdcli.engine.teachers import teacher_features


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite loss of a step: the term, its value, the batch (0-based) in the epoch."""

    term: str
    value: float
    batch: int
    teacher: str | None = None  # why, when the teachers' outputs were not finite (engine.non_finite)


@dataclass
class StepResult:
    """What one step's micro-batches produced: the mean of each term, a non-finite loss if any."""

    terms: dict[str, Tensor] = field(default_factory=dict)
    non_finite: NonFinite | None = None


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM set a flag that the loop checks after each step; a second
    signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopFlags(NamedTuple):
    """Why the loop must stop after this step, agreed by every rank (the max over ranks)."""

    non_finite: bool
    interrupted: bool

    @classmethod
    def agree(cls, procs, device, non_finite: bool, interrupted: bool) -> StopFlags:
        flags = torch.tensor([float(non_finite), float(interrupted)], device=device)
        if procs.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return cls(bool(flags[0] > 0), bool(flags[1] > 0))


def train_step(run, chunk: list[list[int]], first_batch: int, throughput) -> StepResult:
    """Forward and backward over the step's micro-batches; each contributes its share of the
    step's loss (`Objective.forward`: batch means / micro-batches for encoders, sums over the
    step's target tokens for causal LMs), so the gradient is the step's. DDP reduces only on
    the last micro-batch. `first_batch`: the chunk's first batch in its epoch."""
    result, procs, fraction = StepResult(), run.procs, run.position.step / run.total_steps
    started = time.perf_counter()
    batches = [{k: v.to(run.device, non_blocking=True) for k, v in b.items()} for b in _step_batches(run, chunk)]
    normaliser = step_targets(run, batches)
    for micro, (indices, batch) in enumerate(zip(chunk, batches)):
        last_micro = micro == len(chunk) - 1
        if run.sharded:  # FSDP2: reduce-scatter on the last micro-batch only (as DDP's no_sync)
            run.step_module.set_requires_gradient_sync(last_micro)
        plain = last_micro or not procs.distributed or run.sharded
        with nullcontext() if plain else run.step_module.no_sync():
            with autocast(run.device, run.autocast_precision):
                # the teacher cache serves dataset rows only: a micro-batch with generated rows runs the teachers
                cache = None if "generated" in batch and bool(batch["generated"].any()) else run.cache
                feats_T = teacher_features(run.captures_T, cache, indices, batch, run.device) if run.teachers else []
                total, terms = run.step_module(
                    batch, feats_T, fraction, micro_batches=len(chunk), normaliser=normaliser
                )
            run.scaler.scale(total).backward()
        if run.sharded:
            from kdcli.engine.fsdp import reshard_teachers

            reshard_teachers(run.captures_T)
        if result.non_finite is None and not bool(torch.isfinite(total.detach())):
            blame = teacher_blame(run, feats_T, batch) if run.teachers else None
            result.non_finite = NonFinite(*_first_non_finite(total, terms), first_batch + micro, blame)
        for name, value in (("loss", total), *terms.items()):
            result.terms[name] = result.terms.get(name, 0.0) + value.detach().float()
        tokens = int(batch["attention_mask"].sum()) * procs.world_size if "attention_mask" in batch else 0
        run.samples_this_session += len(indices) * procs.world_size
        run.tokens_this_session += tokens
        throughput.add(len(indices) * procs.world_size, tokens)
    if run.on_policy is not None and run.on_policy.generates:
        run.on_policy.figures.step_seconds += time.perf_counter() - started
    return result


def _step_batches(run, chunk: list[list[int]]) -> list[dict[str, Tensor]]:
    """The step's micro-batches on the CPU; under `distillation.on_policy` the chosen rows'
    completions are generated first (`kdcli.engine.generate`)."""
    if run.on_policy is None or not run.on_policy.generates:
        return [run.collator.batch(run.train_set, indices) for indices in chunk]
    from kdcli.engine.generate import collate

    rows = [[run.train_set[i] for i in indices] for indices in chunk]
    rows = run.on_policy.rows_of_step(run, run.position.step, rows)
    return [collate(run.collator, r) for r in rows]


def step_targets(run, batches: list[dict[str, Tensor]]) -> float | None:
    """The target tokens of the whole optimizer step (every micro-batch, every process), per
    process: DDP averages the processes' gradients, so each process's sum over its own target
    tokens is divided by (step targets / world size) to make the gradient the step's mean.
    None where the task's terms are batch means (`Task.target_count`)."""
    counts = [run.task.target_count(b.get("labels")) for b in batches]
    if any(c is None for c in counts):
        return None
    count = torch.tensor(float(sum(c for c in counts if c is not None)), device=run.device)
    if run.procs.distributed:
        torch.distributed.all_reduce(count)
    return max(float(count), 1.0) / run.procs.world_size


def optimizer_step(run) -> None:
    """Clip (student + projections), step the optimizer and the schedule, clear gradients."""
    if run.training.max_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trainable, run.training.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _first_non_finite(total: Tensor, terms: dict[str, Tensor]) -> tuple[str, float]:
    """The first term (in objective order) that is NaN or infinite; "total" if none is."""
    for name, value in terms.items():
        if not bool(torch.isfinite(value.detach()).all()):
            return name, float(value.detach().float())
    return "total", float(total.detach().float())
