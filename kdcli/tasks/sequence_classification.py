"""Sequence classification: one label per row (or text pair), logits (B, C)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcli.facts.labels import DataError, Labels
from kdcli.tasks.base import ENCODED_KEYS, Columns, Encoder, text_values
from kdcli.tasks.logits_kd import LogitsTask


class SequenceClassification(LogitsTask):
    name = "sequence-classification"
    auto_class = "AutoModelForSequenceClassification"

    def encoder(self, tokenizer, labels: Labels, columns: Columns, max_length: int, source: str) -> Encoder:
        def encode(rows: dict[str, list]) -> dict[str, list]:
            pairs = text_values(rows[columns.text_pair]) if columns.text_pair else None
            enc = tokenizer(text_values(rows[columns.text]), pairs, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ENCODED_KEYS if k in enc}
            try:
                out["labels"] = [labels.encode(v) for v in rows[columns.label]]
            except DataError as exc:
                raise DataError(f"{source}, column {columns.label!r}: {exc}") from None
            out["length"] = [len(ids) for ids in enc["input_ids"]]
            return out

        return encode

    def cache_row(self, logits: Tensor, length: int) -> Tensor:
        return logits  # (n_teachers, C)

    def cache_batch(self, rows: list[Tensor], width: int) -> Tensor:
        return torch.stack(rows, dim=1)  # (n_teachers, B, C)


TASK = SequenceClassification()
