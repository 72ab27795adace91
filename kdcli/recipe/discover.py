"""Finding recipes: in folders, and the recipes that produce a model folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from kdcli.errors import UsageError
from kdcli.facts.safe_files import NotRegularFile, is_dir, open_regular
from kdcli.recipe.paths import default_output_dir, local_path

#: JSON files larger than this are not considered when looking for recipes among siblings
#: (recipes are a few KiB; a data file next to them may be gigabytes)
DISCOVERY_MAX_BYTES = 1 << 20
#: a recipe file larger than this is not read
RECIPE_MAX_BYTES = 16 << 20


class Sniffed(NamedTuple):
    """A quick look at a JSON file: `status` is "ok" (then `raw` is its value), "irregular" (not
    a regular file: never opened), "unread" (unreadable, over DISCOVERY_MAX_BYTES, or not UTF-8)
    or "broken" (UTF-8 text that is not JSON)."""

    status: str
    raw: Any = None


def sniff_json(path: Path) -> Sniffed:
    """A recipe-sized JSON file read cheaply, decoded as `read_recipe` decodes recipes (UTF-8,
    with or without a byte-order mark)."""
    try:
        with open_regular(path) as f:
            data = f.read(DISCOVERY_MAX_BYTES + 1)
    except NotRegularFile:
        return Sniffed("irregular")
    except (OSError, ValueError):
        return Sniffed("unread")
    if len(data) > DISCOVERY_MAX_BYTES:
        return Sniffed("unread")
    try:
        return Sniffed("ok", json.loads(data.decode("utf-8-sig")))
    except UnicodeDecodeError:
        return Sniffed("unread")
    except (ValueError, RecursionError):
        return Sniffed("broken")


def output_dir_of(recipe_file: Path) -> Path | None:
    """The folder a recipe file writes its final model to, read cheaply (None if not a recipe)."""
    raw = sniff_json(recipe_file).raw
    if not isinstance(raw, dict) or "student" not in raw:
        return None
    training = raw.get("training")
    written = training.get("output_dir") if isinstance(training, dict) else None
    if isinstance(written, str) and written.strip():
        return Path(local_path(written, recipe_file.parent))
    return Path(default_output_dir(recipe_file.parent, recipe_file.stem))


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


def is_recipe_like(path: Path) -> bool:
    """A JSON file found in a folder counts as a recipe when it is an object with a student
    (or fails to parse, so that a broken recipe is not silently skipped). A *.json that is not a
    regular file (a link to /dev/zero, a FIFO) is never opened, and is reported, not skipped."""
    status, raw = sniff_json(path)
    if status in ("irregular", "broken"):
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
                    Path(folder) / f for f in sorted(files) if f.endswith(".json") and is_recipe_like(Path(folder) / f)
                )
        elif path.exists():
            out.append(path)
        else:
            raise UsageError(f"no such file or folder: {given}")
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in out))
    return unique
