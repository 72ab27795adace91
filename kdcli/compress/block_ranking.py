"""Which teacher blocks a shallower student keeps: measured on sample rows, or spread evenly.

A student that is a shallower copy of the teacher ("keep 20 of 30 blocks") is initialised from
the kept blocks (`kdcli.models.students.init_from_teacher`, 1-based, in order). Two measures
pick the blocks to drop from the teacher's own hidden states on rows of the recipe's data:

- `angular_distance` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", arXiv:2403.17887). For n = L - keep blocks to drop and every start l = 0 .. L-n
  (0-based hidden index),

      d(l, n) = mean over real tokens of arccos(cos_sim(h_l, h_{l+n})) / pi

  where h_i is the hidden state entering block i+1 (h_0 the embeddings' output, h_i the output
  of block i). The contiguous run of blocks l+1 .. l+n with the smallest d is dropped. (The
  paper averages over the final token of each sequence only; here every real token counts, as
  ShortGPT does.)
- `block_influence` (ShortGPT, Men et al. 2024, arXiv:2403.03853). For each block i (1-based)

      BI_i = 1 - mean over real tokens of cos_sim(h_{i-1}, h_i)

  and the n blocks with the lowest BI are dropped (not necessarily contiguous).

h_i for i >= 1 is the raw output of block i, before any final norm (`kdcli.features` hooks the
blocks; Hugging Face's `hidden_states[L]` is the final norm's output instead), which is what
both papers compare. Padding tokens (attention_mask 0) are left out, and per-token values are
computed and summed in float64, so the scores do not depend on how the rows are batched or
padded. Ties (exact only in contrived models) go to the deeper blocks, which both papers find
the more redundant.

`evenly_spaced(L, keep)` is the baseline without measurement: blocks spread evenly, always
including the last (TextBrewer's T4 from BERT-base keeps [3, 6, 9, 12]).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdcli.features import FeatureCapture
from kdcli.models.structure import encoder_blocks

#: The measures `rank_blocks` knows, its `by` values.
BY = ("angular_distance", "block_influence")

#: What each measure is called in `BlockRanking.describe`.
_CITED = {
    "angular_distance": "angular distance, Gromov et al. 2024",
    "block_influence": "block influence, ShortGPT (Men et al. 2024)",
    "evenly_spaced": "even spacing (no measurement)",
}

#: A statistic of two (T, D) float64 batches of unit vectors, one value per token: (T,).
PairStat = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class BlockRanking:
    """The outcome of `rank_blocks`: which of the teacher's blocks a student keeps, and why.

    by: a name in `BY`. num_blocks: L, the teacher's blocks. keep: how many are kept.
    kept / dropped: 1-based teacher blocks, ascending; `kept` is what `init_from_teacher` takes.
    scores: angular_distance -> {"a-b": d} for every run of blocks a..b (1-based, inclusive) of
    length L - keep that could be dropped (empty when nothing is dropped); block_influence ->
    {"i": BI_i} for every block. tokens: real (non-padding) tokens the scores average over.
    """

    by: str
    num_blocks: int
    keep: int
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    scores: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (lists for tuples) for run summaries."""
        return {
            "by": self.by,
            "num_blocks": self.num_blocks,
            "keep": self.keep,
            "kept": list(self.kept),
            "dropped": list(self.dropped),
            "scores": dict(self.scores),
            "tokens": self.tokens,
        }

    def describe(self) -> str:
        """One line for the run log: the blocks kept, by which measure, and the deciding scores."""
        head = f"keeping teacher blocks {_spans(self.kept)} of {self.num_blocks} by {_CITED[self.by]}"
        if not self.dropped:
            return f"{head}: all blocks kept ({self.tokens} tokens measured)"
        if not self.scores:
            return head
        if self.by == "angular_distance":
            run = _run_key(self.dropped[0], self.dropped[-1])
            others = [v for k, v in self.scores.items() if k != run]
            runner_up = f", next best run at {min(others):.4g}" if others else ""
            why = f"dropping run {run} changes the hidden state least (d = {self.scores[run]:.4g}{runner_up})"
        else:
            low = ", ".join(f"{i}: {self.scores[str(i)]:.4g}" for i in self.dropped)
            floor = min(self.scores[str(i)] for i in self.kept)
            why = f"dropped the lowest BI ({low}; lowest kept {floor:.4g})"
        return f"{head}: {why} over {self.tokens} tokens"


