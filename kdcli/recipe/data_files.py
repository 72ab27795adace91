"""Reading local data files for check-recipe: header, first record, label values."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kdcli.facts.safe_files import NotRegularFile, open_regular
from kdcli.facts.tabular import dialect
from kdcli.recipe.sources import DataSource


class DataUnreadable(Exception):
    """A local data file whose header or first record cannot be read. Its message never holds a
    byte of the file: it is printed for files that may not be data files at all."""


#: a csv/tsv header line must end within this many characters
HEADER_MAX_CHARS = 64 * 1024
#: the first record of a json/jsonl file must end within this many characters
RECORD_MAX_CHARS = 1 << 20
#: a column name longer than this (characters) makes a header implausible
COLUMN_NAME_MAX = 100
#: headers with more columns are still checked, but their columns are not listed in messages
LISTED_COLUMNS_MAX = 200


@dataclass(frozen=True)
class DataHeader:
    """The columns of a data file: printable names of at most COLUMN_NAME_MAX characters, read
    from its header line or first record only (`read_header` checks them)."""

    columns: list[str]
    #: column -> whether its first value is a list (None: not known, e.g. csv)
    list_columns: dict[str, bool] | None = None

    @property
    def listable(self) -> bool:
        """Few enough columns to list in a message."""
        return len(self.columns) <= LISTED_COLUMNS_MAX


def open_binary(path: str):
    """A data file opened for reading; only a regular file outside /proc, /sys and /dev is ever
    opened (`safe_files.open_regular`), else DataUnreadable."""
    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise DataUnreadable(str(exc)) from None


def open_text(path: str):
    """A data file opened as UTF-8 text (a byte-order mark skipped); see `open_binary`."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")


def _plausible(columns: list[Any], fmt: str, where: str) -> list[str]:
    """`columns` when they look like the column names of a `fmt` file, else DataUnreadable
    (whose message shows none of them)."""
    for name in columns:
        if not isinstance(name, str):
            raise DataUnreadable(f"its {where} does not look like a {fmt} header: a column name is not text")
        if "\n" in name or "\r" in name:
            raise DataUnreadable(
                f"its {where} does not look like a {fmt} header: a quoted column name goes on over more than one line"
            )
        if not name.replace("\t", "").isprintable():  # a tab: a csv read with the wrong delimiter
            raise DataUnreadable(
                f"its {where} does not look like a {fmt} header: a column name holds a non-printable character"
            )
        if len(name) > COLUMN_NAME_MAX:
            raise DataUnreadable(
                f"its {where} does not look like a {fmt} header: a column name is over {COLUMN_NAME_MAX} characters long"
            )
    return list(columns)


