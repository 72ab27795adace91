"""Reading the files a recipe names without being led into what it should not read.

A recipe (maybe from an untrusted pull request, linted by `check-recipe` in CI) names files;
kdcli must never block on a FIFO, read a device forever, or read kernel and process files
(`/proc/self/environ` holds secrets). Every look at a file a recipe names goes through here:
`open_regular` for reading, the `is_*`/`exists` probes that answer False instead of raising.
Torch-free, and imports nothing of kdcli's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def probe_path(test, path: str | Path) -> bool:
    """A file-system test that answers False instead of raising (permissions, odd names)."""
    try:
        return bool(test(Path(path)))
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    return probe_path(Path.is_dir, path)


def is_file(path: str | Path) -> bool:
    return probe_path(Path.is_file, path)


def exists(path: str | Path) -> bool:
    return probe_path(Path.exists, path)


#: folders whose files are never read, whatever a recipe says (kernel, process and device files)
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


class NotRegularFile(Exception):
    """A path kdcli will not open: not a regular file, or a file under a system folder."""


def open_regular(path: str | Path):
    """Open a regular file for reading (binary), following symbolic links, and refuse folders,
    devices, FIFOs, sockets and anything under /proc, /sys or /dev (NotRegularFile).

    A non-regular file is never opened (opening a FIFO blocks, reading a device never ends):
    the real path is checked with stat first, then opened non-blocking and checked again with
    fstat, so a file swapped in between cannot block either. OSError when it cannot be read.
    """
    real = os.path.realpath(path)
    for folder in SYSTEM_FOLDERS:
        if real == folder or real.startswith(folder + "/"):
            raise NotRegularFile(f"it is a system file (under {folder}), not a recipe or data file")
    what = "it is not a regular file (a folder, device, FIFO or socket)"
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise NotRegularFile(what)
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(real, os.O_RDONLY | nonblocking | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(what)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes; None for anything else (larger,
    unreadable, not a regular file). For cheap looks at sibling files."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except (OSError, ValueError, NotRegularFile):
        return None
    return data if len(data) <= limit else None


def read_regular_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (`open_regular`'s refusals apply); with `limit`, at most
    `limit + 1` bytes, so the caller can tell a file over the limit."""
    with open_regular(path) as f:
        return f.read() if limit is None else f.read(limit + 1)


def read_regular_text(path: str | Path) -> str:
    """The UTF-8 text of a regular file (`open_regular`'s refusals apply)."""
    return read_regular_bytes(path).decode("utf-8")


def open_regular_text(path: str | Path, encoding: str = "utf-8"):
    """A regular file opened as text for the csv module (`newline=""`)."""
    import io

    return io.TextIOWrapper(open_regular(path), encoding=encoding, newline="")
