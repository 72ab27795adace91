"""The recipe: one JSON file describing a distillation (`kdcli distill`) or a training run
(`kdcli train`), its pydantic schema, and `load_recipe(path) -> Recipe`.

Reading a recipe happens in four passes, and every problem of every pass is reported at once
(`errors.RecipeError(problems=[...])`), each with the file, the dotted path
(`distillation.intermediate_matches[2].proj`), the line and column, the bad value and a fix:

1. `parse_json`: a small recursive-descent JSON parser that keeps the position of every value
   and key (the stdlib parser keeps none), so syntax errors and later findings get line:col.
2. Structure (pydantic, `extra="forbid"`, strict types): unknown keys (with a did-you-mean),
   types, ranges, registered names (losses, projections, schedulers from `kdcli.registry`).
   Relative paths resolve against the recipe file's folder, never the working directory.
3. Rules across fields that need no model: the loss fits the feature, one or two layers per
   side, attention layer 0, `proj` only on hidden features, an all-zero objective, the command
   (`distill` needs `teacher` and `distillation`, `train` has neither).
4. Files: local model folders (a `config.json` inside) and data files exist. A model folder
   that does not exist yet is accepted when another recipe in the same folder (or checked in the
   same run) writes it as its `training.output_dir` ("produced by <recipe>"), except when
   loading a recipe to run it.

Model-aware rules (layer numbers exist, sizes, heads, vocabulary) live in `kdcli.checking`.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import json
import json.decoder
import json.scanner
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kdcli import registry
from kdcli.errors import Problem, RecipeError, UsageError
from kdcli.modelinfo import PACKAGE_PREFIX, PackageRefError, package_folder
from kdcli.safe_files import (  # noqa: F401  (re-exported: the recipe side's file tests)
    SYSTEM_FOLDERS,
    NotRegularFile,
    _probe,
    exists,
    is_dir,
    is_file,
    open_regular,
    read_small,
)

Task = Literal["sequence-classification", "token-classification"]
DataFormat = Literal["csv", "tsv", "json", "jsonl", "parquet"]
Mode = Literal["distill", "train"]

#: data file extensions and the format each implies
DATA_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}

#: keys of a match's `proj[3]` (options of the projection's optimizer parameter group)
PROJ_OPTION_KEYS = ("lr", "weight_decay", "betas", "eps")

#: model config fields that `student.overrides` must give as positive integers
SIZE_OVERRIDES = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)

PathKey = Union[str, int]
JsonPath = tuple[PathKey, ...]


# ------------------------------------------------------------------------------------------
# Did-you-mean
# ------------------------------------------------------------------------------------------


def suggest(word: object, options: Iterable[str]) -> str | None:
    """The closest option to `word` (case-insensitive, difflib), or None if none is close."""
    if not isinstance(word, str):
        return None
    by_lower = {option.lower(): option for option in options}
    if word.lower() in by_lower:
        return by_lower[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _did_you_mean(word: object, options: Iterable[str]) -> str:
    options = list(options)
    guess = suggest(word, options)
    if guess is not None:
        return f"did you mean '{guess}'?"
    return "use one of: " + ", ".join(options)


def show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it in JSON, shortened for messages."""
    if isinstance(value, float) and not math.isfinite(value):
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dotted(path: Iterable[PathKey]) -> str:
    """('distillation', 'intermediate_matches', 2, 'proj') -> 'distillation.intermediate_matches[2].proj'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


# ------------------------------------------------------------------------------------------
# JSON with positions
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    col: int  # 1-based, in characters


class JsonSyntaxError(ValueError):
    """Invalid JSON at character offset `offset` (`fix`: how to repair it, when known)."""

    def __init__(self, message: str, offset: int, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.fix = fix


@dataclass
class SourceMap:
    """Where each value (and each object key) starts in the text, by JSON path."""

    text: str
    values: dict[JsonPath, int] = field(default_factory=dict)
    keys: dict[JsonPath, int] = field(default_factory=dict)
    duplicates: list[JsonPath] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._line_starts = [0] + [i + 1 for i, ch in enumerate(self.text) if ch == "\n"]

    def position(self, offset: int) -> Position:
        line = bisect.bisect_right(self._line_starts, offset) - 1
        return Position(line + 1, offset - self._line_starts[line] + 1)

    def at(self, path: JsonPath, *, key: bool = False) -> Position | None:
        """Position of the value at `path` (of its key with key=True), else of its nearest parent."""
        if key and path in self.keys:
            return self.position(self.keys[path])
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.position(self.values[path[:end]])
        return None


_NUMBER = json.scanner.NUMBER_RE
_WS = re.compile(r"[ \t\n\r]*")
_LITERALS = (
    ("true", True),
    ("false", False),
    ("null", None),
    ("NaN", math.nan),
    ("Infinity", math.inf),
    ("-Infinity", -math.inf),
)
_MAX_DEPTH = 100


_UNICODE_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)
_CONTROL_NAMES = {"\t": "a tab", "\n": "a line break", "\r": "a carriage return"}


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.map = SourceMap(text)

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()

    def fail(self, message: str, i: int, fix: str = ""):
        raise JsonSyntaxError(message, i, fix)

    def describe(self, i: int) -> str:
        return "the end of the file" if i >= len(self.text) else repr(self.text[i])

    def where(self, i: int) -> str:
        pos = self.map.position(i)
        return f"{pos.line}:{pos.col}"

    def value(self, i: int, path: JsonPath):
        if len(path) > _MAX_DEPTH:
            self.fail(f"nesting deeper than {_MAX_DEPTH} levels", i)
        self.map.values[path] = i
        ch = self.text[i : i + 1]
        if ch == "{":
            return self.object(i, path)
        if ch == "[":
            return self.array(i, path)
        if ch == '"':
            return self.string(i)
        for word, value in _LITERALS:
            if self.text.startswith(word, i):
                return value, i + len(word)
        match = _NUMBER.match(self.text, i)
        if match:
            integer, frac, exp = match.groups()
            if frac or exp:
                return float(integer + (frac or "") + (exp or "")), match.end()
            try:
                return int(integer), match.end()
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                self.fail(f"an integer of {len(integer.lstrip('-'))} digits is too long", i, "write a shorter number")
        if ch == "'":
            self.fail("strings must use double quotes, not single quotes", i)
        self.fail(f"expected a value, found {self.describe(i)}", i)

    def string(self, i: int):
        try:
            value, end = json.decoder.scanstring(self.text, i + 1, True)
        except json.JSONDecodeError as exc:
            bad = self.text[exc.pos : exc.pos + 1]
            if exc.msg.startswith("Unterminated"):
                self.fail("unterminated string: the string starting here is not closed", i, 'add the closing "')
            if bad in ("\n", "\r"):
                self.fail(f"the string starting here is not closed on its line (found a line break at {self.where(exc.pos)})", i, 'add the closing " (write a line break inside a string as \\n)')
            if exc.msg.startswith("Invalid control"):
                name = _CONTROL_NAMES.get(bad, f"U+{ord(bad):04X}")
                self.fail(f"a raw control character ({name}) inside a string", exc.pos, "escape it, e.g. \\t for a tab, or remove it")
            self.fail(exc.msg.lower(), exc.pos)
        if any(_is_surrogate(ch) for ch in value):
            self.lone_surrogate(i + 1, end)
        return value, end

    def lone_surrogate(self, start: int, end: int) -> None:
        """Fail at the first \\uXXXX escape in text[start:end] that is half of no surrogate pair."""
        escapes = [(m.start(), int(m.group(1), 16)) for m in _UNICODE_ESCAPE.finditer(self.text, start, end) if m.group(1)]
        k = 0
        while k < len(escapes):
            at, code = escapes[k]
            paired = (
                0xD800 <= code <= 0xDBFF
                and k + 1 < len(escapes)
                and escapes[k + 1][0] == at + 6
                and 0xDC00 <= escapes[k + 1][1] <= 0xDFFF
            )
            if paired:
                k += 2
                continue
            if 0xD800 <= code <= 0xDFFF:
                self.fail(
                    f"a lone surrogate \\u{code:04x} is not valid text",
                    at,
                    "write the character itself, or a complete surrogate pair (e.g. \\ud83d\\ude00), or remove the escape",
                )
            k += 1

    def missing_comma(self, prev_end: int, i: int, what: str, closer: str, opened: int, kind: str):
        """After an item: a new item starts (a missing comma, reported where the comma belongs)
        or something else is there (reported where it is)."""
        if i >= len(self.text):
            self.fail(f"expected ',' or '{closer}' {what}, found the end of the file: the {kind} opened at {self.where(opened)} is not closed", i, f"add the missing '{closer}'")
        if self.text[i] in '"{[-0123456789tfnNI':
            self.fail(f"missing ',' {what}: expected ',' here, before the next item at {self.where(i)}", prev_end, "add a comma")
        self.fail(f"expected ',' or '{closer}' {what}, found {self.describe(i)}", i)

    def object(self, i: int, path: JsonPath):
        out: dict = {}
        opened = i
        i = self.ws(i + 1)
        if self.text[i : i + 1] == "}":
            return out, i + 1
        comma = None
        while True:
            if self.text[i : i + 1] != '"':
                if self.text[i : i + 1] == "}" and comma is not None:
                    self.fail("trailing comma before '}'", comma, "remove the comma")
                if i >= len(self.text):
                    self.fail(f"expected a key in double quotes, found the end of the file: the object opened at {self.where(opened)} is not closed", i, "add the missing '}'")
                self.fail(f"expected a key in double quotes, found {self.describe(i)}", i)
            key_at = i
            key, key_end = self.string(i)
            i = self.ws(key_end)
            if self.text[i : i + 1] != ":":
                self.fail(f"expected ':' after the key {show(key)}, found {self.describe(i)}", key_end, "add ':' between the key and its value")
            i = self.ws(i + 1)
            child = path + (key,)
            if key in out:
                self.map.duplicates.append(child)
            self.map.keys[child] = key_at
            out[key], end = self.value(i, child)
            self.map.values.setdefault(child, self.map.values[child])
            i = self.ws(end)
            ch = self.text[i : i + 1]
            if ch == ",":
                comma = i
                i = self.ws(i + 1)
            elif ch == "}":
                return out, i + 1
            else:
                self.missing_comma(end, i, f"after the value of {show(key)}", "}", opened, "object")

    def array(self, i: int, path: JsonPath):
        out: list = []
        opened = i
        i = self.ws(i + 1)
        if self.text[i : i + 1] == "]":
            return out, i + 1
        comma = None
        while True:
            if self.text[i : i + 1] == "]" and comma is not None:
                self.fail("trailing comma before ']'", comma, "remove the comma")
            value, end = self.value(i, path + (len(out),))
            out.append(value)
            i = self.ws(end)
            ch = self.text[i : i + 1]
            if ch == ",":
                comma = i
                i = self.ws(i + 1)
            elif ch == "]":
                return out, i + 1
            else:
                self.missing_comma(end, i, f"after the list's item [{len(out) - 1}]", "]", opened, "list")

    def document(self):
        i = self.ws(0)
        if i >= len(self.text):
            self.fail("the file is empty", i)
        value, i = self.value(i, ())
        i = self.ws(i)
        if i < len(self.text):
            self.fail(f"unexpected {self.describe(i)} after the end of the JSON document", i)
        return value


def parse_json(text: str) -> tuple[Any, SourceMap]:
    """Parse JSON text (as `json.loads`, NaN/Infinity included) keeping every position.

    Raises JsonSyntaxError with the character offset of the first syntax error.
    """
    parser = _Parser(text)
    return parser.document(), parser.map


# ------------------------------------------------------------------------------------------
# References: models and data
# ------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MODEL_REF_FIX = (
    "write a hub id (bert-base-uncased), a folder (./models/x, relative to the recipe's folder) "
    "or pkg:<python package>/<folder>"
)


@dataclass(frozen=True)
class _Context:
    """What validators need to know about the recipe file: its folder and name."""

    base: Path
    stem: str = "recipe"


def _context(info: ValidationInfo) -> _Context:
    ctx = info.context
    return ctx if isinstance(ctx, _Context) else _Context(Path.cwd())


def _error(message: str, fix: str = "") -> PydanticCustomError:
    return PydanticCustomError("kdcli", "{message}", {"message": message, "fix": fix})


def _local_path(ref: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(ref)))


#: the longest file or folder name, and the longest path, that file systems commonly accept (bytes)
NAME_MAX = 255
PATH_MAX = 4096


def path_problem(path: str) -> str | None:
    """Why `path` cannot name a file (a NUL, a name over NAME_MAX bytes, over PATH_MAX bytes in
    all), or None. Checked before any file-system call, which would raise instead."""
    if "\x00" in path:
        return "contains a NUL character"
    encoded = path.encode("utf-8", "surrogatepass")
    if len(encoded) >= PATH_MAX:
        return f"is {len(encoded)} bytes long, over the {PATH_MAX} a path may have"
    longest = max(re.split(r"[/\\]", path), key=lambda part: len(part.encode("utf-8", "surrogatepass")))
    size = len(longest.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        return f"has a name of {size} bytes ({show(longest, 24)}), over 255 bytes, the most a file or folder name may have"
    return None


def _check_path_text(ref: str, *resolved: str) -> None:
    """Raise a recipe error when a path (as written, or resolved) cannot name a file."""
    for path in (ref, *resolved):
        why = path_problem(path)
        if why is not None:
            raise _error(f"path {show(ref)} {why}", "shorten the path or rename the file or folder")


def repository_root(recipe_file: Path) -> Path:
    """The nearest folder above the recipe holding a `.git` entry, else the recipe's own folder."""
    folder = Path(os.path.abspath(recipe_file)).parent
    for candidate in (folder, *folder.parents):
        if _probe(lambda p: os.path.lexists(p / ".git"), candidate):
            return candidate
    return folder


