"""The interface every task module implements (`kdcli.tasks.task_for(name)` returns one).

What differs between tasks lives behind it: how rows are encoded, which Auto class loads the
model, what a capture of its models returns, its KD term (built once at setup), how many target
tokens a batch has, which metrics evaluation reports and (encoders) the shape of a row in the
teacher-logit caches (in memory and on disk). Adding a task is adding a module with a `TASK` object of this
shape and its name in `kdcli.tasks.TASKS` / `_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from kdcli.facts.labels import Labels
    from kdcli.features import Readout

#: A `datasets.map(batched=True)` function: columns of raw rows -> columns of encoded rows
#: (input_ids, attention_mask, [token_type_ids], labels, length).
Encoder = Callable[[dict[str, list]], dict[str, list]]
#: A collated batch -> the `Features` of one forward (`Task.eval_models`).
Forward = Callable[[dict[str, "Tensor"]], Any]
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


class KDTerm(Protocol):
    """A task's terms on the models' outputs (KD and hard-label CE), built once at setup from the
    recipe's `distillation` (None: `kdcli train`, the hard-label CE alone)."""

    def __call__(
        self, feats_S, feats_T: Sequence, labels: Tensor | None, weights: tuple[float, float], **share: Any
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """This micro-batch's share of the step: (weighted contributions to the total, unweighted
        terms "kd" / "hard_label"). `weights`: (kd, hard-label) at this point of training;
        `share`: `micro_batches`, `normaliser` (the step's target count, per process),
        `generated` (on-policy rows)."""
        ...


class Task(Protocol):
    """One task's run-side behaviour: chosen once from the recipe (`kdcli.tasks.task_for`), asked
    by the engine, the objective and the captures, which never ask which task they serve."""

    name: str
    #: the transformers Auto class that loads and builds its models
    auto_class: str
    #: what a capture of its models returns (`features.LOGITS`, or `features.HEAD`: final hidden
    #: states and the output head)
    readout: Readout
    #: its terms and eval metrics are per target token (the run reports tokens/s)
    per_token: bool

    def encoder(self, tokenizer, labels: Labels, columns: Columns, max_length: int, source: str) -> Encoder:
        """The function that tokenises a batch of raw rows (`DataError` for unusable settings)."""
        ...

    def kd_logits(self, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The logits (N, C) the KD and hard-label terms compare, and their labels (N,)."""
        ...

    def kd_term(self, distillation, models: Sequence[nn.Module] = ()) -> KDTerm:
        """Its KD term for the run; `models` (student, teachers...) when they are loaded."""
        ...

    def target_count(self, labels: Tensor | None) -> int | None:
        """The target tokens a batch's terms sum over; None: its terms are batch means."""
        ...

    def cache_rows(self, distillation) -> CacheRowFormat:
        """What its rows in the on-disk teacher cache hold, from the recipe's `distillation`."""
        ...

    def eval_models(self, model: nn.Module | None, teachers: Sequence[nn.Module]) -> tuple[Forward, list[Forward]]:
        """What `evaluate` reads per eval batch: (the evaluated forward, the forwards it is compared
        with). `model` None: the teachers' own figures."""
        ...

    def evaluate(self, batches: Iterable, labels: Labels | None) -> dict[str, float]:
        """Eval metrics from (features_S, features_T, labels) per eval batch."""
        ...


class LogitCacheRows(Protocol):
    """The in-memory teacher-logit cache's rows (`is_caching_logits`, encoder tasks only)."""

    def cache_row(self, logits: Tensor, length: int) -> Tensor:
        """One row's teacher logits (n_teachers, ...) as the logit cache keeps them."""
        ...

    def cache_batch(self, rows: list[Tensor], width: int) -> Tensor:
        """Cached rows back to batch logits (n_teachers, B, ...), padded to `width` tokens."""
        ...


class CacheRowFormat(Protocol):
    """What a row of the on-disk teacher cache holds for a task (`Task.cache_rows`; encoders:
    `kdcli.tasks.cache_rows.LogitRows`, causal-lm: `kdcli.tasks.lm_cache_rows.TopKRows`)."""

    #: the row columns the cache key hashes
    key_columns: tuple[str, ...]

    def key_parts(self) -> dict:
        """The cache key's parts that say what a row keeps (beyond the inputs every cache hashes)."""
        ...

    def targets(self, batch: dict[str, Tensor]) -> list[int]:
        """Per batch row the target count its "N" fields have (0 where there are none)."""
        ...

    def fields(self, feats_T: Sequence, batch: dict[str, Tensor], dtype: Any) -> dict[str, tuple[Tensor, list]]:
        """The batch's fields: name -> (CPU tensor in its storage dtype, per-row shape template:
        "L" the row's tokens, "N" its targets, else a size)."""
        ...

    def features(self, tensors: dict[str, Tensor], mask: Tensor) -> list:
        """The teachers' `Features` from a batch of cached fields (padded to the batch's width)."""
        ...
