"""The mean KD loss of a causal LM from final hidden states and output heads, chunk by chunk.

`chunked_kd_loss` never holds full-vocabulary logits for more than one chunk of tokens: a
custom autograd function computes, for each chunk, both models' logits, the per-token
divergence (`kdcli.losses.divergences`) and the student's gradients, then drops the logits.
The gradients w.r.t. the student's hidden states, head weight and head bias are accumulated
during the forward pass and scaled by the incoming gradient in backward (so a backward costs
nothing more, and a forward that needs no gradient computes none). The teacher side is a
constant (detached). `bench/kd_memory.py` measures the peak memory against full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .divergences import DIVERGENCES
from .inputs import _ndim, _shape, _tensor, compute_dtype

#: labels with this value mark rows that are no target (prompt, padding): they contribute nothing
IGNORE_INDEX = -100
_LOSS = "chunked_kd_loss"


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_S, head_S, bias_S, hidden_T, head_T, bias_T, labels, normaliser, settings):
        fn, options, chunk_size, temperature, hard_weight = settings
        needs = ctx.needs_input_grad[:3]
        dtype = compute_dtype(hidden_S, head_S)
        grads: list[Tensor | None] = [None, None, None]
        if needs[0]:
            grads[0] = torch.zeros_like(hidden_S, dtype=dtype)
        if needs[1]:
            grads[1] = torch.zeros_like(head_S, dtype=dtype)
        if needs[2]:
            grads[2] = torch.zeros_like(bias_S, dtype=dtype)
        total = torch.zeros((), dtype=dtype, device=hidden_S.device)
        for start in range(0, hidden_S.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden_S[rows]
            logits_T = F.linear(hidden_T[rows], head_T, bias_T)
            # the graph starts at the logits (autograd is off here): their gradient dz gives the
            # inputs' by hand, accumulated in place (no (V, D) temporary per chunk)
            logits_S = F.linear(h, head_S, bias_S).to(dtype).requires_grad_(any(needs))
            with torch.enable_grad():
                per_token = fn(logits_S, logits_T, temperature=temperature, **options)
                if labels is not None:
                    target = labels[rows]
                    per_token = torch.where(target != IGNORE_INDEX, per_token, 0.0)
                part = per_token.sum()
                if hard_weight:
                    ce = F.cross_entropy(logits_S, target, ignore_index=IGNORE_INDEX, reduction="sum")
                    part = part + hard_weight * ce
                dz = torch.autograd.grad(part, logits_S)[0] if any(needs) else None
            total += part.detach()
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
        ctx.grads = [g / normaliser if g is not None else None for g in grads]
        ctx.dtypes = (hidden_S.dtype, head_S.dtype, bias_S.dtype if bias_S is not None else None)
        return total / normaliser

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        out = [(g * grad_output).to(dt) if g is not None else None for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None)


def _check(name: str, x: object, dims: tuple[int, ...], what: str) -> Tensor:
    _tensor(_LOSS, name, x)
    _ndim(_LOSS, name, x, dims, what)
    return x


def chunked_kd_loss(
    hidden_S: Tensor,
    head_S: Tensor,
    hidden_T: Tensor,
    head_T: Tensor,
    *,
    bias_S: Tensor | None = None,
    bias_T: Tensor | None = None,
    divergence: str | Callable[..., Tensor] = "forward_kl",
    divergence_options: Mapping[str, Any] | None = None,
    chunk_size: int = 256,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    labels: Tensor | None = None,
    normaliser: float | Tensor | None = None,
) -> Tensor:
    """``(sum_t KD_t + hard_label_weight * sum_t CE_t) / normaliser`` over the target rows t.

    ``KD_t = divergence(hidden_S[t] @ head_S.T + bias_S, hidden_T[t] @ head_T.T + bias_T)``
    (a `kdcli.losses.divergences` function or its name, called with ``temperature`` and
    ``divergence_options``, e.g. ``{"beta": 0.5}``, ``{"t_squared": True, "top_k": 64}``), and
    ``CE_t`` the student's next-token cross-entropy on ``labels[t]`` at temperature 1. The
    labels are already shifted by the caller: row t is position t's hidden state, and its
    label is token t + 1 of the sequence (`IGNORE_INDEX`, -100, where there is none).

    Args:
        hidden_S: (N, D_S), the student's final hidden states (batch and length flattened).
        head_S: (V, D_S), the student's output head (``lm_head.weight``); bias_S: (V,) or None.
        hidden_T, head_T, bias_T: the teacher's, (N, D_T), (V, D_T), (V,) or None; detached.
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
    Returns: a 0-dim tensor, differentiable w.r.t. hidden_S, head_S and bias_S (not twice).
    Precision: the logits are computed in the inputs' dtype (as the model's head would), the
    loss and the gradient sums in float32 for half inputs (float64 stays float64); the
    gradients are returned in each input's dtype.
    """
    hidden_S = _check("hidden_S", hidden_S, (2,), "(N, D_S)")
    hidden_T = _check("hidden_T", hidden_T, (2,), "(N, D_T)")
    head_S = _check("head_S", head_S, (2,), "(V, D_S)")
    head_T = _check("head_T", head_T, (2,), "(V, D_T)")
    n, vocab = hidden_S.shape[0], head_S.shape[0]
    pairs = [("hidden_T", hidden_T.shape[0], n, "N"), ("head_T", head_T.shape[0], vocab, "V")]
    pairs += [
        ("head_S", head_S.shape[1], hidden_S.shape[1], "D_S"),
        ("head_T", head_T.shape[1], hidden_T.shape[1], "D_T"),
    ]
    for name, bias in (("bias_S", bias_S), ("bias_T", bias_T)):
        if bias is not None:
            pairs.append((name, _check(name, bias, (1,), "(V,)").shape[0], vocab, "V"))
    for name, got, want, dim in pairs:
        if got != want:
            raise ValueError(
                f"{_LOSS}: {name} has {dim} = {got} but {want} from the other inputs "
                f"(hidden_S {_shape(hidden_S)}, head_S {_shape(head_S)}, hidden_T {_shape(hidden_T)}, "
                f"head_T {_shape(head_T)})"
            )
    fn = DIVERGENCES.get(divergence) if isinstance(divergence, str) else divergence
    if not callable(fn):
        raise ValueError(f"{_LOSS}: divergence must be one of {sorted(DIVERGENCES)} or a callable, got {divergence!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_LOSS}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(hard_label_weight, bool) or not isinstance(hard_label_weight, (int, float)) or hard_label_weight < 0:
        raise ValueError(f"{_LOSS}: hard_label_weight must be a number >= 0, got {hard_label_weight!r}")
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
    settings = (fn, dict(divergence_options or {}), chunk_size, temperature, float(hard_label_weight))
    return _ChunkedKD.apply(
        hidden_S,
        head_S,
        bias_S,
        hidden_T.detach(),
        head_T.detach(),
        None if bias_T is None else bias_T.detach(),
        labels,
        normaliser,
        settings,
    )
