"""One optimizer step: the micro-batches of gradient accumulation (teachers, student and
objective, backward), the stop flags every rank agrees on, then clipping and the update."""

from __future__ import annotations

import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from kdcli.engine.devices import autocast
from kdcli.engine.teachers import teacher_features


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite loss of a step: the term, its value, the batch (0-based) in the epoch."""

    term: str
    value: float
    batch: int


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
        self._previous: dict[int, object] = {}

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
    """Forward and backward over the step's micro-batches (gradients averaged over them;
    DDP reduces only on the last). `first_batch`: the chunk's first batch in its epoch."""
    result, world, fraction = StepResult(), run.procs.world_size, run.position.step / run.total_steps
    for micro, indices in enumerate(chunk):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in run.collator.batch(run.train_set, indices).items()}
        last_micro = micro == len(chunk) - 1
        with nullcontext() if (last_micro or not run.procs.distributed) else run.step_module.no_sync():
            with autocast(run.device, run.precision):
                feats_T = (
                    teacher_features(run.captures_T, run.cache, indices, batch, run.device) if run.teachers else []
                )
                total, terms = run.step_module(batch, feats_T, fraction)
            run.scaler.scale(total / len(chunk)).backward()
        if result.non_finite is None and not bool(torch.isfinite(total.detach())):
            result.non_finite = NonFinite(*_first_non_finite(total, terms), first_batch + micro)
        for name, value in (("loss", total), *terms.items()):
            result.terms[name] = result.terms.get(name, 0.0) + value.detach().float() / len(chunk)
        run.samples_this_session += len(indices) * world
        throughput.add(len(indices) * world)
    return result


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
