"""`distillation.teacher_cache`: the teachers' outputs per training row, on disk.

What a row holds (`layout`, in the cache folder's meta.json):

- encoders: each teacher's logits ((C,) per row for sequence classification, (L, C) for token
  classification, L the row's real tokens), and the first teacher's matched hidden states
  (L, D) and attention scores (H, L, L), in the recipe's dtype (fp16 / bf16 / fp32). A batch
  is rebuilt at its own width: hidden states and logits are zero past a row's tokens, scores
  -10000 (the padding mask's value), where every loss either masks or gets probability 0.
- causal-lm: per target token the teacher's (the teachers' mean logits') top-k token ids
  (int32), their log-probabilities at the recipe's temperature (dtype) and the log of the
  remaining mass (float32): `top_k * (4 + 2) + 4` bytes per target in fp16. The `top_k`
  divergences read these exactly (`kdcli.losses.divergences.CachedTopK`).

Rows are filled the first time the run meets them (or ahead by `kdcli cache-teacher`) and
read back whenever every row of a batch is cached, with no teacher forward. Storage, atomic
rows and several processes: `kdcli.engine.cache_store`; the key: `kdcli.engine.cache_key`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.engine.cache_key import CACHE_FORMAT_VERSION, cache_key
from kdcli.engine.cache_store import RowStore
from kdcli.features import MASK_VALUE, Features
from kdcli.outdir import TEACHER_CACHE_DIR

#: the recipe's dtype names and their torch dtypes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_STORED = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}
#: the cache folder under the output folder when `teacher_cache.dir` is not given
DEFAULT_DIR = TEACHER_CACHE_DIR
META = "meta.json"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TeacherDiskCache:
    """The teacher's outputs per training row, in `folder` (one key's folder), this `rank`'s writes.

    `lookup(indices, batch, device)` gives every teacher's `Features` when all the batch's rows
    are cached (else None; `collective`: when they are on every rank, for sharded teachers);
    `store(indices, feats_T, batch)` keeps the rows not yet cached.
    causal-lm: `top_k`, `temperature` and `chunk_size` say what is kept per target token."""

    def __init__(
        self,
        folder: Path,
        rank: int,
        *,
        dtype: str = "fp16",
        causal: bool = False,
        top_k: int | None = None,
        temperature: float = 1.0,
        chunk_size: int = 256,
        sync: bool = True,
        collective: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.store_dtype = DTYPES[dtype]
        self.causal, self.top_k, self.temperature, self.chunk_size = causal, top_k, float(temperature), chunk_size
        self.rows = RowStore(self.folder, rank, sync=sync)
        self.layout: list[tuple[str, str, list]] | None = None
        self.hits = self.misses = 0
        self.collective = collective
        self.layout = _read_layout(self.folder)

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self.rows.close()

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, indices: Sequence[int], batch: dict[str, Tensor], device) -> list[Features] | None:
        hit = True
        if any(i not in self.rows for i in indices):
            self.rows.refresh()  # rows another rank (or an earlier run) wrote since the last look
            if self.layout is None:
                self.layout = _read_layout(self.folder)
            hit = self.layout is not None and all(i in self.rows for i in indices)
        if self.collective:  # sharded teachers (FSDP2): every rank runs them, or none does
            flag = torch.tensor([float(hit)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            hit = bool(flag.item() > 0)
        if not hit:
            self.misses += 1
            return None
        self.hits += 1
        width = batch["input_ids"].size(1)
        tensors = self._decode(indices, width)
        mask = batch["attention_mask"]
        tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        hidden = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("hidden.")}
        scores = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("scores.")}
        if self.causal:
            from kdcli.losses.divergences import CachedTopK

            top = CachedTopK(tensors["topk.ids"].long(), tensors["topk.values"], tensors["topk.tail"])
            return [Features(logits=None, hidden=hidden, scores=scores, mask=mask, top_k=top)]
        teachers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("logits."))
        return [
            Features(
                logits=tensors[f"logits.{t}"],
                hidden=hidden if t == 0 else {},
                scores=scores if t == 0 else {},
                mask=mask,
            )
            for t in teachers
        ]

    def _decode(self, indices: Sequence[int], width: int) -> dict[str, Tensor]:
        """The batch's cached fields, padded to `width` tokens (float32; ids int32)."""
        per_row = [self.rows.get(i) for i in indices]
        out: dict[str, Tensor] = {}
        for name, dtype_name, template in self.layout:
            dtype = _STORED[dtype_name]
            if "N" in template:
                out[name] = torch.empty((0, *template[1:]), dtype=torch.float32 if dtype.is_floating_point else dtype)
            else:
                shape = [len(indices)] + [width if d == "L" else d for d in template]
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
                    out[name][(b, *(slice(0, s) for s in shape))] = value
        for name, values in pieces.items():
            if values:
                out[name] = torch.cat(values)
        return out

    # -- writing ---------------------------------------------------------------------------

    def store(self, indices: Sequence[int], feats_T: list[Features], batch: dict[str, Tensor]) -> None:
        if all(i in self.rows for i in indices):
            return
        fields = self._causal_fields(feats_T, batch) if self.causal else self._encoder_fields(feats_T)
        if self.layout is None:
            self._write_layout([(name, _name(t.dtype), template) for name, (t, template) in fields.items()])
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        targets = _row_targets(batch["labels"]).tolist() if self.causal else [0] * len(indices)
        starts = np.cumsum([0, *targets]).tolist()
        rows = []
        for b, i in enumerate(indices):
            if i in self.rows:
                continue
            parts = []
            for name, _, template in self.layout:
                tensor = fields[name][0]
                if "N" in template:
                    value = tensor[starts[b] : starts[b + 1]]
                else:
                    value = tensor[(b, *(slice(0, int(lengths[b])) if d == "L" else slice(None) for d in template))]
                parts.append(value.contiguous().view(torch.uint8).numpy().tobytes())
            rows.append((int(i), b"".join(parts), int(lengths[b]), int(targets[b])))
        self.rows.put_many(rows)

    def _write_layout(self, layout: list[tuple[str, str, list]]) -> None:
        """meta.json with the layout, written once (atomically; every rank writes the same)."""
        self.layout = layout
        path = self.folder / META
        meta = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if meta.get("layout"):
            self.layout = [tuple(f) for f in meta["layout"]]
            return
        meta["layout"] = [list(f) for f in layout]
        tmp = path.with_name(f".{META}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def _encoder_fields(self, feats_T: list[Features]) -> dict[str, tuple[Tensor, list]]:
        """(batch tensor on the CPU in the storage dtype, per-row shape template) per field."""
        out: dict[str, tuple[Tensor, list]] = {}
        for t, f in enumerate(feats_T):
            logits = f.logits.detach()
            out[f"logits.{t}"] = (
                self._cpu(logits),
                list(logits.shape[1:]) if logits.dim() == 2 else ["L", logits.size(-1)],
            )
        first = feats_T[0]
        for i, h in sorted(first.hidden.items()):
            out[f"hidden.{i}"] = (self._cpu(h), ["L", h.size(-1)])
        for i, s in sorted(first.scores.items()):
            out[f"scores.{i}"] = (self._cpu(s), [s.size(1), "L", "L"])
        return out

    def _cpu(self, tensor: Tensor) -> Tensor:
        return tensor.detach().to("cpu", self.store_dtype)

    def _causal_fields(self, feats_T: list[Features], batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, list]]:
        from kdcli.tasks.causal_lm import target_rows

        labels = batch["labels"]
        teachers = [(target_rows(f, labels)[0], *f.head) for f in feats_T]
        ids, values, tails = top_k_rows(teachers, self.top_k, self.temperature, self.chunk_size)
        k = ids.size(1)
        out = {
            "topk.ids": (ids.to("cpu", torch.int32), ["N", k]),
            "topk.values": (values.to("cpu", self.store_dtype), ["N", k]),
            "topk.tail": (tails.to("cpu", torch.float32), ["N"]),
        }
        first = feats_T[0]
        for i, h in sorted(first.hidden.items()):
            out[f"hidden.{i}"] = (self._cpu(h), ["L", h.size(-1)])
        for i, s in sorted(first.scores.items()):
            out[f"scores.{i}"] = (self._cpu(s), [s.size(1), "L", "L"])
        return out


