"""Local csv/tsv files checked before `datasets` reads them: one record per row, as the header says.

`datasets` reads csv through pandas, which is lenient: a row with an extra field shifts its
columns (the first one silently becomes an index), a short row gets empty cells, and a quote
left open swallows the following lines into one cell. `validate_table` reads the file once with
Python's csv module in strict mode, with the delimiter and quoting the run uses (csv: quotes
honoured; tsv: no quoting, as `kdcli.data` reads it), and raises `DataError` naming the file,
the line and the fix when:

- the file is empty, or has a header line but no rows;
- a record has more or fewer fields than the header (blank lines are skipped, as `datasets`
  skips them);
- a quote is still open at the end of the file, or a closing quote is followed by more text
  (`"a"b`): csv's strict mode;
- a quoted field runs over several lines and one of the lines it swallows, read on its own, is
  a row (the header's number of fields) whose label column holds a label like the file's
  others (a class id when the labels are ids, a known name when they are names): a quote left
  open on one line that merged the next rows into it. A field that spans lines without
  swallowing such a row (a review with a line break in it) is legal CSV and kept. Without a
  label column this last rule is not applied.

`check-recipe` runs the same function on local csv/tsv files (it is torch-free and cheap: the csv
module reads ~50 MB/s). Messages name lines, never their content.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from kdcli.facts.labels import DataError, LabelValueError, label_key
from kdcli.facts.safe_files import NotRegularFile, open_regular_text

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "bar"}


def dialect(fmt: str, delimiter: str | None = None) -> tuple[str, int]:
    """(delimiter, quoting) of a csv/tsv data file, as the run and check-recipe read it: a tsv
    is tab-separated with no quoting (quotes are ordinary characters); a csv uses its
    `delimiter` (default ",") and honours quotes."""
    if fmt == "tsv":
        return delimiter or "\t", csv.QUOTE_NONE
    return delimiter or ",", csv.QUOTE_MINIMAL


@dataclass(frozen=True)
class TableShape:
    """What validation learnt: the header and how many data rows follow it."""

    header: list[str]
    rows: int


def _delimiter_name(delimiter: str) -> str:
    return _DELIMITER_NAMES.get(delimiter, repr(delimiter))


def _looks_like_label(text: str, ids: bool, names: set[str]) -> bool:
    try:
        key = label_key(text)
    except LabelValueError:
        return False
    return isinstance(key, int) if ids else key in names


def validate_table(
    path: str | Path,
    *,
    delimiter: str,
    quoting: int,
    label_column: str | None = None,
) -> TableShape:
    """Check a csv/tsv file record by record (see the module doc); `DataError` at the first problem."""
    path = Path(path)
    where = str(path)
    quoted = quoting != csv.QUOTE_NONE
    sep = _delimiter_name(delimiter)
    multi_line: list[tuple[int, int, list[str]]] = []  # (first line, last line, fields)
    labels_seen: list[str] = []
    header: list[str] | None = None
    label_index: int | None = None
    rows = 0
    end = 0  # the last line read so far
    try:
        with open_regular_text(path, encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
            while True:
                start = end + 1
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise DataError(_csv_error(where, start, reader.line_num, str(exc), sep)) from None
                end = reader.line_num
                if not record:
                    continue  # a blank line
                if header is None:
                    header = record
                    label_index = header.index(label_column) if label_column in header else None
                    continue
                rows += 1
                if len(record) != len(header):
                    raise DataError(_count_error(where, start, end, len(record), len(header), sep, quoted))
                if end > start:
                    multi_line.append((start, end, record))
                elif label_index is not None:
                    labels_seen.append(record[label_index])
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: it is not UTF-8 text (byte {exc.start} after line {end}). Fix: save the file as UTF-8"
        ) from None
    except NotRegularFile as exc:
        raise DataError(f"{where}: not read: {exc}. Fix: point data.train/data.eval at a data file") from None
    except OSError as exc:
        raise DataError(
            f"{where}: cannot be read ({exc.strerror or type(exc).__name__}). Fix: check data.train/data.eval paths"
        ) from None
    if not header:
        raise DataError(f"{where}: the file is empty. Fix: give a file with a header line and rows")
    if rows == 0:
        raise DataError(f"{where}: a header line but no rows. Fix: give a file with data rows")
    if multi_line and label_index is not None:
        _check_merged_rows(where, multi_line, labels_seen, label_index, len(header), delimiter, quoting)
    return TableShape(header=header, rows=rows)


def _csv_error(where: str, start: int, line: int, message: str, sep: str) -> str:
    if "unexpected end of data" in message:
        return (
            f"{where}, line {start}: a quote opened on line {start} is never closed (the file ends "
            'inside it). Fix: close the quote; a quote inside a quoted field is written twice ("")'
        )
    if "expected after" in message:
        return (
            f"{where}, line {line}: a closing quote is followed by more text instead of a {sep} or "
            f"the line end (the record starts on line {start}). Fix: quote the whole field and "
            'write each quote inside it twice ("say ""hi"""), or close the quote opened '
            f"on line {start} where the field ends"
        )
    if "field larger than field limit" in message:
        return (
            f"{where}, line {start}: a field grows past the csv field limit, usually a quote opened "
            f"on line {start} that is never closed. Fix: close the quote on line {start}"
        )
    return f"{where}, line {line}: {message}. Fix: check the quoting around line {start}"


def _count_error(where: str, start: int, end: int, got: int, want: int, sep: str, quoted: bool) -> str:
    lines = f"line {start}" if start == end else f"lines {start}-{end} (one record)"
    if got > want:
        fix = (
            f"quote the fields that contain a {sep}, or remove the extra {sep}"
            if quoted
            else f"remove the extra {sep} (a tsv is read without quoting, so a text cannot hold a {sep})"
        )
    else:
        fix = f"give the record a value for each of the {want} columns (an empty value is written as nothing between two {sep}s)"
    return f"{where}, {lines}: {got} field{'s' * (got != 1)} but the header has {want}. Fix: {fix}"


def _check_merged_rows(
    where: str,
    records: list[tuple[int, int, list[str]]],
    labels_seen: list[str],
    label_index: int,
    width: int,
    delimiter: str,
    quoting: int,
) -> None:
    keys = []
    for text in labels_seen:
        try:
            keys.append(label_key(text))
        except LabelValueError:
            continue
    ids = bool(keys) and all(isinstance(k, int) for k in keys)
    names = {k for k in keys if isinstance(k, str)}
    for start, _end, record in records:
        line = start
        for field in record:
            for piece in _LINE_BREAK.split(field)[1:]:
                line += 1
                parsed = next(csv.reader([piece], delimiter=delimiter, quoting=quoting), [])
                if len(parsed) == width and _looks_like_label(parsed[label_index], ids, names):
                    raise DataError(
                        f"{where}, line {start}: a quote opened on line {start} runs over the next "
                        f"line(s) and swallows line {line}, which reads as a row of its own: two "
                        f"rows merged into one. Fix: close the quote on line "
                        f'{start}; a quote inside a quoted field is written twice ("")'
                    )
