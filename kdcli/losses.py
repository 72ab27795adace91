"""The loss core: TextBrewer 0.2.1's losses, exact on its finite results, without its bugs.

A drop-in for `textbrewer.losses`: the same eleven functions with the same names and
signatures, so ``from kdcli.losses import att_mse_loss`` replaces
``from textbrewer.losses import att_mse_loss``. The registry (`kdcli.registry`) names every
function here; nothing else in kdcli spells a loss name.

Exactness contract. On every input where TextBrewer 0.2.1 returns a finite value, the value
and the gradient with respect to the student input agree with it to 1e-6 relative in float64
(in practice to about 1e-14), on every branch. That includes the reference's conventions,
which are deliberate and must not be "fixed":

* the no-mask attention paths treat scores ``<= -1e-3`` as padding (those entries are zeroed
  for the MSE losses, and the teacher's probability is dropped for the CE losses, judged on
  the *teacher's* scores);
* `kd_ce_loss` has no ``T**2`` factor;
* `mmd_loss` divides its Gram matrices by the hidden size without a mask but by the sequence
  length with one;
* `pkd_loss` ignores the mask and uses position 0 of 3-D input.

Beyond the reference (these only change results where it returns NaN/inf or raises):

* float16 and bfloat16 inputs are reduced in float32 and the loss is float32 (no overflow in
  Gram matrices, no underflow in softmax); float64 stays float64;
* attention scores masked with ``-inf`` or ``finfo.min`` give a finite loss and gradient;
* `pkd_loss` on an all-zero vector is finite (the zero vector stays zero);
* masks may be bool, int or float (non-binary float masks act as weights, as in the
  reference, except in `cos_loss`, which like the reference selects the non-zero positions);
* mismatched shapes raise `ValueError` naming the loss, the arguments and both shapes.

Speed. No host syncs and no data-dependent copies (`cos_loss` weights positions instead of
the reference's `masked_select`). The masked squared errors and the attention
cross-entropies are fused autograd functions: one pass per step forward, one or two
backward, masks applied as in-place float multiplies by row and column weights (on CPU,
bool selects such as `masked_fill`/`where` are an order of magnitude slower than a
multiply), sums as chunked BLAS dots instead of a product temporary. `bench/losses.py`
times every loss against the reference.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "att_ce_loss",
    "att_ce_mean_loss",
    "att_mse_loss",
    "att_mse_sum_loss",
    "cos_loss",
    "fsp_loss",
    "hid_mse_loss",
    "kd_ce_loss",
    "kd_mse_loss",
    "mmd_loss",
    "pkd_loss",
]

#: The reference's no-mask convention: attention scores at or below this count as padding.
NO_MASK_THRESHOLD = -1e-3
#: `torch.nn.functional.cosine_embedding_loss` adds this to both squared norms; `cos_loss`
#: reproduces it so that tiny vectors give the reference's value.
COSINE_EPS = 1e-12

Temperature = float | Tensor
_NATIVE = (torch.float32, torch.float64)  # dtypes a loss reduces in as they are


# --- input checks and precision --------------------------------------------------------


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _tensor(loss: str, name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{loss}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _cast_pair(S: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
    """Both in the loss dtype (`compute_dtype`); a no-op for two float32 or two float64 tensors."""
    dtype = S.dtype
    if dtype is T.dtype and dtype in _NATIVE:
        return S, T
    dtype = compute_dtype(S, T)
    return S.to(dtype), T.to(dtype)


def _same_shape(loss: str, name_a: str, a: Tensor, name_b: str, b: Tensor, why: str = "") -> None:
    if a.shape != b.shape:
        hint = f" ({why})" if why else ""
        raise ValueError(
            f"{loss}: {name_a} has shape {_shape(a)} but {name_b} has shape {_shape(b)}; "
            f"they must be equal{hint}"
        )


def _ndim(loss: str, name: str, x: Tensor, allowed: tuple[int, ...], what: str) -> None:
    if x.dim() not in allowed:
        raise ValueError(f"{loss}: {name} has shape {_shape(x)}; expected {what}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss reduces in: the promoted input dtype, at least float32.

    float16/bfloat16 (and integer) inputs are reduced in float32; float64 stays float64.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or dtype.itemsize < 4:
        return torch.float32
    return dtype


class _Mask:
    """A validated (B, L) mask in the loss's dtype.

    `weight` is the reference's ``mask.to(dtype)`` (non-binary values act as weights);
    `keep` is ``weight != 0``; `binary` says the weights are exactly 0/1, so a squared error
    can be weighted in place (w == w**2). A bool mask is binary by type; an int or float
    mask is checked on CPU (free there) and taken as general weights on an accelerator,
    where the check would wait for the device (same result, one more multiply). `keep` and
    `binary` are computed on first use: every kernel launch counts on small inputs.
    """

    def __init__(self, mask: Tensor, like: Tensor) -> None:
        self._mask = mask
        self.weight: Tensor = mask.to(like.dtype)  # (B, L) float

    @cached_property
    def keep(self) -> Tensor:  # (B, L) bool
        return self._mask if self._mask.dtype == torch.bool else self.weight != 0

    @cached_property
    def binary(self) -> bool:
        if self._mask.dtype == torch.bool:
            return True
        w = self.weight
        return w.device.type == "cpu" and torch.equal(w * w, w)


def _mask(loss: str, mask: object, batch: int, length: int, like: Tensor) -> _Mask:
    if not isinstance(mask, Tensor):
        raise ValueError(f"{loss}: mask must be a torch.Tensor of shape (batch, length), got {type(mask).__name__}")
    if mask.is_complex():
        raise ValueError(f"{loss}: mask must be bool, int or float, got {mask.dtype}")
    if mask.shape != (batch, length):
        raise ValueError(
            f"{loss}: mask has shape {_shape(mask)} but the inputs need (batch, length) = "
            f"{(batch, length)}"
        )
    return _Mask(mask.to(device=like.device), like)


# --- fused kernels ---------------------------------------------------------------------

#: Chunk length of `_dot` on one CPU thread in float32: one BLAS dot over millions of
#: float32 elements drifts by ~1e-4 relative; dots over 65536 elements, summed, stay within
#: ~3e-7 (about torch.sum's accuracy) and beat a product temporary plus a sum.
_DOT_CHUNK = 1 << 16


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over all elements of two same-shape tensors.

    float64, small inputs and accelerators (one tree-reduction kernel): ``torch.dot``.
    float32 on CPU: on one thread, BLAS dots over chunks of 65536 elements (one pass, no
    temporary); on more threads ``torch.sum(a * b)`` (two parallel kernels: many small
    parallel regions stall on a busy machine). Differentiable; under autograd a large
    float32 input also takes ``torch.sum(a * b)`` (one graph node, not one per chunk).
    """
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    if n <= _DOT_CHUNK or a.dtype == torch.float64 or a.device.type != "cpu":
        return torch.dot(a, b)
    if torch.get_num_threads() > 1 or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.sum(a * b)
    return torch.stack([torch.dot(a[i : i + _DOT_CHUNK], b[i : i + _DOT_CHUNK]) for i in range(0, n, _DOT_CHUNK)]).sum()