def evenly_spaced(num_blocks: int, keep: int) -> tuple[int, ...]:
    """`keep` of blocks 1..num_blocks spread evenly, the last always included.

    Block k (k = 1..keep) is round(k * num_blocks / keep), rounding halves up, in exact integer
    arithmetic: (12, 4) -> (3, 6, 9, 12), (12, 6) -> (2, 4, ..., 12), (6, 1) -> (6,). The step
    num_blocks / keep is at least 1, so the blocks are distinct and ascending.
    """
    keep = _check_keep(num_blocks, keep)
    return tuple((2 * k * num_blocks + keep) // (2 * keep) for k in range(1, keep + 1))


def rank_blocks(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    keep: int,
    by: str = "angular_distance",
) -> BlockRanking:
    """Measure the teacher `model` on `batches` and choose the `keep` blocks a student keeps.

    model: a causal LM whose blocks `kdcli.models.encoder_blocks` finds (llama, qwen2, gpt2, ...).
    batches: collated batches, dicts with input_ids (B, L) and attention_mask (B, L) (1 = token,
    0 = padding; all tokens when absent); other keys (labels) are ignored. They are moved to the
    model's device. The model runs in eval mode under `torch.inference_mode()`; its training
    flag is restored afterwards. by: "angular_distance" (Gromov et al. 2024, arXiv:2403.17887)
    or "block_influence" (ShortGPT, Men et al. 2024, arXiv:2403.03853); see the module docstring.
    ValueError for keep outside 1..L, an unknown `by`, or batches without a real token.
    """
    if by not in BY:
        raise ValueError(f"unknown block ranking {by!r}; choose one of {', '.join(BY)}")
    num_blocks = len(encoder_blocks(model))
    keep = _check_keep(num_blocks, keep)
    drop = num_blocks - keep
    if by == "angular_distance":
        pairs = [(start, start + drop) for start in range(num_blocks - drop + 1)] if drop else []
        means, tokens = _measure(model, batches, pairs, _angle_over_pi)
        scores = {_run_key(a + 1, b): float(d) for (a, b), d in zip(pairs, means)}
        dropped = _best_run(pairs, means)
    else:
        pairs = [(i - 1, i) for i in range(1, num_blocks + 1)]
        means, tokens = _measure(model, batches, pairs, _cosine)
        influence = [1.0 - float(c) for c in means]
        scores = {str(i): bi for i, bi in enumerate(influence, start=1)}
        dropped = _lowest(influence, drop)
    kept = tuple(i for i in range(1, num_blocks + 1) if i not in dropped)
    return BlockRanking(by, num_blocks, keep, kept, dropped, scores, tokens)


# -- choosing ------------------------------------------------------------------------------


def _check_keep(num_blocks: int, keep: int) -> int:
    """`keep` as an int (any integral type but bool); ValueError outside 1..num_blocks."""
    try:
        value = None if isinstance(keep, bool) else operator.index(keep)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= num_blocks:
        raise ValueError(
            f"cannot keep {keep!r} of {num_blocks} teacher blocks; keep must be a whole number from 1 to {num_blocks}"
        )
    return value


def _run_key(first: int, last: int) -> str:
    """Blocks first..last (1-based, inclusive) as the score key "first-last"."""
    return f"{first}-{last}"


def _best_run(pairs: Sequence[tuple[int, int]], distances: Sequence[float]) -> tuple[int, ...]:
    """Blocks l+1 .. l+n of the pair (l, l+n) with the smallest distance; the deepest on ties."""
    if not pairs:
        return ()
    best = min(range(len(pairs)), key=lambda j: (distances[j], -j))
    start, end = pairs[best]
    return tuple(range(start + 1, end + 1))


def _lowest(influence: Sequence[float], count: int) -> tuple[int, ...]:
    """The 1-based blocks of the `count` lowest values, ascending; the deeper block on ties."""
    order = sorted(range(len(influence)), key=lambda j: (influence[j], -j))
    return tuple(sorted(j + 1 for j in order[:count]))


def _spans(blocks: Sequence[int]) -> str:
    """(1, 2, 3, 7, 9, 10) -> "1-3, 7, 9-10"."""
    parts: list[str] = []
    start = prev = None
    for b in [*blocks, None]:
        if b is not None and prev is not None and b == prev + 1:
            prev = b
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = b
    return ", ".join(parts)


# -- measuring -----------------------------------------------------------------------------


def _cosine(u: Tensor, v: Tensor) -> Tensor:
    """cos_sim of unit vectors u, v (T, D) -> (T,)."""
    return (u * v).sum(dim=-1)


def _angle_over_pi(u: Tensor, v: Tensor) -> Tensor:
    """arccos(cos_sim(u, v)) / pi for unit vectors (T, D) -> (T,), as 2 atan2(|u - v|, |u + v|)
    (Kahan's form: exact 0 for equal vectors, accurate near 0 and pi where arccos is not)."""
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def _unit_tokens(hidden: Tensor, real: Tensor) -> Tensor:
    """The real tokens of one hidden state (B, L, D), by bool mask (B, L), as float64 unit
    vectors (T, D). A zero vector stays zero."""
    h = hidden[real].to(torch.float64)
    return h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _forward_for(model: nn.Module) -> Callable[..., Any]:
    """The model's forward without a KV cache and with logits for the last position only
    (the scores need only the blocks), where its signature allows."""
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1

    def forward(**inputs: Tensor) -> Any:
        return model(**inputs, **extra)

    return forward


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _measure(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    pairs: Sequence[tuple[int, int]],
    stat: PairStat,
) -> tuple[list[float], int]:
    """Mean over real tokens of `stat(u_a, u_b)` for every hidden-layer pair (a, b), where u_i
    are the unit hidden states of layer i (0 = embeddings, i = output of block i), plus the
    number of real tokens. Sums are float64, so batching and padding do not change them.
    ValueError when the batches hold no real token. With no pairs nothing is run."""
    layers = sorted({i for pair in pairs for i in pair})
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    tokens = 0
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with FeatureCapture(model, hidden_layers=layers, role="teacher") as capture, torch.inference_mode():
            forward = _forward_for(model)
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                mask = batch.get("attention_mask")
                real = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
                count = int(real.sum())
                if count == 0 or not pairs:
                    tokens += count
                    continue
                hidden = capture.run(batch, forward=forward).hidden
                # one pair at a time: two (T, D) float64 copies alive, not L + 1
                values = torch.stack(
                    [stat(_unit_tokens(hidden[a], real), _unit_tokens(hidden[b], real)).sum() for a, b in pairs]
                )
                sums += values.cpu()
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no real tokens to measure the teacher's blocks on (every attention_mask is 0, or no rows)")
    return (sums / tokens).tolist(), tokens