def leaves_repository(written: str, resolved: str, root: Path) -> str | None:
    """How a local path written in a recipe reaches outside its repository (absolute, or out
    through `..` or a symbolic link), or None when it stays inside. `pkg:` references name an
    installed package and never count."""
    if written.startswith(PACKAGE_PREFIX):
        return None
    if written.startswith("~") or os.path.isabs(written):
        return "is an absolute path"
    try:
        real, real_root = os.path.realpath(resolved), os.path.realpath(root)
        inside = os.path.commonpath([real, real_root]) == real_root
    except (OSError, ValueError):
        inside = False
    return None if inside else "leads outside the recipe's repository"


def resolve_model_ref(ref: str, base: Path) -> str:
    """A model reference as kdcli stores it: an absolute folder, or a hub id.

    Local when it starts with '.', '/' or '~', names an existing folder relative to `base`, or
    has more than one '/' (no hub id has); `pkg:<package>/<folder>` is a folder inside an
    installed package. Raises ValueError-like PydanticCustomError for malformed references.
    """
    if not ref or ref != ref.strip():
        raise _error(f"{show(ref)} is not a model reference", _MODEL_REF_FIX)
    _check_path_text(ref)
    if ref.startswith(PACKAGE_PREFIX):
        try:
            return str(package_folder(ref))
        except PackageRefError as exc:
            raise _error(exc.message, exc.fix) from None
    if ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") >= 2 or is_dir(base / ref):
        local = _local_path(ref, base)
        _check_path_text(ref, local)
        return local
    if not _HUB_ID.fullmatch(ref) or "--" in ref or ".." in ref or len(ref) > 96:
        raise _error(f"{show(ref)} is neither an existing folder nor a valid hub id", _MODEL_REF_FIX)
    return ref


def _model_ref(value: str, info: ValidationInfo) -> str:
    return resolve_model_ref(value, _context(info).base)


def data_format_of(path: str) -> str | None:
    """The data format implied by a file name's extension, or None."""
    return DATA_EXTENSIONS.get(os.path.splitext(path)[1].lower())