def _apply_factors_(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """x *= each factor, in place (factors broadcast against x: row and column weights)."""
    for f in factors:
        x.mul_(f)
    return x


class _SquaredErrorSum(torch.autograd.Function):
    """``sum_{..., i, j} r_i c_j (x - y)_ij**2`` (j the last dim): a mask-weighted squared error.

    `rows` broadcasts against ``x.shape[:-1]`` and `cols` against `x` (either may be None).
    Row sums are fused reductions (``vector_norm(d * c, dim=-1)**2`` when the column
    weights are 0/1 (`binary`) or absent), weighted by `rows` on the small (..., i) tensor.
    With `clean`, NaN differences become 0 and infinite ones +-finfo.max first, so masked
    entries contribute exactly zero to the value and the gradient even where both scores
    hold ``-inf`` or one holds ``finfo.min`` (the reference turns ``inf * 0`` into NaN); an
    unmasked infinite difference still gives an infinite loss. Forward: subtraction, clean,
    column weighting in place, one reduction; backward: one multiply. Masks are float
    multiplies, not bool selects (on CPU an order of magnitude faster). First-order only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, rows: Tensor | None, cols: Tensor | None, binary: bool, clean: bool) -> Tensor:
        diff = torch.sub(x, y)
        if clean:
            diff.nan_to_num_(nan=0.0)
        if cols is None:
            wdiff = diff
        else:
            wdiff = diff.mul_(cols) if binary else diff * cols
        if binary or cols is None:  # c == c**2: sum_j (c_j d_j)**2
            per_row = torch.linalg.vector_norm(wdiff, dim=-1).square_()
        else:
            per_row = torch.linalg.vecdot(wdiff, diff, dim=-1)
        if rows is not None:  # a masked row may hold inf (finfo.max squared): select, not multiply
            per_row = torch.where(rows != 0, per_row * rows, 0.0)
        ctx.save_for_backward(wdiff, rows)
        return per_row.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        wdiff, rows = ctx.saved_tensors
        scale = 2.0 * grad if rows is None else (2.0 * grad) * rows.unsqueeze(-1)
        g = wdiff * scale
        gx = g if ctx.needs_input_grad[0] else None
        gy = -g if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None


def _squared_error_sum(
    x: Tensor, y: Tensor, rows: Tensor | None = None, cols: Tensor | None = None, binary: bool = True, clean: bool = False
) -> Tensor:
    return _SquaredErrorSum.apply(x, y, rows, cols, binary, clean)


class _SoftCrossEntropySum(torch.autograd.Function):
    """``-sum(r * log_softmax(s))`` over the last dim, ``r = softmax(t) * w``.

    `w` is the product of the broadcast `factors` (row and column mask weights), or, with
    `threshold` instead, the reference's no-mask rule ``t > threshold``. The student's
    log-probabilities go through one in-place pass that maps ``-inf`` to ``finfo.min`` and
    NaN (a row of only ``-inf`` scores) to 0, and NaN teacher probabilities (a row of only
    ``-inf``) become 0: every product with a zero weight is then exactly 0 instead of NaN,
    and since ``exp(finfo.min) == 0`` the fused log-softmax backward gives the reference's
    gradient unchanged. No gradient flows to `t` here: `_soft_cross_entropy_sum` uses plain
    autograd ops when the teacher's scores require one.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, factors: tuple[Tensor, ...], threshold: float | None) -> Tensor:
        log_q = F.log_softmax(s, dim=-1)
        log_q.nan_to_num_(nan=0.0, neginf=torch.finfo(log_q.dtype).min)
        r = F.softmax(t, dim=-1).nan_to_num_(nan=0.0)
        if threshold is not None:
            r.mul_(torch.gt(t, threshold, out=torch.empty_like(t)))  # float 0/1, no bool temporary
        _apply_factors_(r, factors)
        ctx.save_for_backward(r, log_q)
        return -_dot(r, log_q)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        r, log_q = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[0]:
            gs = torch._log_softmax_backward_data(r * (-grad), log_q, -1, log_q.dtype)
        return gs, None, None, None


def _soft_cross_entropy_sum(s: Tensor, t: Tensor, factors: Sequence[Tensor] = (), threshold: float | None = None) -> Tensor:
    """`_SoftCrossEntropySum`, or plain autograd ops when the teacher scores need a gradient."""
    if not t.requires_grad:
        return _SoftCrossEntropySum.apply(s, t, tuple(factors), threshold)
    floor = torch.finfo(s.dtype).min  # finite everywhere; exp(floor) == exp(-inf) == 0
    log_q = F.log_softmax(s.clamp_min(floor), dim=-1)
    r = F.softmax(t.clamp_min(floor), dim=-1)
    if threshold is not None:
        r = r * (t > threshold)
    for f in factors:
        r = r * f
    return -torch.sum(r * log_q)


class _CosineDistance(torch.autograd.Function):
    """Per-row ``1 - cos(s, t)`` with `cosine_embedding_loss`'s epsilon, weighted and summed.

    ``cos = <s, t> / sqrt((|s|^2 + eps) (|t|^2 + eps))``, eps = 1e-12. Input (N, D) rows,
    `weight` (N,) or None (0 drops a row); returns ``sum_n weight_n (1 - cos_n)``. The
    gradient is ``d cos / d s = t / den - cos * s / (|s|^2 + eps)`` (symmetrically for t).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, weight: Tensor | None) -> Tensor:
        dot = torch.linalg.vecdot(s, t, dim=-1)
        ss = torch.linalg.vector_norm(s, dim=-1).square_().add_(COSINE_EPS)
        tt = torch.linalg.vector_norm(t, dim=-1).square_().add_(COSINE_EPS)
        den = torch.sqrt(ss * tt)
        cos = dot / den
        dist = 1.0 - cos
        if weight is not None:
            dist = torch.where(weight != 0, dist * weight, 0.0)
        ctx.save_for_backward(s, t, ss, tt, den, cos, weight)
        return dist.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        s, t, ss, tt, den, cos, weight = ctx.saved_tensors
        g = -grad if weight is None else torch.where(weight != 0, -grad * weight, 0.0)
        g_den = (g / den).unsqueeze(-1)
        g_cos = (g * cos).unsqueeze(-1)
        gs = gt = None
        if ctx.needs_input_grad[0]:
            gs = torch.addcmul(t * g_den, s, g_cos / ss.unsqueeze(-1), value=-1.0)
        if ctx.needs_input_grad[1]:
            gt = torch.addcmul(s * g_den, t, g_cos / tt.unsqueeze(-1), value=-1.0)
        return gs, gt, None


# --- KD losses on logits ---------------------------------------------------------------


def _logits(loss: str, logits_S: Tensor, logits_T: Tensor, temperature: Temperature):
    _tensor(loss, "logits_S", logits_S)
    _tensor(loss, "logits_T", logits_T)
    _same_shape(loss, "logits_S", logits_S, "logits_T", logits_T)
    if logits_S.dim() < 1:
        raise ValueError(f"{loss}: logits must have a class dimension, got shape {_shape(logits_S)}")
    if isinstance(temperature, Tensor):
        if temperature.dim() > 0:
            if temperature.shape != logits_S.shape[:-1]:
                raise ValueError(
                    f"{loss}: temperature has shape {_shape(temperature)} but logits_S has shape "
                    f"{_shape(logits_S)}; a temperature tensor must have the logits' shape without "
                    f"the class dimension, {tuple(logits_S.shape[:-1])}"
                )
            temperature = temperature.unsqueeze(-1)
        dtype = compute_dtype(logits_S, logits_T, temperature)
        temperature = temperature.to(device=logits_S.device, dtype=dtype)
        return logits_S.to(dtype), logits_T.to(dtype), temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{loss}: temperature must be a float or a tensor, got {type(temperature).__name__}")
    S, T = _cast_pair(logits_S, logits_T)
    return S, T, temperature


def kd_mse_loss(logits_S: Tensor, logits_T: Tensor, temperature: Temperature = 1) -> Tensor:
    """Mean squared error between temperature-scaled logits (Ba & Caruana 2014, arXiv:1312.6184).

    ``mean((logits_S / T - logits_T / T)**2)`` over every element.

    Args:
        logits_S, logits_T: (B, C) or (B, L, C); equal shapes.
        temperature: a float, or a tensor of shape (B,) / (B, L) (the logits' shape without
            the class dimension), applied per example / per token.
    Returns: a 0-dim tensor (float32 for half inputs). No mask: token-level logits are
    selected by the caller, as in the reference.
    """
    S, T, temp = _logits("kd_mse_loss", logits_S, logits_T, temperature)
    return F.mse_loss(S / temp, T / temp)


def kd_ce_loss(logits_S: Tensor, logits_T: Tensor, temperature: Temperature = 1) -> Tensor:
    """Cross-entropy between softened teacher and student distributions (Hinton et al. 2015).

    ``-mean_rows sum_c softmax(logits_T / T)_c * log_softmax(logits_S / T)_c`` with the mean
    over every row (B or B*L). Reference convention: **no T**2 factor** (scale the loss
    weight instead if you want Hinton's gradient magnitude).

    Args:
        logits_S, logits_T: (B, C) or (B, L, C); equal shapes.
        temperature: a float, or a tensor (B,) / (B, L), as in `kd_mse_loss`.
    Returns: a 0-dim tensor (float32 for half inputs).
    """
    S, T, temp = _logits("kd_ce_loss", logits_S, logits_T, temperature)
    p_T = F.softmax(T / temp, dim=-1)
    rows = S.numel() // S.shape[-1]
    return -_dot(p_T, F.log_softmax(S / temp, dim=-1)) / rows


# --- attention losses ------------------------------------------------------------------


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


def _row_col_weights(m: _Mask, heads_dim: bool) -> tuple[Tensor, Tensor]:
    """Weights whose product is m_i m_j: rows (B, [1,] L) against the per-row sums of the
    scores and columns (B, [1,] 1, L) against the scores themselves."""
    w = m.weight.unsqueeze(1) if heads_dim else m.weight
    return w, w.unsqueeze(-2)


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
        rows = S.numel() // S.shape[-1]
        return _soft_cross_entropy_sum(S, T, threshold=NO_MASK_THRESHOLD) / rows
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


# --- hidden-state losses ---------------------------------------------------------------


def _hidden(loss: str, state_S: Tensor, state_T: Tensor, mask: Tensor | None):
    """Validate equal-shape states ((B, L, D) when masked) and cast to the loss dtype."""
    _tensor(loss, "state_S", state_S)
    _tensor(loss, "state_T", state_T)
    _same_shape(
        loss, "state_S", state_S, "state_T", state_T,
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
        got = f"{type(states).__name__} of length {len(states)}" if isinstance(states, (list, tuple)) else type(states).__name__
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
        scale = 1.0 / S1.shape[1]
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
