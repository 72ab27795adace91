"""Data: files or hub datasets -> tokenised `datasets.Dataset` -> batches of indices -> tensors.

- `load_table(source)`: a local csv / tsv (tab, no quoting, `quoting=3`) / json / jsonl /
  parquet file, or a hub dataset, through `datasets.load_dataset`. csv/tsv cells are read as
  strings (no NA guessing: a review reading "null" stays text; integer labels are recognised
  afterwards). csv/tsv files are validated first (`kdcli.facts.tabular`: every record has the
  header's fields, no quote left open), so a malformed line is an error naming it.
- `infer_labels(...)` / `Labels` (from `kdcli.facts.labels`, shared with check-recipe): label ids.
  Integer labels ("1", 1, "1.0", 1.0 are one class) keep their values (0..max); string labels
  get ids in sorted order (deterministic); a `ClassLabel` column keeps its names; empty labels,
  scores and ids mixed with names are refused naming the file and row. Computed on the full
  train and eval columns, so `max_*_samples` never changes the head size.
- `tokenize(...)`: one `map(batched=True)` (cached by datasets) producing `input_ids`,
  `attention_mask`, `token_type_ids` (when the tokenizer makes them), `labels`, `length`.
  Token classification takes words + tags per row (`is_split_into_words=True`); the tag goes
  to each word's first sub-token and -100 to the other sub-tokens and the special tokens.
  Causal LM (`task="causal-lm"`) has no class labels: rows of `data.row_format` (text,
  prompt-completion, messages) are encoded by `kdcli.tasks.lm_rows` into unshifted token
  `labels` (-100 off the targets) and `n_targets`; `prepare_data` then drops the rows left
  without a target (an empty text, a completion cut away) and counts them in `TaskData.dropped`.
- `train_batches(lengths, batch_size, seed, epoch, group_by_length, rank, world_size)`: the
  deterministic batch order of one epoch as lists of row indices (resume = skip a count).
- `Collator`: dynamic padding of a batch of rows to its longest row.
- `prepare_data(...)` ties these together into `TaskData`; `prepare_from_recipe(recipe, tokenizer)`
  reads the recipe's `data` section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

# DataError, Labels and infer_labels live torch-free in kdcli.facts.labels (check-recipe counts labels
# with the same code) and are re-exported here.
from kdcli.facts.labels import DataError, Labels, infer_labels, labels_of_splits  # noqa: F401
from kdcli.facts.tabular import dialect, validate_table
from kdcli.tasks import IGNORE_INDEX, TASKS, lm_rows, task_for
from kdcli.tasks.base import Columns

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
#: Batches per length-sorted megabatch when grouping by length.
MEGABATCH_BATCHES = 50
_PADDED = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


@dataclass(frozen=True)
class Source:
    """Where one split comes from: a local file (`format` set) or a hub dataset (`format` None)."""

    path: str
    format: str | None = None
    split: str = "train"
    config: str | None = None
    delimiter: str | None = None

    @classmethod
    def from_recipe(cls, data_source) -> Source:
        """From the recipe's `DataSource` (path, format, split, config, delimiter)."""
        return cls(
            path=str(data_source.path),
            format=data_source.format,
            split=getattr(data_source, "split", None) or "train",
            config=getattr(data_source, "config", None),
            delimiter=getattr(data_source, "delimiter", None),
        )

    def describe(self) -> str:
        if self.format is None:
            extra = f", config {self.config}" if self.config else ""
            return f"hub dataset {self.path!r} (split {self.split}{extra})"
        return self.path


@dataclass
class TaskData:
    """Tokenised splits and their labels. Rows hold input_ids, attention_mask,
    [token_type_ids], labels and length (token count); causal-lm rows also n_targets.

    `labels` is None for causal-lm (no classes); `dropped` counts, per split name ("train",
    "eval"), the causal-lm rows dropped for having no target token left."""

    train: Dataset
    eval: Dataset | None
    labels: Labels | None
    task: str = "sequence-classification"
    dropped: dict[str, int] = field(default_factory=dict)
    _lengths: list[int] | None = field(default=None, init=False, repr=False)

    @property
    def train_lengths(self) -> list[int]:
        """Token counts of the training rows (for `train_batches(group_by_length=True)`)."""
        if self._lengths is None:
            self._lengths = list(self.train["length"])
        return self._lengths


# --- reading ----------------------------------------------------------------------------


