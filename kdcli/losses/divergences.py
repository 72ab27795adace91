"""Per-token KD divergences between next-token distributions (groundwork for causal-LM KD).

Every divergence takes ``student_logits`` and ``teacher_logits`` of shape (N, V) (one row of
vocabulary logits per token) and returns the per-token loss, shape (N,): no mask and no
reduction, which are the caller's (the causal-LM objective takes the mean over the target
tokens of the whole optimizer step; `kdcli.losses.chunked` does it chunk by chunk).

Notation: ``p = softmax(z_T / T)`` (teacher), ``q = softmax(z_S / T)`` (student), both from
``log_softmax`` (no ``log(0)``); terms with a zero weight count 0 (the ``xlogy`` convention
``0 log 0 = 0``), so ``-inf`` logits (a padded vocabulary) give finite losses and gradients
as long as the other distribution is not 0 where the weighting one is not.

Precision: float16/bfloat16 inputs are computed in float32 and the loss is float32; float64
stays float64 (`kdcli.losses.inputs.compute_dtype`).

Common keyword arguments:

* ``temperature`` (T > 0, a number): both logits are divided by it before the softmax;
* ``t_squared``: multiply the loss by T**2 (Hinton et al. 2015, arXiv:1503.02531, keeps the
  gradient magnitude independent of T); default False;
* ``top_k`` / ``top_k_mode``: use only the teacher's k most likely token ids (see
  `top_k_log_probs`); k larger than V is taken as V.

Mismatched shapes or out-of-range arguments raise `ValueError` naming the loss and the argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import _cast_pair, _ndim, _same_shape, _shape, _tensor, compute_dtype

#: how `top_k_log_probs` reduces the vocabulary: renormalise over the k ids, or add a tail bucket
TOP_K_MODES = ("renormalise", "tail")


def _number(loss: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{loss}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def _temperature(loss: str, temperature: object) -> float:
    t = _number(loss, "temperature", temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{loss}: temperature must be finite and > 0, got {temperature!r}")
    return t


def _unit(loss: str, name: str, value: object) -> float:
    v = _number(loss, name, value)
    if not 0 <= v <= 1:
        raise ValueError(f"{loss}: {name} must be in [0, 1], got {value!r}")
    return v


def _check_logits(loss: str, student_logits: object, teacher_logits: object) -> None:
    s = _tensor(loss, "student_logits", student_logits)
    t = _tensor(loss, "teacher_logits", teacher_logits)
    _ndim(loss, "student_logits", s, (2,), "(N, V): one row of vocabulary logits per token")
    _same_shape(loss, "student_logits", s, "teacher_logits", t)
    if s.shape[-1] == 0:
        raise ValueError(f"{loss}: the vocabulary is empty (student_logits has shape {_shape(s)})")


def top_k_log_probs(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int,
    mode: str = "renormalise",
    *,
    temperature: float = 1.0,
    loss: str = "top_k_log_probs",
) -> tuple[Tensor, Tensor]:
    """The student's and teacher's log-distributions reduced to the teacher's top-k token ids.

    The ids are the k largest ``teacher_logits`` of each row (ties as `torch.topk` breaks them).

    * ``mode="renormalise"``: ``log_softmax`` of the k gathered logits / T, for both models
      (p and q restricted to the k ids and renormalised);
    * ``mode="tail"``: the k ids' log-probabilities under the full softmax, plus one tail
      bucket (the last column) holding ``log`` of each distribution's remaining mass,
      computed as a ``logsumexp`` over the other ids (exact for a tiny tail). With k >= V
      there is no tail and no bucket.

    Args:
        student_logits, teacher_logits: (N, V), equal shapes, any float dtype.
        k: >= 1; taken as V when larger.
        mode: one of `TOP_K_MODES`.
        temperature: T > 0, applied before the softmax.
        loss: the name error messages give (the divergence calling this).
    Returns: ``(log_q, log_p)``, each (N, K) with K = min(k, V) (+1 in tail mode with k < V),
    in the compute dtype (float32 for half inputs). A tail whose ids are all ``-inf`` logits
    gives ``-inf`` in the bucket (value fine, gradient NaN): use renormalise mode there.
    """
    _check_logits(loss, student_logits, teacher_logits)
    t = _temperature(loss, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{loss}: top_k must be an int >= 1, got {k!r}")
    if mode not in TOP_K_MODES:
        raise ValueError(f"{loss}: top_k_mode must be one of {TOP_K_MODES}, got {mode!r}")
    S, T = _cast_pair(student_logits, teacher_logits)
    S, T = S / t, T / t
    vocab = S.shape[-1]
    k = min(k, vocab)
    idx = T.topk(k, dim=-1).indices
    if mode == "renormalise" or k == vocab:
        return F.log_softmax(S.gather(-1, idx), dim=-1), F.log_softmax(T.gather(-1, idx), dim=-1)
    out = []
    for z in (S, T):
        log_probs = F.log_softmax(z, dim=-1)
        tail = log_probs.scatter(-1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
        out.append(torch.cat([log_probs.gather(-1, idx), tail], dim=-1))
    return out[0], out[1]


class CachedTopK(NamedTuple):
    """A teacher's top-k next-token distribution per token, as `distillation.teacher_cache`
    keeps it: what `top_k_log_probs` takes from the teacher's logits, computed once.

    ids: (N, k) the teacher's k most likely token ids (of logits / T); log_p: (N, k) their
    log-probabilities at temperature T under the full softmax; tail: (N,) the log of the mass
    of every other id. Passed as ``teacher_logits`` to a divergence with the same ``top_k``
    and ``temperature``, it gives the loss of the full teacher logits (to rounding)."""

    ids: Tensor
    log_p: Tensor
    tail: Tensor

    def rows(self, index) -> CachedTopK:
        return CachedTopK(self.ids[index], self.log_p[index], self.tail[index])


def cached_top_k_log_probs(
    student_logits: Tensor, teacher: CachedTopK, k: int | None, mode: str, *, temperature: float, loss: str
) -> tuple[Tensor, Tensor]:
    """`top_k_log_probs` with the teacher's side read from a `CachedTopK`."""
    _tensor(loss, "student_logits", student_logits)
    _ndim(loss, "student_logits", student_logits, (2,), "(N, V): one row of vocabulary logits per token")
    t = _temperature(loss, temperature)
    vocab, cached = student_logits.shape[-1], teacher.ids.shape[-1]
    if k is None or min(k, vocab) != cached:
        raise ValueError(
            f"{loss}: the teacher cache holds the top {cached} token ids per target token, but top_k is {k!r}. "
            f"Fix: set kd_loss_options.top_k to the teacher_cache's top_k ({cached})"
        )
    if mode not in TOP_K_MODES:
        raise ValueError(f"{loss}: top_k_mode must be one of {TOP_K_MODES}, got {mode!r}")
    if teacher.ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"{loss}: the teacher cache has {teacher.ids.shape[0]} target tokens, the student {student_logits.shape[0]}"
        )
    S = student_logits.to(compute_dtype(student_logits, student_logits)) / t
    idx = teacher.ids.long()
    log_p = teacher.log_p.to(S.dtype)
    tail_p = teacher.tail.to(S.dtype)[:, None]
    valid = idx < vocab  # a padded teacher head's ids beyond the student's compared ones
    if not bool(valid.all()):
        S, idx, log_p, tail_p = _drop_unshared(S, idx, log_p, tail_p, valid)
    if mode == "renormalise" or cached == vocab:
        return F.log_softmax(S.gather(-1, idx), dim=-1), F.log_softmax(log_p, dim=-1)
    log_q = F.log_softmax(S, dim=-1)
    tail_q = log_q.scatter(-1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([log_q.gather(-1, idx), tail_q], dim=-1), torch.cat([log_p, tail_p], dim=-1)


#: the log-probability of a cached id the student does not compare: exp() is exactly 0, yet finite
_DROPPED = -1e30


def _drop_unshared(S: Tensor, idx: Tensor, log_p: Tensor, tail_p: Tensor, valid: Tensor):
    """Cached top-k ids >= the student's compared vocabulary V: each points at an extra column
    of S that holds `_DROPPED`, and its teacher log-probability becomes `_DROPPED` too, so it
    counts on neither side (a row left with none compares two equal uniform rows: 0); its mass
    joins the teacher's tail bucket (in tail mode; renormalise mode drops it)."""
    vocab = S.shape[-1]
    S = torch.cat([S, S.new_full((S.shape[0], 1), _DROPPED)], dim=-1)
    tail_p = torch.logaddexp(tail_p, log_p.masked_fill(valid, float("-inf")).logsumexp(-1, keepdim=True))
    return S, torch.where(valid, idx, vocab), log_p.masked_fill(~valid, _DROPPED), tail_p


def _log_probs(
    loss: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    t_squared: bool,
    top_k: int | None,
    top_k_mode: str,
) -> tuple[Tensor, Tensor, float]:
    """``(log_q, log_p, scale)``: validated, reduced log-distributions and the T**2 factor (or 1)."""
    if not isinstance(t_squared, bool):
        raise ValueError(f"{loss}: t_squared must be a bool, got {type(t_squared).__name__}")
    if isinstance(teacher_logits, CachedTopK):
        log_q, log_p = cached_top_k_log_probs(
            student_logits, teacher_logits, top_k, top_k_mode, temperature=temperature, loss=loss
        )
    elif top_k is not None:
        log_q, log_p = top_k_log_probs(
            student_logits, teacher_logits, top_k, top_k_mode, temperature=temperature, loss=loss
        )
    else:
        _check_logits(loss, student_logits, teacher_logits)
        t = _temperature(loss, temperature)
        S, T = _cast_pair(student_logits, teacher_logits)
        log_q, log_p = F.log_softmax(S / t, dim=-1), F.log_softmax(T / t, dim=-1)
    scale = float(temperature) ** 2 if t_squared else 1.0
    return log_q, log_p, scale


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row: ``sum a (log a - log b)``, with ``0 log(0 / b) = 0``."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _kl_to_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """KL(a || w a + (1 - w) b) per row, for w in [0, 1].

    ``log(a / m) = -logaddexp(log w, log(1 - w) + log b - log a)``: no difference of two
    nearly equal logarithms, so the result stays accurate (relative) when w is near 1 and the
    divergence is tiny. w = 0 is `_kl`; w = 1 is 0.
    """
    if w == 0:
        return _kl(log_a, log_b)
    a = log_a.exp()
    if w == 1:
        return (a + log_b.exp()).sum(-1) * 0.0  # zero, still connected to both inputs' graphs
    ratio = torch.where(a > 0, log_b - log_a, 0.0)  # log(b / a); 0 where a = 0 (no inf - inf)
    log_m_over_a = torch.logaddexp(torch.full_like(ratio, math.log(w)), math.log1p(-w) + ratio)
    return -(a * log_m_over_a).sum(-1)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Forward KL(p || q) = ``sum_v p (log p - log q)`` per token (Hinton et al. 2015).

    Mode-covering. Equals ``kd_ce_loss``'s cross-entropy minus the teacher's entropy (the same
    gradient in the student). (N, V) logits -> (N,) loss; see the module docstring for the
    keyword arguments.
    """
    log_q, log_p, scale = _log_probs(
        "forward_kl", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode
    )
    return _kl(log_p, log_q) * scale


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Reverse KL(q || p) = ``sum_v q (log q - log p)`` per token (MiniLLM, arXiv:2306.08543).

    Mode-seeking. (N, V) logits -> (N,) loss; see the module docstring for the keyword arguments.
    """
    log_q, log_p, scale = _log_probs(
        "reverse_kl", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode
    )
    return _kl(log_q, log_p) * scale


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    normalise: bool = False,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD, Agarwal et al., arXiv:2306.13649).

    ``J(beta) = beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``,
    beta in [0, 1]; beta = 0.5 is the usual JSD.

    * ``normalise=False`` (default): exactly TRL's ``GKDTrainer.generalized_jsd_loss``: J(beta)
      for beta in (0, 1), and at the ends TRL's choice, forward KL(p || q) at beta = 0 and
      reverse KL(q || p) at beta = 1. This is **discontinuous** at the ends: J(beta) -> 0
      as beta -> 0 or 1 (m tends to q, resp. p), J(beta) ~ beta KL(p || q) near 0 and
      ~ (1 - beta) KL(q || p) near 1.
    * ``normalise=True``: ``J(beta) / (beta (1 - beta))``, continuous on [0, 1]: as beta -> 0,
      ``beta KL(p || m) -> beta KL(p || q) + O(beta**2)`` and ``KL(q || m) = O(beta**2)``
      (second order: ``sum (p - q) = 0``), so J / beta -> KL(p || q); symmetrically
      J / (1 - beta) -> KL(q || p) as beta -> 1. The ends are the same as TRL's; the
      interior is J scaled by 1 / (beta (1 - beta)) (4 J at beta = 0.5).

    Computed through ``log(m / p) = logaddexp(log beta, log(1 - beta) + log q - log p)``
    (accurate near the ends). (N, V) logits -> (N,) loss; see the module docstring for the
    other keyword arguments.
    """
    b = _unit("jsd", "beta", beta)
    if not isinstance(normalise, bool):
        raise ValueError(f"jsd: normalise must be a bool, got {type(normalise).__name__}")
    log_q, log_p, scale = _log_probs("jsd", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode)
    if b == 0:
        return _kl(log_p, log_q) * scale
    if b == 1:
        return _kl(log_q, log_p) * scale
    loss = b * _kl_to_mixture(log_p, log_q, b) + (1 - b) * _kl_to_mixture(log_q, log_p, 1 - b)
    if normalise:
        scale /= b * (1 - b)
    return loss * scale


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Skew KL ``KL(p || alpha p + (1 - alpha) q)`` per token (DistiLLM, arXiv:2402.03898).

    alpha in [0, 1] (the paper uses 0.1): alpha = 0 is forward KL, alpha = 1 is 0. Finite even
    where q = 0 and p > 0 (alpha > 0). (N, V) logits -> (N,) loss; see the module docstring
    for the other keyword arguments.
    """
    a = _unit("skew_kl", "alpha", alpha)
    log_q, log_p, scale = _log_probs(
        "skew_kl", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode
    )
    return _kl_to_mixture(log_p, log_q, a) * scale


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Skew reverse KL ``KL(q || (1 - alpha) p + alpha q)`` per token (DistiLLM, arXiv:2402.03898).

    alpha in [0, 1]: alpha = 0 is reverse KL, alpha = 1 is 0. (N, V) logits -> (N,) loss;
    see the module docstring for the other keyword arguments.
    """
    a = _unit("skew_reverse_kl", "alpha", alpha)
    log_q, log_p, scale = _log_probs(
        "skew_reverse_kl", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode
    )
    return _kl_to_mixture(log_q, log_p, a) * scale


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    t_squared: bool = False,
    top_k: int | None = None,
    top_k_mode: str = "renormalise",
) -> Tensor:
    """Total variation distance ``1/2 sum_v |p - q|`` per token (in [0, 1]; used by DistiLLM
    and by Wen et al., arXiv:2307.15190). (N, V) logits -> (N,) loss; see the module docstring
    for the keyword arguments. The gradient of ``|x|`` at x = 0 is taken as 0.
    """
    log_q, log_p, scale = _log_probs("tvd", student_logits, teacher_logits, temperature, t_squared, top_k, top_k_mode)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1) * scale


def ce_per_token(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """TextBrewer's `ce` per token: ``-sum_v p log q`` (no T**2 factor); its mean over the rows is
    `kd_ce_loss`. (N, V) -> (N,). Equals forward KL plus the teacher's entropy."""
    _check_logits("ce", student_logits, teacher_logits)
    t = _temperature("ce", temperature)
    S, T = _cast_pair(student_logits, teacher_logits)
    p = F.softmax(T / t, dim=-1)
    return -(p * F.log_softmax(S / t, dim=-1)).sum(-1)


def mse_per_token(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """TextBrewer's `mse` per token: ``mean_v (z_S/T - z_T/T)**2``; its mean over the rows is
    `kd_mse_loss`. (N, V) -> (N,)."""
    _check_logits("mse", student_logits, teacher_logits)
    t = _temperature("mse", temperature)
    S, T = _cast_pair(student_logits, teacher_logits)
    return ((S - T) / t).pow(2).mean(-1)
