"""Causal language modelling: next-token targets from text, prompt + completion or chat rows.

The model's logits are never built for a whole batch: its captures read each model's final
hidden states (B, L, D) and output head (`features.HEAD`), and its KD term (`tasks.lm_kd.TokenKD`)
computes the KD loss and the hard-label cross-entropy, `evaluate_lm` the eval metrics, chunk by
chunk of target tokens (`kdcli.losses.chunked`). Targets follow the one shift rule of `kdcli.tasks.lm_rows`
(`next_token_labels`: position t predicts token t + 1).

Reduction: the KD and hard-label terms are sums over the target tokens of the whole optimizer
step divided by their number (`count_targets` per micro-batch, summed over the accumulation
steps and over processes), so the gradient does not depend on how a step's rows are split
into micro-batches or across processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.errors import RunError
from kdcli.features import HEAD, FeatureCapture, Readout
from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX
from kdcli.tasks.base import Columns, Encoder, Forward
from kdcli.tasks.lm_cache_rows import TopKRows
from kdcli.tasks.lm_kd import TokenKD, count_targets, shared_vocab, target_rows
from kdcli.tasks.lm_rows import encoder as rows_encoder
from kdcli.tasks.lm_rows import next_token_labels


class CausalLM:
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    #: its captures: final hidden states and the output head, never full logits
    readout: Readout = HEAD
    #: its terms and eval metrics are sums / means over target tokens
    per_token = True

    def encoder(self, tokenizer, labels, columns: Columns, max_length: int, source: str) -> Encoder:
        return rows_encoder(tokenizer, columns, max_length, source)

    def kd_logits(self, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, L, V) logits -> (N, V) at the positions that predict a target, with their ids.
        (The run never builds these logits; this serves callers that have them.)"""
        if labels is None:
            raise ValueError("causal-lm logits need labels to find the target tokens")
        targets = next_token_labels(labels)
        keep = targets != IGNORE_INDEX
        return logits[keep], targets[keep]

    def kd_term(self, distillation, models: Sequence[nn.Module] = ()) -> TokenKD:
        """The step's KD + hard-label term; `models` (student, teachers...) give the ids every head has."""
        return TokenKD(distillation, vocab=shared_vocab(models))

    def target_count(self, labels: Tensor | None) -> int | None:
        """The batch's target tokens: the KD and hard-label terms are sums over the step's."""
        assert labels is not None  # causal-lm rows always carry labels
        return count_targets(labels)

    def cache_rows(self, distillation) -> TopKRows:
        """On disk per target token the teachers' top-k log-probabilities at the temperature."""
        config = distillation.teacher_cache
        return TopKRows(config.top_k, float(distillation.temperature), distillation.chunk_size)

    def eval_models(self, model: nn.Module | None, teachers: Sequence[nn.Module]) -> tuple[Forward, list[Forward]]:
        """`model`'s final hidden states and head, compared with each teacher's (their mean logits);
        `model` None: the first teacher alone (its perplexity; against itself KL is 0, agreement 1)."""
        if model is None:
            return FeatureCapture(teachers[0], readout=self.readout).run, []
        return FeatureCapture(model, readout=self.readout).run, [
            FeatureCapture(t, readout=self.readout).run for t in teachers
        ]

    def evaluate(self, batches, labels=None) -> dict[str, float]:
        """`evaluate_lm` of (features_S, features_T, labels) per batch."""
        return evaluate_lm(batches)


TASK = CausalLM()


@torch.no_grad()
def evaluate_lm(
    student_features: Iterable[tuple[Any, Sequence[Any] | None, Tensor]], *, chunk_size: int = CHUNK_SIZE
) -> dict[str, float]:
    """Eval metrics over the target tokens of every batch, computed chunk by chunk.

    `student_features` yields `(features_S, features_T, labels)` per batch: `Features` with
    `final_hidden` and `head` (the teachers' a list, averaged as in training; None to evaluate
    the model alone), and the batch's unshifted labels (B, L).
    Returns `tokens` (targets scored), `perplexity` (exp of the mean next-token cross-entropy
    of the targets), `nll` (that mean), and with teachers `kl` (mean per-token
    KL(teacher || model) at temperature 1) and `top1_agreement` (share of targets where the
    model's most likely token is the teachers'). `kl` and `top1_agreement` compare the token ids
    every head has, as the KD term does (a padded head's extra rows left out); `nll` uses the
    model's whole head. Sums in float64.
    """
    tokens, nll, kl, agree = 0, 0.0, 0.0, 0
    with_teacher = False
    for feats_S, feats_T, labels in student_features:
        hidden_S, targets = target_rows(feats_S, labels)
        weight_S, bias_S = feats_S.head
        teacher_rows = [(target_rows(f, labels)[0], *f.head) for f in feats_T or ()]
        with_teacher = with_teacher or bool(teacher_rows)
        for start in range(0, hidden_S.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z_S = F.linear(hidden_S[rows], weight_S, bias_S).float()
            y = targets[rows]
            log_q = F.log_softmax(z_S, dim=-1)
            nll += float(-log_q.gather(-1, y[:, None]).sum(dtype=torch.float64))
            if teacher_rows:  # as the KD term: on the ids every head has (padded rows left out)
                shared = min(weight_S.shape[0], *(w.shape[0] for _, w, _ in teacher_rows))
                z_T = cast(  # a sum of >= 1 tensors: a tensor
                    Tensor,
                    sum(
                        F.linear(h[rows], w[:shared], None if b is None else b[:shared]).float()
                        for h, w, b in teacher_rows
                    ),
                )
                z_T, z_kd = z_T / len(teacher_rows), z_S[:, :shared]
                log_q_kd = log_q if shared == z_S.shape[1] else F.log_softmax(z_kd, dim=-1)
                log_p = F.log_softmax(z_T, dim=-1)
                kl += float((log_p.exp() * (log_p - log_q_kd)).sum(dtype=torch.float64))
                agree += int((z_kd.argmax(-1) == z_T.argmax(-1)).sum())
        tokens += int(targets.numel())
    if tokens == 0:
        raise RunError("the eval data has no target tokens. Fix: check data.eval and data.row_format")
    out = {"tokens": tokens, "nll": nll / tokens, "perplexity": math.exp(min(nll / tokens, 700.0))}
    if with_teacher:
        out["kl"] = kl / tokens
        out["top1_agreement"] = agree / tokens
    return out