def load_table(source: Source, *, cache_dir: str | None = None, label_column: str | None = None) -> Dataset:
    """One split as a `datasets.Dataset`, columns as in the file (csv/tsv cells as strings).

    A csv/tsv file is first checked record by record (`kdcli.facts.tabular.validate_table`: field
    counts, quotes; `label_column` lets it spot rows merged by an open quote)."""
    import datasets

    fmt = source.format
    kwargs: dict[str, Any] = {"split": "train", "cache_dir": cache_dir}
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"{source.path}: unknown format {fmt!r}. Fix: use one of {', '.join(FORMATS)}")
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such file. Fix: check data.train/data.eval paths")
        if fmt in ("csv", "tsv"):
            delimiter, quoting = dialect(fmt, source.delimiter)
            columns = validate_table(path, delimiter=delimiter, quoting=quoting, label_column=label_column).header
            kwargs.update(
                delimiter=delimiter,
                quoting=quoting,
                keep_default_na=False,
                features=datasets.Features({c: datasets.Value("string") for c in columns}),
            )
            builder = "csv"
        else:
            builder = "json" if fmt in ("json", "jsonl") else "parquet"
        args: tuple = (builder,)
        kwargs["data_files"] = str(path)
    else:
        args = (source.path, source.config) if source.config else (source.path,)
        kwargs["split"] = source.split
    try:
        table = datasets.load_dataset(*args, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (ConnectionError, ValueError, ArrowInvalid, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"{source.describe()}: cannot read it ({type(exc).__name__}: {first}). Fix: check the "
            "path and format (csv/tsv need a header line), or the hub name, split and network"
        ) from exc
    if len(table) == 0:
        raise DataError(f"{source.describe()}: no rows. Fix: give a split with data")
    return table


# --- labels -----------------------------------------------------------------------------


def class_names(table: Dataset, column: str) -> list[str] | None:
    """Names of a `ClassLabel` column (or a sequence of ClassLabel, as NER tags), else None."""
    import datasets

    feature = table.features.get(column)
    while hasattr(feature, "feature") or isinstance(feature, list):  # List / Sequence / [x]
        feature = feature[0] if isinstance(feature, list) else feature.feature
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# --- tokenising -------------------------------------------------------------------------


def _check_columns(table: Dataset, columns: Mapping[str, str | None], source: str) -> None:
    for option, column in columns.items():
        if column is not None and column not in table.column_names:
            raise DataError(
                f"{source}: no column {column!r} (data.{option}); it has {table.column_names}. "
                f"Fix: set data.{option} to one of them"
            )


def tokenize(
    table: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    labels: Labels | None,
    *,
    task: str = "sequence-classification",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    source: str = "data",
    row_format: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
) -> Dataset:
    """Tokenise every row once (`map(batched=True)`, cached by datasets), without padding.

    Output columns: input_ids, attention_mask, [token_type_ids], labels (an int per row, or a
    list per token with -100 off the first sub-tokens), length. Causal LM (`labels` None, the
    columns of `row_format`): input_ids, attention_mask, labels (unshifted, -100 off the
    targets), length, n_targets (`kdcli.tasks.lm_rows`); rows without targets are kept here.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}. Fix: use one of {', '.join(TASKS)}")
    if task == "causal-lm":
        columns = Columns(
            text=text_column,
            row_format=row_format,
            prompt=prompt_column,
            completion=completion_column,
            messages=messages_column,
        )
        function = lm_rows.encoder(tokenizer, columns, max_length, source)
        needed = {option: getattr(columns, name) for option, name in lm_rows.FORMAT_COLUMNS[row_format]}
        _check_columns(table, needed, source)
        return table.map(function, batched=True, with_indices=True, remove_columns=table.column_names)
    if labels is None:
        raise DataError(f"{source}: task {task} needs class labels. Fix: pass the labels of the label column")
    _check_columns(
        table,
        {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column},
        source,
    )
    columns = Columns(text=text_column, text_pair=text_pair_column, label=label_column)
    function = task_for(task).encoder(tokenizer, labels, columns, max_length, source)
    return table.map(function, batched=True, remove_columns=table.column_names)


def drop_untargeted(table: Dataset, source: str) -> tuple[Dataset, int]:
    """Causal-LM rows with `n_targets` > 0 and how many were dropped; `DataError` when none is left."""
    kept = table.filter(lambda counts: [n > 0 for n in counts], input_columns="n_targets", batched=True)
    if len(kept) == 0:
        raise DataError(
            f"{source}: no row has a target token left ({len(table)} rows: empty texts or completions, "
            "no assistant turn, or targets cut away by truncation). Fix: check data.row_format and its "
            "columns, or raise data.max_length"
        )
    return kept, len(table) - len(kept)


def prepare_data(
    train: Source,
    eval: Source | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str = "sequence-classification",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    row_format: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
) -> TaskData:
    """Read, label and tokenise the train (and eval) split; `max_*_samples` keep the first N rows.

    Causal LM: no labels (`TaskData.labels` None); the rows of `row_format` are encoded, then
    those without a target token are dropped (after `max_*_samples`), counted in `TaskData.dropped`.
    """
    causal = task == "causal-lm"
    label_at = None if causal else label_column
    tables = {"train": load_table(train, cache_dir=cache_dir, label_column=label_at)}
    if eval is not None:
        tables["eval"] = load_table(eval, cache_dir=cache_dir, label_column=label_at)
    sources = {"train": train, "eval": eval}
    labels: Labels | None = None
    if not causal:
        for name, table in tables.items():
            _check_columns(table, {"label_column": label_column}, sources[name].describe())
        names = class_names(tables["train"], label_column)
        splits = [
            (f"{sources[name].describe()}, column {label_column!r}", table[label_column])
            for name, table in tables.items()
            if name == "train" or names is None
        ]
        labels = labels_of_splits(splits, names=names)
    dropped: dict[str, int] = {}
    limits = {"train": max_train_samples, "eval": max_eval_samples}
    out: dict[str, Any] = {}
    for name, table in tables.items():
        limit = limits[name]
        if limit is not None and limit < len(table):
            table = table.select(range(limit))
        out[name] = tokenize(
            table,
            tokenizer,
            labels,
            task=task,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            max_length=max_length,
            source=sources[name].describe(),
            row_format=row_format,
            prompt_column=prompt_column,
            completion_column=completion_column,
            messages_column=messages_column,
        )
        if causal:
            out[name], dropped[name] = drop_untargeted(out[name], sources[name].describe())
    return TaskData(train=out["train"], eval=out.get("eval"), labels=labels, task=task, dropped=dropped)


def prepare_from_recipe(recipe, tokenizer: PreTrainedTokenizerBase, *, cache_dir: str | None = None) -> TaskData:
    """`prepare_data` with the recipe's `task` and `data` section (see docs/architecture.md)."""
    data = recipe.data
    return prepare_data(
        Source.from_recipe(data.train),
        Source.from_recipe(data.eval) if data.eval is not None else None,
        tokenizer,
        task=recipe.task,
        text_column=data.text_column,
        text_pair_column=data.text_pair_column,
        label_column=data.label_column,
        max_length=data.max_length,
        max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples,
        cache_dir=cache_dir,
        row_format=data.row_format,
        prompt_column=data.prompt_column,
        completion_column=data.completion_column,
        messages_column=data.messages_column,
    )


# --- batch order ------------------------------------------------------------------------


def train_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """The row indices of each of this rank's batches in one epoch, in order.

    A pure function of its arguments, so a resumed run skips the batches already done
    (`batches[start:]`). Order: `torch.randperm(n)` seeded with `seed + epoch`, padded by
    repeating its start to a multiple of `world_size`, then cut into global batches of
    `batch_size * world_size`; rank r takes `global_batch[r::world_size]`, exactly the rows
    `DistributedSampler(shuffle=True, seed=seed)` would give it, batched `batch_size` at a time
    (so N ranks with batch B see, step by step, the rows one process with batch N*B sees).
    The last batch may be smaller; none is dropped.

    `group_by_length` (for short texts: less padding): the permutation is cut into megabatches
    of 50 global batches, each sorted by length (longest first), cut into global batches, and
    the global batches are shuffled with the same generator, so batch order stays random.
    """
    n = len(lengths)
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batching: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    if n == 0:
        return []
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / world_size) * world_size
    order += order[: total - n]
    step = batch_size * world_size
    if group_by_length:
        mega = step * MEGABATCH_BATCHES
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[start : start + step] for start in range(0, len(order), step)]
    if group_by_length:
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
    return [batch[rank::world_size] for batch in batches]