def _looks_local_data(ref: str, base: Path) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or "\\" in ref
        or ref.count("/") >= 2
        or data_format_of(ref) is not None
        or exists(base / ref)
    )


# ------------------------------------------------------------------------------------------
# The schema
# ------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class PretrainedModel(_Section):
    """A model loaded with `from_pretrained`: a teacher, or a student given by `model`."""

    model: str = Field(
        description="Hub id, local folder (relative to the recipe's folder), or pkg:<package>/<folder>."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code.")

    _check_model = field_validator("model")(_model_ref)

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.model)


class ConfigStudent(_Section):
    """A student built from a config (plus overrides), optionally initialised from teacher blocks."""

    config: str | None = Field(
        None,
        description="Model whose config.json is the base (hub id, folder or pkg:); "
        "defaults to the first teacher's model.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Hugging Face config fields to change, e.g. {\"num_hidden_layers\": 3}.",
    )
    init_from_teacher: list[int] | None = Field(
        None,
        description="Teacher blocks (1..L) copied into the student's blocks in order; one per "
        "student block. In a train recipe, blocks of the model named by `config`.",
    )
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _model_ref(value, info)

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict) -> dict:
        for key in SIZE_OVERRIDES:
            if key in value:
                size = value[key]
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    raise _error(
                        f"overrides.{key} must be a positive integer, got {show(size)}",
                        f"write e.g. \"{key}\": {3 if key == 'num_hidden_layers' else 384}",
                    )
        hidden, heads = value.get("hidden_size"), value.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
            raise _error(
                f"overrides.hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                "choose sizes with hidden_size % num_attention_heads == 0 (e.g. 384 and 12)",
            )
        return value

    @field_validator("init_from_teacher")
    @classmethod
    def _check_init(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise _error("init_from_teacher is an empty list", "list one teacher block per student block, e.g. [2, 4, 6], or remove it")
        for block in value:
            if block < 1:
                raise _error(
                    f"init_from_teacher lists block {block}; blocks are numbered 1..L",
                    "use block numbers from 1 (the first transformer block) to the teacher's layer count",
                )
        return value


def _student_form(value: Any) -> str | None:
    if isinstance(value, dict):
        return "<pretrained>" if "model" in value else "<config>"
    if isinstance(value, PretrainedModel):
        return "<pretrained>"
    if isinstance(value, ConfigStudent):
        return "<config>"
    return None


def _check_student_shape(value: Any) -> Any:
    if not isinstance(value, (dict, PretrainedModel, ConfigStudent)):
        raise _error(
            f"student must be an object, got {show(value)}",
            'write {"model": "<hub id or folder>"} or {"config": "<model>", "overrides": {...}}',
        )
    return value


Student = Annotated[
    Union[Annotated[PretrainedModel, Tag("<pretrained>")], Annotated[ConfigStudent, Tag("<config>")]],
    Discriminator(_student_form),
    BeforeValidator(_check_student_shape),
]


def _teacher_form(value: Any) -> str | None:
    if isinstance(value, (dict, PretrainedModel)):
        return "<one>"
    if isinstance(value, list):
        return "<list>"
    return None


def _check_teacher_shape(value: Any) -> Any:
    if isinstance(value, str):
        raise _error(
            "teacher must be an object, not a string",
            f'write "teacher": {{"model": {show(value)}}}',
        )
    if isinstance(value, list) and not value:
        raise _error("teacher is an empty list", 'name at least one teacher: [{"model": "..."}]')
    if not isinstance(value, (dict, list, PretrainedModel)):
        raise _error(
            f"teacher must be an object or a list of objects, got {show(value)}",
            'write {"model": "<hub id or folder>"} or a list of such objects (multi-teacher)',
        )
    return value


Teacher = Annotated[
    Union[Annotated[PretrainedModel, Tag("<one>")], Annotated[list[PretrainedModel], Tag("<list>")]],
    Discriminator(_teacher_form),
    BeforeValidator(_check_teacher_shape),
]


class DataSource(_Section):
    """A data file (csv, tsv, json, jsonl, parquet) or a hub dataset."""

    path: str = Field(description="File path (relative to the recipe's folder) or hub dataset id.")
    format: DataFormat | None = Field(
        None, validate_default=True, description="File format; inferred from the extension."
    )
    delimiter: str | None = Field(
        None, validate_default=True, description="csv field delimiter (default ','); tsv is always a tab."
    )
    split: str | None = Field(
        None, description="Hub dataset split (default: train for data.train, validation for data.eval)."
    )
    config: str | None = Field(None, description="Hub dataset configuration name, e.g. sst2 of glue.")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise _error("the data path is empty", "write a file path or a hub dataset id")
        _check_path_text(value)
        base = _context(info).base
        if not _looks_local_data(value, base):
            return value
        local = _local_path(value, base)
        _check_path_text(value, local)
        return local

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if path is None:
            return value
        local = os.path.isabs(path)
        if not local:
            if value is not None:
                raise _error(
                    f"format {show(value)} applies to local files; {show(path)} is a hub dataset",
                    "remove format, or give a local file path (starting with ./ for a relative one)",
                )
            return None
        if value is None:
            value = data_format_of(path)
            if value is None:
                raise _error(
                    f"cannot tell the format of {show(os.path.basename(path))} from its extension",
                    "use a .csv, .tsv, .json, .jsonl or .parquet file, or set format",
                )
        return value

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if "format" not in info.data:
            return value
        if fmt == "tsv":
            if value not in (None, "\t"):
                raise _error(
                    f"delimiter {show(value)} contradicts format tsv (always tab-separated)",
                    "remove delimiter, or use format csv with this delimiter",
                )
            return "\t"
        if fmt == "csv":
            if value is None:
                return ","
            if len(value) != 1:
                raise _error(f"delimiter must be one character, got {show(value)}", 'write e.g. ";" or "|"')
            return value
        if value is not None:
            raise _error(
                f"delimiter applies to csv files, not {fmt or 'hub datasets'}",
                "remove delimiter",
            )
        return None

    @field_validator("split", "config")
    @classmethod
    def _hub_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if value is not None and path is not None and os.path.isabs(path):
            raise _error(
                f"{info.field_name} applies to hub datasets; {show(os.path.basename(path))} is a local file",
                f"remove {info.field_name} (a local file is one split)",
            )
        return value

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.path)


