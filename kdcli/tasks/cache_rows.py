"""The encoder tasks' rows in the on-disk teacher cache (`kdcli.engine.teacher_cache`), and
what every task's rows share (the first teacher's matched hidden states and attention scores).

A row format says what a cache row holds for its task (`Task.cache_rows`, `base.CacheRowFormat`):
the key's extra parts and columns, the target count per batch row, the batch's fields (a tensor
and a per-row shape template: "L" the row's tokens, "N" its targets) and the teacher `Features`
a batch of cached fields gives back. The cache itself stores, checks and pads the bytes; it never
asks which task it serves. Causal-LM rows: `kdcli.tasks.lm_cache_rows.TopKRows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdcli.features import Features

#: field name -> (batch tensor on the CPU in its storage dtype, per-row shape template)
Fields = dict[str, tuple[Tensor, list]]


def matched_fields(first: Features, dtype: torch.dtype) -> Fields:
    """The first teacher's matched hidden states (L, D) and attention scores (H, L, L)."""
    out: Fields = {}
    for i, h in sorted(first.hidden.items()):
        out[f"hidden.{i}"] = (on_cpu(h, dtype), ["L", h.size(-1)])
    for i, s in sorted(first.scores.items()):
        out[f"scores.{i}"] = (on_cpu(s, dtype), [s.size(1), "L", "L"])
    return out


def matched_maps(tensors: dict[str, Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """(hidden states, attention scores) by layer from a batch of cached fields."""
    hidden = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("hidden.")}
    scores = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("scores.")}
    return hidden, scores


def on_cpu(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.detach().to("cpu", dtype)


class LogitRows:
    """Encoders: each teacher's logits ((C,) per row for sequence classification, (L, C) for
    token classification) and the first teacher's matched hidden states and scores."""

    #: the row columns the cache key hashes
    key_columns: tuple[str, ...] = ("input_ids", "token_type_ids", "attention_mask")

    def key_parts(self) -> dict:
        """The key's parts beyond the inputs every cache has: none."""
        return {}

    def targets(self, batch: dict[str, Tensor]) -> list[int]:
        """Per batch row its target count: encoder rows have none."""
        return [0] * batch["input_ids"].size(0)

    def fields(self, feats_T: Sequence[Features], batch: dict[str, Tensor], dtype: torch.dtype) -> Fields:
        out: Fields = {}
        for t, f in enumerate(feats_T):
            assert f.logits is not None  # encoder tasks' models return logits
            logits = f.logits.detach()
            out[f"logits.{t}"] = (
                on_cpu(logits, dtype),
                list(logits.shape[1:]) if logits.dim() == 2 else ["L", logits.size(-1)],
            )
        return {**out, **matched_fields(feats_T[0], dtype)}

    def features(self, tensors: dict[str, Tensor], mask: Tensor) -> list[Features]:
        hidden, scores = matched_maps(tensors)
        teachers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("logits."))
        return [
            Features(
                logits=tensors[f"logits.{t}"],
                hidden=hidden if t == 0 else {},
                scores=scores if t == 0 else {},
                mask=mask,
            )
            for t in teachers
        ]
