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

Beyond the reference, the divergences on next-token distributions (`divergences`: forward and
reverse KL, generalized JSD, skew KL both ways, TVD, with top-k and T^2 options), their
mean-over-rows forms (`divergence_means`: forward_kl_loss, ...) that the registry names, and
`chunked` (the causal-LM KD loss from hidden states and output heads, chunk by chunk).

Layout: `logits` (kd_ce_loss, kd_mse_loss), `attention` (att_mse/att_ce and their head-summed
and head-averaged variants), `hidden` (hid_mse, cos, pkd, and the two-layer Gram losses
fsp and mmd); `inputs` holds the shared argument checks, masks and dtype rule, `kernels`
the fused autograd functions. Every public name is re-exported here.
"""

from __future__ import annotations

from .attention import NO_MASK_THRESHOLD as NO_MASK_THRESHOLD
from .attention import att_ce_loss, att_ce_mean_loss, att_mse_loss, att_mse_sum_loss
from .divergence_means import (
    forward_kl_loss,
    jsd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    tvd_loss,
)
from .hidden import cos_loss, fsp_loss, hid_mse_loss, mmd_loss, pkd_loss
from .inputs import Temperature as Temperature
from .inputs import compute_dtype as compute_dtype
from .kernels import COSINE_EPS as COSINE_EPS
from .logits import kd_ce_loss, kd_mse_loss

__all__ = [
    "att_ce_loss",
    "att_ce_mean_loss",
    "att_mse_loss",
    "att_mse_sum_loss",
    "cos_loss",
    "forward_kl_loss",
    "fsp_loss",
    "hid_mse_loss",
    "jsd_loss",
    "kd_ce_loss",
    "kd_mse_loss",
    "mmd_loss",
    "pkd_loss",
    "reverse_kl_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "tvd_loss",
]

# The losses are defined in submodules (logits, attention, hidden) but belong to this
# module's API: `kdcli.losses.<name>` is how the registry names them, and where pickle and
# introspection should find them.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
