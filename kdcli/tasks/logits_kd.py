"""The encoder tasks' KD term: KD on the logits the task selects, and the hard-label CE.

    kd = KD(z_S, z_T, T)        hard_label = CE(z_S, y)

as TextBrewer 0.2.1's `GeneralDistiller.compute_loss` and `MultiTeacherDistiller` define them
(the module docstring of `kdcli.objective` lists the details: the temperature scheduler,
`probability_shift`, multi-teacher means, token-level selection). `LogitsKD` is built once at
setup by the task (`LogitsTask.kd_term`): the KD function and its options from the registry,
the temperature scheduler, the task's choice of logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli import registry
from kdcli.errors import RunError
from kdcli.facts.labels import Labels
from kdcli.features import LOGITS, FeatureCapture, Features, Readout
from kdcli.tasks import IGNORE_INDEX
from kdcli.tasks.base import Forward
from kdcli.tasks.cache_rows import LogitRows
from kdcli.tasks.classification_metrics import classification_metrics

#: (logits, labels) -> the logits (N, C) the KD and hard-label terms compare, their labels (N,)
Selection = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


def select_labelled(logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Token-level logits (B, L, C) -> (N, C) at the N positions where labels != -100.

    Sequence-level logits (B, C) pass through unchanged (the reference's
    `select_logits_with_mask`). Returns the selected labels (N,) too, or (B,) unchanged.
    The task is told by the logits' shape; a task's own `LogitsKD` uses its `kd_logits`.
    """
    if logits.dim() != 3:
        return logits, labels
    if labels is None:
        raise ValueError("token-level logits need labels to select the labelled tokens")
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def probability_shift(logits_T: Tensor, labels: Tensor) -> Tensor:
    """Swap each row's largest logit with the label's logit (out of place).

    logits_T: (N, C); labels: (N,) class ids (negative ids leave the row unchanged).
    Wen et al. 2019, "Preparing Lessons", arXiv:1911.07471; reference: `probability_shift_`.
    """
    if logits_T.dim() != 2:
        raise ValueError(f"probability_shift expects (N, C) logits, got {tuple(logits_T.shape)}")
    top = logits_T.argmax(dim=-1)
    target = torch.where(labels < 0, top, labels)
    rows = torch.arange(logits_T.size(0), device=logits_T.device)
    top_value = logits_T[rows, top]
    target_value = logits_T[rows, target]
    shifted = logits_T.clone()
    shifted[rows, top] = target_value
    shifted[rows, target] = top_value
    return shifted


