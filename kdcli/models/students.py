"""Students built from a config plus overrides, optionally initialised from a teacher's
embeddings, chosen blocks, pooler and head."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kdcli.errors import first_line
from kdcli.models.common import (
    ModelError,
    as_torch_dtype,
    auto_model_class,
    check_local_folder,
    label_kwargs,
    quiet_transformers,
    remote_code_notice,
    resolve_model_ref,
)
from kdcli.models.structure import encoder_blocks

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel


def load_config(
    config_ref: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    warn: Callable[[str], None] | None = None,
    gguf_file: str | None = None,
):
    """A transformers config from a folder, a config.json path, a hub id, or a GGUF file's
    header (`gguf_file`, inside the folder; its quantization_config is dropped)."""
    from transformers import AutoConfig

    from kdcli.models.loading import drop_quantization_config

    ref = resolve_model_ref(config_ref)
    check_local_folder(ref, "student config")
    if trust_remote_code and warn is not None:
        warn(remote_code_notice(ref, "student config"))
    try:
        if gguf_file is not None:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(ref, revision=revision, gguf_file=gguf_file)
            drop_quantization_config(config)
            return config
        return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"student config {ref!r}: cannot read it ({first_line(exc)}). Fix: give a folder "
            "with config.json, a config.json file, or a hub id"
        ) from exc


def apply_overrides(config, overrides: dict[str, Any]) -> None:
    """Set config attributes in place; an unknown key is a `ModelError` with close matches."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known and not hasattr(config, key):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"a {config.model_type} config has {', '.join(sorted(known)[:12])}, ..."
            )
            raise ModelError(f"student.overrides: {key!r} is not a {config.model_type} config field. Fix: {hint}")
        try:
            setattr(config, key, value)
        except Exception as exc:  # TypeError, ValueError, huggingface_hub's strict-field error
            raise ModelError(
                f"student.overrides: {key}={value!r} is not valid ({first_line(exc.__cause__ or exc)})"
            ) from exc


def build_student(
    config_ref: str,
    overrides: dict[str, Any] | None,
    task: str,
    num_labels: int | None,
    id2label: dict | None,
    init_from: PreTrainedModel | None = None,
    init_layers: Sequence[int] | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    warn: Callable[[str], None] | None = None,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A student built from a config (+ overrides) with random weights, for `task`.

    With `init_from` and `init_layers`, student block j (1-based) starts as teacher block
    `init_layers[j-1]` (1-based), and the embeddings, pooler and head are the teacher's:
    `len(init_layers)` must equal the student's layer count and every shape must agree.
    Uses the global torch RNG (seed it first for reproducible initialisation).
    """
    config = load_config(
        config_ref, revision=revision, trust_remote_code=trust_remote_code, warn=warn, gguf_file=gguf_file
    )
    source_types = getattr(config, "layer_types", None)
    apply_overrides(config, dict(overrides or {}))
    _fit_layer_types(config, source_types, init_layers)
    for key, value in label_kwargs(num_labels, id2label).items():
        setattr(config, key, value)
    auto = auto_model_class(task)
    torch_dtype = as_torch_dtype(dtype)
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
            f"overrides {overrides or {}} ({first_line(exc)})"
        ) from exc
    if init_layers is not None:
        if init_from is None:
            raise ModelError("student.init_from_teacher: no teacher model to copy from")
        init_from_teacher(model, init_from, init_layers)
    return model


def _fit_layer_types(config, source_types, init_layers: Sequence[int] | None) -> None:
    """Configs that list a type per layer (`layer_types`, e.g. Qwen2's sliding/full attention)
    keep one entry per layer after `num_hidden_layers` changed: the copied blocks' own types
    when the student starts from teacher blocks, else the first N (the last one repeated)."""
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(source_types, list) or not source_types or not isinstance(count, int):
        return
    if init_layers is not None and len(init_layers) == count and all(1 <= i <= len(source_types) for i in init_layers):
        config.layer_types = [source_types[i - 1] for i in init_layers]
    elif len(source_types) != count:
        config.layer_types = (source_types + [source_types[-1]] * count)[:count]


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, layers: Sequence[int]) -> None:
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
            index, rest = key[len(s_prefix) :].split(".", 1)
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
