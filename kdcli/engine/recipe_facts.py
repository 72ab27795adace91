"""What a run knows about its recipe and folder: the paths `--overwrite` must never delete,
the recipe's hash (the folder's marker), the command that continues the run."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path
from typing import Literal

from kdcli.engine.devices import Processes

Mode = Literal["distill", "train"]


def read_paths(recipe) -> list[Path]:
    """Every local path the run reads (the recipe, its data, models, student config, tokenizer),
    which `--overwrite` must never delete. A relative reference (a recipe built in code) is
    taken relative to the recipe's folder, as recipes resolve them, and to the working folder,
    as `from_pretrained` and the data readers would read it; each one that exists counts."""
    data = recipe.data
    refs = [
        recipe.source,
        data.train.path,
        data.eval.path if data.eval is not None else None,
        *[t.model for t in recipe.teachers],
        getattr(recipe.student, "model", None),
        getattr(recipe.student, "config", None),
        recipe.tokenizer,
        recipe.init_source,
    ]
    bases = ([Path(recipe.source).parent] if recipe.source else []) + [Path.cwd()]
    paths: list[Path] = []
    for ref in refs:
        if not ref:
            continue
        ref = os.path.expanduser(str(ref))
        if os.path.isabs(ref):
            paths.append(Path(ref))
        else:
            paths += [base / ref for base in bases if os.path.lexists(base / ref)]
    return paths


def recipe_sha256(recipe) -> str:
    """The hash of the recipe file (or, for a recipe built in code, of its JSON)."""
    if recipe.source is not None:
        data = Path(recipe.source).read_bytes()
    else:
        data = recipe.model_dump_json(by_alias=True).encode()
    return hashlib.sha256(data).hexdigest()


def resume_command(mode: Mode, recipe, out: Path, procs: Processes, *, max_steps, device, seed) -> str:
    """The exact command that continues this run."""
    parts = ["kdcli", mode, str(recipe.source) if recipe.source else "RECIPE", "--output-dir", str(out), "--resume"]
    if max_steps is not None:
        parts += ["--max-steps", str(max_steps)]
    if device is not None:
        parts += ["--device", device]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if procs.distributed:
        parts = ["torchrun", "--nproc-per-node", str(procs.world_size), "-m"] + parts
    return shlex.join(parts)
