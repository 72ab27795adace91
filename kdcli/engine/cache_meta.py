"""meta.json of a `distillation.teacher_cache` folder: the key, its inputs (for people) and the
rows' layout ([field name, stored dtype, per-row shape] each; "L" the row's tokens, "N" its
target tokens), read leniently: a file that is not a JSON object, or a layout that is not
one, reads as absent, and the run writes it again (the layout from the teachers' outputs).
Written atomically (a temporary file, then `os.replace`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

META = "meta.json"
#: the dtypes a field may be stored in
STORED_NAMES = ("float16", "bfloat16", "float32", "int32")


def load_meta(path: Path) -> dict | None:
    """meta.json's document: {} when there is none, None when it is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def parse_layout(raw) -> list[tuple[str, str, list]] | None:
    """A layout as meta.json holds it ([name, dtype, template] each), or None when it is not one."""
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for field in raw:
        if not (isinstance(field, list) and len(field) == 3):
            return None
        name, dtype, template = field
        if not (isinstance(name, str) and dtype in STORED_NAMES and isinstance(template, list)):
            return None
        if not all(d in ("L", "N") or (type(d) is int and 0 <= d < 1 << 24) for d in template):
            return None
        out.append((name, dtype, template))
    return out


def read_layout(folder: Path) -> list[tuple[str, str, list]] | None:
    meta = load_meta(folder / META)
    return parse_layout(meta.get("layout")) if meta else None


def write_meta_file(path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{META}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_meta(folder: Path, parts: dict, key: str, warn: Callable[[str], None]) -> None:
    """The key and its inputs, for people (the layout is added by the first row's writer);
    a meta.json that is not a JSON object is written again, with a warning."""
    path = folder / META
    meta = load_meta(path)
    if meta is None:
        warn(
            f"warning: teacher cache: {path} is not readable JSON; it is written again (the rows' layout with the next row)"
        )
        meta = {}
    if meta.get("inputs") == json.loads(json.dumps(parts, default=str)) and meta.get("key") == key:
        return
    meta.update(key=key, inputs=parts)
    write_meta_file(path, meta)