def _source_from_string(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


SourceField = Annotated[
    DataSource, BeforeValidator(_source_from_string, json_schema_input_type=Union[str, DataSource])
]


class DataSection(_Section):
    """Where the examples come from and how they are tokenised."""

    train: SourceField = Field(description="Training data: a path / hub id, or an object.")
    eval: SourceField | None = Field(None, description="Evaluation data (optional).")
    text_column: str = Field("sentence", description="Column of texts (token-classification: lists of words).")
    text_pair_column: str | None = Field(None, description="Second text column for sentence pairs.")
    label_column: str = Field("label", description="Column of labels (token-classification: lists of tags).")
    max_length: int = Field(128, ge=1, le=1_000_000, description="Tokens per example after truncation.")
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N evaluation examples.")
    group_by_length: bool = Field(True, description="Batch examples of similar length together.")

    @model_validator(mode="after")
    def _default_splits(self) -> DataSection:
        if not self.train.is_local and self.train.split is None:
            self.train.split = "train"
        if self.eval is not None and not self.eval.is_local and self.eval.split is None:
            self.eval.split = "validation"
        return self


_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
#: the seeds training.seed (and the --seed flag) accept: what torch and numpy seed from
SEED_RANGE = range(0, 2**32)


class TrainingSection(_Section):
    """Optimisation and bookkeeping; every field has a default."""

    num_epochs: int = Field(3, ge=1, description="Passes over the training data.")
    num_steps: int | None = Field(None, ge=1, description="Optimizer steps; when set it wins over num_epochs.")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-4, gt=0, allow_inf_nan=False)
    warmup_ratio: float = Field(0.1, ge=0, le=1, allow_inf_nan=False, description="Fraction of steps of linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, allow_inf_nan=False, description="Gradient clipping norm; <= 0 disables.")
    seed: int = Field(42, ge=SEED_RANGE.start, lt=SEED_RANGE.stop)
    device: str = Field("auto", description='"auto", "cpu", "cuda", "cuda:N" or "mps".')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1, description="Log every N optimizer steps.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end only).")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at the end only).")
    output_dir: str | None = Field(
        None,
        description="Where the final model is saved (save_pretrained); relative to the recipe's "
        "folder; default runs/<recipe file name without .json>.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            guess = suggest(value, ["auto", "cpu", "cuda", "mps"])
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise _error(f"unknown device {show(value)}", f'use "auto", "cpu", "cuda", "cuda:N" or "mps"{hint}')
        return value

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise _error("output_dir is empty", "write a folder path, e.g. runs/my-run")
        local = _local_path(value, _context(info).base)
        _check_path_text(value, local)
        return local


def _proj_from_list(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    if not isinstance(value, list) or len(value) not in (3, 4):
        raise _error(
            f"proj must be a list [kind, dim_S, dim_T] or [kind, dim_S, dim_T, {{options}}], got {show(value)}",
            'write e.g. "proj": ["linear", 312, 768]',
        )
    out = {"kind": value[0], "dim_S": value[1], "dim_T": value[2]}
    if len(value) == 4:
        out["options"] = value[3]
    return out


class Proj(_Section):
    """`proj = [kind, dim_S, dim_T, {options}?]`: maps student features (dim_S) to dim_T."""

    kind: str = Field(json_schema_extra={"enum": registry.projection_names()})
    dim_S: int = Field(ge=1)
    dim_T: int = Field(ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if value not in registry.projection_names():
            raise _error(f"unknown projection {show(value)}", _did_you_mean(value, registry.projection_names()))
        return value

    @field_validator("options")
    @classmethod
    def _check_options(cls, value: dict) -> dict:
        for key, option in value.items():
            if key not in PROJ_OPTION_KEYS:
                raise _error(f"unknown projection option {show(key)}", _did_you_mean(key, PROJ_OPTION_KEYS))
            if key in ("lr", "weight_decay", "eps"):
                number = isinstance(option, (int, float)) and not isinstance(option, bool)
                low = 0 if key == "weight_decay" else 1e-300  # lr and eps must be > 0
                if not number or not math.isfinite(option) or option < low:
                    symbol = ">=" if key == "weight_decay" else ">"
                    raise _error(
                        f"projection option {key} must be a finite number {symbol} 0, got {show(option)}",
                        f'write e.g. "{key}": 1e-3',
                    )
        return value


ProjField = Annotated[
    Proj,
    BeforeValidator(
        _proj_from_list,
        json_schema_input_type=Union[
            tuple[Literal[tuple(registry.projection_names())], int, int],  # type: ignore[misc]
            tuple[Literal[tuple(registry.projection_names())], int, int, dict[str, Any]],  # type: ignore[misc]
        ],
    ),
]


def _check_layer(value: Any) -> Any:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if is_int(value) or (isinstance(value, list) and value and all(is_int(x) for x in value)):
        return value
    raise _error(
        f"a layer is an integer (or a list of two for fsp/gram/mmd/nst), got {show(value)}",
        "write e.g. 4, or [8, 8] for a two-layer loss",
    )


Layer = Annotated[Union[int, list[int]], BeforeValidator(_check_layer)]


class Match(_Section):
    """One intermediate match, as TextBrewer's `IntermediateMatch`."""

    layer_T: Layer = Field(description="Teacher layer: hidden 0..L (0 = embeddings), attention 1..L.")
    layer_S: Layer = Field(description="Student layer, numbered as layer_T.")
    feature: Literal["hidden", "attention"]
    loss: str = Field(json_schema_extra={"enum": registry.loss_names("match")})
    weight: float = Field(ge=0, allow_inf_nan=False)
    proj: ProjField | None = None

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, value: str) -> str:
        if value in registry.loss_names("kd"):
            raise _error(
                f"{show(value)} is a KD loss on logits, not an intermediate-match loss",
                "set it as distillation.kd_loss_type; here use one of: " + ", ".join(registry.loss_names("match")),
            )
        if value not in registry.loss_names("match"):
            raise _error(f"unknown loss {show(value)}", _did_you_mean(value, registry.loss_names("match")))
        return value

    @property
    def spec(self) -> registry.LossSpec:
        return registry.get_loss(self.loss)


def _normalise_temperature_scheduler(value: Any) -> Any:
    names = registry.scheduler_names("temperature")
    usage = 'write "none", ["constant"], ["flsw", beta, gamma], ["flsw", beta, gamma, eps] or ["cwsm", beta]'
    if value == "none":
        return value
    if isinstance(value, str):
        if value not in names:
            raise _error(f"unknown temperature scheduler {show(value)}", _did_you_mean(value, ["none", *names]))
        value = [value]
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise _error(f"temperature_scheduler must be \"none\" or [name, *params], got {show(value)}", usage)
    name, params = value[0], value[1:]
    if name not in names:
        raise _error(f"unknown temperature scheduler {show(name)}", _did_you_mean(name, names))
    spec = registry.get_scheduler(name)
    optional = list(spec.defaults)  # optional positional parameters after the required ones
    allowed = [*spec.params, *optional]
    signature = ", ".join([*spec.params, *(f"[{p}]" for p in optional)]) or "no parameters"
    if len(params) == 1 and isinstance(params[0], dict):
        given = params[0]
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise _error(
                f"temperature scheduler {name} has no parameter {show(unknown[0])}",
                _did_you_mean(unknown[0], allowed) if allowed else f"{name} takes no parameters",
            )
        missing = [p for p in spec.params if p not in given]
        if missing:
            raise _error(f"temperature scheduler {name} needs {', '.join(missing)}", usage)
        last = max([i + 1 for i, p in enumerate(optional) if p in given], default=0)
        params = [given[p] for p in spec.params] + [given.get(p, spec.defaults[p]) for p in optional[:last]]
    if not len(spec.params) <= len(params) <= len(allowed):
        raise _error(
            f"temperature scheduler {name} takes {signature}; got {len(params)} value(s)",
            f"write {show([name, *[1.0] * len(spec.params)])}",
        )
    for param_name, param in zip(allowed, params):
        if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
            raise _error(f"{name} parameter {param_name} must be a finite number, got {show(param)}", usage)
    return [name, *params]


TemperatureScheduler = Annotated[
    Union[Literal["none"], list[Union[str, float]]],
    BeforeValidator(
        _normalise_temperature_scheduler,
        json_schema_input_type=Union[
            Literal[tuple(["none", *registry.scheduler_names("temperature")])],  # type: ignore[misc]
            list[Union[str, float, dict[str, float]]],
        ],
    ),
]


def _weight_scheduler(value: str) -> str:
    names = ["none", *registry.scheduler_names("weight")]
    if value not in names:
        raise _error(f"unknown weight scheduler {show(value)}", _did_you_mean(value, names))
    return value


WeightScheduler = Annotated[str, Field(json_schema_extra={"enum": ["none", *registry.scheduler_names("weight")]})]


class DistillationConfig(_Section):
    """TextBrewer 0.2.1's `DistillationConfig`: same names, same defaults."""

    temperature: float = Field(4, gt=0, allow_inf_nan=False)
    temperature_scheduler: TemperatureScheduler = "none"
    hard_label_weight: float = Field(0, ge=0, allow_inf_nan=False)
    hard_label_weight_scheduler: WeightScheduler = "none"
    kd_loss_type: str = Field("ce", json_schema_extra={"enum": registry.loss_names("kd")})
    kd_loss_weight: float = Field(1, ge=0, allow_inf_nan=False)
    kd_loss_weight_scheduler: WeightScheduler = "none"
    probability_shift: bool = False
    intermediate_matches: list[Match] = Field(default_factory=list)
    is_caching_logits: bool = False

    _check_schedulers = field_validator("hard_label_weight_scheduler", "kd_loss_weight_scheduler")(
        _weight_scheduler
    )

    @field_validator("kd_loss_type")
    @classmethod
    def _check_kd_loss(cls, value: str) -> str:
        names = registry.loss_names("kd")
        if value not in names:
            hint = (
                f"{show(value)} is an intermediate-match loss; put it in intermediate_matches. KD losses: "
                + ", ".join(names)
                if value in registry.loss_names("match")
                else _did_you_mean(value, names)
            )
            raise _error(f"unknown kd_loss_type {show(value)}", hint)
        return value

    @field_validator("intermediate_matches", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class Recipe(_Section):
    """A kdcli recipe. `kdcli distill` needs `teacher` and `distillation`; `kdcli train` has neither."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        populate_by_name=True,
        title="kdcli recipe",
        json_schema_extra={"description": "A kdcli recipe: see docs/recipe.md."},
    )

    schema_: str | None = Field(None, alias="$schema", description="JSON Schema URL or path, for editors.")
    description: str | None = Field(None, description="Free text: what the recipe does and why.")
    teacher: Teacher | None = Field(None, description="Teacher model, or a list of teachers (their logits are averaged).")
    student: Student = Field(description='{"model": ...} or {"config": ..., "overrides": {...}, "init_from_teacher": [...]}.')
    tokenizer: str | None = Field(None, description="Tokenizer (hub id, folder or pkg:); default: the first teacher's, else the student's model.")
    task: Task = "sequence-classification"
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    distillation: DistillationConfig | None = Field(None, description="Present in kdcli distill recipes only.")

    _source: Path | None = PrivateAttr(None)

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _model_ref(value, info)

    @model_validator(mode="after")
    def _defaults(self, info: ValidationInfo) -> Recipe:
        _apply_defaults(self, _context(info))
        return self

    @property
    def source(self) -> Path | None:
        """The recipe file (absolute), when loaded with `load_recipe`."""
        return self._source

    @property
    def teachers(self) -> list[PretrainedModel]:
        """The teachers as a list (a single `teacher` object becomes a one-element list)."""
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]

    @property
    def kind(self) -> Mode:
        """"distill" when the recipe has a distillation section, else "train"."""
        return "distill" if self.distillation is not None else "train"

    @property
    def init_source(self) -> str | None:
        """The model whose blocks `student.init_from_teacher` copies (first teacher, else `config`)."""
        if not isinstance(self.student, ConfigStudent) or self.student.init_from_teacher is None:
            return None
        return self.teachers[0].model if self.teachers else self.student.config


def recipe_json_schema() -> dict:
    """The JSON Schema of a recipe (what `kdcli schema` prints)."""
    schema = Recipe.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ------------------------------------------------------------------------------------------
# Pydantic errors -> problems
# ------------------------------------------------------------------------------------------

_KEYS_OF: dict[str, type[BaseModel]] = {
    "": Recipe,
    "teacher": PretrainedModel,
    "teacher[*]": PretrainedModel,
    "data": DataSection,
    "data.train": DataSource,
    "data.eval": DataSource,
    "training": TrainingSection,
    "distillation": DistillationConfig,
    "distillation.intermediate_matches[*]": Match,
    "distillation.intermediate_matches[*].proj": Proj,
}


def _allowed_keys(parent: JsonPath, raw: Any) -> list[str]:
    pattern = dotted("*" if isinstance(p, int) else p for p in parent).replace(".*", "[*]")
    if pattern == "student":
        node = raw.get("student") if isinstance(raw, dict) else None
        model = PretrainedModel if isinstance(node, dict) and "model" in node else ConfigStudent
    else:
        model = _KEYS_OF.get(pattern)
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


_PROJ_INDEX = {"kind": 0, "dim_S": 1, "dim_T": 2, "options": 3}


def _raw_path(loc: tuple, raw: Any) -> JsonPath:
    """Map a pydantic location onto the JSON the user wrote (union tags dropped, `proj`
    fields mapped to list indices, cut where the user wrote a scalar)."""
    path: list[PathKey] = []
    node = raw
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):
            continue  # a union tag, not a key
        if isinstance(node, list) and isinstance(part, str) and part in _PROJ_INDEX:
            part = _PROJ_INDEX[part]
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        else:
            break  # the user wrote a scalar where the model expected more structure
    return tuple(path)


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "tuple_type": "a list",
}
_COMPARISONS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else show(value)


def _describe_error(err: dict, raw: Any) -> tuple[JsonPath, str, str, bool]:
    """(path, message, fix, at_key) for one pydantic error; messages name the field by its
    last key (the dotted path travels separately in the Problem)."""
    kind = err["type"]
    path = _raw_path(err["loc"], raw)
    keys = [p for p in err["loc"] if isinstance(p, str) and not p.startswith("<")]
    name = keys[-1] if keys else "the recipe"
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "kdcli":
        return path, ctx.get("message", err["msg"]), ctx.get("fix", ""), False
    if kind == "extra_forbidden":
        key = path[-1] if path else ""
        allowed = _allowed_keys(path[:-1], raw)
        parent = dotted(path[:-1]) or "the top level"
        if path[:1] == ("student",) and key in ("config", "overrides", "init_from_teacher"):
            return (
                path,
                f"a student given by `model` takes no `{key}`",
                'use either {"model": ...} or {"config": ..., "overrides": {...}, "init_from_teacher": [...]}',
                True,
            )
        return path, f"unknown key {show(key)} in {parent}", _did_you_mean(key, allowed), True
    if kind == "missing":
        parent = dotted(path[:-1]) or "the top level"
        return path, f"missing required key {show(path[-1] if path else '')} in {parent}", "add it (see docs/recipe.md)", False
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return path, f"{name} is {show(value)}, not one of: {', '.join(expected)}", _did_you_mean(value, expected), False
    if kind in _TYPE_WORDS:
        return path, f"{name} must be {_TYPE_WORDS[kind]}, got {show(value)}", f"write {name} as {_TYPE_WORDS[kind]}", False
    if kind in _COMPARISONS:
        symbol, key = _COMPARISONS[kind]
        limit = _number(ctx.get(key))
        return path, f"{name} must be {symbol} {limit}, got {_number(value)}", f"use a value {symbol} {limit}", False
    if kind in ("finite_number", "float_parsing"):
        return path, f"{name} must be a finite number, got {show(value)}", "write a finite number", False
    if kind in ("too_short", "too_long"):
        return path, f"{name}: {err['msg'].lower()}", "fix the number of items", False
    return path, f"{name}: {err['msg']} (got {show(value)})", "see docs/recipe.md", False


# ------------------------------------------------------------------------------------------
# Rules across fields (no model needed)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A rule's finding before it is placed in the file: path, message, fix, severity."""

    path: JsonPath
    message: str
    fix: str = ""
    severity: str = "error"
    at_key: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def match_findings(raw: Any, at: JsonPath) -> list[Finding]:
    """The model-free rules of one intermediate match, as written (`at` is its JSON path).

    Works on the raw JSON so that a match with, say, a bad weight still gets its feature and
    layer rules checked; each rule looks only at fields that are individually well-formed.
    """
    out: list[Finding] = []
    if not isinstance(raw, dict):
        return out
    loss, feature = raw.get("loss"), raw.get("feature")
    spec = registry.get_loss(loss) if loss in registry.loss_names("match") else None
    feature = feature if feature in ("hidden", "attention") else None
    if spec is not None and feature is not None and spec.feature != feature:
        out.append(
            Finding(
                at + ("feature",),
                f"loss {loss} compares {spec.feature} features, but feature is {show(feature)}",
                f'set "feature": "{spec.feature}", or pick a {feature} loss: '
                + ", ".join(n for n in registry.loss_names("match") if registry.get_loss(n).feature == feature),
            )
        )
    for side in ("layer_T", "layer_S"):
        layer = raw.get(side)
        well_formed = _is_int(layer) or (isinstance(layer, list) and bool(layer) and all(_is_int(x) for x in layer))
        if not well_formed:
            continue
        if spec is not None and spec.layers_per_side == 2:
            if not (isinstance(layer, list) and len(layer) == 2):
                example = [layer, layer] if _is_int(layer) else layer[:2] * (2 // len(layer[:2]))
                out.append(
                    Finding(
                        at + (side,),
                        f"loss {loss} compares two layers per side, so {side} must be a list of two layers, got {show(layer)}",
                        f'write "{side}": {show(example)}',
                    )
                )
        elif spec is not None and isinstance(layer, list):
            out.append(
                Finding(
                    at + (side,),
                    f"loss {loss} compares one layer per side, so {side} must be one integer, got {show(layer)}",
                    f'write "{side}": {layer[0]} (lists of two are for fsp, gram, mmd and nst)',
                )
            )
        for i, number in enumerate(layer if isinstance(layer, list) else [layer]):
            where = at + (side, i) if isinstance(layer, list) else at + (side,)
            if number < 0:
                out.append(Finding(where, f"{side} {number} is negative", "layers are numbered from 0 (hidden) or 1 (attention)"))
            elif number == 0 and feature == "attention":
                out.append(
                    Finding(
                        where,
                        f"{side} 0 is the embedding output, which has no attention; attention layers are 1..L",
                        "use the block number, from 1 (first block) to the model's layer count",
                    )
                )
    if raw.get("proj") is not None and feature == "attention":
        out.append(
            Finding(
                at + ("proj",),
                "proj maps hidden states; it is not valid on an attention feature",
                "remove proj (attention maps have no hidden dimension)",
            )
        )
    return out


def _raw_match_findings(raw_matches: Any) -> list[Finding]:
    out: list[Finding] = []
    if isinstance(raw_matches, list):
        for i, raw in enumerate(raw_matches):
            out.extend(match_findings(raw, ("distillation", "intermediate_matches", i)))
    return out


def distillation_findings(config: DistillationConfig, training: TrainingSection | None, n_teachers: int) -> list[Finding]:
    """Rules across the distillation section (and the training section it depends on)."""
    out: list[Finding] = []
    at: JsonPath = ("distillation",)
    active = [
        config.kd_loss_weight > 0 or config.kd_loss_weight_scheduler != "none",
        config.hard_label_weight > 0 or config.hard_label_weight_scheduler != "none",
        *(m.weight > 0 for m in config.intermediate_matches),
    ]
    if not any(active):
        out.append(
            Finding(
                at,
                "every loss term has weight 0 (kd_loss_weight, hard_label_weight and every match weight), so nothing would be learned",
                "give at least one term a weight > 0, e.g. \"kd_loss_weight\": 1",
            )
        )
    if config.is_caching_logits and config.intermediate_matches:
        out.append(
            Finding(
                at + ("is_caching_logits",),
                "is_caching_logits skips the teacher's forward pass, but intermediate_matches need the teacher's features every step",
                "set is_caching_logits to false, or remove intermediate_matches",
            )
        )
    if n_teachers > 1 and config.intermediate_matches:
        out.append(
            Finding(
                at + ("intermediate_matches",),
                f"{n_teachers} teachers are given; multi-teacher distillation averages the teachers' logits and has no intermediate matches (as in the reference)",
                "use one teacher, or remove intermediate_matches",
            )
        )
    return out


def _section_findings(raw: dict, view: Recipe, sections: frozenset[str], mode: Mode | None) -> list[Finding]:
    """Rules across sections, each run when the sections it needs are well-formed (`view` and
    `sections` as in LoadedRecipe)."""
    out: list[Finding] = []
    has_teacher = raw.get("teacher") is not None
    has_distillation = raw.get("distillation") is not None
    if mode == "distill" and not has_distillation:
        out.append(
            Finding(
                (),
                "`kdcli distill` needs a `distillation` section; this recipe has none (it is a `kdcli train` recipe)",
                "add \"distillation\": {...} and a teacher, or run `kdcli train`",
            )
        )
    elif mode == "train" and has_distillation:
        out.append(
            Finding(
                ("distillation",),
                "`kdcli train` recipes have no distillation section; this is a `kdcli distill` recipe",
                "run `kdcli distill`, or remove distillation (and teacher) to train the student alone",
                at_key=True,
            )
        )
    if has_teacher and not has_distillation and mode != "distill":
        out.append(
            Finding(
                ("teacher",),
                "a teacher is given but there is no distillation section; a `kdcli train` recipe has no teacher",
                "add \"distillation\": {} to distil (kdcli distill), or remove teacher to train the student alone",
                at_key=True,
            )
        )
    if has_distillation and not has_teacher:
        out.append(
            Finding(
                ("distillation",),
                "a distillation section needs a teacher, and there is none",
                'add "teacher": {"model": "<hub id or folder>"}',
                at_key=True,
            )
        )
    student = raw.get("student")
    if isinstance(student, dict) and "model" not in student and student.get("config") is None and not has_teacher:
        out.append(
            Finding(
                ("student",),
                "a student declared by config needs `config` here: there is no teacher to take it from",
                'add "config": "<hub id or folder>" (the model whose config.json the student starts from)',
            )
        )
    teachers = raw.get("teacher")
    teacher_list = teachers if isinstance(teachers, list) else [teachers] if teachers is not None else []
    for i, teacher in enumerate(teacher_list):
        path: JsonPath = ("teacher", i) if isinstance(teachers, list) else ("teacher",)
        if isinstance(teacher, dict) and teacher.get("trust_remote_code") is True:
            out.append(Finding(path + ("trust_remote_code",), "trust_remote_code runs Python code from the teacher's repository", "keep it only for repositories you trust", "warning"))
    if isinstance(student, dict) and student.get("trust_remote_code") is True:
        out.append(Finding(("student", "trust_remote_code"), "trust_remote_code runs Python code from the student's repository", "keep it only for repositories you trust", "warning"))

    training = view.training if "training" in sections else None
    if has_distillation:
        if "distillation" in sections and view.distillation is not None:
            out.extend(distillation_findings(view.distillation, training, len(teacher_list)))
        if isinstance(raw["distillation"], dict):
            out.extend(_raw_match_findings(raw["distillation"].get("intermediate_matches")))
    data = view.data if "data" in sections else None
    if raw.get("task") == "token-classification" and data is not None:
        for name, source in (("train", data.train), ("eval", data.eval)):
            if source is not None and source.format in ("csv", "tsv"):
                out.append(
                    Finding(
                        ("data", name),
                        f"token-classification needs a list of words and a list of tags per record; a {source.format} file holds one text per row",
                        "use a json, jsonl or parquet file",
                    )
                )
        if data.text_pair_column is not None:
            out.append(Finding(("data", "text_pair_column"), "token-classification takes one list of words per record, not sentence pairs", "remove text_pair_column"))
    return out


# ------------------------------------------------------------------------------------------
# Files: models, data, and the recipes that produce model folders
# ------------------------------------------------------------------------------------------


def default_output_dir(recipe_file: Path) -> Path:
    return Path(_local_path(os.path.join("runs", recipe_file.stem), recipe_file.parent))


#: JSON files larger than this are not considered when looking for recipes among siblings
#: (recipes are a few KiB; a data file next to them may be gigabytes)
DISCOVERY_MAX_BYTES = 1 << 20
#: a recipe file larger than this is not read
RECIPE_MAX_BYTES = 16 << 20


def output_dir_of(recipe_file: Path) -> Path | None:
    """The folder a recipe file writes its final model to, read cheaply (None if not a recipe)."""
    data = read_small(recipe_file, DISCOVERY_MAX_BYTES)
    try:
        raw = json.loads(data.decode("utf-8")) if data is not None else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or "student" not in raw:
        return None
    training = raw.get("training")
    written = training.get("output_dir") if isinstance(training, dict) else None
    if isinstance(written, str) and written.strip():
        return Path(_local_path(written, recipe_file.parent))
    return default_output_dir(recipe_file)


def find_producers(recipe_files: Iterable[Path]) -> dict[str, list[Path]]:
    """Map each output folder (absolute) to the recipe files that write it.

    Considers the given files and every other `*.json` in their folders.
    """
    candidates: dict[Path, None] = {}
    for file in recipe_files:
        file = Path(os.path.abspath(file))
        candidates[file] = None
        if is_dir(file.parent):
            try:
                siblings = sorted(file.parent.glob("*.json"))
            except OSError:
                siblings = []
            for sibling in siblings:
                candidates[Path(os.path.abspath(sibling))] = None
    producers: dict[str, list[Path]] = {}
    for file in candidates:
        out = output_dir_of(file)
        if out is not None:
            producers.setdefault(str(out), []).append(file)
    return producers


def _close_names(missing: Path, want_dir: bool, outside: bool = False) -> str:
    """A did-you-mean among the missing path's neighbours; none outside the repository (a
    lint step in CI must not list folders of the machine it runs on)."""
    if outside:
        return "check the path; keep models and data inside the repository, relative to the recipe's folder"
    parent = missing.parent
    if not is_dir(parent):
        return f"its folder {parent} does not exist either"
    try:
        names = [p.name for p in parent.iterdir() if is_dir(p) == want_dir and not p.name.startswith(".")]
    except OSError:
        names = []
    guess = suggest(missing.name, names)
    return f"did you mean '{guess}'?" if guess else "check the spelling; relative paths resolve against the recipe's folder"


@dataclass
class LoadedRecipe:
    """One recipe file read as far as it can be.

    `recipe` is the validated Recipe (None when any structural problem remains). `view` is the
    best effort for later rules: the Recipe itself, or one assembled from the sections that
    validated on their own (`sections` names them; other sections hold defaults or None), so
    that every rule whose inputs are well-formed runs even when others fail. `matches` are the
    intermediate matches that validated, with their index in the file.
    """

    source: Path
    display: str
    recipe: Recipe | None = None
    view: Recipe | None = None
    sections: frozenset[str] = frozenset()
    matches: list[tuple[int, Match]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    raw: Any = None
    positions: SourceMap | None = None
    #: local model folders that do not exist yet, and the recipe that produces each
    produced: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> Mode | None:
        if isinstance(self.raw, dict):
            return "distill" if self.raw.get("distillation") is not None else "train"
        return None

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def add(self, path: JsonPath, message: str, fix: str = "", severity: str = "error", *, at_key: bool = False) -> None:
        """Record a problem at a JSON path (line/col looked up in the source map)."""
        pos = self.positions.at(tuple(path), key=at_key) if self.positions else None
        problem = Problem(
            file=self.display,
            path=dotted(path),
            message=message,
            fix=fix,
            line=pos.line if pos else None,
            col=pos.col if pos else None,
            severity=severity,
        )
        if problem not in self.problems:
            self.problems.append(problem)

    def add_finding(self, finding: Finding) -> None:
        self.add(finding.path, finding.message, finding.fix, finding.severity, at_key=finding.at_key)

    def written(self, path: JsonPath) -> Any:
        """The raw value at a JSON path, as the user wrote it (None if absent)."""
        node = self.raw
        for part in path:
            if isinstance(node, dict) and isinstance(part, str) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return None
        return node

    def sorted_problems(self) -> list[Problem]:
        """Problems in file order (those without a position first)."""
        return sorted(self.problems, key=lambda p: (p.line or 0, p.col or 0))

    @functools.cached_property
    def root(self) -> Path:
        """The repository the recipe belongs to (see `repository_root`)."""
        return repository_root(self.source)

    def outside(self, path: JsonPath, resolved: str) -> str | None:
        """How the local path written at `path` (resolved: `resolved`) leaves the repository,
        or None (see `leaves_repository`; None too when nothing is written there)."""
        written = self.written(path)
        return leaves_repository(written, resolved, self.root) if isinstance(written, str) else None


def display_name(path: Path) -> str:
    """A file name for messages: relative to the working directory when below it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except (ValueError, OSError):  # not below the working directory, or no working directory
        return str(path)


def _kind_of_file(path: Path) -> str:
    data = read_small(path, DISCOVERY_MAX_BYTES)
    try:
        raw = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "train"
    return "distill" if isinstance(raw, dict) and raw.get("distillation") is not None else "train"


_OUTSIDE_FIX = (
    "keep models and data inside the repository and refer to them relative to the recipe's folder "
    "(or use a hub id or pkg:<package>/<folder>)"
)


def _warn_outside(loaded: LoadedRecipe, path: JsonPath, resolved: str, what: str) -> bool:
    """A warning when the local path at `path` leaves the repository; True when it does."""
    why = loaded.outside(path, resolved)
    if why is not None:
        loaded.add(
            path,
            f"{what} {show(loaded.written(path))} {why}: a recipe should name only files inside its repository "
            f"({loaded.root}); check-recipe shows nothing read from it",
            _OUTSIDE_FIX,
            "warning",
        )
    return why is not None


def _check_model_folder(loaded: LoadedRecipe, path: JsonPath, folder: str, role: str, producers: dict[str, list[Path]], mode: Mode | None) -> None:
    folder_path = Path(folder)
    written = loaded.written(path)
    shown = show(written) if isinstance(written, str) else show(folder)
    outside = _warn_outside(loaded, path, folder, f"{role} folder")
    if is_file(folder_path / "config.json"):
        return
    makers = [p for p in producers.get(os.path.normpath(folder), []) if p != loaded.source]
    if makers:
        maker = makers[0]
        if mode is not None:
            loaded.add(
                path,
                f"{role} folder {shown} does not exist yet ({folder}); it is produced by {display_name(maker)}",
                f"run `kdcli {_kind_of_file(maker)} {display_name(maker)}` first",
            )
        else:
            loaded.produced[os.path.normpath(folder)] = maker
            note = f"{dotted(path)} {shown}: produced by {display_name(maker)}"
            if note not in loaded.notes:
                loaded.notes.append(note)
        return
    if is_dir(folder_path):
        loaded.add(path, f"{role} folder {shown} has no config.json ({folder})", "point it at a folder written by save_pretrained")
        return
    loaded.add(path, f"{role} folder {shown} not found ({folder})", _close_names(folder_path, want_dir=True, outside=outside))


def _check_files(loaded: LoadedRecipe, producers: dict[str, list[Path]], mode: Mode | None) -> None:
    """Local model folders and data files exist; the output folder overwrites nothing."""
    recipe, sections = loaded.view, loaded.sections
    assert recipe is not None  # internal: only called once a view exists
    if "teacher" in sections:
        many = isinstance(recipe.teacher, list)
        for i, teacher in enumerate(recipe.teachers):
            path: JsonPath = ("teacher", i, "model") if many else ("teacher", "model")
            if teacher.is_local:
                _check_model_folder(loaded, path, teacher.model, "teacher", producers, mode)
    student = recipe.student if "student" in sections else None
    if isinstance(student, PretrainedModel) and student.is_local:
        _check_model_folder(loaded, ("student", "model"), student.model, "student", producers, mode)
    if isinstance(student, ConfigStudent) and student.config and os.path.isabs(student.config):
        if loaded.written(("student", "config")) is not None:
            _check_model_folder(loaded, ("student", "config"), student.config, "student config", producers, mode)
    if "tokenizer" in sections and recipe.tokenizer and os.path.isabs(recipe.tokenizer):
        outside = _warn_outside(loaded, ("tokenizer",), recipe.tokenizer, "tokenizer folder")
        if not is_dir(recipe.tokenizer) and (mode is not None or os.path.normpath(recipe.tokenizer) not in producers):
            loaded.add(("tokenizer",), f"tokenizer folder {show(loaded.written(('tokenizer',)))} not found ({recipe.tokenizer})", _close_names(Path(recipe.tokenizer), want_dir=True, outside=outside))
    if "data" in sections:
        for name, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
            if source is None or not source.is_local:
                continue
            path = ("data", name) if isinstance(loaded.written(("data", name)), str) else ("data", name, "path")
            file = Path(source.path)
            outside = _warn_outside(loaded, path, source.path, f"data.{name} file")
            if not is_file(file):
                if is_dir(file):
                    what = "is a folder, not a file"
                elif exists(file):
                    what = "is not a regular file (a device, FIFO or socket)"
                else:
                    what = "not found"
                loaded.add(path, f"data file {show(loaded.written(path))} {what} ({source.path})", _close_names(file, want_dir=False, outside=outside))
    if "training" not in sections:
        return
    out_dir = os.path.normpath(recipe.training.output_dir or "")
    where: JsonPath = ("training", "output_dir") if loaded.written(("training", "output_dir")) else ("training",)
    reading = [t.model for t in recipe.teachers] if "teacher" in sections else []
    if student is not None:
        reading.append(getattr(student, "model", None) or getattr(student, "config", None))
    if any(r and os.path.isabs(r) and os.path.normpath(r) == out_dir for r in reading):
        loaded.add(where, f"output_dir {out_dir} is also a model this recipe reads; the run would overwrite it", "write the result to another folder")
    others = [p for p in producers.get(out_dir, []) if p != loaded.source]
    if others:
        loaded.add(where, f"{display_name(others[0])} writes to the same output_dir {out_dir}", "give each recipe its own output_dir", "warning")


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


@functools.cache
def _adapter(kind: str) -> TypeAdapter:
    return TypeAdapter(Optional[Teacher] if kind == "teacher" else Student)


def _apply_defaults(recipe: Recipe, ctx: _Context) -> None:
    if recipe.training.output_dir is None:
        recipe.training.output_dir = _local_path(os.path.join("runs", ctx.stem), ctx.base)
    if isinstance(recipe.student, ConfigStudent) and recipe.student.config is None and recipe.teachers:
        recipe.student.config = recipe.teachers[0].model
        if recipe.student.revision is None:
            recipe.student.revision = recipe.teachers[0].revision


def _best_effort(raw: dict, ctx: _Context) -> tuple[Recipe, frozenset[str], list[tuple[int, Match]]]:
    """A Recipe assembled from the sections that validate on their own (see LoadedRecipe.view)."""
    ok: set[str] = set()
    values: dict[str, Any] = {}

    def attempt(name: str, validate, value: Any, fallback: Any) -> None:
        try:
            values[name] = validate(value)
            ok.add(name)
        except (ValidationError, PydanticCustomError):
            values[name] = fallback

    attempt("teacher", lambda v: _adapter("teacher").validate_python(v, context=ctx), raw.get("teacher"), None)
    attempt("student", lambda v: _adapter("student").validate_python(v, context=ctx), raw.get("student"), None)
    attempt("data", lambda v: DataSection.model_validate(v, context=ctx), raw.get("data"), None)
    attempt("training", lambda v: TrainingSection.model_validate(v, context=ctx), raw.get("training", {}), TrainingSection())
    tokenizer = raw.get("tokenizer")
    values["tokenizer"] = None
    if isinstance(tokenizer, str):
        try:
            values["tokenizer"] = resolve_model_ref(tokenizer, ctx.base)
            ok.add("tokenizer")
        except PydanticCustomError:
            pass
    elif tokenizer is None:
        ok.add("tokenizer")
    task = raw.get("task", "sequence-classification")
    values["task"] = task if task in ("sequence-classification", "token-classification") else "sequence-classification"
    if task == values["task"]:
        ok.add("task")
    matches: list[tuple[int, Match]] = []
    distillation = raw.get("distillation")
    attempt("distillation", lambda v: None if v is None else DistillationConfig.model_validate(v, context=ctx), distillation, None)
    if values["distillation"] is not None:
        matches = list(enumerate(values["distillation"].intermediate_matches))
    elif isinstance(distillation, dict) and isinstance(distillation.get("intermediate_matches"), list):
        for i, item in enumerate(distillation["intermediate_matches"]):
            try:
                matches.append((i, Match.model_validate(item, context=ctx)))
            except ValidationError:
                pass
    view = Recipe.model_construct(**values)
    _apply_defaults(view, ctx)
    return view, frozenset(ok), matches


def read_recipe(path: str | Path, mode: Mode | None = None, producers: dict[str, list[Path]] | None = None) -> LoadedRecipe:
    """Read and validate one recipe file, collecting every problem (never raises RecipeError).

    `mode` is the command about to run it ("distill" or "train"; None to lint). Raises
    UsageError when the file does not exist. `producers` maps output folders to recipe files
    (`find_producers`); by default the recipe's own folder is searched.
    """
    source = Path(os.path.abspath(Path(path).expanduser()))
    if not exists(source):
        raise UsageError(f"no such recipe file: {path}")
    if is_dir(source):
        raise UsageError(f"{path} is a folder; pass a recipe file (check-recipe also takes folders)")
    loaded = LoadedRecipe(source=source, display=display_name(source))
    try:
        with open_regular(source) as f:
            data = f.read(RECIPE_MAX_BYTES + 1)
    except NotRegularFile as exc:
        loaded.problems.append(Problem(loaded.display, "", f"not read: {exc}", "pass a recipe file (a regular JSON file)"))
        return loaded
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    if len(data) > RECIPE_MAX_BYTES:
        loaded.problems.append(Problem(loaded.display, "", f"the file is over {RECIPE_MAX_BYTES >> 20} MiB; a recipe is a few KiB", "pass a recipe file"))
        return loaded
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        loaded.problems.append(Problem(loaded.display, "", f"the file is not UTF-8 text (byte {exc.start})", "save it as UTF-8"))
        return loaded
    try:
        raw, positions = parse_json(text)
    except JsonSyntaxError as exc:
        pos = SourceMap(text).position(exc.offset)
        loaded.problems.append(
            Problem(loaded.display, "", f"invalid JSON: {exc.message}", exc.fix or "fix the JSON syntax at this spot", pos.line, pos.col)
        )
        return loaded
    loaded.raw, loaded.positions = raw, positions
    if not isinstance(raw, dict):
        loaded.add((), f"a recipe is a JSON object, got {show(raw, 30)}", 'start from {"student": ..., "data": ...} (see docs/recipe.md)')
        return loaded
    for dup in positions.duplicates:
        loaded.add(dup, f"key {show(dup[-1])} appears twice in {dotted(dup[:-1]) or 'the top level'}", "keep one", at_key=True)

    ctx = _Context(base=source.parent, stem=source.stem)
    try:
        recipe = Recipe.model_validate(raw, context=ctx)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            rpath, message, fix, at_key = _describe_error(err, raw)
            loaded.add(rpath, message, fix, at_key=at_key)
        loaded.view, loaded.sections, loaded.matches = _best_effort(raw, ctx)
    else:
        recipe._source = source
        loaded.recipe = loaded.view = recipe
        loaded.sections = frozenset({"teacher", "student", "data", "training", "tokenizer", "task", "distillation"})
        loaded.matches = list(enumerate(recipe.distillation.intermediate_matches if recipe.distillation else []))
    for finding in _section_findings(raw, loaded.view, loaded.sections, mode):
        loaded.add_finding(finding)
    _check_files(loaded, producers if producers is not None else find_producers([source]), mode)
    if not loaded.ok:
        loaded.recipe = None
    return loaded


def load_recipe(path: str | Path, mode: Mode | None = None) -> Recipe:
    """Load a recipe, or raise RecipeError listing every problem (UsageError: no such file).

    `mode="distill"` needs `teacher` and `distillation`; `mode="train"` needs neither; with a
    mode, every local model folder must already exist. Model-aware rules are not applied here:
    see `kdcli.checking.load_checked`.
    """
    loaded = read_recipe(path, mode)
    if not loaded.ok or loaded.recipe is None:
        raise RecipeError(problems=loaded.sorted_problems())
    return loaded.recipe
