"""The output folder of a run: what may be written, cleared or resumed, and by whom.

- Marker: every folder a run writes carries `.kdcli-run.json` (kdcli's version, the recipe's
  hash). `--overwrite` clears only a folder with the marker, or one holding nothing but
  kdcli's own bookkeeping files; anything else is refused, naming a few of its files.
- Protection: `--overwrite` is refused when the folder is, or holds, something the run reads
  (the recipe, its data, its models, the tokenizer), comparing both the paths as written and
  as resolved through symlinks (`realpath`), so `-o LINK` to the recipe's folder is caught.
- Late clearing: the old run is deleted only by `RunFolder.begin()`, which the run calls just
  before writing its first file (after models and data loaded): a run that fails earlier
  leaves the previous outputs as they were. Clearing never follows a symlink.
- Lock: one run per folder. `.kdcli.lock` inside it is held with `fcntl.flock` for the run's
  whole life and names the holder's PID; the kernel drops the lock when the process ends,
  even by `kill -9`, so a lock file left behind never blocks. Under torchrun rank 0 alone
  takes it (the other ranks write nothing).
- Stale temporary files: a save cut short (kill -9, power loss) leaves hidden temporary
  folders of kdcli's own naming (`checkpoints/.step-N.xxxxxxxx`, `.save_pretrained.xxxxxxxx`,
  ...); they are removed when a run opens the folder, once it holds the lock.
- Before any model loads: a name too long for the file system, a parent where the folder
  cannot be created, and a folder where nothing can be written are each one message (a real
  probe: a file is created and deleted).

This module imports nothing heavy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from kdcli.errors import UsageError
from kdcli.run_files.checkpoint_layout import CHECKPOINTS, latest_checkpoint

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MARKER = ".kdcli-run.json"
LOCK_FILE = ".kdcli.lock"
#: the default folder of `distillation.teacher_cache` (kdcli.engine.teacher_cache.DEFAULT_DIR):
#: keyed by its inputs, so it is kept for the next run (and may be filled by `kdcli cache-teacher`)
TEACHER_CACHE_DIR = "teacher-cache"
#: kdcli's bookkeeping files: they do not make a folder "not empty" and survive clearing.
OWN_FILES = frozenset({MARKER, LOCK_FILE, TEACHER_CACHE_DIR})
_PROBE_PREFIX = ".kdcli-probe-"
_NAME_MAX = 255
_TEMP_SUFFIX = r"[a-z0-9_]{8}"  # tempfile.mkstemp / mkdtemp's random part
_STALE_IN_CHECKPOINTS = re.compile(rf"^\.step-\d+\.({_TEMP_SUFFIX}|old-\d+)$")
_STALE_IN_OUTPUT = re.compile(rf"^(\.save_pretrained\.{_TEMP_SUFFIX}|{re.escape(_PROBE_PREFIX)}\d+)$")
_SHOWN = 4  # file names quoted in a refusal


# -- what is in a folder ----------------------------------------------------------------------


def contents(folder: Path) -> list[str]:
    """Names in `folder` other than kdcli's own bookkeeping files, sorted ([] if absent)."""
    try:
        return sorted(name for name in os.listdir(folder) if name not in OWN_FILES)
    except FileNotFoundError:
        return []


def _listing(folder: Path, names: Sequence[str]) -> str:
    shown = [
        (n if n.isprintable() else repr(n)) + ("/" if (folder / n).is_dir() and not (folder / n).is_symlink() else "")
        for n in names[:_SHOWN]
    ]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(shown) + more


def is_marked(folder: Path) -> bool:
    """True when `folder` carries kdcli's marker (a regular file, not a symlink, from kdcli)."""
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return "kdcli" in json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def write_marker(folder: Path, info: dict) -> Path:
    """Mark `folder` as a kdcli run's output (atomically): kdcli's version plus `info`."""
    from kdcli import __version__

    doc = {"kdcli": __version__, **info}
    folder = Path(folder)
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)
    return folder / MARKER


# -- protection -------------------------------------------------------------------------------


def _forms(path: str | os.PathLike) -> set[Path]:
    """The path as written (absolute) and as resolved through every symlink."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def protected_inside(out: Path, protected: Iterable[str | os.PathLike]) -> Path | None:
    """The first of `protected` that `out` is, or holds (symlinks resolved or not), else None."""
    outs = _forms(out)
    for path in protected:
        for form in _forms(path):
            if any(form == o or o in form.parents for o in outs):
                return Path(os.path.abspath(path))
    return None


# -- clearing and stale temporaries -----------------------------------------------------------


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a folder tree (never following links)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # on Linux the fd-based version: never follows a symlink inside


def clear(folder: Path) -> None:
    """Delete everything in `folder` but kdcli's marker and lock file."""
    for name in contents(folder):
        _remove(Path(folder) / name)


