"""A JSON parser that keeps the line and column of every value and key."""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
import math
import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kdcli.recipe.messages import JsonPath, show


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

    def fail(self, message: str, i: int, fix: str = "") -> NoReturn:
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
                self.fail(
                    f"the string starting here is not closed on its line (found a line break at {self.where(exc.pos)})",
                    i,
                    'add the closing " (write a line break inside a string as \\n)',
                )
            if exc.msg.startswith("Invalid control"):
                name = _CONTROL_NAMES.get(bad, f"U+{ord(bad):04X}")
                self.fail(
                    f"a raw control character ({name}) inside a string",
                    exc.pos,
                    "escape it, e.g. \\t for a tab, or remove it",
                )
            self.fail(exc.msg.lower(), exc.pos)
        if any(_is_surrogate(ch) for ch in value):
            self.lone_surrogate(i + 1, end)
        return value, end

    def lone_surrogate(self, start: int, end: int) -> None:
        """Fail at the first \\uXXXX escape in text[start:end] that is half of no surrogate pair."""
        escapes = [
            (m.start(), int(m.group(1), 16)) for m in _UNICODE_ESCAPE.finditer(self.text, start, end) if m.group(1)
        ]
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

    def next_item(self, end: int, closer: str, what: str, opened: int, kind: str) -> tuple[int, int | None]:
        """After an item ending at `end`: (where the next item starts, the comma's offset), or
        (the offset after `closer`, None) when the object or list closes there."""
        i = self.ws(end)
        ch = self.text[i : i + 1]
        if ch == ",":
            return self.ws(i + 1), i
        if ch == closer:
            return i + 1, None
        self.missing_comma(end, i, what, closer, opened, kind)

    def missing_comma(self, prev_end: int, i: int, what: str, closer: str, opened: int, kind: str) -> NoReturn:
        """After an item: a new item starts (a missing comma, reported where the comma belongs)
        or something else is there (reported where it is)."""
        if i >= len(self.text):
            self.fail(
                f"expected ',' or '{closer}' {what}, found the end of the file: the {kind} opened at {self.where(opened)} is not closed",
                i,
                f"add the missing '{closer}'",
            )
        if self.text[i] in '"{[-0123456789tfnNI':
            self.fail(
                f"missing ',' {what}: expected ',' here, before the next item at {self.where(i)}",
                prev_end,
                "add a comma",
            )
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
                    self.fail(
                        f"expected a key in double quotes, found the end of the file: the object opened at {self.where(opened)} is not closed",
                        i,
                        "add the missing '}'",
                    )
                self.fail(f"expected a key in double quotes, found {self.describe(i)}", i)
            key_at = i
            key, key_end = self.string(i)
            i = self.ws(key_end)
            if self.text[i : i + 1] != ":":
                self.fail(
                    f"expected ':' after the key {show(key)}, found {self.describe(i)}",
                    key_end,
                    "add ':' between the key and its value",
                )
            i = self.ws(i + 1)
            child = path + (key,)
            if key in out:
                self.map.duplicates.append(child)
            self.map.keys[child] = key_at
            out[key], end = self.value(i, child)
            i, comma = self.next_item(end, "}", f"after the value of {show(key)}", opened, "object")
            if comma is None:
                return out, i

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
            i, comma = self.next_item(end, "]", f"after the list's item [{len(out) - 1}]", opened, "list")
            if comma is None:
                return out, i

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
