"""Token classification (NER-style): a list of words and one tag per word per row; the first
sub-token of each word carries the tag, the others -100; logits (B, L, C)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcli.facts.labels import DataError, Labels
from kdcli.tasks import IGNORE_INDEX
from kdcli.tasks.base import ENCODED_KEYS, Columns, Encoder
from kdcli.tasks.logits_kd import LogitsTask, select_labelled


class TokenClassification(LogitsTask):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    outside_tag = "O"

    def encoder(self, tokenizer, labels: Labels, columns: Columns, max_length: int, source: str) -> Encoder:
        if columns.text_pair is not None:
            raise DataError(f"{source}: token classification takes no text_pair_column. Fix: remove it")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"{source}: token classification needs a fast tokenizer (word ids). Fix: use a "
                "tokenizer with a tokenizer.json"
            )
        words_column, tags_column = columns.text, columns.label

        def encode(rows: dict[str, list]) -> dict[str, list]:
            words = rows[words_column]
            if any(not isinstance(w, list) for w in words):
                raise DataError(
                    f"{source}: column {words_column!r} must hold a list of words per row for "
                    "token classification. Fix: point data.text_column at the words column"
                )
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ENCODED_KEYS if k in enc}
            out["labels"] = [
                _row_labels(enc.word_ids(row), tags, words[row], labels, source, tags_column)
                for row, tags in enumerate(rows[tags_column])
            ]
            out["length"] = [len(ids) for ids in enc["input_ids"]]
            return out

        return encode

    def kd_logits(self, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, L, C) -> (N, C) at the N positions whose label is not -100."""
        return select_labelled(logits, labels)

    def cache_row(self, logits: Tensor, length: int) -> Tensor:
        return logits[:, :length]  # (n_teachers, length, C): the row's real tokens

    def cache_batch(self, rows: list[Tensor], width: int) -> Tensor:
        """Re-padded per batch; padded positions carry label -100 and are never read."""
        logits = torch.zeros(rows[0].size(0), len(rows), width, rows[0].size(-1))
        for b, row in enumerate(rows):
            logits[:, b, : row.size(1)] = row
        return logits


def _row_labels(word_ids, tags, words, labels: Labels, source: str, tags_column: str) -> list[int]:
    if len(tags) != len(words):
        raise DataError(
            f"{source}: a row has {len(words)} words but {len(tags)} tags ({words[:5]}...). Fix: give one tag per word"
        )
    row_labels, previous = [], None
    for word in word_ids:
        first = word is not None and word != previous
        try:
            row_labels.append(labels.encode(tags[word]) if first else IGNORE_INDEX)
        except DataError as exc:
            raise DataError(f"{source}, column {tags_column!r}: {exc}") from None
        previous = word
    return row_labels


TASK = TokenClassification()
