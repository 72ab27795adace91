"""Minitron's activation importance (Muralidharan et al. 2024, arXiv 2407.14679) of a Llama,
Mistral or Qwen2 model, measured with forward hooks over calibration rows.

Per block, over the real (non-padding) tokens of the rows, in float64:

- a query head's importance is the mean L2 norm of its attention output (the head's slice of
  `o_proj`'s input, before the output projection mixes the heads);
- an MLP channel's importance is the mean absolute value of its activation
  (`act(gate) * up`, the input of `down_proj`);
- an embedding channel's importance is the mean absolute value of that channel at the output
  of every RMSNorm (both norms of every block and the final norm), summed over the norms.

The paper also sums over batch and sequence and found mean/L2 aggregations close; here every
real token counts once, so the scores do not depend on batching or padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdcli.models import encoder_blocks


@dataclass(frozen=True)
class Importance:
    """Per block (0-based list index = teacher block - 1): heads (H,) and mlp (ff,) scores;
    hidden (d,) summed over every norm; tokens measured."""

    heads: list[Tensor]
    mlp: list[Tensor]
    hidden: Tensor
    tokens: int


class _Sums:
    """Running float64 sums the hooks add to, with the current batch's real-token mask."""

    def __init__(self, blocks: int, heads: int, head_dim: int, ff: int, d: int) -> None:
        self.heads = [torch.zeros(heads, dtype=torch.float64) for _ in range(blocks)]
        self.mlp = [torch.zeros(ff, dtype=torch.float64) for _ in range(blocks)]
        self.hidden = torch.zeros(d, dtype=torch.float64)
        self.head_shape = (heads, head_dim)
        self.real: Tensor | None = None

    def tokens_of(self, x: Tensor) -> Tensor:
        """The real tokens of a (B, L, ...) activation as (T, ...) float64."""
        return x[self.real].to(torch.float64)

    def head_hook(self, i: int) -> Callable:
        def hook(_module, args):
            x = self.tokens_of(args[0])
            self.heads[i] += x.reshape(x.shape[0], *self.head_shape).norm(dim=-1).sum(0).cpu()

        return hook

    def mlp_hook(self, i: int) -> Callable:
        def hook(_module, args):
            self.mlp[i] += self.tokens_of(args[0]).abs().sum(0).cpu()

        return hook

    def norm_hook(self, _module, _args, output):
        self.hidden += self.tokens_of(output).abs().sum(0).cpu()


def _hooks(model: nn.Module, sums: _Sums) -> list:
    blocks = encoder_blocks(model)
    handles = []
    for i, block in enumerate(blocks.modules):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(sums.head_hook(i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(sums.mlp_hook(i)))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            handles.append(norm.register_forward_hook(sums.norm_hook))
    handles.append(model.get_decoder().norm.register_forward_hook(sums.norm_hook))
    return handles


def measure_importance(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> Importance:
    """The activation importance of `model`'s heads, MLP channels and embedding channels over
    `batches` (dicts with input_ids and attention_mask). ValueError when no real token."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    blocks = len(encoder_blocks(model))
    sums = _Sums(blocks, heads, head_dim, config.intermediate_size, config.hidden_size)
    device = next(model.parameters()).device
    base = model.get_decoder()  # the blocks only: no head, no vocabulary-sized logits
    tokens = 0
    handles = _hooks(model, sums)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                sums.real = mask.bool()
                tokens += int(sums.real.sum())
                base(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no real tokens to measure importance on (no rows, or every attention_mask is 0)")
    return Importance(
        heads=[h / tokens for h in sums.heads],
        mlp=[m / tokens for m in sums.mlp],
        hidden=sums.hidden / tokens,
        tokens=tokens,
    )
