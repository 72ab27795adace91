"""The training batches, in order, from any position: one epoch's batches at a time
(`data.train_batches`: shuffled per epoch from the seed, grouped by length, this rank's share)."""

from __future__ import annotations

from collections.abc import Sequence

from kdcli import data as kdata
from kdcli.run_files.checkpoint import Position


class BatchStream:
    """Where the run is in its data (epoch, batch within the epoch, samples seen), and the
    micro-batches of the next optimizer step. The epoch rollover lives here only."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group_by_length: bool,
        rank: int,
        world_size: int,
        position: Position,
    ) -> None:
        self._args = (lengths, batch_size, seed)
        self._group, self._rank, self._world = group_by_length, rank, world_size
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self.epoch, self.batch_in_epoch, self.samples_seen = (
            position.epoch,
            position.batch_in_epoch,
            position.samples_seen,
        )

    def batches_of(self, epoch: int) -> list[list[int]]:
        """One epoch's batches (the current epoch's are kept)."""
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            lengths, batch_size, seed = self._args
            batches = kdata.train_batches(lengths, batch_size, seed, epoch, self._group, self._rank, self._world)
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def _roll_over(self) -> None:
        if self.batch_in_epoch >= len(self.batches_of(self.epoch)):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def next_chunk(self, count: int) -> list[list[int]]:
        """The (up to) `count` batches of the next optimizer step, all from one epoch."""
        self._roll_over()
        return self.batches_of(self.epoch)[self.batch_in_epoch : self.batch_in_epoch + count]

    def advance(self, chunk: list[list[int]], step: int) -> Position:
        """Move past `chunk` (this rank's share; every rank took as many rows) -> the position
        after optimizer step `step`, as a checkpoint records it."""
        self.batch_in_epoch += len(chunk)
        self.samples_seen += sum(len(i) for i in chunk) * self._world
        self._roll_over()
        return Position(step, self.epoch, self.batch_in_epoch, self.samples_seen)
