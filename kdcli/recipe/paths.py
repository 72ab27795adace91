"""Model and data references, path checks, the repository root and the default output folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import ValidationInfo

from kdcli.facts.modelinfo import PACKAGE_PREFIX, PackageRefError, package_folder
from kdcli.facts.safe_files import exists, is_dir, probe_path
from kdcli.recipe.messages import show
from kdcli.recipe.validation import context_of, recipe_error

#: data file extensions and the format each implies
DATA_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MODEL_REF_FIX = (
    "write a hub id (bert-base-uncased), a folder (./models/x, relative to the recipe's folder) "
    "or pkg:<python package>/<folder>"
)


def local_path(ref: str, base: Path) -> str:
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
        return (
            f"has a name of {size} bytes ({show(longest, 24)}), over 255 bytes, the most a file or folder name may have"
        )
    return None


def check_path_text(ref: str, *resolved: str) -> None:
    """Raise a recipe error when a path (as written, or resolved) cannot name a file."""
    for path in (ref, *resolved):
        why = path_problem(path)
        if why is not None:
            raise recipe_error(f"path {show(ref)} {why}", "shorten the path or rename the file or folder")


def repository_root(recipe_file: Path) -> Path:
    """The nearest folder above the recipe holding a `.git` entry, else the recipe's own folder."""
    folder = Path(os.path.abspath(recipe_file)).parent
    for candidate in (folder, *folder.parents):
        if probe_path(lambda p: os.path.lexists(p / ".git"), candidate):
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
        raise recipe_error(f"{show(ref)} is not a model reference", _MODEL_REF_FIX)
    check_path_text(ref)
    if ref.startswith(PACKAGE_PREFIX):
        try:
            return str(package_folder(ref))
        except PackageRefError as exc:
            raise recipe_error(exc.message, exc.fix) from None
    if ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") >= 2 or is_dir(base / ref):
        local = local_path(ref, base)
        check_path_text(ref, local)
        return local
    if not _HUB_ID.fullmatch(ref) or "--" in ref or ".." in ref or len(ref) > 96:
        raise recipe_error(f"{show(ref)} is neither an existing folder nor a valid hub id", _MODEL_REF_FIX)
    return ref


def model_ref(value: str, info: ValidationInfo) -> str:
    return resolve_model_ref(value, context_of(info).base)


def data_format_of(path: str) -> str | None:
    """The data format implied by a file name's extension, or None."""
    return DATA_EXTENSIONS.get(os.path.splitext(path)[1].lower())


def looks_local_data(ref: str, base: Path) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or "\\" in ref
        or ref.count("/") >= 2
        or data_format_of(ref) is not None
        or exists(base / ref)
    )


def default_output_dir(base: Path, stem: str) -> str:
    """Where a recipe named `stem` (its file name without .json) in folder `base` writes its
    model when training.output_dir is not given: runs/<stem> beside it."""
    return local_path(os.path.join("runs", stem), base)
