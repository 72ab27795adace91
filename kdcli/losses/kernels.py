"""Fused autograd kernels of `kdcli.losses`: masked squared errors, soft cross-entropy,
cosine distance and chunked dots (see the package docstring, "Speed").

Package-internal. One pass per step forward, one or two backward; masks are applied as
in-place float multiplies by row and column weights, never bool selects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: `torch.nn.functional.cosine_embedding_loss` adds this to both squared norms; `cos_loss`
#: reproduces it so that tiny vectors give the reference's value.
COSINE_EPS = 1e-12

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
    def forward(
        ctx, x: Tensor, y: Tensor, rows: Tensor | None, cols: Tensor | None, binary: bool, clean: bool
    ) -> Tensor:
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
    x: Tensor,
    y: Tensor,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    binary: bool = True,
    clean: bool = False,
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


def _soft_cross_entropy_sum(
    s: Tensor, t: Tensor, factors: Sequence[Tensor] = (), threshold: float | None = None
) -> Tensor:
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
