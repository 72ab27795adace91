"""The causal-LM KD term: KD and hard-label CE summed over the step's target tokens, chunked.

Built once at setup by the task (`CausalLM.kd_term`) from the recipe's `distillation`: the
per-token divergence from the registry (`registry.get_loss(kd_loss_type).token_fn()`), its
options with their defaults (`DistillationConfig.kd_options`), the chunk size, the
temperature, and the token ids every model's head has (a padded vocabulary's extra rows left
out). Per micro-batch it takes the final hidden states and heads at the target positions
(`target_rows`) and calls `kdcli.losses.chunked.chunked_kd_loss`, so full-vocabulary logits
never exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from kdcli import registry
from kdcli.errors import RunError
from kdcli.losses.chunked import chunked_kd_loss
from kdcli.losses.divergences import forward_kl
from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX
from kdcli.tasks.lm_rows import next_token_labels


def target_rows(features, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(final hidden states at the predicting positions (N, D), their next-token ids (N,))."""
    targets = next_token_labels(labels)
    keep = targets != IGNORE_INDEX
    return features.final_hidden[keep], targets[keep]


def count_targets(labels: Tensor) -> int:
    """The target tokens of a batch after the shift (what its KD term sums over)."""
    return int((next_token_labels(labels) != IGNORE_INDEX).sum())


def shared_vocab(models: Sequence[nn.Module]) -> int | None:
    """The rows of the smallest output head (None without a student and a teacher)."""
    if len(models) < 2:
        return None
    heads = [cast("nn.Module", cast(Any, m).get_output_embeddings()) for m in models]
    return min(int(cast(Tensor, h.weight).shape[0]) for h in heads)


class TokenKD:
    """`(kd_weight * sum_t KD_t + hard_label_weight * sum_t CE_t) / normaliser` over the target
    tokens t of one micro-batch (`kdcli.tasks.base.KDTerm`); `distillation` None (`kdcli train`):
    the hard-label CE alone."""

    def __init__(self, distillation=None, vocab: int | None = None) -> None:
        self.config = distillation
        self.divergence = forward_kl
        self.options: dict[str, Any] = {}
        self.chunk_size, self.temperature, self.vocab = CHUNK_SIZE, 1.0, vocab
        if distillation is not None:
            self.divergence = registry.get_loss(distillation.kd_loss_type).token_fn()
            self.options = distillation.kd_options
            self.chunk_size, self.temperature = distillation.chunk_size, float(distillation.temperature)

    def target_rows(self, features, labels: Tensor) -> tuple[Tensor, Tensor]:
        return target_rows(features, labels)

    def __call__(self, feats_S, feats_T: Sequence, labels: Tensor | None, weights, **share):
        """`share`: `normaliser` (the step's target tokens per process; default this batch's) and
        `generated` (B,) bool: rows whose completion was generated (no hard-label term there)."""
        if labels is None:
            raise RunError("causal-lm training needs the rows' labels (the target tokens), but the batch has none")
        hidden_S, targets = target_rows(feats_S, labels)
        weight_S, bias_S = feats_S.head
        distil = self.config is not None
        if distil and not feats_T:
            raise ValueError("distillation needs at least one teacher's features")
        cached = feats_T[0].top_k if distil else None  # the teacher cache's top-k, for the target rows
        teachers = [(target_rows(f, labels)[0], *f.head) for f in feats_T] if distil and cached is None else []
        normaliser = share.get("normaliser")
        settings = {
            "bias_S": bias_S,
            "divergence": self.divergence,
            "divergence_options": self.options,
            "chunk_size": self.chunk_size,
            "temperature": self.temperature,
            "kd_weight": weights[0],
            "normaliser": normaliser if normaliser is not None else max(int(targets.numel()), 1),
            "return_parts": True,
            "vocab": self.vocab,
        }
        hard_rows = _dataset_targets(labels, share.get("generated"))
        total, parts = _kd_and_hard_labels(
            hidden_S, weight_S, teachers, targets, hard_rows, weights[1], cached, settings
        )
        terms = {"kd": parts["kd"]} if distil else {}
        terms["hard_label"] = parts["hard_label"]
        return {"kd": total}, terms


def _dataset_targets(labels: Tensor, generated: Tensor | None) -> Tensor | None:
    """(N,) bool over a batch's target tokens: from a dataset row (not generated); None when
    every row is a dataset row."""
    if generated is None or not bool(generated.any()):
        return None
    keep = next_token_labels(labels) != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return ~generated.to(labels.device)[rows[keep]]


def _kd_and_hard_labels(hidden_S, weight_S, teachers, targets, hard_rows, hard_weight, cached, settings):
    """`chunked_kd_loss` over the target rows; with generated rows (`hard_rows` False there), the
    dataset rows and the generated rows in two calls, the hard-label term on the former only
    (same normaliser: the sum is the step's)."""

    def call(rows, weight):
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        return chunked_kd_loss(
            pick(hidden_S),
            weight_S,
            [pick(h) for h, _, _ in teachers],
            [w for _, w, _ in teachers],
            bias_T=[b for _, _, b in teachers],
            hard_label_weight=weight,
            labels=pick(targets),
            cached_T=cached,
            **settings,
        )

    if hard_rows is None:
        return call(None, hard_weight)
    if cached is not None:
        raise ValueError("the teacher cache serves dataset rows only; a batch with generated rows runs the teachers")
    total, parts = call(~hard_rows, 0.0)
    if bool(hard_rows.any()):
        total_d, parts_d = call(hard_rows, hard_weight)
        return total + total_d, {"kd": parts["kd"] + parts_d["kd"], "hard_label": parts_d["hard_label"]}
    return total, {"kd": parts["kd"], "hard_label": torch.zeros_like(parts["hard_label"])}
