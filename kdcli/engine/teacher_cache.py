"""`distillation.teacher_cache`: the teachers' outputs per training row, on disk.

What a row holds is the task's (`Task.cache_rows`, the layout in the cache folder's meta.json):
encoders' teachers' logits (`kdcli.tasks.cache_rows.LogitRows`), causal-LM's top-k token rows
(`kdcli.tasks.lm_cache_rows.TopKRows`), and the first teacher's matched hidden states and
attention scores, in the recipe's dtype (fp16 / bf16 / fp32). A batch is rebuilt at its own
width: hidden states and logits are zero past a row's tokens, scores -10000 (the padding mask's
value), where every loss either masks or gets probability 0.

Rows are filled the first time the run meets them (or ahead by `kdcli cache-teacher`) and
read back whenever every row of a batch is cached, with no teacher forward. Storage, atomic
rows and several processes: `kdcli.engine.cache_store`; the key: `kdcli.engine.cache_key`.

A row is used only when its bytes pass their CRC-32, its token (and target) count is the
batch row's, its size is the layout's and its token ids (a `topk.ids` field) lie in the
teacher's vocabulary. Any other row is damaged: its batch runs the teacher, the row is written again,
and `close` warns once with the count. Where no teacher can run (`recompute=False`) a damaged
row is an error naming its file. An unreadable meta.json is written again (the layout is the
one the teachers' outputs give, whatever the file said).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdcli.engine.cache_key import CACHE_FORMAT_VERSION, cache_key
from kdcli.engine.cache_meta import META, load_meta, parse_layout, read_layout, write_meta, write_meta_file
from kdcli.engine.cache_store import RowStore
from kdcli.errors import RunError
from kdcli.features import MASK_VALUE, Features
from kdcli.run_files.outdir import TEACHER_CACHE_DIR
from kdcli.tasks.base import CacheRowFormat
from kdcli.tasks.cache_rows import LogitRows

#: the recipe's dtype names and their torch dtypes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_STORED = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}
#: the cache folder under the output folder when `teacher_cache.dir` is not given
DEFAULT_DIR = TEACHER_CACHE_DIR


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TeacherDiskCache:
    """The teacher's outputs per training row, in `folder` (one key's folder), this `rank`'s writes.

    `lookup(indices, batch, device)` gives every teacher's `Features` when all the batch's rows
    are cached (else None; `collective`: when they are on every rank, for sharded teachers);
    `store(indices, feats_T, batch)` keeps the rows not yet cached.
    `row_format`: what a row holds (the task's `cache_rows`; default the encoders' logits);
    `vocab`: the teacher's vocabulary size (stored token ids must lie below it).
    `key`: the cache's key (sha256 hex), which the rank files' headers must carry.
    `warn`: warnings (damaged rows, another cache's files); `recompute`: whether a damaged row
    can be computed again by a teacher (else it is an error)."""

    def __init__(
        self,
        folder: Path,
        rank: int,
        *,
        key: str,
        warn: Callable[[str], None] | None = None,
        recompute: bool = True,
        vocab: int | None = None,
        dtype: str = "fp16",
        row_format: CacheRowFormat | None = None,
        sync: bool = True,
        collective: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.store_dtype = DTYPES[dtype]
        self.row_format: CacheRowFormat = row_format if row_format is not None else LogitRows()
        self.warn = warn or (lambda text: None)
        self.recompute, self.vocab = recompute, vocab
        self.rows = RowStore(self.folder, rank, key=key, sync=sync, warn=self.warn)
        self.hits = self.misses = 0
        self.collective = collective
        self.layout = read_layout(self.folder)
        #: rows found damaged (and computed again) -> their data file
        self.damaged: dict[int, Path] = {}
        self._said_read_only = False

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self.rows.close()
        if self.damaged:
            files = ", ".join(sorted({str(p) for p in self.damaged.values()}))
            self.warn(
                f"warning: teacher cache: {len(self.damaged)} cached row(s) in {files} failed their check "
                "(bytes changed since written, file cut short, or values out of range); the teacher "
                + ("computed them again and they were replaced" if not self.rows.read_only else "computed them again")
            )
            self.damaged = {}

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, indices: Sequence[int], batch: dict[str, Tensor], device) -> list[Features] | None:
        hit = True
        if self.layout is None or any(i not in self.rows for i in indices):
            self.rows.refresh()  # rows another rank (or an earlier run) wrote since the last look
            if self.layout is None:
                self.layout = read_layout(self.folder)
            hit = self.layout is not None and all(i in self.rows for i in indices)
        per_row = self._checked_rows(indices, batch) if hit else None
        hit = per_row is not None
        if self.collective:  # sharded teachers (FSDP2): every rank runs them, or none does
            flag = torch.tensor([float(hit)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            hit = bool(flag.item() > 0)
        if not hit:
            self.misses += 1
            return None
        self.hits += 1
        width = batch["input_ids"].size(1)
        assert per_row is not None  # a hit here is a hit on every rank
        tensors = self._decode(per_row, width)
        mask = batch["attention_mask"]
        tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        return self.row_format.features(tensors, mask)

    def _checked_rows(self, indices: Sequence[int], batch: dict[str, Tensor]) -> list | None:
        """Each row's (bytes, entry) when every row of the batch passes its checks, else None
        (the damaged rows dropped from the store, so that the batch runs the teacher)."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        targets = self.row_format.targets(batch)
        per_row, bad = [], {}
        for b, i in enumerate(indices):
            got = self.rows.get(i)
            if got is None:
                bad[i] = self.rows.damaged[i]
            elif not self._fits(*got, int(lengths[b]), int(targets[b])):
                path = self.rows.folder / f"rank{got[1].rank}.data"
                self.rows.drop(i)
                bad[i] = path
            per_row.append(got)
        if not bad:
            return per_row
        if not self.recompute:
            (first, path), *_ = bad.items()
            raise RunError(
                f"teacher cache: {len(bad)} cached row(s) of this batch (row {first} first) in {path} failed "
                f"their check, and no teacher is loaded to compute them again. Fix: delete {self.folder} "
                "(or run `kdcli cache-teacher` on the recipe) to fill it again"
            )
        self.damaged.update(bad)
        return None

    def _fits(self, raw, entry, length: int, targets: int) -> bool:
        """A row's entry agrees with the batch row and the layout (and its ids with the vocabulary)."""
        if entry.length != length or entry.targets != targets:
            return False
        assert self.layout is not None  # rows are checked once the layout is known
        spans, at = {}, 0
        for name, dtype_name, template in self.layout:
            shape = [entry.length if d == "L" else entry.targets if d == "N" else d for d in template]
            size = math.prod(shape) * _STORED[dtype_name].itemsize
            spans[name], at = (at, at + size), at + size
        if at != entry.size or len(raw) != at:
            return False
        start, end = spans.get("topk.ids", (0, 0))
        if end > start:
            ids = raw[start:end].view(np.int32)
            if ids.min() < 0 or (self.vocab is not None and ids.max() >= self.vocab):
                return False
        return True

    def _decode(self, per_row: list, width: int) -> dict[str, Tensor]:
        """The batch's cached fields, padded to `width` tokens (float32; ids int32)."""
        assert self.layout is not None  # rows are decoded once the layout is known
        out: dict[str, Tensor] = {}
        for name, dtype_name, template in self.layout:
            dtype = _STORED[dtype_name]
            if "N" in template:
                out[name] = torch.empty((0, *template[1:]), dtype=torch.float32 if dtype.is_floating_point else dtype)
            else:
                shape = [len(per_row)] + [width if d == "L" else d for d in template]
                fill = MASK_VALUE if name.startswith("scores.") else 0.0
                out[name] = torch.full(shape, fill, dtype=torch.float32)
        pieces: dict[str, list[Tensor]] = {name: [] for name, _, t in self.layout if "N" in t}
        for b, (raw, entry) in enumerate(per_row):
            at = 0
            for name, dtype_name, template in self.layout:
                dtype = _STORED[dtype_name]
                shape = [entry.length if d == "L" else entry.targets if d == "N" else d for d in template]
                size = math.prod(shape) * dtype.itemsize
                value = torch.from_numpy(np.array(raw[at : at + size])).view(dtype).reshape(shape)
                at += size
                if dtype.is_floating_point:
                    value = value.float()
                if "N" in template:
                    pieces[name].append(value)
                else:
                    index: tuple[int | slice, ...] = (b, *(slice(0, s) for s in shape))
                    out[name][index] = value
        for name, values in pieces.items():
            if values:
                out[name] = torch.cat(values)
        return out

    # -- writing ---------------------------------------------------------------------------

    def store(self, indices: Sequence[int], feats_T: list[Features], batch: dict[str, Tensor]) -> int:
        """Keep the batch's rows not yet cached; returns how many were written."""
        if self.layout is not None and all(i in self.rows for i in indices):
            return 0
        fields = self.row_format.fields(feats_T, batch, self.store_dtype)
        layout = [(name, _name(t.dtype), template) for name, (t, template) in fields.items()]
        if self.layout != layout:  # none yet, or meta.json said otherwise (damaged)
            self._write_layout(layout)
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        targets = self.row_format.targets(batch)
        starts = np.cumsum([0, *targets]).tolist()
        rows = []
        for b, i in enumerate(indices):
            if i in self.rows:
                continue
            parts = []
            for name, _, template in layout:  # == self.layout (written above when it differed)
                tensor = fields[name][0]
                if "N" in template:
                    value = tensor[starts[b] : starts[b + 1]]
                else:
                    value = tensor[(b, *(slice(0, int(lengths[b])) if d == "L" else slice(None) for d in template))]
                parts.append(value.contiguous().view(torch.uint8).numpy().tobytes())
            rows.append((int(i), b"".join(parts), int(lengths[b]), int(targets[b])))
        written = self.rows.put_many(rows)
        if self.rows.read_only and not self._said_read_only:
            self._said_read_only = True
            self.warn(
                f"warning: teacher cache {self.folder}: {self.rows.why_read_only()}; this run reads the cache "
                "but keeps none of its rows"
            )
        return written

    def verify(self, indices: Sequence[int], batch: dict[str, Tensor]) -> bool:
        """Whether every row of the batch is cached and passes its checks (damaged ones are dropped)."""
        if self.layout is None or any(i not in self.rows for i in indices):
            return False
        return self._checked_rows(indices, batch) is not None

    def _write_layout(self, layout: list[tuple[str, str, list]]) -> None:
        """meta.json with the layout (atomically; every rank writes the same)."""
        self.layout = layout
        path = self.folder / META
        meta = load_meta(path) or {}
        if parse_layout(meta.get("layout")) == layout:
            return
        meta["layout"] = [list(f) for f in layout]
        try:
            write_meta_file(path, meta)
        except OSError:  # a folder this process cannot write: the layout is kept in memory (`store` warns)
            pass


def open_cache(
    root: Path, parts: dict, rank: int, say: Callable[[str], None], warn: Callable[[str], None] | None = None, **options
) -> TeacherDiskCache:
    """The cache folder of these inputs under `root` (`root/<key[:16]>`), created when new;
    says which folder it uses and whether others (of other inputs) are left in place.
    `warn`: warnings (damaged files; default `say`)."""
    parts = {"format": CACHE_FORMAT_VERSION, **parts}
    key = cache_key(parts)
    folder = Path(root) / key[:16]
    others = (
        sorted(p.name for p in Path(root).glob("*") if p.is_dir() and p.name != folder.name)
        if Path(root).is_dir()
        else []
    )
    warn = warn or say
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_meta(folder, parts, key, warn)
    except OSError as exc:
        raise RunError(
            f"cannot use the teacher cache folder {folder} ({type(exc).__name__}: {exc.strerror or exc}). "
            "Fix: set distillation.teacher_cache.dir to a folder this user can write"
        ) from None
    cache = TeacherDiskCache(folder, rank, key=key, warn=warn, **options)
    state = f"{len(cache)} rows cached" if len(cache) else "new: filled as the rows are first met"
    say(f"teacher cache: {folder} (key {key[:16]}; {state})")
    if others and not len(cache):
        say(
            f"teacher cache: the inputs differ from the cache(s) {', '.join(others[:3])} in {root} "
            "(teacher weights, tokenizer, rows, max_length, matches, dtype, ...); those are left in place, unused"
        )
    return cache
