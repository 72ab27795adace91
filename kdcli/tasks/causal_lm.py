"""Causal language modelling: next-token targets from text, prompt + completion or chat rows.

The model's logits are never built for a whole batch: the objective takes each model's final
hidden states (B, L, D) and output head (`output_head`) and computes the KD loss, the
hard-label cross-entropy and the eval metrics chunk by chunk of target tokens
(`kdcli.losses.chunked`). Targets follow the one shift rule of `kdcli.tasks.lm_rows`
(`next_token_labels`: position t predicts token t + 1).

Reduction: the KD and hard-label terms are sums over the target tokens of the whole optimizer
step divided by their number (`count_targets` per micro-batch, summed over the accumulation
steps and over processes), so the gradient does not depend on how a step's rows are split
into micro-batches or across processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.errors import RunError
from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX
from kdcli.tasks.base import Columns, Encoder
from kdcli.tasks.lm_rows import encoder as rows_encoder
from kdcli.tasks.lm_rows import next_token_labels

#: config fields of architectures whose forward changes the head's logits after the matmul
#: (soft-capping, scaling): the chunked loss would compare other numbers than the model's
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
#: target tokens per chunk in evaluation (the eval logits of one chunk at a time)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder under a `...ForCausalLM` (Llama's `model`, GPT-2's `transformer`): its forward
    returns the final hidden states, after the final norm, without the head."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise RunError(f"{type(model).__name__} has no base model under its LM head; kdcli cannot distil it")
    return base


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output head as (weight (V, D), bias (V,) or None): the logits are `h @ W.T + b`.
    `RunError` for architectures that transform the logits after the head (soft-capping,
    scaling), which the chunked loss does not reproduce."""
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            assert config is not None  # the value was read from it
            raise RunError(
                f"a {config.model_type} model transforms its logits after the head ({name} = {value}); "
                "kdcli's chunked KD loss does not reproduce that. Fix: use a llama, qwen2, mistral or gpt2 model"
            )
    # nn.Module types its attributes Tensor | Module: the Hugging Face method, typed by hand
    head = cast("Callable[[], nn.Module | None]", model.get_output_embeddings)()
    if not isinstance(head, nn.Linear):
        raise RunError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not a linear layer")
    return head.weight, head.bias


def count_targets(labels: Tensor) -> int:
    """The target tokens of a batch after the shift (what its KD term sums over)."""
    return int((next_token_labels(labels) != IGNORE_INDEX).sum())


def target_rows(features, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(final hidden states at the predicting positions (N, D), their next-token ids (N,))."""
    targets = next_token_labels(labels)
    keep = targets != IGNORE_INDEX
    return features.final_hidden[keep], targets[keep]


class CausalLM:
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    #: the objective sums its KD and hard-label terms over the step's target tokens
    token_level = True

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

    def metrics(self, predictions: Sequence[int], gold: Sequence[int], labels) -> dict[str, float]:
        raise NotImplementedError("causal-lm evaluation compares distributions: use evaluate_lm")

    def cache_row(self, logits: Tensor, length: int) -> Tensor:
        raise RunError("causal-lm has no in-memory logit cache (is_caching_logits is refused for it)")

    def cache_batch(self, rows: list[Tensor], width: int) -> Tensor:
        raise RunError("causal-lm has no in-memory logit cache (is_caching_logits is refused for it)")


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
