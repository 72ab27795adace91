"""The teachers' side of a step (their features, or the cached logits) and the student's
forward with the objective as one module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdcli.features import FeatureCapture, Features
from kdcli.objective import Objective
from kdcli.tasks.base import LogitCacheRows


class StudentStep(nn.Module):
    """The student's forward and the objective as one module, so that DistributedDataParallel
    wraps the student and the projections together (one gradient reduction per step)."""

    def __init__(self, student: nn.Module, objective: Objective, capture: FeatureCapture):
        super().__init__()
        self.student = student
        self.objective = objective
        self._capture = capture

    def forward(
        self,
        batch: dict[str, Tensor],
        feats_T: list[Features],
        step_fraction: float,
        *,
        micro_batches: int = 1,
        normaliser: float | None = None,
    ):
        feats_S = self._capture.run(batch)
        return self.objective(
            step_fraction,
            feats_S,
            feats_T,
            batch.get("labels"),
            micro_batches=micro_batches,
            normaliser=normaliser,
            generated=batch.get("generated"),
        )


def _logits(features: Features) -> Tensor:
    assert features.logits is not None  # the in-memory cache is for tasks whose models return logits
    return features.logits


class TeacherLogitCache:
    """Teacher logits per training row (CPU, float32), keyed by the row's index.

    The task decides a row's shape (`Task.cache_row` / `cache_batch`): sequence classification
    stores (n_teachers, C) per row; token classification (n_teachers, length, C) for the row's
    real tokens, re-padded per batch (padded positions carry label -100 and are never read)."""

    def __init__(self, task: LogitCacheRows) -> None:
        self._task = task
        self._rows: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, indices: Sequence[int], batch: dict[str, Tensor], device) -> list[Features] | None:
        if any(i not in self._rows for i in indices):
            return None
        rows = [self._rows[i] for i in indices]
        logits = self._task.cache_batch(rows, batch["input_ids"].size(1))  # (n_teachers, B, ...)
        logits = logits.to(device, non_blocking=True)
        return [Features(logits=logits[t], mask=batch["attention_mask"]) for t in range(logits.size(0))]

    def store(self, indices: Sequence[int], feats_T: list[Features], batch: dict[str, Tensor]) -> None:
        stacked = torch.stack([_logits(f).detach().float() for f in feats_T]).cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for b, i in enumerate(indices):
            self._rows[i] = self._task.cache_row(stacked[:, b], int(lengths[b])).clone()


def teacher_features(
    captures: Sequence[FeatureCapture],
    cache,
    indices: list[int],
    batch: dict[str, Tensor],
    device,
) -> list[Features]:
    """Each teacher's features for a batch: from the cache when every row is in it, else a
    forward pass of each teacher (whose outputs the cache then keeps). `cache`: None, the
    in-memory `TeacherLogitCache` (is_caching_logits) or the on-disk
    `kdcli.engine.teacher_cache.TeacherDiskCache` (distillation.teacher_cache); both have
    `lookup(indices, batch, device)` and `store(indices, feats, batch)`."""
    if cache is not None:
        found = cache.lookup(indices, batch, device)
        if found is not None:
            return found
    feats = [c.run_teacher(batch) for c in captures]
    if cache is not None:
        cache.store(indices, feats, batch)
    return feats
