"""The mean KD loss of a causal LM from final hidden states and output heads, chunk by chunk.

`chunked_kd_loss` never holds full-vocabulary logits for more than one chunk of tokens: a
custom autograd function computes, for each chunk, both models' logits, the per-token
divergence (`kdcli.losses.divergences`) and the student's gradients, then drops the logits.
The gradients w.r.t. the student's hidden states, head weight and head bias are accumulated
during the forward pass and scaled by the incoming gradient in backward (so a backward costs
nothing more, and a forward that needs no gradient computes none). The teacher side is a
constant (detached). `bench/lm_loss.py` measures the peak memory against full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX

from .divergences import CachedTopK, forward_kl
from .inputs import _ndim, _shape, _tensor, compute_dtype

_LOSS = "chunked_kd_loss"


class _Settings(NamedTuple):
    """What `_ChunkedKD` reads besides tensors (one argument of `apply`)."""

    fn: Callable[..., Tensor]
    options: dict[str, Any]
    chunk_size: int
    temperature: float
    kd_weight: float
    hard_weight: float
    parts: bool
    cached_T: CachedTopK | None
    shared: int


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_S, head_S, bias_S, labels, normaliser, settings, *teachers):
        fn, options, chunk_size, temperature, kd_weight, hard_weight, parts, cached_T, shared = settings
        needs = ctx.needs_input_grad[:3]
        dtype = compute_dtype(hidden_S, head_S)
        grads: list[Tensor | None] = [None, None, None]
        if needs[0]:
            grads[0] = torch.zeros_like(hidden_S, dtype=dtype)
        if needs[1]:
            grads[1] = torch.zeros_like(head_S, dtype=dtype)
        if needs[2]:
            grads[2] = torch.zeros_like(bias_S, dtype=dtype)
        sums = torch.zeros(2, dtype=dtype, device=hidden_S.device)  # KD, hard-label CE
        triples = [teachers[i : i + 3] for i in range(0, len(teachers), 3)]
        for start in range(0, hidden_S.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden_S[rows]
            # several teachers: the mean of their logits (as the reference's MultiTeacherDistiller)
            logits_T = sum(F.linear(h_T[rows], w_T, b_T) for h_T, w_T, b_T in triples) if triples else None
            if len(triples) > 1:
                logits_T = logits_T / len(triples)
            if cached_T is not None:  # the teacher cache's top-k distribution of these rows
                logits_T = cached_T.rows(rows)
            # the graph starts at the logits (autograd is off here): their gradient dz gives the
            # inputs' by hand, accumulated in place (no (V, D) temporary per chunk)
            logits_S = F.linear(h, head_S, bias_S).to(dtype).requires_grad_(any(needs))
            with torch.enable_grad():
                target = labels[rows] if labels is not None else None
                if logits_T is not None:  # the ids both heads have: a padded head's extra rows left out
                    kd_S = logits_S[:, :shared] if shared < logits_S.shape[1] else logits_S
                    per_token = fn(kd_S, logits_T, temperature=temperature, **options)
                    if target is not None:
                        per_token = torch.where(target != IGNORE_INDEX, per_token, 0.0)
                    kd = per_token.sum()
                else:  # no teacher (kd_weight 0): the hard-label term alone
                    kd = logits_S.new_zeros(())
                part = kd_weight * kd
                ce = None
                if target is not None and (hard_weight or parts):
                    ce = F.cross_entropy(logits_S, target, ignore_index=IGNORE_INDEX, reduction="sum")
                    if hard_weight:
                        part = part + hard_weight * ce
                dz = torch.autograd.grad(part, logits_S)[0] if any(needs) else None
            sums[0] += kd.detach()
            if ce is not None:
                sums[1] += ce.detach()
            if dz is None:
                continue
            dz_in = dz.to(head_S.dtype)  # the head's matmuls run in the inputs' dtype
            if needs[0]:
                grads[0][rows] = dz_in @ head_S
            if needs[1]:
                if dz_in.dtype == dtype:
                    grads[1].addmm_(dz_in.T, h)
                else:
                    grads[1] += dz_in.T @ h
            if needs[2]:
                grads[2] += dz.sum(0)
        ctx.grads = [g.div_(normaliser) if g is not None else None for g in grads]  # in place: no second copy
        ctx.n_teacher_inputs = len(teachers)
        ctx.dtypes = (hidden_S.dtype, head_S.dtype, bias_S.dtype if bias_S is not None else None)
        sums = sums / normaliser
        ctx.mark_non_differentiable(sums)
        total = kd_weight * sums[0] + hard_weight * sums[1]
        return total, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_sums):
        one = bool(grad_output == 1)  # the usual case: hand the buffers over without another copy
        out = [None if g is None else (g if one else g * grad_output).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, *([None] * ctx.n_teacher_inputs))


def _check(name: str, x: object, dims: tuple[int, ...], what: str) -> Tensor:
    t = _tensor(_LOSS, name, x)
    _ndim(_LOSS, name, t, dims, what)
    return t


def chunked_kd_loss(
    hidden_S: Tensor,
    head_S: Tensor,
    hidden_T: Tensor | Sequence[Tensor],
    head_T: Tensor | Sequence[Tensor],
    *,
    bias_S: Tensor | None = None,
    bias_T: Tensor | None | Sequence[Tensor | None] = None,
    divergence: Callable[..., Tensor] = forward_kl,
    divergence_options: Mapping[str, Any] | None = None,
    chunk_size: int = CHUNK_SIZE,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    labels: Tensor | None = None,
    normaliser: float | Tensor | None = None,
    kd_weight: float = 1.0,
    return_parts: bool = False,
    cached_T: CachedTopK | None = None,
    vocab: int | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``(kd_weight * sum_t KD_t + hard_label_weight * sum_t CE_t) / normaliser`` over the target rows t.

    ``KD_t = divergence(hidden_S[t] @ head_S.T + bias_S, hidden_T[t] @ head_T.T + bias_T)``
    (a per-token `kdcli.losses.divergences` function, `registry.get_loss(name).token_fn()`, called with ``temperature`` and
    ``divergence_options``, e.g. ``{"beta": 0.5}``, ``{"t_squared": True, "top_k": 64}``), and
    ``CE_t`` the student's next-token cross-entropy on ``labels[t]`` at temperature 1. The
    labels are already shifted by the caller: row t is position t's hidden state, and its
    label is token t + 1 of the sequence (`IGNORE_INDEX`, -100, where there is none).

    Args:
        hidden_S: (N, D_S), the student's final hidden states (batch and length flattened).
        head_S: (V, D_S), the student's output head (``lm_head.weight``); bias_S: (V,) or None.
        hidden_T, head_T, bias_T: the teacher's, (N, D_T), (V, D_T), (V,) or None; detached.
            Several teachers: a list of each (equal lengths); the KD target is the mean of their
            logits, computed per chunk.
        chunk_size: tokens per chunk (>= 1; need not divide N): the most rows of (V,) logits
            alive at once, per model.
        temperature: T > 0 of the divergence (the hard-label term uses T = 1).
        hard_label_weight: >= 0; > 0 needs ``labels``.
        labels: (N,) integer targets or None (every row is a target). Rows labelled
            IGNORE_INDEX contribute nothing, to the KD term either (but are still computed:
            a caller with many such rows, e.g. long prompts, saves time by passing only the
            target rows).
        normaliser: the number of target tokens of the whole optimizer step (for gradient
            accumulation over micro-batches); default: the target rows here (at least 1).
        kd_weight: >= 0, the weight of the KD term in the returned total (and its gradient).
        return_parts: also return ``{"kd": sum KD / normaliser, "hard_label": sum CE /
            normaliser}`` (detached; the CE is computed whenever labels are given).
        cached_T: instead of teachers (``hidden_T`` and ``head_T`` empty lists): the teacher's
            top-k distribution of each of the N rows (`distillation.teacher_cache`), for a
            divergence with ``top_k`` in ``divergence_options``.
        vocab: the KD term compares the first ``vocab`` token ids (default: the smallest head's
            rows, so a padded head's extra rows are left out; ids >= vocab in ``cached_T`` are
            dropped, `cached_top_k_log_probs`). The hard-label term uses the student's whole head.
    Returns: a 0-dim tensor, differentiable w.r.t. hidden_S, head_S and bias_S (not twice);
    with ``return_parts``, ``(total, parts)``.
    Precision: the logits are computed in the inputs' dtype (as the model's head would), the
    loss and the gradient sums in float32 for half inputs (float64 stays float64); the
    gradients are returned in each input's dtype.
    """
    hiddens_T: list[Tensor] = list(hidden_T) if isinstance(hidden_T, (list, tuple)) else [cast(Tensor, hidden_T)]
    heads_T: list[Tensor] = list(head_T) if isinstance(head_T, (list, tuple)) else [cast(Tensor, head_T)]
    biases_T: list[Tensor | None] = (
        list(bias_T) if isinstance(bias_T, (list, tuple)) else [cast("Tensor | None", bias_T)] * len(hiddens_T)
    )
    if cached_T is not None and (hiddens_T or cached_T.ids.shape[0] != hidden_S.shape[0]):
        raise ValueError(f"{_LOSS}: cached_T replaces the teachers and has one row per row of hidden_S")
    if (
        (not hiddens_T and cached_T is None and kd_weight)
        or len(heads_T) != len(hiddens_T)
        or len(biases_T) != len(hiddens_T)
    ):
        raise ValueError(
            f"{_LOSS}: one head_T (and bias_T) per hidden_T: got {len(hiddens_T)} hidden_T, "
            f"{len(heads_T)} head_T, {len(biases_T)} bias_T"
        )
    hidden_S, head_S = _checked_shapes(hidden_S, head_S, bias_S, hiddens_T, heads_T, biases_T)
    n, vocab_S = hidden_S.shape[0], head_S.shape[0]
    fn, vocab = _checked_options(divergence, vocab, chunk_size, kd_weight, hard_label_weight, vocab_S, heads_T)
    if labels is not None:
        _tensor(_LOSS, "labels", labels)
        if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"{_LOSS}: labels must be integer of shape (N,) = {(n,)}, got {labels.dtype} {_shape(labels)}"
            )
        labels = labels.to(hidden_S.device)
    elif hard_label_weight:
        raise ValueError(f"{_LOSS}: hard_label_weight = {hard_label_weight} needs labels")
    if normaliser is None:
        normaliser = (labels != IGNORE_INDEX).sum().clamp_min(1) if labels is not None else max(n, 1)
    elif isinstance(normaliser, bool) or not isinstance(normaliser, (int, float, Tensor)) or not normaliser > 0:
        raise ValueError(f"{_LOSS}: normaliser must be > 0 (the step's number of target tokens), got {normaliser!r}")
    settings = _Settings(
        fn,
        dict(divergence_options or {}),
        chunk_size,
        temperature,
        float(kd_weight),
        float(hard_label_weight),
        return_parts,
        cached_T,
        vocab,
    )
    teachers = []  # each head cut to the shared ids (a view: no copy)
    for h_T, w_T, b_T in zip(hiddens_T, heads_T, biases_T):
        teachers += [h_T.detach(), w_T.detach()[:vocab], None if b_T is None else b_T.detach()[:vocab]]
    total, sums = _ChunkedKD.apply(hidden_S, head_S, bias_S, labels, normaliser, settings, *teachers)
    if return_parts:
        return total, {"kd": sums[0], "hard_label": sums[1]}
    return total


