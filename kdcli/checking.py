"""`kdcli check-recipe`: the model-aware recipe rules, the data-file rules, and the report formats.

`kdcli.recipe` validates what a recipe says; this module checks it against the models and data
it names, reading only each model's `config.json` (`kdcli.modelinfo`) and each data file's
header (or first record):

- layer numbers exist in each model (hidden 0..L, attention 1..L);
- `proj` sizes equal the student's and teacher's hidden sizes, and a `proj` is present when a
  loss that needs equal sizes (hidden_mse, cos, pkd, fsp/gram) meets different sizes;
- attention_mse / attention_ce need equal head counts (the _sum/_mean variants do not);
- every model reads the run's tokenizer ids as its own tokens (`kdcli.vocab`: the tokenizer
  files of each model folder are compared on shared ids, a padded vocabulary is fine, and
  every model has an embedding per id), with or without intermediate matches; when the files
  cannot be read, teacher and student share a vocab_size when intermediate matches or
  token-level logits are compared; `data.max_length` fits every model's position embeddings;
- each model folder's weights agree with its config.json (safetensors headers: vocabulary
  rows, widths, block count, head rows), are whole, and a pickle calls nothing but tensor
  constructors (`kdcli.modelinfo`);
- `init_from_teacher` lists one existing block per student block, of the same shape;
- `student.overrides` names fields of the base config (did-you-mean);
- the teacher's classification head has as many classes as the data has labels, counted over
  train and eval with the run's own rule (`kdcli.labels`: "1" and "1.0" one class; empty
  labels, scores, and ids mixed with names refused); local csv/tsv records are validated as
  the run validates them (`kdcli.tabular`: field counts, open quotes), naming the line;
- the text and label columns exist in every local data file.

A model folder that another recipe produces (see `recipe.find_producers`) is described by that
recipe's student: its config (plus overrides) and the number of labels of its data. When a
config cannot be had (offline, unknown hub id) the rules that needed it are reported as not
checked: a warning, or an error with `strict=True`.

Reports render as rich text, one JSON document, or GitHub workflow annotations. Nothing here
imports torch, transformers or datasets.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from kdcli.errors import Problem, RecipeError, UsageError, printable
from kdcli.labels import DataError, Labels, labels_of_splits
from kdcli.modelinfo import (
    GENERIC_CONFIG_KEYS,
    ConfigUnavailable,
    ModelFacts,
    WeightsUnreadable,
    cached_hub_config,
    check_pickles,
    hub_facts,
    local_facts,
    read_config,
    weight_disagreements,
    weight_shapes,
    with_overrides,
)
from kdcli.recipe import (
    DISCOVERY_MAX_BYTES,
    ConfigStudent,
    DataSource,
    Finding,
    JsonPath,
    LoadedRecipe,
    Match,
    Mode,
    NotRegularFile,
    PretrainedModel,
    Recipe,
    display_name,
    find_producers,
    is_file,
    open_regular,
    read_recipe,
    show,
    suggest,
)

from kdcli.tabular import validate_table
from kdcli.vocab import VOCAB_FIX, read_vocab, vocabulary_problem

#: data files larger than this are not scanned for their labels (headers are always read)
LABEL_SCAN_LIMIT_BYTES = 64 * 1024 * 1024

_HEADLESS_FIX = "fine-tune the teacher on the task first (kdcli train), or point teacher.model at a fine-tuned model"


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


@dataclass
class FileReport:
    """The result of checking one recipe file."""

    file: str
    kind: str | None  # "distill" / "train"; None when the file is not a readable recipe
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "valid": self.valid,
            "kind": self.kind,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


@dataclass
class CheckReport:
    """The result of one `check-recipe` run over several files."""

    files: list[FileReport]

    @property
    def valid(self) -> bool:
        return all(f.valid for f in self.files)

    def summary(self) -> dict:
        return {
            "files": len(self.files),
            "valid": sum(f.valid for f in self.files),
            "invalid": sum(not f.valid for f in self.files),
            "errors": sum(len(f.errors) for f in self.files),
            "warnings": sum(len(f.warnings) for f in self.files),
        }

    def to_dict(self) -> dict:
        return {"valid": self.valid, "summary": self.summary(), "files": [f.to_dict() for f in self.files]}


# ------------------------------------------------------------------------------------------
# Model facts: local folders, the hub, and folders other recipes produce
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A model's facts, or why they could not be had. `partial`: only overrides are known."""

    facts: ModelFacts | None
    reason: str = ""
    partial: bool = False


