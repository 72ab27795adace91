"""The interface every task module implements (`kdcli.tasks.task_for(name)` returns one).

What differs between tasks lives behind it: how rows are encoded, which Auto class loads the
model, which logits the KD loss compares, which metrics evaluation reports and the shape of a
row in the teacher-logit cache. Adding a task is adding a module with a `TASK` object of this
shape and its name in `kdcli.tasks.TASKS` / `_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from kdcli.facts.labels import Labels

#: A `datasets.map(batched=True)` function: columns of raw rows -> columns of encoded rows
#: (input_ids, attention_mask, [token_type_ids], labels, length).
Encoder = Callable[[dict[str, list]], dict[str, list]]
#: The keys of a tokenizer's output a model may take.
ENCODED_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Columns:
    """The data columns a recipe names (`data.text_column`, ...)."""

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    #: causal-lm only: which row format (`kdcli.tasks.ROW_FORMATS`) and its columns
    row_format: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def text_values(values: list[Any]) -> list[str]:
    """Cells as strings (a missing cell is the empty string)."""
    return ["" if v is None else str(v) for v in values]


class Task(Protocol):
    """One task's run-side behaviour."""

    name: str
    #: the transformers Auto class that loads and builds its models
    auto_class: str

    def encoder(self, tokenizer, labels: Labels, columns: Columns, max_length: int, source: str) -> Encoder:
        """The function that tokenises a batch of raw rows (`DataError` for unusable settings)."""

    def kd_logits(self, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The logits (N, C) the KD and hard-label terms compare, and their labels (N,)."""

    def metrics(self, predictions: Sequence[int], gold: Sequence[int], labels: Labels) -> dict[str, float]:
        """Evaluation metrics from flat predicted and gold label ids (-100 = not scored)."""

    def cache_row(self, logits: Tensor, length: int) -> Tensor:
        """One row's teacher logits (n_teachers, ...) as the logit cache keeps them."""

    def cache_batch(self, rows: list[Tensor], width: int) -> Tensor:
        """Cached rows back to batch logits (n_teachers, B, ...), padded to `width` tokens."""
