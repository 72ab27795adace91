"""The content key of a teacher cache: a sha256 over everything the cached outputs depend on.

`cache_key(parts)` hashes a JSON document of the inputs (canonical: sorted keys); the parts
come from `key_parts`: kdcli's cache format version, the task, each teacher's weight files
(`files_digest`), the tokenizer's files, the training rows' encoded columns after
tokenisation (`rows_digest`), max_length, the matched layers, the storage dtype, the run's
precision and device type, and for causal-lm the temperature and top_k. Any change gives
another key, hence another cache folder: stale outputs are never read.

Files: up to `FULL_HASH_MAX` bytes a file's bytes are hashed; a bigger file (a multi-GB
checkpoint) is taken as its size, its modification time (ns) and its first and last MiB,
which a changed or replaced checkpoint alters in practice and costs milliseconds. A model
that is not a local folder (a hub id outside the local cache) is hashed from its loaded
weights instead (`state_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

#: bump when the files' layout or meaning changes: older caches are then left unused
#: (2: file headers carrying the key, a CRC-32 of each row's bytes in its index record)
CACHE_FORMAT_VERSION = 2
#: files up to this size are hashed whole
FULL_HASH_MAX = 256 << 20
_EDGE = 1 << 20
#: the files of a model folder that decide its outputs
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or for a file over `FULL_HASH_MAX` of its size, mtime and edges."""
    h = hashlib.sha256()
    stat = path.stat()
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_MAX:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        h.update(f.read(_EDGE))
        f.seek(stat.st_size - _EDGE)
        h.update(f.read(_EDGE))
    return "edges:" + h.hexdigest()


def model_folder(ref: str, revision: str | None = None) -> Path | None:
    """The local folder of a model reference: itself, or its snapshot in the Hugging Face cache."""
    if os.path.isdir(ref):
        return Path(ref)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, local_files_only=True))
    except Exception:  # not cached, offline, not a hub id
        return None


def files_digest(folder: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """{file name: digest} of a folder's model files (`WEIGHT_SUFFIXES`), or of `names` in it."""
    wanted = sorted(names) if names is not None else sorted(p.name for p in folder.iterdir())
    out = {}
    for name in wanted:
        path = folder / name
        if path.is_file() and (names is not None or name.endswith(WEIGHT_SUFFIXES)):
            out[name] = file_digest(path)
    return out


def state_digest(model) -> str:
    """sha256 of a loaded model's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rows_digest(dataset, columns: Iterable[str]) -> str:
    """sha256 of the training rows' encoded columns, in row order (offsets and values of each
    list column, read from the Arrow table without converting the rows to Python)."""
    import numpy as np

    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    present = [c for c in columns if c in dataset.column_names]
    table = dataset.select_columns(present).with_format("arrow")[:]  # the rows as the run sees them
    for name in present:
        h.update(name.encode())
        column = table.column(name).combine_chunks()
        if hasattr(column, "offsets"):
            h.update(np.asarray(column.offsets).astype(np.int64).tobytes())
            h.update(np.asarray(column.values).astype(np.int64).tobytes())
        else:
            h.update(np.asarray(column).astype(np.int64).tobytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
