"""The on-disk row store under `distillation.teacher_cache`: append-only flat files per rank.

One cache folder (`<dir>/<key[:16]>/`) holds, for each process rank r that wrote rows:

    rank<r>.data    a 64-byte header, then the rows' bytes, one after the other
    rank<r>.index   a 64-byte header, then one fixed 44-byte record per row: magic, row id,
                    offset, size, token count, target count, CRC-32 of the row's bytes,
                    CRC-32 of the record
    rank<r>.lock    held (`flock`) by the process that writes rank r's files; holds its PID

Each header is a magic (`KDCINDX2` / `KDCDATA2`) and the cache's key (the sha256 of its
inputs, `kdcli.engine.cache_key`): files that do not carry this folder's key (another cache's,
copied in, or an older kdcli's) are never read; the writer of that rank starts them again
(`foreign` says which, and `warn` says so once).

A row is written as: its bytes appended to the data file, the data file synced, then its
index record appended. A reader only takes complete index records whose CRC matches, and a
record only exists once its data was written: a process killed mid-row leaves bytes past the
last record (or a torn record), which no reader sees and which the next writer of that rank
truncates when it opens the files. A row's bytes are checked against their CRC-32 each time
they are read (`get`): a row that fails (edited, or cut off by a truncated file) is dropped,
so that the caller computes it again and `put_many` appends the new copy; within a rank the
later record of a row wins, and a copy in another rank's files is kept as a spare.

Each rank writes only its own files (one writer per rank, `rank<r>.lock`) and reads every
rank's: a row cached by rank 1 in epoch 1 serves rank 0 in epoch 2, and a run with another
process count reads the rows of the earlier one. A second process on the same rank's files
(a `distill` and a `cache-teacher` of one recipe) finds the lock taken: `holder` is its PID.

Reads go through `numpy.memmap` views of the data files (mapped again when a file grew).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_RECORD = struct.Struct("<4sqqqiiII")
_MAGIC = b"KDC2"
_BODY = _RECORD.size - 4  # the bytes the record's CRC covers
_HEADER = struct.Struct("<8s32s24x")
HEADER_SIZE = _HEADER.size
_INDEX_MAGIC, _DATA_MAGIC = b"KDCINDX2", b"KDCDATA2"
_RANK_FILE = re.compile(r"rank(\d+)\.index")


@dataclass(frozen=True)
class Entry:
    """Where one cached row lies: the rank file, its offset and size, its token and target
    counts, and the CRC-32 of its bytes."""

    rank: int
    offset: int
    size: int
    length: int
    targets: int
    crc: int


def pack_record(row: int, offset: int, size: int, length: int, targets: int, crc: int) -> bytes:
    body = _RECORD.pack(_MAGIC, row, offset, size, length, targets, crc, 0)[:_BODY]
    return body + struct.pack("<I", zlib.crc32(body))


def read_records(raw: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """The valid records at the start of an index file's bytes past its header: (row, offset,
    size, length, targets, crc) each; stops at the first incomplete or corrupt record."""
    out = []
    for start in range(0, len(raw) - _RECORD.size + 1, _RECORD.size):
        chunk = raw[start : start + _RECORD.size]
        magic, row, offset, size, length, targets, crc, check = _RECORD.unpack(chunk)
        if magic != _MAGIC or check != zlib.crc32(chunk[:_BODY]) or min(row, size, length, targets) < 0:
            break
        if offset < HEADER_SIZE:
            break
        out.append((row, offset, size, length, targets, crc))
    return out


def header(magic: bytes, key: bytes) -> bytes:
    return _HEADER.pack(magic, key)


def key_bytes(key: str) -> bytes:
    """The 32 bytes a file header carries for a sha256 hex key."""
    return bytes.fromhex(key)


class RowStore:
    """Rows of bytes keyed by training-row id, in `folder` (the cache of `key`, a sha256 hex
    digest), written by this `rank`. `warn`: says once which rank files were not this cache's."""

    def __init__(
        self, folder: Path, rank: int, *, key: str, sync: bool = True, warn: Callable[[str], None] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.sync = sync
        self.key = key_bytes(key)
        self.warn = warn or (lambda text: None)
        self.entries: dict[int, Entry] = {}
        self._spares: dict[int, list[Entry]] = {}  # copies of a row in other ranks' files
        self._read_upto: dict[int, int] = {}  # rank -> bytes of its index file read
        self._maps: dict[int, np.memmap] = {}
        self._data_fd: int | None = None
        self._index_fd: int | None = None
        self._lock_fd: int | None = None
        self._data_end = HEADER_SIZE
        #: rank -> why its files are not read (another cache's key, an older format)
        self.foreign: dict[int, str] = {}
        #: rows whose bytes failed their check, not yet written again -> the data file they were in
        self.damaged: dict[int, Path] = {}
        self._bad: set[Entry] = set()  # the copies that failed
        #: another live process holds this rank's files: its PID (0: unknown); this one reads only
        self.holder: int | None = None
        #: the files cannot be written (a read-only folder): the error; this process reads only
        self.unwritable: str | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.refresh()

    @property
    def read_only(self) -> bool:
        return self.holder is not None or self.unwritable is not None

    def why_read_only(self) -> str | None:
        """Why this process cannot write its rank's files, in words (None: it can)."""
        if self.holder is not None:
            return f"another process (PID {self.holder or 'unknown'}) is writing rank {self.rank}'s files"
        if self.unwritable is not None:
            return f"rank {self.rank}'s files cannot be written ({self.unwritable})"
        return None

    # -- writing ---------------------------------------------------------------------------

    def claim(self) -> str | None:
        """Take this rank's files for writing now: None when taken, else why not (`why_read_only`)."""
        if self._index_fd is None and not self.read_only:
            self._open_for_writing()
        return self.why_read_only()

    def _open_for_writing(self) -> None:
        try:
            if self._lock():
                self._prepare()
        except OSError as exc:  # a read-only folder or file: this process only reads
            self.close()
            self.unwritable = f"{type(exc).__name__}: {exc.strerror or exc}"

    def _prepare(self) -> None:
        """Open this rank's files (locked), start them again when they are not this cache's,
        then cut what a killed writer left past its last row."""
        index_path, data_path = self._paths(self.rank)
        self._index_fd = os.open(index_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        if self._headers_ok(self.rank) is not True:  # empty, foreign or damaged: begin again
            self._forget(self.rank)
            for fd, magic in ((self._data_fd, _DATA_MAGIC), (self._index_fd, _INDEX_MAGIC)):
                os.ftruncate(fd, 0)
                _write_all(fd, header(magic, self.key), 0)
            self.foreign.pop(self.rank, None)
        with open(index_path, "rb") as f:
            f.seek(HEADER_SIZE)
            records = read_records(f.read())
        end = max((offset + size for _, offset, size, *_ in records), default=HEADER_SIZE)
        os.ftruncate(self._index_fd, HEADER_SIZE + len(records) * _RECORD.size)
        os.ftruncate(self._data_fd, end)
        self._data_end = end
        self._forget(self.rank)
        self._read_upto[self.rank] = HEADER_SIZE
        self._add(self.rank, records)
        self._read_upto[self.rank] = HEADER_SIZE + len(records) * _RECORD.size

    def _lock(self) -> bool:
        """flock `rank<r>.lock` and write this PID in it; False (and `holder` set) when another
        live process holds it."""
        fd = os.open(self.folder / f"rank{self.rank}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a file system without flock: write unlocked, as before
                return True
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            self.holder = int(text) if text.isdigit() else 0
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def put_many(self, rows: list[tuple[int, bytes, int, int]]) -> int:
        """Append rows (row id, bytes, token count, target count): all data, one sync, then
        the index records. Rows already stored (by any rank) are skipped. Returns the number
        of rows written (0 when this process cannot write: `why_read_only`)."""
        rows = [r for r in rows if r[0] not in self.entries]
        if not rows:
            return 0
        if self._index_fd is None:
            self._open_for_writing()
        if self.read_only:
            return 0
        assert self._data_fd is not None and self._index_fd is not None  # opened for writing above
        records, offset = [], self._data_end
        blob = b"".join(data for _, data, _, _ in rows)
        _write_all(self._data_fd, blob, offset)
        if self.sync:
            os.fdatasync(self._data_fd)
        for row, data, length, targets in rows:
            records.append((row, offset, len(data), length, targets, zlib.crc32(data)))
            offset += len(data)
        self._data_end = offset
        index_at = self._read_upto[self.rank]
        _write_all(self._index_fd, b"".join(pack_record(*r) for r in records), index_at)
        self._read_upto[self.rank] = index_at + len(records) * _RECORD.size
        self._add(self.rank, records)
        return len(records)

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the index records every rank appended since the last look."""
        for path in sorted(self.folder.glob("rank*.index")):
            match = _RANK_FILE.fullmatch(path.name)
            if match is None:
                continue
            rank = int(match.group(1))
            if rank not in self._read_upto:
                ok = self._headers_ok(rank)  # None: being created; False: not this cache's
                if not ok:
                    if ok is False and rank not in self.foreign:
                        self._refuse(rank)
                    continue
                self.foreign.pop(rank, None)  # (started again by its writer since)
                self._read_upto[rank] = HEADER_SIZE
            start = self._read_upto[rank]
            with open(path, "rb") as f:
                f.seek(start)
                raw = f.read()
            records = read_records(raw)
            self._read_upto[rank] = start + len(records) * _RECORD.size
            self._add(rank, records)

    def get(self, row: int) -> tuple[np.ndarray, Entry] | None:
        """One row's bytes (a read-only view of the mapped data file) and its entry, or None
        when its bytes fail their check (then the row counts as not cached: `damaged`)."""
        first = self.entries[row]
        while True:
            entry = self.entries[row]
            raw = self._bytes(entry)
            if raw is not None and zlib.crc32(raw.data) == entry.crc:
                return raw, entry
            self._bad.add(entry)
            spares = self._spares.get(row)
            if not spares:
                self.drop(row, first.rank)
                return None
            self.entries[row] = spares.pop(0)

    def drop(self, row: int, rank: int | None = None) -> None:
        """Forget a row whose bytes are wrong (found in `rank`'s file; default: the one it was
        read from): it is not cached until written again."""
        entry = self.entries.pop(row, None)
        self._spares.pop(row, None)
        if entry is not None:
            self._bad.add(entry)  # (not taken again when its file is read again)
        rank = rank if rank is not None else entry.rank if entry is not None else self.rank
        self.damaged[row] = self._paths(rank)[1]

    def _bytes(self, entry: Entry) -> np.ndarray | None:
        end = entry.offset + entry.size
        mapped = self._maps.get(entry.rank)
        if mapped is None or mapped.shape[0] < end:
            path = self._paths(entry.rank)[1]
            try:
                if path.stat().st_size < end:
                    return None  # the data file was cut under its index
                mapped = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError):
                return None
            self._maps[entry.rank] = mapped
        return mapped[entry.offset : end]

    def _add(self, rank: int, records) -> None:
        for row, offset, size, length, targets, crc in records:
            entry = Entry(rank, offset, size, length, targets, crc)
            if entry in self._bad:
                continue
            held = self.entries.get(row)
            if held is None or held.rank == rank:  # new, or a later copy in the same file
                self.entries[row] = entry
                self.damaged.pop(row, None)
            else:
                self._spares.setdefault(row, []).append(entry)

    def _forget(self, rank: int) -> None:
        """Drop what was read of a rank's files (they are being started again)."""
        for row in [r for r, e in self.entries.items() if e.rank == rank]:
            spares = self._spares.get(row)
            if spares:
                self.entries[row] = spares.pop(0)
            else:
                del self.entries[row]
        self._read_upto.pop(rank, None)
        self._maps.pop(rank, None)

    def _headers_ok(self, rank: int) -> bool | None:
        """Whether a rank's two files carry this cache's key: True, False, or None while a
        writer is still creating them (an index shorter than its header)."""
        index_path, data_path = self._paths(rank)
        try:
            with open(index_path, "rb") as f:
                index_head = f.read(HEADER_SIZE)
            with open(data_path, "rb") as f:
                data_head = f.read(HEADER_SIZE)
        except FileNotFoundError:
            return None
        if len(index_head) < HEADER_SIZE:
            return None if not index_head else False
        return index_head == header(_INDEX_MAGIC, self.key) and data_head == header(_DATA_MAGIC, self.key)

    def _refuse(self, rank: int) -> None:
        index_path, data_path = self._paths(rank)
        self.foreign[rank] = (
            f"{index_path.name} and {data_path.name} in {self.folder} do not carry this cache's key "
            "in their headers (another cache's files, an older kdcli's, or damaged ones)"
        )
        self.warn(f"warning: teacher cache: {self.foreign[rank]}; their rows are not read, and are computed again")

    def __contains__(self, row: int) -> bool:
        return row in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _paths(self, rank: int) -> tuple[Path, Path]:
        return self.folder / f"rank{rank}.index", self.folder / f"rank{rank}.data"

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._index_fd = self._lock_fd = None
        self._maps.clear()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
