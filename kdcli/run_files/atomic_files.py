"""Files written whole or not at all, and a full disk as one message (torch-free).

A file goes to a temporary name in its folder and is moved into place with `os.replace`, so a
crash leaves the old file or the new one, never half of one. A full disk (ENOSPC, or a quota)
inside `disk_full_as_error` becomes a `DiskFullError`: what was being written, where, and about
how much space it needs. kdcli/checkpoint.py builds its checkpoints on these.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError, RunError

# -- a full disk -----------------------------------------------------------------------------

_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "StorageFull")


def is_no_space(exc: BaseException) -> bool:
    """True when `exc`, or an error it wraps (torch's writer raises RuntimeError over the OSError;
    safetensors its own error quoting it), is a full disk or quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(exc) for text in _NO_SPACE_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class DiskFullError(RunError):
    """The disk filled up while kdcli wrote `what` into `folder`; `needed` bytes, about."""

    def __init__(self, what: str, folder: Path, needed: int):
        self.what, self.folder, self.needed = what, Path(folder), needed
        try:
            free = f"; {format_bytes(shutil.disk_usage(self.folder).free)} free"
        except OSError:
            free = ""
        super().__init__(
            f"no space left on the disk of {self.folder} while writing {what} "
            f"(it needs about {format_bytes(needed)}{free})"
        )


@contextmanager
def disk_full_as_error(what: str, folder: Path, needed: int):
    """Turn a full disk inside the block into a `DiskFullError` (other errors pass through)."""
    try:
        yield
    except KdcliError:
        raise
    except BaseException as exc:
        if is_no_space(exc):
            raise DiskFullError(what, folder, needed) from None
        raise


# -- atomic files ----------------------------------------------------------------------------


def ordinary_mode(path: Path, *, folder: bool) -> None:
    """Give a file from mkstemp (0600) or a folder from mkdtemp (0700) the mode an ordinary
    `open`/`mkdir` would have given it under the process's umask, so that outputs are as
    readable as the user's other files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        ordinary_mode(Path(tmp), folder=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, doc: Any) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
