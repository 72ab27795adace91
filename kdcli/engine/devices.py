"""Where a run executes: its place in a torchrun job, the device, the precision, the seeds."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kdcli.errors import UsageError


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0 (which alone prints results)."""
    return Processes.from_env().is_main


def resolve_device(name: str, procs: Processes) -> torch.device:
    """ "auto" -> cuda, then mps, then cpu; under torchrun on CUDA each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: no CUDA GPU is available here. Fix: use --device cpu or auto")
        if procs.distributed:
            name = f"cuda:{procs.local_rank}"
        device = torch.device(name)
        if device.index is None:  # plain "cuda": the current device, with its index made explicit
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s). Fix: pick one of them"
            )
        torch.cuda.set_device(device)
        return device
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UsageError("device 'mps': Apple's GPU backend is not available here. Fix: use --device cpu or auto")
        if procs.distributed:
            raise UsageError("several processes on mps are not supported. Fix: run one process, or use CUDA")
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """ "auto" -> bf16 autocast on GPUs that support it, fp16 (+ GradScaler) on other GPUs,
    fp32 on CPU and mps."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA GPU (device is {device}). Fix: use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("precision bf16: this GPU does not support bfloat16. Fix: use fp16 or auto")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
