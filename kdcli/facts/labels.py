"""Label values -> class ids: the one rule shared by the run (`kdcli.data`) and `check-recipe`
(`kdcli.recipe`), so the head size a run builds is the one check-recipe predicts.

Torch-free (check-recipe imports it). The rule, value by value (`label_key`):

- an int is a class id; a bool is one too (False = 0, True = 1);
- a float that is a whole number (1.0) is that class id; any other float (0.5) is refused: it
  is a score, not a class;
- a string is stripped of surrounding blanks, then: an integer ("1", "+1", "-1") is a class id;
  a decimal number that is whole ("1.0", "1.", "1e0") is that class id too, so "1" and "1.0"
  are ONE class (1), never two; a decimal number that is not whole ("0.5") is refused like a
  float; anything else ("pos", "B-PER", "NaN") is a class name;
- a missing value (None, a JSON null) and an empty or blank string are refused, naming the
  file and the row: an empty label is never a class of its own.

A label set is all ids or all names. Ids keep their values and make max + 1 classes (0..max; a
negative id is refused: an unlabelled test split uses -1); names get ids in sorted order. Ids
and names mixed, e.g. "pos"/"neg" in train and 0/1 in eval, are refused naming one of each
(they would silently make 4 classes out of 2). A `ClassLabel` column's names win: the dataset
says what its ints mean.

Rows are numbered from 1 among the data rows (the header line is not a row; blank lines of a
csv/tsv are skipped, as `datasets` skips them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kdcli.errors import RunError

_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NO_LABEL_FIX = "drop unlabelled rows (e.g. a test split) or fill in their labels"


class DataError(RunError):
    """The data cannot be read or does not fit the recipe (file, column, labels).

    `redacted`: the same message without any value read from the file (check-recipe shows it
    for files it may not quote, e.g. outside the recipe's repository)."""

    def __init__(self, message: str, redacted: str | None = None) -> None:
        super().__init__(message)
        self.redacted = redacted if redacted is not None else message


class LabelValueError(ValueError):
    """One label value that is no class: `reason` says why (a clause), `fix` how to fix it;
    `redacted` is `reason` without the value."""

    def __init__(self, reason: str, fix: str, redacted: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.redacted = redacted if redacted is not None else reason


def _score(shown: str) -> LabelValueError:
    return LabelValueError(
        f"label {shown} is not a whole number: labels must be class ids or names, got a float",
        "use classes, not scores (kdcli distils classifiers, not regressors)",
        "a label is not a whole number: labels must be class ids or names, got a float",
    )


def label_key(value: Any) -> int | str:
    """The class a label value stands for: an int (a class id) or a str (a class name).

    `LabelValueError` for a missing or blank value and for a number that is not whole.
    """
    if value is None:
        raise LabelValueError("some rows have no label (a missing value)", _NO_LABEL_FIX)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _score(repr(value))
    text = str(value).strip()
    if not text:
        raise LabelValueError(
            f"some rows have no label (an empty value {str(value)!r})",
            _NO_LABEL_FIX,
            "some rows have no label (an empty value)",
        )
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text):
        number = float(text)
        if number.is_integer():
            return int(number)
        raise _score(repr(text))
    return text


@dataclass(frozen=True)
class Labels:
    """Label ids: `kind` "int" (values kept) or "str" (ids in sorted order); `names[i]` is id i."""

    kind: Literal["int", "str"]
    names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def describe(self) -> str:
        """e.g. '2 labels (0, 1)' or '3 labels (neg, neutral, pos)'."""
        shown = ", ".join(self.names[:6]) + (", ..." if len(self.names) > 6 else "")
        return f"{self.num_labels} label{'s' * (self.num_labels != 1)} ({shown})"

    def encode(self, value: Any) -> int:
        """The id of one label value; `DataError` for a value outside the mapping."""
        try:
            key = label_key(value)
        except LabelValueError as exc:
            raise DataError(f"{exc.reason}. Fix: {exc.fix}") from None
        if self.kind == "int":
            if not isinstance(key, int) or not 0 <= key < self.num_labels:
                raise DataError(f"label {value!r} is not one of 0..{self.num_labels - 1}")
            return key
        if str(key) not in self.label2id:
            raise DataError(f"label {value!r} is not one of {list(self.names)}")
        return self.label2id[str(key)]


def _rows(values: Iterable[Any]) -> Iterable[tuple[int, Any]]:
    """(row number from 1, value) with tag lists flattened (every tag keeps its row)."""
    for row, value in enumerate(values, start=1):
        if isinstance(value, (list, tuple)):
            for item in value:
                yield row, item
        else:
            yield row, value


def labels_of_splits(splits: Sequence[tuple[str, Iterable[Any]]], *, names: Sequence[str] | None = None) -> Labels:
    """The labels of every split's label values (one value per row, or a list of tags per row).

    `splits`: (where, values) pairs, `where` naming the file and column in messages. `names` (a
    ClassLabel's) wins. `DataError` naming the file and row for a value that is no class, for a
    negative id, and for ids mixed with names.
    """
    if names is not None:
        return Labels("int", tuple(str(n) for n in names))
    ids: dict[int, tuple[str, int]] = {}
    found: dict[str, tuple[str, int]] = {}
    for where, values in splits:
        for row, value in _rows(values):
            try:
                key = label_key(value)
            except LabelValueError as exc:
                raise DataError(
                    f"{where}, row {row}: {exc.reason}. Fix: {exc.fix}",
                    f"{where}, row {row}: {exc.redacted}. Fix: {exc.fix}",
                ) from None
            if isinstance(key, int):
                if key < 0:
                    fix = "Fix: use labelled rows; integer labels must be 0..num_labels-1"
                    raise DataError(
                        f"{where}, row {row}: label {key} is negative (an unlabelled test split?). {fix}",
                        f"{where}, row {row}: a label is negative (an unlabelled test split?). {fix}",
                    )
                ids.setdefault(key, (where, row))
            else:
                found.setdefault(key, (where, row))
            if ids and found:
                (id_value, (id_where, id_row)) = next(iter(ids.items()))
                (name, (name_where, name_row)) = next(iter(found.items()))
                fix = "Fix: label every split the same way, all ids 0..N-1 or all names"
                raise DataError(
                    f"{where}, row {row}: labels mix class ids and names: {id_value} ({id_where}, row "
                    f"{id_row}) and {name!r} ({name_where}, row {name_row}). {fix}",
                    f"{where}, row {row}: labels mix class ids and names: an id in {id_where}, row "
                    f"{id_row} and a name in {name_where}, row {name_row}. {fix}",
                )
    if not ids and not found:
        where = splits[0][0] if splits else "labels"
        raise DataError(f"{where}: no labels. Fix: check data.label_column")
    if ids:
        return Labels("int", tuple(str(i) for i in range(max(ids) + 1)))
    return Labels("str", tuple(sorted(found)))


def infer_labels(values: Iterable[Any], *, names: Sequence[str] | None = None, where: str = "labels") -> Labels:
    """`labels_of_splits` of one split's values (tag lists are flattened)."""
    return labels_of_splits([(where, values)], names=names)
