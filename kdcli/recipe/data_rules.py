"""check-recipe's data rules: columns exist, labels counted as the run counts them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kdcli.facts.labels import DataError, Labels, labels_of_splits
from kdcli.facts.safe_files import is_file
from kdcli.facts.tabular import dialect, validate_table
from kdcli.recipe.data_files import DataHeader, DataUnreadable, label_values, read_header
from kdcli.recipe.lm_data import messages_findings
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.messages import JsonPath, show, suggest
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe
from kdcli.recipe.sources import DataSource

#: data files larger than this are not scanned for their labels (headers are always read)
LABEL_SCAN_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LabelScan:
    """The labels of a recipe's local data files, counted as `kdcli.data` counts them (the same
    `kdcli.facts.labels` code). `labels` None: unknown or refused; `complete`: every split was read
    (else `labels` is a lower bound); `error`: why a file (at `where`) or its labels are refused."""

    labels: Labels | None = None
    complete: bool = False
    error: DataError | None = None
    where: JsonPath = ("data", "label_column")
    path: str = ""

    def problem(self, show_values: bool) -> Finding | None:
        """The error as a finding; without label values unless `show_values`."""
        if self.error is None:
            return None
        text, _, fix = (str(self.error) if show_values else self.error.redacted).partition(". Fix: ")
        return Finding(self.where, text.replace(self.path, os.path.basename(self.path)) if self.path else text, fix)


def values_shown(recipe: Recipe, loaded: LoadedRecipe) -> bool:
    """Whether label values may appear in messages: every local data file is inside the recipe's
    repository with a plausible header, as `data_findings` requires to list column names."""
    for split, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if source is None or not source.is_local:
            continue
        try:
            if loaded.outside(loaded.data_path(split), source.path) is not None or not read_header(source).listable:
                return False
        except DataUnreadable:
            return False
    return True


def scan_labels(splits: list[tuple[str, DataSource]], column: str) -> LabelScan:
    """Validate each local csv/tsv split (`kdcli.facts.tabular`) and count the labels of all splits
    together (`kdcli.facts.labels`), as a run does; hub data, files over LABEL_SCAN_LIMIT_BYTES and
    files whose header lacks the column are skipped (other rules report those)."""
    values: list[tuple[str, list[Any]]] = []
    complete = True
    for split, source in splits:
        if not source.is_local or source.format is None:
            complete = False
            continue
        try:
            if os.path.getsize(source.path) > LABEL_SCAN_LIMIT_BYTES or column not in read_header(source).columns:
                complete = False
                continue
        except (OSError, DataUnreadable):
            complete = False
            continue
        if source.format in ("csv", "tsv"):
            delimiter, quoting = dialect(source.format, source.delimiter)
            try:
                validate_table(source.path, delimiter=delimiter, quoting=quoting, label_column=column)
            except DataError as exc:
                return LabelScan(error=exc, where=("data", split), path=source.path)
        try:
            rows = list(label_values(source, column))
        except Exception:  # read_header reports unreadable files; here we just do not know
            complete = False
            continue
        values.append((f"data.{split} file {os.path.basename(source.path)}, column {column!r}", rows))
    if not values:
        return LabelScan()
    try:
        return LabelScan(labels_of_splits(values), complete)
    except DataError as exc:
        return LabelScan(error=exc)


def count_labels(source: DataSource, column: str, *, token_level: bool = False) -> int | None:
    """How many classes one file's labels make, as `kdcli.data` counts them (integer labels:
    max + 1; names: distinct values; tag lists flattened); None when unknown or refused."""
    labels = scan_labels([("train", source)], column).labels
    return labels.num_labels if labels is not None else None


def delimiter_hint(header: DataHeader, source: DataSource) -> str:
    """A fix for a delimited file read with the wrong delimiter (one column holding tabs...)."""
    if source.format not in ("csv", "tsv") or len(header.columns) != 1:
        return ""
    for char, name in (("\t", "a tab"), (",", "a comma"), (";", "a semicolon"), ("|", "a bar")):
        if char in header.columns[0] and char != source.delimiter:
            if char == "\t":
                return 'the header line looks tab-separated: use a .tsv file or set format "tsv"'
            return f'the header line looks separated by {name}: set "delimiter": {show(char)} (format csv)'
    return ""


def _column_findings(
    recipe: Recipe, loaded: LoadedRecipe, split: str, source: DataSource, header: DataHeader
) -> list[Finding]:
    """The text, pair and label columns exist in one local data file's header (and hold lists
    for token-classification). Column names are shown only for a plausible header of a file
    inside the repository (check-recipe runs in CI on recipes from pull requests)."""
    out: list[Finding] = []
    columns = data_columns(recipe)
    name = os.path.basename(source.path)
    outside = loaded.outside(loaded.data_path(split), source.path)
    listed = outside is None and header.listable
    misread = delimiter_hint(header, source) if listed else ""
    for option, column in columns:
        written = loaded.written(("data", option)) is not None
        if column not in header.columns:
            default = "" if written else f" (the default {option})"
            guess = suggest(column, header.columns) if listed else None
            fix = f"set data.{option} to {show(guess)}" if guess else f"set data.{option} to one of its columns"
            if listed:
                known = f"its columns: {', '.join(map(show, header.columns)) or 'none'}"
            else:
                why = (
                    "the file is outside the recipe's repository"
                    if outside
                    else f"it has {len(header.columns)} columns"
                )
                known = f"its columns are not listed ({why})"
            out.append(
                Finding(
                    ("data", option),
                    f"data.{split} file {name} has no column {show(column)}{default}; {known}",
                    misread or fix,
                )
            )
        elif recipe.task == "token-classification" and option != "text_pair_column" and header.list_columns is not None:
            if not header.list_columns.get(column, False):
                what = "words" if option == "text_column" else "tags"
                out.append(
                    Finding(
                        ("data", option),
                        f"token-classification needs a list of {what} per record, but column {show(column)} of {name} does not hold lists",
                        f"store each record's {what} as a JSON list",
                    )
                )
        elif option == "messages_column":
            out.extend(messages_findings(split, source, column, header))
    return out


def data_columns(recipe: Recipe) -> list[tuple[str, str]]:
    """(option, column) of each column the task reads: causal-lm's by its row format (text;
    prompt and completion; messages), else the text, label and pair columns."""
    data = recipe.data
    if recipe.task == "causal-lm":
        options = {
            "text": ("text_column",),
            "prompt-completion": ("prompt_column", "completion_column"),
            "messages": ("messages_column",),
        }[data.row_format]
        return [(option, getattr(data, option)) for option in options]
    columns = [("text_column", data.text_column), ("label_column", data.label_column)]
    if data.text_pair_column is not None:
        columns.append(("text_pair_column", data.text_pair_column))
    return columns


def data_findings(recipe: Recipe, loaded: LoadedRecipe) -> list[Finding]:
    """The columns exist in every local data file (and hold lists for token-classification)."""
    out: list[Finding] = []
    for split, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if source is None:
            continue
        where: JsonPath = ("data", split)
        if not source.is_local:
            out.append(
                Finding(
                    where,
                    f"columns of the hub dataset {show(source.path)} were not checked (only local files are read)",
                    f"check {', '.join(option for option, _ in data_columns(recipe))} against the dataset card",
                    "unchecked",
                )
            )
            continue
        if not is_file(source.path):
            continue  # reported by recipe.read_recipe
        try:
            header = read_header(source)
        except DataUnreadable as exc:
            shown = show(loaded.written(loaded.data_path(split)) or source.path)
            out.append(
                Finding(where, f"data file {shown}: {exc}", f"give a {source.format} file with a header or records")
            )
            continue
        out.extend(_column_findings(recipe, loaded, split, source, header))
    return out
