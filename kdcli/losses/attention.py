"""Losses on attention scores: `att_mse_loss`, `att_mse_sum_loss` (TinyBERT) and
`att_ce_loss`, `att_ce_mean_loss` (MiniLM), on raw (pre-softmax) scores.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .inputs import _Mask, _mask, _ndim, _row_col_weights, _same_shape, _shape, _tensor, compute_dtype
from .kernels import _soft_cross_entropy_sum, _squared_error_sum

#: The reference's no-mask convention: attention scores at or below this count as padding.
NO_MASK_THRESHOLD = -1e-3


def _attention(
    loss: str, attention_S: Tensor, attention_T: Tensor, mask: Tensor | None, *, same_heads: bool
) -> tuple[Tensor, Tensor, _Mask | None]:
    """Validate scores (B, H, L, L) or (B, L, L) and a (B, L) mask; cast to the loss dtype."""
    _tensor(loss, "attention_S", attention_S)
    _tensor(loss, "attention_T", attention_T)
    what = "(batch, heads, length, length) or (batch, length, length)"
    _ndim(loss, "attention_S", attention_S, (3, 4), what)
    _ndim(loss, "attention_T", attention_T, (3, 4), what)
    if attention_S.dim() != attention_T.dim():
        raise ValueError(
            f"{loss}: attention_S has shape {_shape(attention_S)} but attention_T has shape "
            f"{_shape(attention_T)}; both must be 4-D (batch, heads, length, length) or both 3-D"
        )
    if same_heads or attention_S.dim() == 3:
        why = "equal head counts; use the _sum/_mean variant when they differ" if same_heads else ""
        _same_shape(loss, "attention_S", attention_S, "attention_T", attention_T, why)
    else:
        rest_S, rest_T = attention_S.shape[:1] + attention_S.shape[2:], attention_T.shape[:1] + attention_T.shape[2:]
        if rest_S != rest_T:
            raise ValueError(
                f"{loss}: attention_S has shape {_shape(attention_S)} but attention_T has shape "
                f"{_shape(attention_T)}; batch and lengths must be equal (head counts may differ)"
            )
    dtype = compute_dtype(attention_S, attention_T)
    S, T = attention_S.to(dtype), attention_T.to(dtype)
    if mask is None:
        return S, T, None
    length = S.shape[-1]
    if S.shape[-2] != length:
        raise ValueError(
            f"{loss}: attention_S has shape {_shape(attention_S)}; with a mask the scores must be "
            f"square (length, length)"
        )
    return S, T, _mask(loss, mask, S.shape[0], length, S)


def _att_mse(S: Tensor, T: Tensor, m: _Mask | None) -> Tensor:
    """MSE on (B, H, L, L) or (B, L, L); see `att_mse_loss` for the conventions."""
    if m is None:
        return F.mse_loss(F.threshold(S, NO_MASK_THRESHOLD, 0.0), F.threshold(T, NO_MASK_THRESHOLD, 0.0))
    heads = S.shape[1] if S.dim() == 4 else 1
    rows, cols = _row_col_weights(m, S.dim() == 4)
    valid = m.weight.sum(dim=1).square().sum() * heads
    return _squared_error_sum(S, T, rows, cols, m.binary, clean=True) / valid


def _att_ce(S: Tensor, T: Tensor, m: _Mask | None) -> Tensor:
    """Soft cross-entropy over the last dim of (B, H, L, L) or (B, L, L); see `att_ce_loss`."""
    if m is None:
        n_rows = S.numel() // S.shape[-1]
        return _soft_cross_entropy_sum(S, T, threshold=NO_MASK_THRESHOLD) / n_rows
    heads = S.shape[1] if S.dim() == 4 else 1
    rows, cols = _row_col_weights(m, S.dim() == 4)
    return _soft_cross_entropy_sum(S, T, (rows.unsqueeze(-1), cols)) / (m.weight.sum() * heads)


def att_mse_loss(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between attention score matrices, per head (TinyBERT, arXiv:1909.10351).

    Args:
        attention_S, attention_T: (B, H, L, L) raw (pre-softmax) scores, equal shapes (equal
            head counts); (B, L, L) is taken as one head.
        mask: optional (B, L), bool/int/float; 0 marks padding.
    Masking and reduction:
        * with a mask: ``sum_{b,h,i,j} m_bi m_bj (A_S - A_T)^2 / sum_{b,h} (sum_i m_bi)^2``;
          masked entries contribute nothing, whatever they hold (-10000, -inf, finfo.min).
        * without a mask (reference convention): entries ``<= -1e-3`` in either tensor are
          set to 0 (they are taken for additive padding), then the plain mean over all
          B*H*L*L entries.
    """
    S, T, m = _attention("att_mse_loss", attention_S, attention_T, mask, same_heads=True)
    return _att_mse(S, T, m)


def att_mse_sum_loss(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between head-summed attention scores (TinyBERT, arXiv:1909.10351).

    Args:
        attention_S, attention_T: (B, H_S, L, L) and (B, H_T, L, L) (head counts may differ;
            scores are summed over heads first) or both (B, L, L).
        mask: optional (B, L); 0 marks padding.
    Masking and reduction: as `att_mse_loss` on the (B, L, L) sums: masked,
    ``sum m_bi m_bj (sum_h A_S - sum_h A_T)^2 / sum_b (sum_i m_bi)^2``; unmasked, summed
    entries ``<= -1e-3`` are zeroed and the mean is over B*L*L.
    """
    S, T, m = _attention("att_mse_sum_loss", attention_S, attention_T, mask, same_heads=False)
    if S.dim() == 4:
        S, T = S.sum(dim=1), T.sum(dim=1)
    return _att_mse(S, T, m)


def att_ce_loss(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between attention distributions, per head (MiniLM, arXiv:2002.10957).

    ``-softmax(A_T) * log_softmax(A_S)`` summed over keys (softmax over the last dim).

    Args:
        attention_S, attention_T: (B, H, L, L) raw scores, equal shapes; (B, L, L) is one head.
        mask: optional (B, L); 0 marks padding.
    Masking and reduction:
        * with a mask: ``-sum_{b,h,i,j} m_bi m_bj p_T log q_S / sum_{b,h,i} m_bi`` (mean over
          unmasked query rows of every head); masked keys still enter both softmaxes, as in
          the reference, and ``-inf`` scores give a finite loss.
        * without a mask (reference convention): the teacher's probability is dropped where
          the *teacher's* score is ``<= -1e-3``, and the mean is over all B*H*L rows.
    """
    S, T, m = _attention("att_ce_loss", attention_S, attention_T, mask, same_heads=True)
    return _att_ce(S, T, m)


def att_ce_mean_loss(attention_S: Tensor, attention_T: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between head-averaged attention scores (MiniLM, arXiv:2002.10957).

    Args:
        attention_S, attention_T: (B, H_S, L, L) and (B, H_T, L, L) (head counts may differ;
            scores are averaged over heads before the softmax) or both (B, L, L).
        mask: optional (B, L); 0 marks padding.
    Masking and reduction: as `att_ce_loss` on the (B, L, L) means: masked, divided by
    ``sum m``; unmasked, teacher probabilities dropped where the mean teacher score is
    ``<= -1e-3`` and the mean is over B*L rows.
    """
    S, T, m = _attention("att_ce_mean_loss", attention_S, attention_T, mask, same_heads=False)
    if S.dim() == 4:
        S, T = S.mean(dim=1), T.mean(dim=1)
    return _att_ce(S, T, m)
