"""Losses on hidden states: per position (`hid_mse_loss`, `cos_loss`), at position 0
(`pkd_loss`), and on Gram matrices of two layers (`fsp_loss`, `mmd_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import _cast_pair, _mask, _ndim, _row_col_weights, _same_shape, _shape, _tensor, compute_dtype
from .kernels import _CosineDistance, _squared_error_sum


def _hidden(loss: str, state_S: Tensor, state_T: Tensor, mask: Tensor | None):
    """Validate equal-shape states ((B, L, D) when masked) and cast to the loss dtype."""
    _tensor(loss, "state_S", state_S)
    _tensor(loss, "state_T", state_T)
    _same_shape(
        loss,
        "state_S",
        state_S,
        "state_T",
        state_T,
        "hidden sizes must agree; add a `proj` to the match when they differ",
    )
    if state_S.dim() < 1:
        raise ValueError(f"{loss}: state_S must have a hidden dimension, got shape {_shape(state_S)}")
    S, T = _cast_pair(state_S, state_T)
    if mask is None:
        return S, T, None
    _ndim(loss, "state_S", S, (3,), "(batch, length, hidden) when a mask is given")
    return S, T, _mask(loss, mask, S.shape[0], S.shape[1], S)


def hid_mse_loss(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between hidden states (TinyBERT, arXiv:1909.10351).

    Args:
        state_S, state_T: (B, L, D), equal shapes (a `proj` maps the student's D first).
        mask: optional (B, L); 0 marks padding.
    Reduction: masked, ``sum_{b,l} m_bl ||H_S - H_T||^2 / (D * sum m)``; unmasked, the mean
    over all elements.
    """
    S, T, m = _hidden("hid_mse_loss", state_S, state_T, mask)
    if m is None:
        return F.mse_loss(S, T)
    total = _squared_error_sum(S, T, rows=m.weight)
    return total / (m.weight.sum() * S.shape[-1])