class _Resolver:
    """Facts of model references, cached for one check run."""

    def __init__(self, producers: dict[str, list[Path]]) -> None:
        self.producers = producers
        self._cache: dict[tuple, Resolved] = {}
        self._visiting: set[Path] = set()
        self._labels: dict[tuple, LabelScan] = {}

    def model(self, ref: str, revision: str | None = None) -> Resolved:
        key = ("model", ref, revision)
        if key not in self._cache:
            self._cache[key] = self._model(ref, revision)
        return self._cache[key]

    def _model(self, ref: str, revision: str | None) -> Resolved:
        if os.path.isabs(ref):
            folder = Path(ref)
            if (folder / "config.json").is_file():
                try:
                    return Resolved(local_facts(folder))
                except ConfigUnavailable as exc:
                    return Resolved(None, exc.reason)
            makers = self.producers.get(os.path.normpath(ref), [])
            if makers:
                return self.produced(makers[0])
            return Resolved(None, f"{ref} has no config.json")
        try:
            return Resolved(hub_facts(ref, revision))
        except ConfigUnavailable as exc:
            return Resolved(None, exc.reason)

    def produced(self, recipe_file: Path) -> Resolved:
        """Facts of the model `recipe_file` will write: its student, with its data's labels."""
        name = display_name(recipe_file)
        if recipe_file in self._visiting:
            return Resolved(None, f"recipes produce each other in a cycle through {name}")
        self._visiting.add(recipe_file)
        try:
            try:
                loaded = read_recipe(recipe_file, producers=self.producers)
            except UsageError as exc:
                return Resolved(None, str(exc))
            if loaded.recipe is None:
                return Resolved(None, f"{name}, which produces it, is not a valid recipe")
            recipe = loaded.recipe
            student = self.student(recipe)
            if student.facts is None:
                return Resolved(None, f"the student of {name}, which produces it: {student.reason}")
            labels = self.labels(recipe.data).labels
            facts = replace(
                student.facts,
                source=f"produced by {name}",
                head=recipe.task,
                num_labels=labels.num_labels if labels is not None else student.facts.num_labels,
            )
            return Resolved(facts, partial=student.partial, reason=student.reason)
        finally:
            self._visiting.discard(recipe_file)

    def student(self, recipe: Recipe) -> Resolved:
        """The student's facts: its model's, or its base config's with the overrides applied."""
        student = recipe.student
        if isinstance(student, PretrainedModel):
            return self.model(student.model, student.revision)
        base = self.model(student.config, student.revision) if student.config else Resolved(None, "no config given")
        if base.facts is None:
            partial = with_overrides(ModelFacts(source="student.overrides"), student.overrides)
            return Resolved(partial, base.reason, partial=True)
        return Resolved(with_overrides(base.facts, student.overrides), partial=base.partial, reason=base.reason)

    def labels(self, data: Any) -> LabelScan:
        """The labels of a recipe's `data` section, train and eval together (cached)."""
        splits = [("train", data.train)] + ([("eval", data.eval)] if data.eval is not None else [])
        key = (tuple((s, d.path, d.format, d.delimiter) for s, d in splits), data.label_column)
        if key not in self._labels:
            self._labels[key] = scan_labels(splits, data.label_column)
        return self._labels[key]


# ------------------------------------------------------------------------------------------
# Data files: header, first record, labels
# ------------------------------------------------------------------------------------------


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


def _open_text(path: str):
    """A data file opened as text; only a regular file outside /proc, /sys and /dev is ever
    opened (`recipe.open_regular`), else DataUnreadable."""
    try:
        binary = open_regular(path)
    except NotRegularFile as exc:
        raise DataUnreadable(str(exc)) from None
    return io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")