def _read_layout(folder: Path) -> list[tuple[str, str, list]] | None:
    path = folder / META
    if not path.exists():
        return None
    return [tuple(f) for f in json.loads(path.read_text(encoding="utf-8")).get("layout") or []] or None


def _row_targets(labels: Tensor) -> Tensor:
    from kdcli.tasks import IGNORE_INDEX
    from kdcli.tasks.lm_rows import next_token_labels

    return (next_token_labels(labels) != IGNORE_INDEX).sum(dim=1).cpu()


@torch.no_grad()
def top_k_rows(
    teachers: list[tuple[Tensor, Tensor, Tensor | None]], k: int, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per target row: the top-k ids of the teachers' mean logits / T, their log-probabilities
    at T and the log of the remaining mass, chunk by chunk (as `top_k_log_probs` computes them)."""
    n = teachers[0][0].size(0)
    ids, values, tails = [], [], []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        z = sum(F.linear(h[rows], w, b) for h, w, b in teachers)
        if len(teachers) > 1:
            z = z / len(teachers)
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        z = z / temperature
        top = z.topk(min(k, z.size(-1)), dim=-1).indices
        log_probs = F.log_softmax(z, dim=-1)
        ids.append(top)
        values.append(log_probs.gather(-1, top))
        tails.append(log_probs.scatter(-1, top, float("-inf")).logsumexp(dim=-1))
    if not ids:
        width = min(k, teachers[0][1].size(0))
        return torch.empty(0, width, dtype=torch.long), torch.empty(0, width), torch.empty(0)
    return torch.cat(ids), torch.cat(values), torch.cat(tails)


def write_meta(folder: Path, parts: dict) -> None:
    """The key's inputs, for people (the layout is added by the first row's writer)."""
    path = folder / META
    meta = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if meta.get("inputs") == parts:
        return
    meta["inputs"] = parts
    tmp = path.with_name(f".{META}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def open_cache(root: Path, parts: dict, rank: int, say: Callable[[str], None], **options) -> TeacherDiskCache:
    """The cache folder of these inputs under `root` (`root/<key[:16]>`), created when new;
    says which folder it uses and whether others (of other inputs) are left in place."""
    parts = {"format": CACHE_FORMAT_VERSION, **parts}
    key = cache_key(parts)
    folder = Path(root) / key[:16]
    others = (
        sorted(p.name for p in Path(root).glob("*") if p.is_dir() and p.name != folder.name)
        if Path(root).is_dir()
        else []
    )
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_meta(folder, parts)
    cache = TeacherDiskCache(folder, rank, **options)
    state = f"{len(cache)} rows cached" if len(cache) else "new: filled as the rows are first met"
    say(f"teacher cache: {folder} (key {key[:16]}; {state})")
    if others and not len(cache):
        say(
            f"teacher cache: the inputs differ from the cache(s) {', '.join(others[:3])} in {root} "
            "(teacher weights, tokenizer, rows, max_length, matches, dtype, ...); those are left in place, unused"
        )
    return cache