def remove_stale_temps(folder: Path, file_names: Iterable[str] = ()) -> list[Path]:
    """Delete the temporary files and folders kdcli's atomic writes leave when killed:
    `checkpoints/.step-N.<random>` and `.step-N.old-<pid>`, `.save_pretrained.<random>`,
    `.kdcli-probe-<pid>`, and `.<name>.<random>.tmp` for each of `file_names` (the files a run
    writes). Only call it while holding the folder's lock. Returns what was removed."""
    folder = Path(folder)
    names = "|".join(re.escape(n) for n in [*file_names, MARKER])
    temp_file = re.compile(rf"^\.({names})\.({_TEMP_SUFFIX}|\d+)\.tmp$")
    removed = []
    for parent, pattern in ((folder, None), (folder / CHECKPOINTS, _STALE_IN_CHECKPOINTS)):
        try:
            entries = os.listdir(parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in entries:
            stale = pattern.match(name) if pattern else (_STALE_IN_OUTPUT.match(name) or temp_file.match(name))
            if stale:
                path = parent / name
                try:
                    _remove(path)
                except OSError:
                    continue
                removed.append(path)
    return removed


# -- the lock ---------------------------------------------------------------------------------


class FolderLock:
    """An exclusive `flock` on `<folder>/.kdcli.lock` holding this process's PID."""

    def __init__(self, path: Path, fd: int | None, *, created: bool = False):
        self.path = path
        self._fd = fd
        self.created = created  # the lock file did not exist before

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> FolderLock:
        """Take the lock, or raise UsageError naming the live process that holds it."""
        path = Path(folder) / LOCK_FILE
        if fcntl is None:  # pragma: no cover - no flock on this platform
            return cls(path, None)
        for _ in range(5):
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR), False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    if created:
                        path.unlink(missing_ok=True)
                    return cls(path, None)  # a file system without flock (some network mounts)
                holder = _read_pid(path)
                who = f"PID {holder}" if holder else "PID unknown"
                raise UsageError(
                    f"output folder {Path(folder)} is in use by another kdcli run ({who}). Fix: wait for "
                    "it to finish (or stop it), or choose another --output-dir"
                ) from None
            # the holder before us may have deleted the file while we waited: lock the live one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd, created=created)
            os.close(fd)
        raise UsageError(f"cannot lock the output folder {Path(folder)} (its lock file keeps changing). Fix: try again")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, delete: bool = False) -> None:
        if self._fd is None:
            return
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# -- checks that need no model ----------------------------------------------------------------


def _name_max(out: Path) -> int:
    """The longest name the file system of `out`'s nearest existing ancestor allows."""
    existing = Path(out.anchor or os.sep)
    for part in out.parts[1:]:
        if len(os.fsencode(part)) > _NAME_MAX or not os.path.isdir(existing / part):
            break
        existing = existing / part
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def check_name_lengths(out: Path) -> None:
    """Refuse a path with a component longer than the file system allows (ENAMETOOLONG)."""
    limit = _name_max(out)
    too_long = [part for part in out.parts if len(os.fsencode(part)) > limit]
    if too_long:
        short = {part: part[:24] + "…" for part in too_long}
        shown = os.path.join(*[short.get(part, part) for part in out.parts])
        raise UsageError(
            f"output folder {shown}: the name {short[too_long[0]]!r} has {len(too_long[0])} characters, "
            f"more than the {limit} this file system allows for one name. Fix: choose a shorter --output-dir"
        )


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def make_folder(out: Path) -> Path | None:
    """Create `out` and its missing parents; returns the topmost folder created, or None."""
    missing = []
    folder = out
    while not os.path.isdir(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    top = None
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except OSError as exc:
            if isinstance(exc, FileExistsError) and os.path.isdir(folder):
                continue  # another process made it meanwhile
            if top is not None:
                remove_empty_folders(folder.parent, top)
            if isinstance(exc, FileExistsError):
                problem, fix = f"{folder} is a file", "choose another --output-dir"
            elif exc.errno == errno.ENAMETOOLONG:
                problem, fix = "the path is too long for the file system", "choose a shorter --output-dir"
            else:
                problem, fix = (
                    f"{_describe(exc)} in {folder.parent}",
                    "choose an --output-dir in a folder you can write to",
                )
            raise UsageError(f"cannot create the output folder {out}: {problem}. Fix: {fix}") from None
        top = top or folder
    return top


def remove_empty_folders(folder: Path, top: Path) -> None:
    """rmdir `folder` and its parents up to `top`, stopping at the first that is not empty
    (another process may have started writing there)."""
    for path in [folder, *folder.parents]:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return


def probe_writable(out: Path) -> None:
    """Create and delete a file in `out`: a read-only folder fails here, not after the models load."""
    probe = out / f"{_PROBE_PREFIX}{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise UsageError(
            f"output folder {out} is not writable ({_describe(exc)}). Fix: make it writable, or choose "
            "another --output-dir"
        ) from None
    os.close(fd)
    probe.unlink(missing_ok=True)


