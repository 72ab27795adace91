"""Loading pretrained models and tokenizers: weight files checked first, transformers' load
report turned into one-line `ModelError`s (config.json against the weights, a head of
another size), `HeadMismatch` for a teacher whose trained head does not fit the labels."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import first_line
from kdcli.facts.modelinfo import (
    PICKLE_FIX,
    WeightsUnreadable,
    check_pickles,
    refused_pickle,
    weight_shapes,
)
from kdcli.models.common import (
    REDOWNLOAD_FIX,
    TOKENIZER_FILES,
    HeadMismatch,
    LoadedModel,
    ModelError,
    as_torch_dtype,
    auto_model_class,
    check_local_folder,
    has_safetensors,
    label_kwargs,
    quiet_transformers,
    remote_code_notice,
    resolve_model_ref,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    pickled = bool(bins) and not has_safetensors(ref)
    file = bins[0] if bins else "pytorch_model.bin"
    if "GLOBAL" in text and ("Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError)):
        called = re.search(r"GLOBAL ([\w.]+)", text)
        return ModelError(
            f"{role} {ref!r}: {refused_pickle(file, [called.group(1) if called else 'a callable'])}. Fix: {PICKLE_FIX}"
        )
    if type(exc).__name__ == "SafetensorError":
        return ModelError(
            f"{role} {ref!r}: its safetensors weights cannot be read ({first_line(exc)}). Fix: {REDOWNLOAD_FIX}"
        )
    missing_file = "does not appear to have" in text or "no file named" in text.lower()
    if pickled and not missing_file and isinstance(exc, (OSError, RuntimeError, EOFError, pickle.UnpicklingError)):
        detail = first_line(exc.__context__ or exc) if "Weights only load failed" in text else first_line(exc)
        return ModelError(
            f"{role} {ref!r}: {file} is damaged or not a PyTorch checkpoint ({detail}). Fix: "
            "re-download the model, or save it again (preferably as model.safetensors)"
        )
    return ModelError(
        f"{role} {ref!r}: cannot load it as a {task} model ({first_line(exc)}). "
        "Fix: give a local folder with config.json and weights, or a hub id reachable "
        "from this machine"
    )


def _in_body(key: str, model: PreTrainedModel) -> bool:
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


def _check_loading_info(model: PreTrainedModel, info: dict, ref: str, role: str, *, resize_head: bool) -> None:
    """Refuse a load where anything but a classification head (and the pooler under a new
    head) was initialised at random instead of read from the checkpoint."""
    mismatched = sorted(
        (k[0], k[1], k[2]) if isinstance(k, tuple) else (k, None, None) for k in info.get("mismatched_keys", ())
    )
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
    dtype: torch.dtype | str | None = None,
    role: str = "model",
    resize_head: bool = True,
    warn: Callable[[str], None] | None = None,
    gguf_file: str | None = None,
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
    `gguf_file`: a GGUF file inside the folder (a causal LM), dequantized to `dtype` by
    transformers (through the gguf package); the loaded config loses its `quantization_config`
    (the weights are plain tensors now, and a student saved from it must not claim otherwise).
    """
    ref = resolve_model_ref(ref)
    check_local_folder(ref, role)
    auto = auto_model_class(task)
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, role))
    kwargs: dict[str, Any] = dict(label_kwargs(num_labels, id2label))
    if gguf_file is not None:
        _check_gguf_file(ref, gguf_file, role)
        kwargs["gguf_file"] = gguf_file
    else:
        _check_weight_files(ref, role)
        if has_safetensors(ref):
            kwargs["use_safetensors"] = True
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(
                ref,
                revision=revision,
                trust_remote_code=trust_remote_code,
                dtype=as_torch_dtype(dtype),
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
    if gguf_file is not None:
        drop_quantization_config(model.config)
        _forget_gguf_quantizer(model)
    return LoadedModel(
        model=model,
        ref=ref,
        new=tuple(sorted(info.get("missing_keys", ()))),
        resized=tuple(sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))),
        unused=tuple(sorted(info.get("unexpected_keys", ()))),
    )


def _check_gguf_file(ref: str, gguf_file: str, role: str) -> None:
    """A local folder must hold the named GGUF file (a hub id is left to transformers)."""
    folder = Path(ref).expanduser()
    if folder.is_dir() and not (folder / gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"use one of {', '.join(found)}" if found else "put the .gguf file in that folder"
        raise ModelError(f"{role} {ref!r}: no GGUF file {gguf_file!r} in the folder. Fix: {hint}")


def _forget_gguf_quantizer(model) -> None:
    """transformers keeps a GGUF quantizer on the model it dequantized, and `save_pretrained`
    then refuses ("quantized with gguf and is not serializable"): the weights are plain tensors,
    so a GGUF student saves like any other once the quantizer is gone."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def drop_quantization_config(config) -> None:
    """Forget a GGUF checkpoint's `quantization_config` (transformers dequantized it on load)."""
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None


def load_tokenizer(
    ref: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    role: str = "tokenizer",
    warn: Callable[[str], None] | None = None,
    gguf_file: str | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model folder or hub repo (`AutoTokenizer.from_pretrained`), or
    inside a GGUF file (`gguf_file`); `warn` gets the trust_remote_code warning before anything
    is loaded."""
    from transformers import AutoTokenizer

    ref = resolve_model_ref(ref)
    check_local_folder(ref, role)
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, role))
    folder = Path(ref).expanduser()
    if gguf_file is not None:
        _check_gguf_file(ref, gguf_file, role)
        from kdcli.models.gguf_tokenizer import without_unlisted_tokens

        try:
            with quiet_transformers():  # exactly the file's ids (no <|endoftext|> added by transformers)
                return without_unlisted_tokens(
                    AutoTokenizer.from_pretrained(ref, revision=revision, gguf_file=gguf_file)
                )
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            raise ModelError(
                f"{role} {ref!r}: cannot read the tokenizer inside {gguf_file} ({first_line(exc)}). Fix: "
                "set `tokenizer` in the recipe to a folder or hub id with tokenizer files"
            ) from exc
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone: refuse it.
        raise ModelError(
            f"{role} {ref!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...). "
            "Fix: set `tokenizer` in the recipe to a folder or hub id that has them"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{role} {ref!r}: no usable tokenizer ({first_line(exc)}). Fix: set `tokenizer` in "
            "the recipe to a folder or hub id that has tokenizer files"
        ) from exc
    return tokenizer