def _checked_shapes(hidden_S, head_S, bias_S, hiddens_T, heads_T, biases_T) -> tuple[Tensor, Tensor]:
    """(hidden_S, head_S) checked; every input's sizes against the others (ValueError naming both)."""
    hidden_S = _check("hidden_S", hidden_S, (2,), "(N, D_S)")
    head_S = _check("head_S", head_S, (2,), "(V, D_S)")
    n, vocab_S = hidden_S.shape[0], head_S.shape[0]
    pairs = [("head_S", head_S.shape[1], hidden_S.shape[1], "D_S")]
    if bias_S is not None:
        pairs.append(("bias_S", _check("bias_S", bias_S, (1,), "(V,)").shape[0], vocab_S, "V"))
    for h_T, w_T, b_T in zip(hiddens_T, heads_T, biases_T):
        h_T = _check("hidden_T", h_T, (2,), "(N, D_T)")
        w_T = _check("head_T", w_T, (2,), "(V_T, D_T)")
        pairs += [("hidden_T", h_T.shape[0], n, "N"), ("head_T", w_T.shape[1], h_T.shape[1], "D_T")]
        if b_T is not None:
            pairs.append(("bias_T", _check("bias_T", b_T, (1,), "(V_T,)").shape[0], w_T.shape[0], "V_T"))
    for name, got, want, dim in pairs:
        if got != want:
            raise ValueError(
                f"{_LOSS}: {name} has {dim} = {got} but {want} from the other inputs "
                f"(hidden_S {_shape(hidden_S)}, head_S {_shape(head_S)}, hidden_T {_shape(hiddens_T[0])}, "
                f"head_T {_shape(heads_T[0])})"
            )
    return hidden_S, head_S


def _checked_options(divergence, vocab, chunk_size, kd_weight, hard_label_weight, vocab_S, heads_T):
    """(divergence function, compared ids) with the scalar options checked (ValueError)."""
    smallest = min([vocab_S, *(w.shape[0] for w in heads_T)])
    if vocab is None:
        vocab = smallest
    elif isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= smallest:
        raise ValueError(f"{_LOSS}: vocab must be an int from 1 to the smallest head's {smallest} rows, got {vocab!r}")
    fn = divergence
    if not callable(fn):
        raise ValueError(
            f"{_LOSS}: divergence must be a per-token function (registry.get_loss(name).token_fn()), got {divergence!r}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_LOSS}: chunk_size must be an int >= 1, got {chunk_size!r}")
    for name, weight in (("hard_label_weight", hard_label_weight), ("kd_weight", kd_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{_LOSS}: {name} must be a number >= 0, got {weight!r}")
    return fn, vocab