# -- the run's folder -------------------------------------------------------------------------


class RunFolder:
    """The output folder as one run holds it: `open` (checks, lock, stale temps, the checkpoint
    to resume from), `begin` (clear the old run if overwriting, mark), `close` (release; a run
    that never began removes the folder it created)."""

    def __init__(
        self, out: Path, *, overwrite: bool, lock: FolderLock | None, created: Path | None, latest: Path | None
    ):
        self.path = out
        self.latest = latest  # the checkpoint to resume from
        self._overwrite = overwrite
        self._lock = lock
        self._created = created
        self.begun = False

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.held

    @classmethod
    def open(
        cls,
        out: str | os.PathLike,
        *,
        resume: bool,
        overwrite: bool,
        protected: Iterable[str | os.PathLike],
        main: bool = True,
        file_names: Iterable[str] = (),
    ) -> RunFolder:
        """Check `out` for this run and, on the main process, create, probe and lock it.

        Raises UsageError: --resume with --overwrite; a file; a name too long; not creatable or
        not writable; held by another live run; --resume without a checkpoint; not empty
        without --resume/--overwrite; --overwrite of a folder the run reads, or of a folder
        kdcli did not write."""
        out = Path(os.path.abspath(out))
        if resume and overwrite:
            raise UsageError("--resume and --overwrite contradict each other. Fix: pass one of them")
        check_name_lengths(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"output folder {out} is a file. Fix: choose another --output-dir")
        if not main:  # torchrun's other ranks: rank 0 checked and holds the folder
            return cls(out, overwrite=overwrite, lock=None, created=None, latest=_latest(out) if resume else None)

        created = make_folder(out)
        lock = None
        try:
            probe_writable(out)
            lock = FolderLock.acquire(out)
            latest = cls._check(out, resume=resume, overwrite=overwrite, protected=protected)
            if resume or is_marked(out):  # kdcli's own temporaries, in a folder kdcli wrote
                remove_stale_temps(out, file_names)
        except BaseException:
            if lock is not None:  # a refused folder keeps no trace of this run
                lock.release(delete=created is not None or lock.created)
            if created is not None:
                remove_empty_folders(out, created)
            raise
        return cls(out, overwrite=overwrite, lock=lock, created=created, latest=latest)

    @staticmethod
    def _check(out: Path, *, resume: bool, overwrite: bool, protected: Iterable[str | os.PathLike]) -> Path | None:
        if resume:
            latest = _latest(out)
            if latest is None:
                raise UsageError(
                    f"--resume: {out} holds no checkpoint ({out / CHECKPOINTS}/step-N). "
                    "Fix: run without --resume to start the run"
                )
            return latest
        names = contents(out)
        if not names:
            return None
        marked = is_marked(out)
        if overwrite:
            hit = protected_inside(out, protected)
            if hit is not None:
                raise UsageError(
                    f"--overwrite would delete {hit}, which this run reads (it is inside {out}"
                    + (f", which is {os.path.realpath(out)}" if os.path.realpath(out) != str(out) else "")
                    + "). Fix: choose another --output-dir"
                )
            if marked:
                return None
        if not marked:
            has_checkpoint = (out / CHECKPOINTS).is_dir()
            raise UsageError(
                f"output folder {out} is not empty and kdcli did not write it (no {MARKER}); it holds "
                f"{_listing(out, names)}. kdcli never deletes files it did not write. Fix: choose another "
                "--output-dir, or move those files away"
                + (" (or pass --resume if it holds a run of an older kdcli)" if has_checkpoint else "")
            )
        raise UsageError(
            f"output folder {out} is not empty (a previous kdcli run). Fix: pass --resume to continue "
            "the run in it, --overwrite to replace it, or choose another --output-dir"
        )

    def begin(self, marker: dict) -> None:
        """Just before the run's first write: clear the previous run (with --overwrite), mark."""
        if self._overwrite and contents(self.path):
            clear(self.path)
        write_marker(self.path, marker)
        self.begun = True

    def close(self) -> None:
        """Release the lock; a run that never began removes the folder it created."""
        remove = not self.begun and self._created is not None and not contents(self.path)
        if self._lock is not None:
            self._lock.release(delete=remove or (not self.begun and self._lock.created))
        if remove:
            remove_empty_folders(self.path, self._created)
        self._lock = None


def _latest(out: Path) -> Path | None:
    return latest_checkpoint(out)
