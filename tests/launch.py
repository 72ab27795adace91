"""Launching kdcli under torchrun from tests (gloo on CPU), one way for every test module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun_command() -> list[str]:
    """torchrun next to this interpreter (the venv's), else `python -m torch.distributed.run`."""
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_kdcli(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m kdcli ARGS`, one thread per process, the
    checkout on PYTHONPATH; stdout and stderr captured as text."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [*torchrun_command(), "--standalone", "--nproc-per-node", str(nproc), "-m", "kdcli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL
    )