def _plausible(columns: list[Any], fmt: str, where: str) -> list[str]:
    """`columns` when they look like the column names of a `fmt` file, else DataUnreadable
    (whose message shows none of them)."""
    for name in columns:
        if not isinstance(name, str):
            raise DataUnreadable(f"its {where} does not look like a {fmt} header: a column name is not text")
        if "\n" in name or "\r" in name:
            raise DataUnreadable(f"its {where} does not look like a {fmt} header: a quoted column name goes on over more than one line")
        if not name.replace("\t", "").isprintable():  # a tab: a csv read with the wrong delimiter
            raise DataUnreadable(f"its {where} does not look like a {fmt} header: a column name holds a non-printable character")
        if len(name) > COLUMN_NAME_MAX:
            raise DataUnreadable(f"its {where} does not look like a {fmt} header: a column name is over {COLUMN_NAME_MAX} characters long")
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
            quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
            with _open_text(path) as f:
                line = f.readline(HEADER_MAX_CHARS + 1)
            if len(line) > HEADER_MAX_CHARS:
                raise DataUnreadable(f"its first line is over {HEADER_MAX_CHARS // 1024} KiB long, not a header line")
            row = next(csv.reader([line], delimiter=source.delimiter or ",", quoting=quoting), None)
            if not row:
                raise DataUnreadable("it is empty (a header line is needed)")
            if any("\n" in c or "\r" in c for c in row):  # an open quote: the row goes on
                raise DataUnreadable(f"its first line does not look like a {fmt} header: a quoted column name goes on over more than one line")
            return DataHeader(_plausible([c.strip() for c in row], fmt, "first line"))
        if fmt == "jsonl":
            return _header_of_record(_first_jsonl_record(path))
        if fmt == "json":
            return _header_of_record(_first_json_record(path))
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                binary = open_regular(path)
            except NotRegularFile as exc:
                raise DataUnreadable(str(exc)) from None
            with binary:
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
        raise DataUnreadable(f"its first record cannot be parsed ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
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


_JSON_KINDS = {list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number", type(None): "null"}


def _header_of_record(record: Any) -> DataHeader:
    if not isinstance(record, dict):
        raise DataUnreadable(f"its first record is {_JSON_KINDS.get(type(record), 'a value')}, not a JSON object")
    columns = _plausible(list(record), "JSON", "first record")
    return DataHeader(columns, {k: isinstance(v, list) for k, v in record.items()})


def _first_jsonl_record(path: str) -> Any:
    """The first record of a .jsonl file (blank lines skipped), read within RECORD_MAX_CHARS."""
    read = 0
    with _open_text(path) as f:
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


def _first_json_record(path: str) -> Any:
    """The first record of a .json file: a JSON array of objects, or JSON lines."""
    with _open_text(path) as f:
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


def _label_values(source: DataSource, column: str) -> Iterable[Any]:
    fmt, path = source.format, source.path
    if fmt in ("csv", "tsv"):
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        with _open_text(path) as f:
            reader = csv.reader(f, delimiter=source.delimiter or ("\t" if fmt == "tsv" else ","), quoting=quoting)
            header = [c.strip() for c in next(reader, [])]
            index = header.index(column)
            for row in reader:
                if row:
                    yield row[index] if index < len(row) else None
    elif fmt == "jsonl":
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line).get(column)
    elif fmt == "json":
        with _open_text(path) as f:
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


@dataclass(frozen=True)
class LabelScan:
    """The labels of a recipe's local data files, counted as `kdcli.data` counts them (the same
    `kdcli.labels` code). `labels` None: unknown or refused; `complete`: every split was read
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


def _values_shown(recipe: Recipe, loaded: LoadedRecipe) -> bool:
    """Whether label values may appear in messages: every local data file is inside the recipe's
    repository with a plausible header, as `data_findings` requires to list column names."""
    for split, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if source is None or not source.is_local:
            continue
        where: JsonPath = ("data", split)
        written_path = where if isinstance(loaded.written(where), str) else where + ("path",)
        try:
            if loaded.outside(written_path, source.path) is not None or not read_header(source).listable:
                return False
        except DataUnreadable:
            return False
    return True


def scan_labels(splits: list[tuple[str, DataSource]], column: str) -> LabelScan:
    """Validate each local csv/tsv split (`kdcli.tabular`) and count the labels of all splits
    together (`kdcli.labels`), as a run does; hub data, files over LABEL_SCAN_LIMIT_BYTES and
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
            quoting = csv.QUOTE_NONE if source.format == "tsv" else csv.QUOTE_MINIMAL
            delimiter = source.delimiter or ("\t" if source.format == "tsv" else ",")
            try:
                validate_table(source.path, delimiter=delimiter, quoting=quoting, label_column=column)
            except DataError as exc:
                return LabelScan(error=exc, where=("data", split), path=source.path)
        try:
            rows = list(_label_values(source, column))
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


def _delimiter_hint(header: DataHeader, source: DataSource) -> str:
    """A fix for a delimited file read with the wrong delimiter (one column holding tabs...)."""
    if source.format not in ("csv", "tsv") or len(header.columns) != 1:
        return ""
    for char, name in (("\t", "a tab"), (",", "a comma"), (";", "a semicolon"), ("|", "a bar")):
        if char in header.columns[0] and char != source.delimiter:
            if char == "\t":
                return "the header line looks tab-separated: use a .tsv file or set format \"tsv\""
            return f'the header line looks separated by {name}: set "delimiter": {show(char)} (format csv)'
    return ""


def data_findings(recipe: Recipe, loaded: LoadedRecipe) -> list[Finding]:
    """The columns exist in every local data file (and hold lists for token-classification)."""
    out: list[Finding] = []
    data = recipe.data
    columns = [("text_column", data.text_column), ("label_column", data.label_column)]
    if data.text_pair_column is not None:
        columns.append(("text_pair_column", data.text_pair_column))
    for split, source in (("train", data.train), ("eval", data.eval)):
        if source is None:
            continue
        where: JsonPath = ("data", split)
        if not source.is_local:
            out.append(
                Finding(
                    where,
                    f"columns of the hub dataset {show(source.path)} were not checked (only local files are read)",
                    "check text_column and label_column against the dataset card",
                    "unchecked",
                )
            )
            continue
        if not is_file(source.path):
            continue  # reported by recipe.read_recipe
        written_path = where if isinstance(loaded.written(where), str) else where + ("path",)
        try:
            header = read_header(source)
        except DataUnreadable as exc:
            out.append(Finding(where, f"data file {show(loaded.written(written_path) or source.path)}: {exc}", f"give a {source.format} file with a header or records"))
            continue
        name = os.path.basename(source.path)
        # Column names are shown only for a plausible header of a file inside the repository
        # (check-recipe runs in CI on recipes from pull requests).
        outside = loaded.outside(written_path, source.path)
        listed = outside is None and header.listable
        misread = _delimiter_hint(header, source) if listed else ""
        for option, column in columns:
            written = loaded.written(("data", option)) is not None
            if column not in header.columns:
                default = "" if written else f" (the default {option})"
                guess = suggest(column, header.columns) if listed else None
                fix = f"set data.{option} to {show(guess)}" if guess else f"set data.{option} to one of its columns"
                if listed:
                    known = f"its columns: {', '.join(map(show, header.columns)) or 'none'}"
                else:
                    why = "the file is outside the recipe's repository" if outside else f"it has {len(header.columns)} columns"
                    known = f"its columns are not listed ({why})"
                out.append(Finding(("data", option), f"data.{split} file {name} has no column {show(column)}{default}; {known}", misread or fix))
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
    return out


# ------------------------------------------------------------------------------------------
# Model-aware rules
# ------------------------------------------------------------------------------------------


def _teacher_path(recipe: Recipe, i: int) -> JsonPath:
    return ("teacher", i) if isinstance(recipe.teacher, list) else ("teacher",)


def _student_ref_path(recipe: Recipe, loaded: LoadedRecipe) -> JsonPath:
    if isinstance(recipe.student, PretrainedModel):
        return ("student", "model")
    if loaded.written(("student", "config")) is not None:
        return ("student", "config")
    return ("student",)


def _layer_range(feature: str, layers: int) -> tuple[int, int, str]:
    if feature == "hidden":
        return 0, layers, f"hidden layers 0..{layers}, 0 being the embeddings"
    return 1, layers, f"attention layers 1..{layers}"


def match_model_findings(matches: list[tuple[int, Match]], teacher: ModelFacts | None, student: ModelFacts | None) -> list[Finding]:
    """Layer numbers, projection sizes and head counts of the (index, match) pairs."""
    out: list[Finding] = []
    for i, match in matches:
        at: JsonPath = ("distillation", "intermediate_matches", i)
        spec = match.spec
        for side, facts, who in (("layer_T", teacher, "teacher"), ("layer_S", student, "student")):
            if facts is None or facts.num_hidden_layers is None:
                continue
            layer = getattr(match, side)
            low, high, described = _layer_range(match.feature, facts.num_hidden_layers)
            for j, number in enumerate(layer if isinstance(layer, list) else [layer]):
                if number > high:
                    where = at + ((side, j) if isinstance(layer, list) else (side,))
                    out.append(
                        Finding(
                            where,
                            f"{side} {number} does not exist: the {who} has {facts.num_hidden_layers} layers ({described})",
                            f"use a layer from {low} to {high}",
                        )
                    )
        d_s = student.hidden_size if student else None
        d_t = teacher.hidden_size if teacher else None
        if match.feature == "hidden" and match.proj is not None:
            if d_s is not None and match.proj.dim_S != d_s:
                out.append(Finding(at + ("proj", 1), f"proj dim_S is {match.proj.dim_S} but the student's hidden size is {d_s}", f"write {show([match.proj.kind, d_s, d_t or match.proj.dim_T])}"))
            if d_t is not None and match.proj.dim_T != d_t:
                out.append(Finding(at + ("proj", 2), f"proj dim_T is {match.proj.dim_T} but the teacher's hidden size is {d_t}", f"write {show([match.proj.kind, d_s or match.proj.dim_S, d_t])}"))
        if match.feature == "hidden" and match.proj is None and spec.needs_proj_when_sizes_differ:
            if d_s is not None and d_t is not None and d_s != d_t:
                out.append(
                    Finding(
                        at + ("proj",),
                        f"{match.loss} needs equal hidden sizes, but the student's is {d_s} and the teacher's {d_t}",
                        f'add "proj": {show(["linear", d_s, d_t])} (mmd/nst accept different sizes)',
                    )
                )
        if spec.same_size == "heads" and student and teacher:
            h_s, h_t = student.num_attention_heads, teacher.num_attention_heads
            if h_s is not None and h_t is not None and h_s != h_t:
                variant = {"attention_mse": "attention_mse_sum", "attention_ce": "attention_ce_mean"}.get(match.loss, "")
                out.append(
                    Finding(
                        at + ("loss",),
                        f"{match.loss} compares head by head, but the student has {h_s} attention heads and the teacher {h_t}",
                        f"use {variant} (sums/averages over heads) or models with equal head counts",
                    )
                )
    return out


def init_findings(recipe: Recipe, loaded: LoadedRecipe, source: ModelFacts | None, student: ModelFacts | None) -> list[Finding]:
    """`student.init_from_teacher`: one existing block per student block, of the same shape."""
    out: list[Finding] = []
    cs = recipe.student
    if not isinstance(cs, ConfigStudent) or cs.init_from_teacher is None:
        return out
    at: JsonPath = ("student", "init_from_teacher")
    blocks = cs.init_from_teacher
    who = "teacher" if recipe.teachers else "config model"
    if student is not None and student.num_hidden_layers is not None and len(blocks) != student.num_hidden_layers:
        out.append(
            Finding(
                at,
                f"init_from_teacher lists {len(blocks)} blocks but the student has {student.num_hidden_layers} layers",
                "list exactly one teacher block per student block (or change overrides.num_hidden_layers)",
            )
        )
    if source is not None and source.num_hidden_layers is not None:
        for i, block in enumerate(blocks):
            if block > source.num_hidden_layers:
                out.append(Finding(at + (i,), f"block {block} does not exist: the {who} has blocks 1..{source.num_hidden_layers}", f"use blocks from 1 to {source.num_hidden_layers}"))
    if source is not None and student is not None:
        for fact in ("hidden_size", "num_attention_heads", "intermediate_size"):
            s, t = getattr(student, fact), getattr(source, fact)
            if s is not None and t is not None and s != t:
                where = ("student", "overrides", fact) if fact in cs.overrides else at
                out.append(
                    Finding(
                        where,
                        f"init_from_teacher copies blocks of {fact} {t}, but the student's {fact} is {s}",
                        f"keep the {who}'s {fact} ({t}), or remove init_from_teacher",
                    )
                )
        if source.model_type and student.model_type and source.model_type != student.model_type:
            out.append(Finding(at, f"init_from_teacher copies {source.model_type} blocks into a {student.model_type} student", "use a student config of the same architecture"))
    return out


def override_findings(recipe: Recipe, base: ModelFacts | None) -> list[Finding]:
    """Every override names a field of the base config (a close miss is an error, others warn)."""
    out: list[Finding] = []
    cs = recipe.student
    if not isinstance(cs, ConfigStudent) or base is None or not base.config_keys:
        return out
    known = set(base.config_keys) | GENERIC_CONFIG_KEYS
    for key in cs.overrides:
        if key in known:
            continue
        guess = suggest(key, sorted(base.config_keys))
        if guess is not None:
            out.append(Finding(("student", "overrides", key), f"override {show(key)} is not a field of the base config", f"did you mean '{guess}'?", at_key=True))
        else:
            out.append(
                Finding(
                    ("student", "overrides", key),
                    f"override {show(key)} is not in the base config; transformers will keep it as an extra attribute that the model may ignore",
                    "check the field name in the model's configuration class",
                    "warning",
                    at_key=True,
                )
            )
    return out


def _model_folder(ref: str | None, revision: str | None = None) -> Path | None:
    """A model reference's folder on this machine: a local folder, or a hub id's snapshot in
    the Hugging Face cache; None when there is none (not downloaded, produced by a recipe)."""
    if not ref:
        return None
    if os.path.isabs(ref):
        return Path(ref) if Path(ref).is_dir() else None
    cached = cached_hub_config(ref, revision)
    return Path(cached[1]).parent if cached is not None else None


_WEIGHTS_CONFIG_FIX = (
    "use the config.json that was saved with these weights (it must describe the tensors in the "
    "file), or save the model again with save_pretrained"
)


def weight_findings(recipe: Recipe, models: _Models) -> list[Finding]:
    """Each loaded model folder's safetensors headers are whole and agree with its config.json
    (vocabulary rows, embedding width, block count, hidden width, head rows)."""
    out: list[Finding] = []
    seen: set[str] = set()
    for path, role, ref, _ in models.refs:
        if role == "student config" and not (recipe.init_source and not recipe.teachers):
            continue  # a student built from a config: no weights are loaded from there
        folder = Path(ref) if os.path.isabs(ref) else None
        if folder is None or ref in seen or not (folder / "config.json").is_file():
            continue
        seen.add(ref)
        try:
            shapes = weight_shapes(folder)
            check_pickles(folder)
            config = read_config(folder) if shapes else {}
        except WeightsUnreadable as exc:
            reason = exc.reason.replace(str(folder) + os.sep, "")  # the finding's path names the folder
            out.append(Finding(path, f"the {role}'s weights cannot be read: {reason}", exc.fix))
            continue
        except ConfigUnavailable:
            continue
        disagreements = weight_disagreements(shapes or {}, config)
        if disagreements:
            more = f" (and {len(disagreements) - 3} more)" if len(disagreements) > 3 else ""
            out.append(
                Finding(
                    path,
                    f"the {role}'s config.json disagrees with its weights: {'; '.join(disagreements[:3])}{more}; "
                    "loading it would start those tensors at random",
                    _WEIGHTS_CONFIG_FIX,
                )
            )
    return out


def vocab_findings(recipe: Recipe, loaded: LoadedRecipe, models: _Models) -> tuple[list[Finding], bool]:
    """Every model reads the run's tokenizer ids as its own tokens (`kdcli.vocab`, as the run
    checks them): enough token embeddings, and a pretrained model's own tokenizer files agree
    with the tokenizer on every id both have. Also returns whether the tokens could be
    compared for every model (then vocab_size alone decides nothing)."""
    student = recipe.student if "student" in loaded.sections else None
    teachers = recipe.teachers if "teacher" in loaded.sections else []
    if isinstance(recipe.tokenizer, str) and recipe.tokenizer and "tokenizer" in loaded.sections:
        used_ref, revision, used_name = recipe.tokenizer, None, "the recipe's tokenizer"
    elif teachers:
        used_ref, revision, used_name = teachers[0].model, teachers[0].revision, "the teacher's tokenizer"
    elif student is not None:
        used_ref, revision, used_name = getattr(student, "model", None) or student.config, student.revision, "the student's tokenizer"
    else:
        return [], False
    used_folder = _model_folder(used_ref, revision)
    used = read_vocab(used_folder) if used_folder is not None else None
    if used is None:
        return [], False
    out: list[Finding] = []
    all_compared = True
    for path, role, ref, resolved in models.refs:
        if role == "student config":
            facts, own, same = models.student.facts, None, True  # built from a config: learns these ids
        else:
            facts = resolved.facts
            folder = _model_folder(ref)
            same = folder is not None and folder.resolve() == used_folder.resolve()
            own = read_vocab(folder) if folder is not None and not same else None
            all_compared = all_compared and (same or own is not None)
        rows = facts.vocab_size if facts is not None else None
        problem = vocabulary_problem(used, used_name, own, rows, f"the {role}")
        if problem is not None:
            out.append(Finding(path, problem, VOCAB_FIX))
    return out, all_compared


def model_findings(recipe: Recipe, loaded: LoadedRecipe, models: _Models, resolver: _Resolver) -> list[Finding]:
    """All rules that need the models' configs (each skipped where a fact is unknown)."""
    out: list[Finding] = []
    teachers = models.teachers
    t0 = teachers[0].facts if teachers else None
    s = models.student.facts
    out += match_model_findings(loaded.matches, t0, s)
    if "student" in loaded.sections:
        out += init_findings(recipe, loaded, models.init_source.facts if models.init_source else None, s)
        out += override_findings(recipe, models.base.facts if models.base else None)

    out += weight_findings(recipe, models)
    vocab, tokens_compared = vocab_findings(recipe, loaded, models)
    out += vocab
    has_matches = bool(loaded.matches)
    compares_tokens = has_matches or recipe.task == "token-classification"
    if compares_tokens and not tokens_compared and s is not None and s.vocab_size is not None:
        for t in teachers:
            if t.facts is not None and t.facts.vocab_size is not None and t.facts.vocab_size != s.vocab_size:
                why = "intermediate matches compare token positions" if has_matches else "token-level logits are compared position by position"
                out.append(
                    Finding(
                        _student_ref_path(recipe, loaded),
                        f"the teacher's vocabulary has {t.facts.vocab_size} tokens and the student's {s.vocab_size}: {why}, which needs one shared tokenizer",
                        "use a student with the teacher's tokenizer (same vocab_size)",
                    )
                )
    for role, facts in [("teacher", r.facts) for r in teachers] + [("student", s)]:
        limit = facts.max_position_embeddings if facts else None
        if "data" in loaded.sections and limit is not None and recipe.data.max_length > limit:
            out.append(Finding(("data", "max_length"), f"max_length {recipe.data.max_length} exceeds the {role}'s {limit} position embeddings", f"use max_length <= {limit}"))
            break

    kd = recipe.distillation
    uses_logits = kd is not None and (kd.kd_loss_weight > 0 or kd.kd_loss_weight_scheduler != "none")
    if uses_logits and "data" in loaded.sections:
        scan = resolver.labels(recipe.data)
        data_labels = scan.labels
        for i, t in enumerate(teachers):
            facts = t.facts
            if facts is None:
                continue
            path = _teacher_path(recipe, i) + ("model",)
            if facts.head not in (None, recipe.task):
                kind = "no classification head" if facts.head == "" else f"a {facts.head} head"
                out.append(Finding(path, f"the teacher has {kind} for {recipe.task} (config: {facts.source}); its logits would come from a randomly initialised head", _HEADLESS_FIX, "warning"))
            elif facts.head == recipe.task and facts.num_labels is not None and data_labels is not None:
                n_data = data_labels.num_labels
                if n_data > facts.num_labels or (scan.complete and n_data != facts.num_labels):
                    also = ", counting data.eval too" if recipe.data.eval is not None else ""
                    shown = data_labels.describe() if _values_shown(recipe, loaded) else f"{n_data} labels"
                    out.append(
                        Finding(
                            path,
                            f"the teacher's head has {facts.num_labels} classes but data.train has {shown}{also}: the teacher cannot produce these labels",
                            "distil on data labelled like the teacher's training data, or use a teacher trained on these labels",
                        )
                    )
    return out


def _unchecked_rules(recipe: Recipe, loaded: LoadedRecipe, role: str) -> list[str]:
    rules = []
    matches = [m for _, m in loaded.matches]
    if matches:
        rules.append("layer numbers")
        if any(m.feature == "hidden" for m in matches):
            rules.append("hidden sizes and proj")
        if any(m.spec.same_size == "heads" for m in matches):
            rules.append("attention heads")
    if recipe.teachers and (matches or recipe.task == "token-classification"):
        rules.append("shared vocabulary")
    if role in ("init", "student config") and isinstance(recipe.student, ConfigStudent) and recipe.student.init_from_teacher:
        rules.append("init_from_teacher")
    if role == "student config" and isinstance(recipe.student, ConfigStudent) and recipe.student.overrides:
        rules.append("override names")
    if role == "teacher" and recipe.distillation is not None:
        rules.append("teacher head and labels")
    rules.append("max_length")
    return list(dict.fromkeys(rules))


# ------------------------------------------------------------------------------------------
# Checking files
# ------------------------------------------------------------------------------------------


def _place(loaded: LoadedRecipe, finding: Finding, strict: bool) -> None:
    severity = finding.severity
    fix = finding.fix
    if severity == "unchecked":
        severity = "error" if strict else "warning"
        if not strict:
            fix = f"{fix} (--strict makes this an error)" if fix else "--strict makes this an error"
    loaded.add(finding.path, finding.message, fix, severity, at_key=finding.at_key)


@dataclass
class _Models:
    """The facts of every model a recipe names, and where each is named (for warnings)."""

    teachers: list[Resolved]
    student: Resolved
    base: Resolved | None  # the config a config-student starts from
    init_source: Resolved | None  # the model init_from_teacher copies blocks from
    #: (JSON path, role, reference, facts) of each model reference
    refs: list[tuple[JsonPath, str, str, Resolved]]


def _models(recipe: Recipe, loaded: LoadedRecipe, resolver: _Resolver) -> _Models:
    has_student = "student" in loaded.sections
    teachers = [resolver.model(t.model, t.revision) for t in recipe.teachers] if "teacher" in loaded.sections else []
    student = resolver.student(recipe) if has_student else Resolved(None, "the student section is invalid")
    refs = [(_teacher_path(recipe, i) + ("model",), "teacher", t.model, r) for i, (t, r) in enumerate(zip(recipe.teachers, teachers))]
    base = None
    if has_student and isinstance(recipe.student, PretrainedModel):
        refs.append((("student", "model"), "student", recipe.student.model, student))
    elif has_student and recipe.student.config:
        base = resolver.model(recipe.student.config, recipe.student.revision)
        refs.append((_student_ref_path(recipe, loaded), "student config", recipe.student.config, base))
    init_source = None
    if has_student and recipe.init_source is not None:
        init_source = teachers[0] if recipe.teachers else base
    return _Models(teachers, student, base, init_source, refs)


def _reported_missing(ref: str, loaded: LoadedRecipe) -> bool:
    """A local folder that neither exists nor is produced: read_recipe has reported it."""
    return os.path.isabs(ref) and not Path(ref).exists() and os.path.normpath(ref) not in loaded.produced


def check_loaded(loaded: LoadedRecipe, resolver: _Resolver, strict: bool = False) -> None:
    """Add the model-aware and data rules' problems to a recipe read by `read_recipe`."""
    recipe = loaded.view
    if recipe is None:
        return
    models = _models(recipe, loaded, resolver)
    reported: set[str] = set()
    for path, _, ref, resolved in models.refs:
        if resolved.facts is not None and not resolved.partial or ref in reported or _reported_missing(ref, loaded):
            continue
        reported.add(ref)
        written = loaded.written(path)
        roles = list(dict.fromkeys(role for _, role, other, _ in models.refs if other == ref))
        rules = list(dict.fromkeys(rule for role in roles for rule in _unchecked_rules(recipe, loaded, role)))
        message = (
            f"could not read the config of {' and '.join(roles)} {show(written if isinstance(written, str) else ref)}: "
            f"{resolved.reason}; not checked: {', '.join(rules)}"
        )
        fix = "make its config.json available (a local folder, the Hugging Face cache, or network access)"
        _place(loaded, Finding(path, message, fix, "unchecked"), strict)
    for finding in model_findings(recipe, loaded, models, resolver):
        _place(loaded, finding, strict)
    if "data" in loaded.sections:
        for finding in data_findings(recipe, loaded):
            _place(loaded, finding, strict)
        problem = resolver.labels(recipe.data).problem(_values_shown(recipe, loaded))  # csv/tsv records, labels
        if problem is not None:
            _place(loaded, problem, strict)


def check_file(path: str | Path, *, strict: bool = False, mode: Mode | None = None, producers: dict[str, list[Path]] | None = None, resolver: _Resolver | None = None) -> tuple[FileReport, LoadedRecipe]:
    """Check one recipe file completely; returns its report and what was read."""
    producers = producers if producers is not None else find_producers([Path(path)])
    resolver = resolver or _Resolver(producers)
    loaded = read_recipe(path, mode, producers)
    check_loaded(loaded, resolver, strict)
    report = FileReport(loaded.display, loaded.kind, loaded.sorted_problems(), list(loaded.notes))
    return report, loaded


def _is_recipe_like(path: Path) -> bool:
    """A JSON file found in a folder counts as a recipe when it is an object with a student
    (or fails to parse, so that a broken recipe is not silently skipped). A *.json that is not a
    regular file (a link to /dev/zero, a FIFO) is never opened, and is reported, not skipped."""
    try:
        with open_regular(path) as f:
            data = f.read(DISCOVERY_MAX_BYTES + 1)
    except NotRegularFile:
        return True
    except (OSError, ValueError):
        return False
    if len(data) > DISCOVERY_MAX_BYTES:
        return False
    try:
        raw = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return False
    except (ValueError, RecursionError):
        return True
    return isinstance(raw, dict) and ("student" in raw or "teacher" in raw or "distillation" in raw)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Recipe files from files and folders. A folder gives its *.json recipes, recursively,
    skipping hidden folders, model folders (holding a config.json) and JSON files that are not
    recipes. UsageError for a path that does not exist."""
    out: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                # prune hidden folders and model folders (a config.json: saved models, runs/...)
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and not (Path(folder) / d / "config.json").is_file()
                )
                out.extend(
                    Path(folder) / f for f in sorted(files) if f.endswith(".json") and _is_recipe_like(Path(folder) / f)
                )
        elif path.exists():
            out.append(path)
        else:
            raise UsageError(f"no such file or folder: {given}")
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in out))
    return unique


def check_paths(paths: Iterable[str | Path], *, strict: bool = False, mode: Mode | None = None) -> CheckReport:
    """Check recipe files and folders; a model folder produced by any recipe checked in the run
    (or a sibling of one) counts as available."""
    files = expand_paths(paths)
    producers = find_producers(files)
    resolver = _Resolver(producers)
    return CheckReport([check_file(f, strict=strict, mode=mode, producers=producers, resolver=resolver)[0] for f in files])


def load_checked(path: str | Path, mode: Mode | None = None, *, strict: bool = False) -> Recipe:
    """`load_recipe` plus the model-aware and data rules: the entry point for running a recipe.

    Raises RecipeError with every error (warnings alone do not raise), UsageError when the
    file does not exist.
    """
    report, loaded = check_file(path, strict=strict, mode=mode)
    if not report.valid or loaded.view is None:
        raise RecipeError(problems=report.problems)
    return loaded.view


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def render_text(report: CheckReport, console) -> None:
    """Rich text, grouped per file, on `console` (a rich Console).

    Every string that comes from a user's files (file names, paths, messages quoting values,
    keys or column names) is printed as data: non-printable characters escaped (`printable`),
    rich markup escaped, and emoji codes (`:x:`) and highlighting off.
    """
    from rich.markup import escape

    def data(text: str) -> str:
        return escape(printable(text))

    def line(markup: str) -> None:
        console.print(markup, highlight=False, emoji=False)

    for file in report.files:
        if file.valid:
            status = "[green]ok[/]"
            if file.warnings:
                status += f" [yellow]({len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})[/]"
        else:
            status = f"[red]invalid[/] ({len(file.errors)} error{'s' * (len(file.errors) != 1)}" + (
                f", {len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})" if file.warnings else ")"
            )
        kind = f" [dim]{data(file.kind)}[/]" if file.kind else ""
        line(f"[bold]{data(file.file)}[/]{kind}: {status}")
        for p in file.problems:
            where = f"{p.line}:{p.col}" if p.line is not None else "-"
            color = "red" if p.severity == "error" else "yellow"
            at = f" [cyan]{data(p.path)}[/]:" if p.path else ""
            line(f"  [dim]{where}[/] [{color}]{data(p.severity)}[/]{at} {data(p.message)}")
            if p.fix:
                line(f"      [dim]fix:[/] {data(p.fix)}")
        for note in file.notes:
            line(f"  [dim]note: {data(note)}[/]")
    s = report.summary()
    line(
        f"{s['files']} file{'s' * (s['files'] != 1)} checked: {s['valid']} valid, {s['invalid']} invalid "
        f"({s['errors']} error{'s' * (s['errors'] != 1)}, {s['warnings']} warning{'s' * (s['warnings'] != 1)})"
    )


def _escape_data(text: str) -> str:
    """A workflow command's message: non-printable characters escaped (`printable`: no raw
    control character or lone surrogate reaches the log), then %, CR and LF as GitHub wants."""
    return printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: CheckReport) -> str:
    """GitHub Actions workflow commands: one `::error`/`::warning` annotation per problem."""
    lines = []
    for file in report.files:
        for p in file.problems:
            command = "error" if p.severity == "error" else "warning"
            props = [f"file={_escape_property(p.file)}"]
            if p.line is not None:
                props.append(f"line={p.line}")
            if p.col is not None:
                props.append(f"col={p.col}")
            props.append(f"title={_escape_property('kdcli check-recipe' + (': ' + p.path if p.path else ''))}")
            message = p.message + (f". Fix: {p.fix}" if p.fix else "")
            lines.append(f"::{command} {','.join(props)}::{_escape_data(message)}")
    s = report.summary()
    lines.append(
        f"kdcli check-recipe: {s['files']} file{'s' * (s['files'] != 1)}, {s['valid']} valid, {s['invalid']} invalid, "
        f"{s['errors']} error{'s' * (s['errors'] != 1)}, {s['warnings']} warning{'s' * (s['warnings'] != 1)}"
    )
    return "\n".join(lines)