def cos_loss(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine distance between hidden states (DistilBERT, arXiv:1910.01108).

    ``mean over positions of 1 - cos(h_S, h_T)`` with `cosine_embedding_loss`'s definition
    ``cos = <s, t> / sqrt((|s|^2 + 1e-12)(|t|^2 + 1e-12))`` (so zero vectors give cos = 0).

    Args:
        state_S, state_T: (B, L, D) (or any equal shapes ending in D without a mask).
        mask: optional (B, L); non-zero entries select positions (the reference's
            `masked_select`; the mask's values are not weights here). Without a mask every
            position counts.
    Reduction: mean over the selected positions. Positions are weighted instead of copied
    out, so there is no host sync; an all-zero mask gives 0 (the reference gives NaN).
    """
    S, T, m = _hidden("cos_loss", state_S, state_T, mask)
    D = S.shape[-1]
    S2, T2 = S.reshape(-1, D), T.reshape(-1, D)
    if m is None:
        return _CosineDistance.apply(S2, T2, None) / S2.shape[0]
    keep = m.keep.reshape(-1).to(S.dtype)
    return _CosineDistance.apply(S2, T2, keep) / keep.sum().clamp_min(1.0)


def _unit_rows(x: Tensor) -> Tensor:
    """x / ||x|| per row; an all-zero row stays zero (the reference divides by zero).

    The norm is floored at ``finfo.tiny``. That changes no finite reference result: torch's
    norm is sqrt(sum x^2), so a non-zero norm is at least sqrt(smallest subnormal), far
    above tiny; only a norm of exactly 0 (where the reference gives NaN or inf) is lifted.
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny)


def pkd_loss(state_S: Tensor, state_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised-vector MSE at position 0 (BERT-PKD, arXiv:1908.09355).

    ``mean_b || s_b/||s_b|| - t_b/||t_b|| ||^2`` with s = state_S[:, 0] for 3-D input (the
    [CLS] position) or state_S itself for 2-D input; each side independently.

    Args:
        state_S, state_T: (B, L, D) or (B, D); the selected vectors must have equal shapes.
        mask: not used (reference convention).
    An all-zero vector is left at zero instead of divided by zero, so the loss is finite.
    """
    loss = "pkd_loss"
    _tensor(loss, "state_S", state_S)
    _tensor(loss, "state_T", state_T)
    what = "(batch, length, hidden) or (batch, hidden)"
    _ndim(loss, "state_S", state_S, (2, 3), what)
    _ndim(loss, "state_T", state_T, (2, 3), what)
    cls_S = state_S[:, 0] if state_S.dim() == 3 else state_S
    cls_T = state_T[:, 0] if state_T.dim() == 3 else state_T
    if cls_S.shape != cls_T.shape:
        raise ValueError(
            f"{loss}: state_S has shape {_shape(state_S)} but state_T has shape {_shape(state_T)}; "
            f"the compared vectors have shapes {_shape(cls_S)} and {_shape(cls_T)} and must be equal "
            f"(add a `proj` when hidden sizes differ)"
        )
    dtype = compute_dtype(cls_S, cls_T)
    diff = _unit_rows(cls_S.to(dtype)) - _unit_rows(cls_T.to(dtype))
    return diff.square().sum(dim=-1).mean()


# --- two-layer (Gram) losses -----------------------------------------------------------


def _two(loss: str, name: str, states: object) -> tuple[Tensor, Tensor]:
    if not isinstance(states, (list, tuple)) or len(states) != 2:
        got = (
            f"{type(states).__name__} of length {len(states)}"
            if isinstance(states, (list, tuple))
            else type(states).__name__
        )
        raise ValueError(f"{loss}: {name} must be a list of two tensors (two layers), got {got}")
    a = _tensor(loss, f"{name}[0]", states[0])
    b = _tensor(loss, f"{name}[1]", states[1])
    what = "(batch, length, hidden)"
    _ndim(loss, f"{name}[0]", a, (3,), what)
    _ndim(loss, f"{name}[1]", b, (3,), what)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"{loss}: {name}[0] has shape {_shape(a)} but {name}[1] has shape {_shape(b)}; "
            f"batch and length must be equal"
        )
    return a, b


def fsp_loss(state_S: Sequence[Tensor], state_T: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """MSE between (D, D) Gram matrices of two layers; a variant of FSP (Yim et al., CVPR 2017).

    ``G = X_0^T X_1 / n`` per example (B, D, D) for each side, then ``mean((G_S - G_T)^2)``.

    Args:
        state_S, state_T: lists of two (B, L, D) tensors; student and teacher shapes equal
            (a `proj` maps the student's D first).
        mask: optional (B, L). Masked positions are zeroed in both layers (so a float mask
            weighs position l by m_l^2) and n is each example's ``sum m``; without a mask
            n is the sequence length L.
    """
    loss = "fsp_loss"
    S0, S1 = _two(loss, "state_S", state_S)
    T0, T1 = _two(loss, "state_T", state_T)
    for i, (s, t) in enumerate(((S0, T0), (S1, T1))):
        _same_shape(loss, f"state_S[{i}]", s, f"state_T[{i}]", t, "add a `proj` when hidden sizes differ")
    dtype = compute_dtype(S0, S1, T0, T1)
    S0, S1, T0, T1 = (x.to(dtype) for x in (S0, S1, T0, T1))
    if mask is None:
        scale: float | Tensor = 1.0 / S1.shape[1]
        return F.mse_loss(_gram_dd(S0, S1, scale), _gram_dd(T0, T1, scale))
    m = _mask(loss, mask, S0.shape[0], S0.shape[1], S0)
    # Zeroing both layers and dividing by the length == weighting X_1 by m^2 / sum m.
    scale = (m.weight.square() / m.weight.sum(dim=1, keepdim=True)).unsqueeze(-1)  # (B, L, 1)
    return F.mse_loss(_gram_dd(S0, S1, scale), _gram_dd(T0, T1, scale))


def _gram_dd(x0: Tensor, x1: Tensor, scale: float | Tensor) -> Tensor:
    """x0^T (scale * x1): (B, D0, D1). A scalar scale is applied to the smaller operand."""
    if isinstance(scale, float) and x0.shape[2] * x1.shape[2] <= x1.shape[1] * x1.shape[2]:
        return torch.bmm(x0.transpose(1, 2), x1).mul_(scale)
    return torch.bmm(x0.transpose(1, 2), x1 * scale)


def mmd_loss(state_S: Sequence[Tensor], state_T: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """MSE between (L, L) Gram matrices of two layers; a variant of NST (arXiv:1707.01219).

    ``G = X_0 X_1^T / d`` per example (B, L, L) for each side, then the MSE of G_S and G_T.
    The student's and teacher's hidden sizes may differ (no `proj` needed).

    Args:
        state_S: two (B, L, D_S) tensors; state_T: two (B, L, D_T) tensors.
        mask: optional (B, L); 0 marks padding.
    Reduction (reference convention, kept on purpose):
        * without a mask, d is each side's hidden size (D_S, D_T) and the mean is over B*L*L;
        * with a mask, d is the sequence length L on both sides, and the loss is
          ``sum m_bi m_bj (G_S - G_T)^2 / sum_b (sum_i m_bi)^2``.
    """
    loss = "mmd_loss"
    S0, S1 = _two(loss, "state_S", state_S)
    T0, T1 = _two(loss, "state_T", state_T)
    _same_shape(loss, "state_S[0]", S0, "state_S[1]", S1)
    _same_shape(loss, "state_T[0]", T0, "state_T[1]", T1)
    if S0.shape[:2] != T0.shape[:2]:
        raise ValueError(
            f"{loss}: state_S[0] has shape {_shape(S0)} but state_T[0] has shape {_shape(T0)}; "
            f"batch and length must be equal (hidden sizes may differ)"
        )
    dtype = compute_dtype(S0, S1, T0, T1)
    S0, S1, T0, T1 = (x.to(dtype) for x in (S0, S1, T0, T1))
    if mask is None:
        gram_S = torch.bmm(S0, S1.transpose(1, 2)).div_(S1.shape[2])
        gram_T = torch.bmm(T0, T1.transpose(1, 2)).div_(T1.shape[2])
        return F.mse_loss(gram_S, gram_T)
    m = _mask(loss, mask, S0.shape[0], S0.shape[1], S0)
    length = S1.shape[1]
    gram_S = torch.bmm(S0, S1.transpose(1, 2)).div_(length)
    gram_T = torch.bmm(T0, T1.transpose(1, 2)).div_(length)
    rows, cols = _row_col_weights(m, heads_dim=False)
    total = _squared_error_sum(gram_S, gram_T, rows, cols, m.binary)
    return total / m.weight.sum(dim=1).square().sum()
