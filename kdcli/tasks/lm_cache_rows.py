"""Causal-LM rows in the on-disk teacher cache (`kdcli.engine.teacher_cache`): per target token
the teachers' (their mean logits') top-k token ids (int32), their log-probabilities at the
recipe's temperature (the cache's dtype) and the log of the remaining mass (float32):
`top_k * (4 + 2) + 4` bytes per target in fp16; plus the first teacher's matched hidden states
and scores. The `top_k` divergences read these exactly
(`kdcli.losses.divergences.CachedTopK`). The format's interface: `kdcli.tasks.cache_rows`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.features import Features
from kdcli.losses.divergences import CachedTopK
from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX
from kdcli.tasks.cache_rows import Fields, LogitRows, matched_fields, matched_maps
from kdcli.tasks.lm_kd import target_rows
from kdcli.tasks.lm_rows import next_token_labels


class TopKRows:
    """`top_k`, `temperature` and `chunk_size` (from the recipe's distillation) say what is kept
    per target token."""

    key_columns: tuple[str, ...] = (*LogitRows.key_columns, "labels")

    def __init__(self, top_k: int | None, temperature: float = 1.0, chunk_size: int = CHUNK_SIZE) -> None:
        self.top_k, self.temperature, self.chunk_size = top_k, float(temperature), chunk_size

    def key_parts(self) -> dict:
        """What the kept rows depend on beyond the inputs: the temperature and k."""
        return {"temperature": self.temperature, "top_k": self.top_k}

    def targets(self, batch: dict[str, Tensor]) -> list[int]:
        """Per batch row its target tokens."""
        return (next_token_labels(batch["labels"]) != IGNORE_INDEX).sum(dim=1).cpu().tolist()

    def fields(self, feats_T: Sequence[Features], batch: dict[str, Tensor], dtype: torch.dtype) -> Fields:
        labels = batch["labels"]
        teachers: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for f in feats_T:
            assert f.head is not None  # causal-LM features carry the output head
            teachers.append((target_rows(f, labels)[0], *f.head))
        assert self.top_k is not None  # a causal-LM cache keeps the teachers' top-k
        ids, values, tails = top_k_rows(teachers, self.top_k, self.temperature, self.chunk_size)
        k = ids.size(1)
        out: Fields = {
            "topk.ids": (ids.to("cpu", torch.int32), ["N", k]),
            "topk.values": (values.to("cpu", dtype), ["N", k]),
            "topk.tail": (tails.to("cpu", torch.float32), ["N"]),
        }
        return {**out, **matched_fields(feats_T[0], dtype)}

    def features(self, tensors: dict[str, Tensor], mask: Tensor) -> list[Features]:
        hidden, scores = matched_maps(tensors)
        top = CachedTopK(tensors["topk.ids"].long(), tensors["topk.values"], tensors["topk.tail"])
        return [Features(logits=None, hidden=hidden, scores=scores, mask=mask, top_k=top)]


@torch.no_grad()
def top_k_rows(
    teachers: list[tuple[Tensor, Tensor, Tensor | None]], k: int, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per target row: the top-k ids of the teachers' mean logits / T, their log-probabilities
    at T and the log of the remaining mass, chunk by chunk (as `top_k_log_probs` computes them)."""
    n = teachers[0][0].size(0)
    ids, values, tails = [], [], []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        z = cast(Tensor, sum(F.linear(h[rows], w, b) for h, w, b in teachers))  # >= 1 teacher
        if len(teachers) > 1:
            z = z / len(teachers)
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        z = z / temperature
        top = z.topk(min(k, z.size(-1)), dim=-1).indices
        log_probs = F.log_softmax(z, dim=-1)
        ids.append(top)
        values.append(log_probs.gather(-1, top))
        tails.append(log_probs.scatter(-1, top, float("-inf")).logsumexp(dim=-1))
    if not ids:
        width = min(k, teachers[0][1].size(0))
        return torch.empty(0, width, dtype=torch.long), torch.empty(0, width), torch.empty(0)
    return torch.cat(ids), torch.cat(values), torch.cat(tails)
