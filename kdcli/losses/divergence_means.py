"""The divergences as KD losses on logits: the mean over rows of `kdcli.losses.divergences`.

`forward_kl_loss(logits_S, logits_T, temperature, **options)` and its siblings are what the
registry names (`kd_loss_type`): on (B, C) classification logits, on (N, C) selected token
logits, or on (N, V) next-token logits, they return the mean over rows of the per-token
divergence. A causal-LM run never calls them on full logits: its objective computes the same
per-token functions chunk by chunk from hidden states and heads
(`kdcli.losses.chunked.chunked_kd_loss`), with the mean over the target tokens of the whole
optimizer step. `options` are the registry's `kd_loss_options` (beta, alpha, t_squared,
top_k, top_k_mode, normalise). The temperature is a number (per-example temperature
schedulers apply to ce and mse only).
"""

from __future__ import annotations

from torch import Tensor

from .divergences import forward_kl, jsd, reverse_kl, skew_kl, skew_reverse_kl, tvd


def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits


def forward_kl_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.forward_kl` (KL(p || q)); (..., V) logits -> 0-dim."""
    return forward_kl(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()


def reverse_kl_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.reverse_kl` (KL(q || p)); (..., V) logits -> 0-dim."""
    return reverse_kl(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()


def jsd_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.jsd` (generalized JSD, beta); (..., V) logits -> 0-dim."""
    return jsd(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()


def skew_kl_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.skew_kl` (alpha); (..., V) logits -> 0-dim."""
    return skew_kl(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()


def skew_reverse_kl_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.skew_reverse_kl` (alpha); (..., V) logits -> 0-dim."""
    return skew_reverse_kl(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()


def tvd_loss(logits_S: Tensor, logits_T: Tensor, temperature: float = 1.0, **options) -> Tensor:
    """Mean over rows of `divergences.tvd` (1/2 sum |p - q|); (..., V) logits -> 0-dim."""
    return tvd(_rows(logits_S), _rows(logits_T), temperature=temperature, **options).mean()