def read_header(source: DataSource) -> DataHeader:
    """The columns of a local data file, from its header line or first record only.

    DataUnreadable unless the file is a regular file that parses as its declared format with a
    plausible header (`_plausible`): a check-recipe report may then show its column names, and
    nothing else of it.
    """
    fmt, path = source.format, source.path
    try:
        if fmt in ("csv", "tsv"):
            delimiter, quoting = dialect(fmt, source.delimiter)
            with open_text(path) as f:
                line = f.readline(HEADER_MAX_CHARS + 1)
            if len(line) > HEADER_MAX_CHARS:
                raise DataUnreadable(f"its first line is over {HEADER_MAX_CHARS // 1024} KiB long, not a header line")
            row = next(csv.reader([line], delimiter=delimiter, quoting=quoting), None)
            if not row:
                raise DataUnreadable("it is empty (a header line is needed)")
            if any("\n" in c or "\r" in c for c in row):  # an open quote: the row goes on
                raise DataUnreadable(
                    f"its first line does not look like a {fmt} header: a quoted column name goes on over more than one line"
                )
            return DataHeader(_plausible([c.strip() for c in row], fmt, "first line"))
        if fmt == "jsonl":
            return header_of_record(first_jsonl_record(path))
        if fmt == "json":
            return header_of_record(first_json_record(path))
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            with open_binary(path) as binary:
                schema = pq.read_schema(binary)
            return DataHeader(
                _plausible(list(schema.names), fmt, "schema"),
                {f.name: pa.types.is_list(f.type) or pa.types.is_large_list(f.type) for f in schema},
            )
    except DataUnreadable:
        raise
    except UnicodeDecodeError:
        raise DataUnreadable("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataUnreadable(
            f"its first record cannot be parsed ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except csv.Error as exc:
        raise DataUnreadable(f"its header line cannot be parsed ({str(exc).splitlines()[0][:80]})") from None
    except RecursionError:
        raise DataUnreadable("its first record cannot be parsed (nested too deeply)") from None
    except ValueError as exc:
        raise DataUnreadable(f"its first record cannot be parsed ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise DataUnreadable(f"it cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    except Exception as exc:  # pyarrow's own errors (ArrowInvalid) are not OSError/ValueError everywhere
        raise DataUnreadable(f"it cannot be read ({exc.__class__.__name__})") from None
    raise DataUnreadable(f"unknown format {fmt!r}")


_JSON_KINDS = {
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def header_of_record(record: Any) -> DataHeader:
    if not isinstance(record, dict):
        raise DataUnreadable(f"its first record is {_JSON_KINDS.get(type(record), 'a value')}, not a JSON object")
    columns = _plausible(list(record), "JSON", "first record")
    return DataHeader(columns, {k: isinstance(v, list) for k, v in record.items()})


def first_jsonl_record(path: str) -> Any:
    """The first record of a .jsonl file (blank lines skipped), read within RECORD_MAX_CHARS."""
    read = 0
    with open_text(path) as f:
        while read <= RECORD_MAX_CHARS:
            line = f.readline(RECORD_MAX_CHARS + 1)
            if not line:
                raise DataUnreadable("it holds no records")
            if len(line) > RECORD_MAX_CHARS:
                break
            read += len(line)
            if line.strip():
                return json.loads(line)
    raise DataUnreadable(f"its first record does not end within {RECORD_MAX_CHARS >> 20} MiB")


def first_json_record(path: str) -> Any:
    """The first record of a .json file: a JSON array of objects, or JSON lines."""
    with open_text(path) as f:
        head = f.read(RECORD_MAX_CHARS)
    text = head.lstrip()
    decoder = json.JSONDecoder()
    if text.startswith("["):
        inner = text[1:].lstrip()
        if inner.startswith("]"):
            raise DataUnreadable("it is an empty list")
        record, _ = decoder.raw_decode(inner)
        return record
    if not text:
        raise DataUnreadable("it is empty")
    record, _ = decoder.raw_decode(text)
    return record


def label_values(source: DataSource, column: str) -> Iterable[Any]:
    fmt, path = source.format, source.path
    if fmt in ("csv", "tsv"):
        delimiter, quoting = dialect(fmt, source.delimiter)
        with open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = [c.strip() for c in next(reader, [])]
            index = header.index(column)
            for row in reader:
                if row:
                    yield row[index] if index < len(row) else None
    elif fmt == "jsonl":
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line).get(column)
    elif fmt == "json":
        with open_text(path) as f:
            text = f.read()
        try:
            records = json.loads(text)
        except ValueError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        for record in records if isinstance(records, list) else [records]:
            yield record.get(column) if isinstance(record, dict) else None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path, columns=[column]).column(column).to_pylist()


#: how many first records `first_values` reads for a column's values
FIRST_RECORDS = 5


def first_values(source: DataSource, column: str, count: int = FIRST_RECORDS) -> list[Any]:
    """The `column` values of the first `count` records of a local json, jsonl or parquet file
    (a record without the column gives None), read within RECORD_MAX_CHARS per record; fewer
    when the file has fewer or they cannot be read ([] for csv/tsv, whose cells are text)."""
    fmt, path = source.format, source.path
    values: list[Any] = []
    try:
        if fmt == "jsonl":
            with open_text(path) as f:
                while len(values) < count:
                    line = f.readline(RECORD_MAX_CHARS + 1)
                    if not line or len(line) > RECORD_MAX_CHARS:
                        break
                    if line.strip():
                        record = json.loads(line)
                        values.append(record.get(column) if isinstance(record, dict) else None)
        elif fmt == "json":
            with open_text(path) as f:
                text = f.read(RECORD_MAX_CHARS * count).lstrip()
            decoder, pos = json.JSONDecoder(), 1 if text.startswith("[") else 0
            while len(values) < count:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(text) or text[pos] == "]":
                    break
                record, pos = decoder.raw_decode(text, pos)
                values.append(record.get(column) if isinstance(record, dict) else None)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            with open_binary(path) as binary:
                batch = next(pq.ParquetFile(binary).iter_batches(batch_size=count, columns=[column]), None)
                values = batch.column(0).to_pylist() if batch is not None else []
    except Exception:  # a record cut short or unparsable: judge the ones read (read_header reports the file)
        return values
    return values
