"""The on-disk row store under `distillation.teacher_cache`: append-only flat files per rank.

One cache folder (`<dir>/<key>/`) holds, for each process rank r that wrote rows:

    rank<r>.data    the rows' bytes, one after the other (each row: its fields, concatenated)
    rank<r>.index   one fixed 40-byte record per row: magic, row id, offset, size, token
                    count, target count, CRC-32 of the record

A row is written as: its bytes appended to the data file, the data file synced, then its
index record appended. A reader only takes complete index records whose CRC matches, and a
record only exists once its data was written: a process killed mid-row leaves bytes past the
last record (or a torn record), which no reader sees and which the next writer of that rank
truncates when it opens the files. Each rank writes only its own files (one writer per file,
no lock needed) and reads every rank's: a row cached by rank 1 in epoch 1 serves rank 0 in
epoch 2, and a run with another process count reads the rows of the earlier one.

Reads go through `numpy.memmap` views of the data files (mapped again when a file grew).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_RECORD = struct.Struct("<4sqqqiiI")
_MAGIC = b"KDC1"
_BODY = _RECORD.size - 4  # the bytes the CRC covers
_RANK_FILE = re.compile(r"rank(\d+)\.index")


@dataclass(frozen=True)
class Entry:
    """Where one cached row lies: the rank file, its offset and size, its token and target counts."""

    rank: int
    offset: int
    size: int
    length: int
    targets: int


def pack_record(row: int, offset: int, size: int, length: int, targets: int) -> bytes:
    body = _RECORD.pack(_MAGIC, row, offset, size, length, targets, 0)[:_BODY]
    return body + struct.pack("<I", zlib.crc32(body))


def read_records(raw: bytes) -> list[tuple[int, int, int, int, int]]:
    """The valid records at the start of an index file's bytes: (row, offset, size, length,
    targets) each; stops at the first incomplete or corrupt record."""
    out = []
    for start in range(0, len(raw) - _RECORD.size + 1, _RECORD.size):
        chunk = raw[start : start + _RECORD.size]
        magic, row, offset, size, length, targets, crc = _RECORD.unpack(chunk)
        if magic != _MAGIC or crc != zlib.crc32(chunk[:_BODY]) or min(row, offset, size, length, targets) < 0:
            break
        out.append((row, offset, size, length, targets))
    return out


class RowStore:
    """Rows of bytes keyed by training-row id, in `folder`, written by this `rank`."""

    def __init__(self, folder: Path, rank: int, *, sync: bool = True) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.sync = sync
        self.entries: dict[int, Entry] = {}
        self._read_upto: dict[int, int] = {}  # rank -> bytes of its index file read
        self._maps: dict[int, np.memmap] = {}
        self._data_fd: int | None = None
        self._index_fd: int | None = None
        self._data_end = 0
        #: another live process holds this rank's files (a second run on the same cache): read only
        self.read_only = False
        self.folder.mkdir(parents=True, exist_ok=True)
        self.refresh()

    # -- writing ---------------------------------------------------------------------------

    def _open_for_writing(self) -> None:
        """Open and lock this rank's files, then cut what a killed writer left past its last row."""
        index_path, data_path = self._paths(self.rank)
        self._index_fd = os.open(index_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._index_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.read_only = True
            return
        records = read_records(index_path.read_bytes())
        end = max((offset + size for _, offset, size, _, _ in records), default=0)
        self._data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._index_fd, len(records) * _RECORD.size)
        os.ftruncate(self._data_fd, end)
        self._data_end = end
        self._read_upto[self.rank] = len(records) * _RECORD.size
        for row, offset, size, length, targets in records:
            self.entries.setdefault(row, Entry(self.rank, offset, size, length, targets))
        self._maps.pop(self.rank, None)

    def put_many(self, rows: list[tuple[int, bytes, int, int]]) -> None:
        """Append rows (row id, bytes, token count, target count): all data, one sync, then
        the index records. Rows already stored (by any rank) are skipped."""
        rows = [r for r in rows if r[0] not in self.entries]
        if not rows:
            return
        if self._index_fd is None:
            self._open_for_writing()
        if self.read_only:
            return
        records, offset = [], self._data_end
        blob = b"".join(data for _, data, _, _ in rows)
        _write_all(self._data_fd, blob, offset)
        if self.sync:
            os.fdatasync(self._data_fd)
        for row, data, length, targets in rows:
            records.append((row, offset, len(data), length, targets))
            offset += len(data)
        self._data_end = offset
        index_at = self._read_upto[self.rank]
        _write_all(self._index_fd, b"".join(pack_record(*r) for r in records), index_at)
        self._read_upto[self.rank] = index_at + len(records) * _RECORD.size
        for row, start, size, length, targets in records:
            self.entries.setdefault(row, Entry(self.rank, start, size, length, targets))

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the index records every rank appended since the last look."""
        for path in sorted(self.folder.glob("rank*.index")):
            match = _RANK_FILE.fullmatch(path.name)
            if match is None:
                continue
            rank = int(match.group(1))
            start = self._read_upto.get(rank, 0)
            with open(path, "rb") as f:
                f.seek(start)
                raw = f.read()
            records = read_records(raw)
            self._read_upto[rank] = start + len(records) * _RECORD.size
            for row, offset, size, length, targets in records:
                self.entries.setdefault(row, Entry(rank, offset, size, length, targets))

    def get(self, row: int) -> tuple[np.ndarray, Entry]:
        """One row's bytes (a read-only view of the mapped data file) and its entry."""
        entry = self.entries[row]
        mapped = self._maps.get(entry.rank)
        if mapped is None or mapped.shape[0] < entry.offset + entry.size:
            mapped = np.memmap(self._paths(entry.rank)[1], dtype=np.uint8, mode="r")
            self._maps[entry.rank] = mapped
        return mapped[entry.offset : entry.offset + entry.size], entry

    def __contains__(self, row: int) -> bool:
        return row in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _paths(self, rank: int) -> tuple[Path, Path]:
        return self.folder / f"rank{rank}.index", self.folder / f"rank{rank}.data"

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._index_fd = None
        self._maps.clear()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