def eval_batches(num_rows: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Consecutive eval batches; with several ranks each takes every world_size-th batch
    (no padding, so every row is evaluated exactly once)."""
    batches = [list(range(s, min(s + batch_size, num_rows))) for s in range(0, num_rows, batch_size)]
    return batches[rank::world_size]


# --- padding ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Collator:
    """Pads a batch to its longest row: input_ids with `pad_token_id`, attention_mask and
    token_type_ids with 0, token labels with -100; sequence labels are stacked. Columns other
    than those four (e.g. `length`) are left out. Rows are right-padded (encoders).

    Accepts a list of row dicts (a DataLoader's batch) or a dict of columns
    (`dataset[indices]`); `batch(dataset, indices)` does the indexing.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> Collator:
        pad = tokenizer.pad_token_id
        return cls(pad_token_id=0 if pad is None else int(pad), pad_to_multiple_of=pad_to_multiple_of)

    def batch(self, dataset: Dataset, indices: Sequence[int]) -> dict[str, Tensor]:
        return self(dataset[list(indices)])

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, Tensor]:
        if isinstance(rows, Mapping):
            columns = {k: list(v) for k, v in rows.items() if k in _PADDED}
        else:
            columns = {k: [row[k] for row in rows] for k in _PADDED if rows and k in rows[0]}
        if "input_ids" not in columns:
            raise ValueError("a batch needs input_ids")
        width = max(len(ids) for ids in columns["input_ids"])
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        if "attention_mask" not in columns:
            columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
        out: dict[str, Tensor] = {}
        for key, values in columns.items():
            if key == "labels" and not isinstance(values[0], (list, tuple)):
                out[key] = torch.tensor(values, dtype=torch.long)
                continue
            pad = self.pad_token_id if key == "input_ids" else _PADDED[key]
            out[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values], dtype=torch.long)
        return out
