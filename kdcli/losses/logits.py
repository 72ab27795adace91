"""KD losses on logits: `kd_mse_loss` and `kd_ce_loss` (TextBrewer's KD_LOSS_MAP)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .inputs import Temperature, _cast_pair, _same_shape, _shape, _tensor, compute_dtype
from .kernels import _dot


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
