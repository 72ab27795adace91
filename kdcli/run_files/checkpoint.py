"""Atomic files and resumable checkpoints.

Every file kdcli writes goes to a temporary name in the same folder and is then moved into
place with `os.replace`, so a crash leaves either the old file or the new one, never half a
file. A checkpoint is a folder `checkpoints/step-N/` holding `state.pt` (student weights,
projections, optimizer, learning-rate scheduler, grad scaler, RNG states, data position)
and `meta.json` (the same position in readable form); it is assembled in a hidden temporary
folder and renamed into place, so `latest_checkpoint` only ever sees complete ones.

A full disk (ENOSPC, or a quota) while writing is a `DiskFullError`: one line saying what was
being written, where, and about how much space it needs (the bytes of the tensors written);
the temporary folder is removed and the previous checkpoint is kept.

Checkpoints are read back with `torch.load(weights_only=True)`: only tensors and plain
Python values are unpickled, so resuming from a folder someone else wrote cannot run their
code. RNG states are therefore stored as tensors and plain ints/lists, never as pickled
objects (python's `random` state and numpy's `RandomState` are converted both ways).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.run_files.atomic_files import (  # noqa: F401  (re-exported: kdcli's atomic files and full-disk errors)
    DiskFullError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    disk_full_as_error,
    format_bytes,
    is_no_space,
)
from kdcli.run_files.atomic_files import ordinary_mode as _ordinary_mode
from kdcli.run_files.checkpoint_layout import (  # noqa: F401  (re-exported: the layout's names)
    CHECKPOINTS,
    META_FILE,
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
)

# -- the bytes a save writes --------------------------------------------------------------


def nbytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: what saving it writes, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))


def atomic_save_pretrained_files(model, tokenizer, folder: Path) -> list[Path]:
    """`save_pretrained` the model (safetensors) and tokenizer into a temporary folder inside
    `folder`, then move each file into `folder` with `os.replace` (each file atomic; other
    files in `folder` are left alone). Returns the files placed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save_pretrained.", dir=folder))
    placed = []
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar under kdcli's own
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for child in sorted(tmp.iterdir()):
            if child.is_file():
                os.replace(child, folder / child.name)
                placed.append(folder / child.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return placed


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename folder `tmp` to `final`, replacing an existing `final` (old one removed after)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# -- RNG states as plain values ------------------------------------------------------------


def capture_rng() -> dict:
    """The RNG states of python, numpy and torch (CPU and every CUDA device), as tensors and
    plain values that `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Inverse of `capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where the run stands: optimizer steps done, the epoch, batches of it consumed."""

    step: int  # optimizer steps completed
    epoch: int  # 0-based epoch the next batch belongs to
    batch_in_epoch: int  # batches of that epoch already consumed
    samples_seen: int = 0  # training examples consumed (all ranks)


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped."""

    position: Position
    student: dict[str, torch.Tensor]
    objective: dict[str, torch.Tensor]  # the projections' weights
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    path: Path | None = None
    #: FSDP2: the model and optimizer state are in the folder's `shards/` (torch.distributed.checkpoint)
    sharded: bool = False
    #: plain JSON values written into meta.json beside the position (e.g. the run's objective)
    meta: dict[str, Any] | None = None


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step}"


def save_checkpoint(output_dir: Path, ckpt: Checkpoint, *, keep_last: int = 2, shards: Path | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically (temp folder + rename) and keep the newest
    `keep_last` checkpoints. Returns the folder. `shards`: a folder of sharded state every rank
    wrote (FSDP2), moved in as `shards/` before the rename."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, ckpt.position.step)
    payload = {
        "format": 1,
        "position": asdict(ckpt.position),
        "student": ckpt.student,
        "objective": ckpt.objective,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "scaler": ckpt.scaler,
        "rng": ckpt.rng,
        "sharded": shards is not None,
    }
    with disk_full_as_error(f"checkpoint {final.name}", root, nbytes(payload)):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            # through a Python file, so that a write error keeps its errno (torch's own file
            # writer reports a full disk as "unexpected pos")
            if shards is not None:
                os.replace(shards, tmp / "shards")
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(payload, f)
            meta = {**asdict(ckpt.position), **(ckpt.meta or {})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _ordinary_mode(tmp, folder=True)
            _swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder with `torch.load(weights_only=True)` (no code runs)."""
    path = Path(path)
    payload = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    return Checkpoint(
        position=Position(**payload["position"]),
        student=payload["student"],
        objective=payload["objective"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        scaler=payload["scaler"],
        rng=payload["rng"],
        path=path,
        sharded=bool(payload.get("sharded", False)),
    )