def hard_label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (B, C) or (B, L, C) against labels (B,) or (B, L).

    Positions labelled -100 are ignored; mean over the rest (Hugging Face's `loss`).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class LogitsKD:
    """The KD and hard-label terms on the models' logits (batch means), built once.

    `distillation` None (`kdcli train`): the hard-label CE alone. Called per micro-batch as
    `kdcli.tasks.base.KDTerm`: returns `(weighted, terms)`, each value divided by
    `micro_batches` (this micro-batch's share of the step)."""

    def __init__(self, distillation=None, select: Selection = select_labelled) -> None:
        from kdcli.schedules import build_temperature_scheduler

        self.config = distillation
        self._select = select
        self.kd_fn: Callable[..., Tensor] | None = None
        self.kd_options: dict[str, Any] = {}
        self.temperature_scheduler = None
        if distillation is not None:
            self.kd_fn = registry.get_loss(distillation.kd_loss_type).fn()
            self.kd_options = dict(distillation.kd_loss_options)
            self.temperature_scheduler = build_temperature_scheduler(distillation.temperature_scheduler)

    def __call__(self, feats_S, feats_T: Sequence, labels: Tensor | None, weights, **share):
        weighted, terms = self._terms(feats_S, feats_T, labels, weights)
        micro_batches = share.get("micro_batches", 1)
        if micro_batches == 1:
            return weighted, terms
        return {k: v / micro_batches for k, v in weighted.items()}, {k: v / micro_batches for k, v in terms.items()}

    def _terms(self, feats_S, feats_T: Sequence, labels: Tensor | None, weights):
        kd_weight, hl_weight = weights
        if self.config is None:
            if labels is None:
                raise RunError("training needs labels, but the batch has none")
            ce = hard_label_loss(feats_S.logits, labels)
            return {"hard_label": ce}, {"hard_label": ce}
        if not feats_T:
            raise ValueError("distillation needs at least one teacher's features")
        logits_S, labels_sel = self._select(feats_S.logits.float(), labels)
        teacher_logits = [self._select(f.logits.float(), labels)[0] for f in feats_T]
        logits_T = (
            teacher_logits[0] if len(teacher_logits) == 1 else cast(Tensor, sum(teacher_logits)) / len(teacher_logits)
        )
        if self.config.probability_shift:
            if labels_sel is None:
                raise RunError("probability_shift needs labels, but the batch has none")
            logits_T = probability_shift(logits_T, labels_sel)
        if self.temperature_scheduler is not None:
            temperature = self.temperature_scheduler(logits_S, logits_T, self.config.temperature)
        else:
            temperature = self.config.temperature
        assert self.kd_fn is not None  # set with the config, from the same `distillation`
        kd = self.kd_fn(logits_S, logits_T, temperature, **self.kd_options)
        weighted, terms = {"kd": kd_weight * kd}, {"kd": kd}
        if labels is not None:
            ce = hard_label_loss(feats_S.logits, labels)
            terms["hard_label"] = ce
            if hl_weight != 0.0:
                weighted["hard_label"] = hl_weight * ce
        return weighted, terms


class LogitsTask:
    """What the encoder tasks share: their models return logits, their KD term is `LogitsKD`
    on the logits `kd_logits` selects, their terms are batch means (no target count)."""

    readout: Readout = LOGITS
    #: token classification: the tag left out of precision / recall / F1
    outside_tag: str | None = None
    #: its terms are batch means, its metrics per predicted label
    per_token = False

    def kd_logits(self, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return logits, labels

    def kd_term(self, distillation, models: Sequence = ()) -> LogitsKD:
        return LogitsKD(distillation, self.kd_logits)

    def target_count(self, labels: Tensor | None) -> int | None:
        return None

    def cache_rows(self, distillation) -> LogitRows:
        """On disk each teacher's logits per row (and the first teacher's matched features)."""
        return LogitRows()

    def eval_models(self, model, teachers: Sequence) -> tuple[Forward, list[Forward]]:
        """The logits of `model`, or (None) of the teachers' mean, in eval mode; compared with
        the gold labels alone."""
        captures = [FeatureCapture(m, readout=self.readout) for m in ([model] if model is not None else teachers)]

        def logits_of(batch: dict[str, Tensor]) -> Features:
            outs = []
            for capture in captures:
                was_training = capture.model.training
                capture.model.eval()
                logits = capture.run(batch).logits
                assert logits is not None  # the LOGITS readout
                outs.append(logits.float())
                capture.model.train(was_training)
            return Features(logits=outs[0] if len(outs) == 1 else torch.stack(outs).mean(0))

        return logits_of, []

    def evaluate(self, batches: Iterable, labels: Labels | None) -> dict[str, float]:
        """Accuracy (and micro P/R/F1 over non-O tags) of the argmax of each batch's logits."""
        predictions: list[int] = []
        gold: list[int] = []
        for feats, _, batch_labels in batches:
            predictions += feats.logits.argmax(dim=-1).reshape(-1).tolist()
            gold += batch_labels.reshape(-1).tolist()
        assert labels is not None  # tasks evaluated on logits are labelled
        return self.metrics(predictions, gold, labels)

    def metrics(self, predictions: Sequence[int], gold: Sequence[int], labels: Labels) -> dict[str, float]:
        """Accuracy; with `outside_tag` (token classification's "O"), micro P/R/F1 over the other tags."""
        outside = labels.label2id.get(self.outside_tag) if self.outside_tag is not None else None
        return classification_metrics(predictions, gold, outside_id=outside)
