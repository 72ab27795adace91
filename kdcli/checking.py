"""`kdcli check-recipe`: the model-aware recipe rules, the data-file rules, and the report formats.

`kdcli.recipe` validates what a recipe says; this module checks it against the models and data
it names, reading only each model's `config.json` (`kdcli.modelinfo`) and each data file's
header (or first record):

- layer numbers exist in each model (hidden 0..L, attention 1..L);
- `proj` sizes equal the student's and teacher's hidden sizes, and a `proj` is present when a
  loss that needs equal sizes (hidden_mse, cos, pkd, fsp/gram) meets different sizes;
- attention_mse / attention_ce need equal head counts (the _sum/_mean variants do not);
- teacher and student share a vocabulary when intermediate matches or token-level logits are
  compared; `data.max_length` fits every model's position embeddings;
- `init_from_teacher` lists one existing block per student block, of the same shape;
- `student.overrides` names fields of the base config (did-you-mean);
- the teacher's classification head has as many classes as the data has labels;
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
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from kdcli.errors import Problem, RecipeError, UsageError
from kdcli.modelinfo import (
    GENERIC_CONFIG_KEYS,
    ConfigUnavailable,
    ModelFacts,
    hub_facts,
    local_facts,
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
    PretrainedModel,
    Recipe,
    display_name,
    find_producers,
    read_recipe,
    show,
    suggest,
)

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
        self._labels: dict[tuple, int | None] = {}

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
            labels = self.label_count(recipe.data.train, recipe.data.label_column, recipe.task)
            facts = replace(
                student.facts,
                source=f"produced by {name}",
                head=recipe.task,
                num_labels=labels if labels is not None else student.facts.num_labels,
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

    def label_count(self, source: DataSource, column: str, task: str) -> int | None:
        key = (source.path, source.format, source.delimiter, column, task)
        if key not in self._labels:
            self._labels[key] = count_labels(source, column, token_level=task == "token-classification")
        return self._labels[key]


# ------------------------------------------------------------------------------------------
# Data files: header, first record, labels
# ------------------------------------------------------------------------------------------


class DataUnreadable(Exception):
    """A local data file whose header or first record cannot be read."""


@dataclass(frozen=True)
class DataHeader:
    columns: list[str]
    #: column -> whether its first value is a list (None: not known, e.g. csv)
    list_columns: dict[str, bool] | None = None


def _open_text(path: str):
    return open(path, encoding="utf-8-sig", newline="")


def read_header(source: DataSource) -> DataHeader:
    """The columns of a local data file, from its header line or first record only."""
    fmt, path = source.format, source.path
    try:
        if fmt in ("csv", "tsv"):
            quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
            with _open_text(path) as f:
                row = next(csv.reader(f, delimiter=source.delimiter or ",", quoting=quoting), None)
            if not row:
                raise DataUnreadable("it is empty (a header line is needed)")
            return DataHeader([c.strip() for c in row])
        if fmt == "jsonl":
            with _open_text(path) as f:
                for line in f:
                    if line.strip():
                        return _header_of_record(json.loads(line))
            raise DataUnreadable("it holds no records")
        if fmt == "json":
            return _header_of_record(_first_json_record(path))
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            return DataHeader(
                list(schema.names),
                {f.name: pa.types.is_list(f.type) or pa.types.is_large_list(f.type) for f in schema},
            )
    except DataUnreadable:
        raise
    except UnicodeDecodeError:
        raise DataUnreadable("it is not UTF-8 text") from None
    except (ValueError, csv.Error) as exc:
        raise DataUnreadable(f"its first record cannot be parsed ({str(exc).splitlines()[0][:80]})") from None
    except OSError as exc:
        raise DataUnreadable(f"it cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    except Exception as exc:  # pyarrow's own errors (ArrowInvalid) are not OSError/ValueError everywhere
        raise DataUnreadable(f"it cannot be read ({exc.__class__.__name__})") from None
    raise DataUnreadable(f"unknown format {fmt!r}")


def _header_of_record(record: Any) -> DataHeader:
    if not isinstance(record, dict):
        raise DataUnreadable(f"its first record is not a JSON object ({show(record, 30)})")
    return DataHeader(list(record), {k: isinstance(v, list) for k, v in record.items()})


def _first_json_record(path: str) -> Any:
    """The first record of a .json file: a JSON array of objects, or JSON lines."""
    with _open_text(path) as f:
        head = f.read(1 << 20)
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
            reader = csv.reader(f, delimiter=source.delimiter or ",", quoting=quoting)
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


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def count_labels(source: DataSource, column: str, *, token_level: bool = False) -> int | None:
    """How many classes the data's labels make, as `kdcli.data` counts them (integer labels:
    max + 1; names: distinct values); None when unknown (hub data, a large file, unreadable)."""
    if not source.is_local or source.format is None:
        return None
    try:
        if os.path.getsize(source.path) > LABEL_SCAN_LIMIT_BYTES:
            return None
        values: list[Any] = []
        for value in _label_values(source, column):
            if token_level and isinstance(value, list):
                values.extend(value)
            else:
                values.append(value)
    except Exception:  # the columns rule reports unreadable files; here we just do not know
        return None
    if not values or any(v is None for v in values):
        return None
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        return max(ints) + 1 if min(ints) >= 0 else None
    return len({str(v) for v in values})


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
        if not Path(source.path).is_file():
            continue  # reported by recipe.read_recipe
        try:
            header = read_header(source)
        except DataUnreadable as exc:
            out.append(Finding(where, f"data file {show(loaded.written(where) if isinstance(loaded.written(where), str) else source.path)}: {exc}", f"give a {source.format} file with a header or records"))
            continue
        name = os.path.basename(source.path)
        misread = _delimiter_hint(header, source)
        for option, column in columns:
            written = loaded.written(("data", option)) is not None
            if column not in header.columns:
                guess = suggest(column, header.columns)
                default = "" if written else f" (the default {option})"
                fix = f"set data.{option} to {show(guess)}" if guess else f"set data.{option} to one of its columns"
                out.append(
                    Finding(
                        ("data", option),
                        f"data.{split} file {name} has no column {show(column)}{default}; its columns: {', '.join(map(show, header.columns)) or 'none'}",
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

    has_matches = bool(loaded.matches)
    compares_tokens = has_matches or recipe.task == "token-classification"
    if compares_tokens and s is not None and s.vocab_size is not None:
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
        n_data = resolver.label_count(recipe.data.train, recipe.data.label_column, recipe.task)
        for i, t in enumerate(teachers):
            facts = t.facts
            if facts is None:
                continue
            path = _teacher_path(recipe, i) + ("model",)
            if facts.head not in (None, recipe.task):
                kind = "no classification head" if facts.head == "" else f"a {facts.head} head"
                out.append(Finding(path, f"the teacher has {kind} for {recipe.task} (config: {facts.source}); its logits would come from a randomly initialised head", _HEADLESS_FIX, "warning"))
            elif facts.head == recipe.task and facts.num_labels is not None and n_data is not None and facts.num_labels != n_data:
                out.append(
                    Finding(
                        path,
                        f"the teacher's head has {facts.num_labels} classes but data.train has {n_data} labels",
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
    (or fails to parse, so that a broken recipe is not silently skipped)."""
    try:
        if path.stat().st_size > DISCOVERY_MAX_BYTES:
            return False
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError):
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
    """Rich text, grouped per file, on `console` (a rich Console)."""
    from rich.markup import escape

    for file in report.files:
        if file.valid:
            status = "[green]ok[/]"
            if file.warnings:
                status += f" [yellow]({len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})[/]"
        else:
            status = f"[red]invalid[/] ({len(file.errors)} error{'s' * (len(file.errors) != 1)}" + (
                f", {len(file.warnings)} warning{'s' * (len(file.warnings) != 1)})" if file.warnings else ")"
            )
        kind = f" [dim]{file.kind}[/]" if file.kind else ""
        console.print(f"[bold]{escape(file.file)}[/]{kind}: {status}", highlight=False)
        for p in file.problems:
            where = f"{p.line}:{p.col}" if p.line is not None else "-"
            color = "red" if p.severity == "error" else "yellow"
            at = f" [cyan]{escape(p.path)}[/]:" if p.path else ""
            console.print(f"  [dim]{where}[/] [{color}]{p.severity}[/]{at} {escape(p.message)}", highlight=False)
            if p.fix:
                console.print(f"      [dim]fix:[/] {escape(p.fix)}", highlight=False)
        for note in file.notes:
            console.print(f"  [dim]note: {escape(note)}[/]", highlight=False)
    s = report.summary()
    console.print(
        f"{s['files']} file{'s' * (s['files'] != 1)} checked: {s['valid']} valid, {s['invalid']} invalid "
        f"({s['errors']} error{'s' * (s['errors'] != 1)}, {s['warnings']} warning{'s' * (s['warnings'] != 1)})",
        highlight=False,
    )


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


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
