"""Input checks, masks and precision shared by every loss in `kdcli.losses`.

Package-internal: the helpers validate arguments (raising `ValueError` naming the loss, the
arguments and the shapes), pick the dtype a loss reduces in (`compute_dtype`), and turn a
(B, L) mask into float weights (`_Mask`, `_row_col_weights`).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

#: A KD temperature: a number, or a tensor of the logits' shape without the class dimension.
Temperature = float | Tensor
_NATIVE = (torch.float32, torch.float64)  # dtypes a loss reduces in as they are


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
            f"{loss}: {name_a} has shape {_shape(a)} but {name_b} has shape {_shape(b)}; they must be equal{hint}"
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
            f"{loss}: mask has shape {_shape(mask)} but the inputs need (batch, length) = {(batch, length)}"
        )
    return _Mask(mask.to(device=like.device), like)


def _row_col_weights(m: _Mask, heads_dim: bool) -> tuple[Tensor, Tensor]:
    """Weights whose product is m_i m_j: rows (B, [1,] L) against the per-row sums of the
    scores and columns (B, [1,] 1, L) against the scores themselves."""
    w = m.weight.unsqueeze(1) if heads_dim else m.weight
    return w, w.unsqueeze(-2)
