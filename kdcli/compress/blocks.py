"""The student's teacher blocks chosen by measurement (`student.init_from_teacher` given as
`{"keep": K, "by": ...}`): the run and `kdcli rank-blocks` both call `choose_blocks`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import Tensor, nn

from kdcli import data as kdata

#: rows per batch of the measurement's forward passes
MEASURE_BATCH = 8


def sample_batches(task_data: kdata.TaskData, tokenizer, rows: int) -> Callable[[], Iterator[dict[str, Tensor]]]:
    """The first `rows` training rows (in file order), collated `MEASURE_BATCH` at a time."""
    collator = kdata.Collator.for_tokenizer(tokenizer)
    count = min(rows, len(task_data.train))

    def batches() -> Iterator[dict[str, Tensor]]:
        for start in range(0, count, MEASURE_BATCH):
            yield collator.batch(task_data.train, range(start, min(start + MEASURE_BATCH, count)))

    return batches


def choose_blocks(model: nn.Module, batches: Callable[[], Iterator[dict[str, Tensor]]], keep: int, by: str):
    """A `BlockRanking` of `model`'s blocks: kept = the `keep` blocks to copy, ascending.
    `by` "evenly_spaced" measures nothing (its scores are empty)."""
    from kdcli.compress.block_ranking import BlockRanking, evenly_spaced, rank_blocks
    from kdcli.models import encoder_blocks

    if by == "evenly_spaced":
        total = len(encoder_blocks(model))
        kept = evenly_spaced(total, keep)
        dropped = tuple(b for b in range(1, total + 1) if b not in kept)
        return BlockRanking(by=by, num_blocks=total, keep=keep, kept=kept, dropped=dropped, scores={}, tokens=0)
    return rank_blocks(model, batches(), keep, by=by)
