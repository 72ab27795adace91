"""check-recipe's causal-lm model rules: the GGUF files models name (present, readable, on a
causal-lm recipe only), the chat template a `messages` row format renders rows with, and what
on_policy generation needs of the tokenizer (an end marker, a generation prompt)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdcli.facts.modelinfo import GGUF_FIX, GGUFFacts
from kdcli.facts.safe_files import exists, is_dir, read_small
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.messages import JsonPath, show
from kdcli.recipe.on_policy_rules import AT, NO_END_FIX, NO_GENERATION_PROMPT_FIX
from kdcli.recipe.resolve import Models, Resolved, teacher_path
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe
from kdcli.recipe.sources import PretrainedModel
from kdcli.recipe.vocab_rules import TokenizerSource, run_tokenizer

#: GGUF files named in a fix, at most
LISTED_GGUF_MAX = 10
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


_GGUFModel = tuple[JsonPath, str, str, str, str, Resolved]


def _gguf_models(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[_GGUFModel]:
    """(JSON path of the model object, the key of its reference, the reference, role,
    gguf_file, facts) of each model naming a GGUF file."""
    out: list[_GGUFModel] = []
    if "teacher" in loaded.sections:
        for i, (t, resolved) in enumerate(zip(recipe.teachers, models.teachers)):
            if t.gguf_file:
                out.append((teacher_path(recipe, i), "model", t.model, "teacher", t.gguf_file, resolved))
    student = recipe.student if "student" in loaded.sections else None
    if isinstance(student, PretrainedModel) and student.gguf_file:
        out.append((("student",), "model", student.model, "student", student.gguf_file, models.student))
    elif student is not None and student.gguf_file and student.config and models.base is not None:
        out.append((("student",), "config", student.config, "student config", student.gguf_file, models.base))
    return out


def _gguf_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(".gguf"))
    except OSError:
        return []


def _missing_fix(loaded: LoadedRecipe, at: JsonPath, folder: str) -> str:
    """Name the folder's .gguf files, unless it lies outside the recipe's repository (a CI lint
    must not list the folders of the machine it runs on)."""
    if loaded.outside(at, folder) is not None:
        return "check the file name (a folder outside the recipe's repository is not listed)"
    names = _gguf_names(Path(folder))
    if not names:
        return (
            "the folder holds no .gguf file: put the GGUF checkpoint there, or point the model at the folder holding it"
        )
    more = f" (and {len(names) - LISTED_GGUF_MAX} more)" if len(names) > LISTED_GGUF_MAX else ""
    return f"use one of the folder's GGUF files: {', '.join(map(show, names[:LISTED_GGUF_MAX]))}{more}"


def gguf_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """Each gguf_file is in its model's folder and has a readable GGUF header, and only a
    causal-lm recipe names one (a GGUF checkpoint is a decoder-only language model). A student
    config's gguf_file taken from the teacher is reported at the teacher only."""
    out: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for at, key, ref, role, gguf_file, resolved in _gguf_models(recipe, loaded, models):
        where = at + ("gguf_file",)
        if loaded.written(where) is not None and recipe.task != "causal-lm":
            out.append(
                Finding(
                    where,
                    f"gguf_file loads a GGUF checkpoint, a decoder-only language model, but task is {show(recipe.task)}",
                    'set "task": "causal-lm" to distil a language model, or remove gguf_file and point the model '
                    "at a folder with config.json and safetensors weights",
                )
            )
        if (ref, gguf_file) in seen:
            continue
        seen.add((ref, gguf_file))
        if os.path.isabs(ref) and is_dir(ref) and not exists(Path(ref) / gguf_file):
            shown = loaded.written(at + (key,))
            out.append(
                Finding(
                    where,
                    f"the {role} folder {show(shown if isinstance(shown, str) else ref)} holds no file {show(gguf_file)}",
                    _missing_fix(loaded, at + (key,), ref),
                )
            )
        elif resolved.facts is None and resolved.reported:
            reason = resolved.reason.replace(str(Path(ref)) + os.sep, "") if os.path.isabs(ref) else resolved.reason
            out.append(Finding(where, f"the {role}'s GGUF file cannot be read: {reason}", GGUF_FIX))
    return out


_TEMPLATE_FIX = (
    'use a tokenizer that has one (e.g. an -Instruct model\'s) as "tokenizer", add a "chat_template" to its '
    'tokenizer_config.json (or a chat_template.jinja file beside it), or use "row_format": "prompt-completion"'
)


def chat_template_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """`row_format: "messages"` renders each row with the run tokenizer's chat template: the
    tokenizer (its files, or its GGUF header) must have one."""
    if recipe.task != "causal-lm" or "data" not in loaded.sections or recipe.data.row_format != "messages":
        return []
    source = run_tokenizer(recipe, loaded, models)
    if source is None or source.folder is None and not isinstance(source.facts, GGUFFacts):
        return []  # not on this machine: the config rules report it
    if source.gguf_file and not isinstance(source.facts, GGUFFacts):
        return []  # an unreadable GGUF file: gguf_findings reports it
    if source.chat_template() is not None:
        return []
    where = (
        f"the GGUF file {source.gguf_file} has no tokenizer.chat_template"
        if source.gguf_file
        else "its folder has no chat_template in tokenizer_config.json, no chat_template.jinja or chat_template.json"
    )
    return [
        Finding(
            ("data", "row_format"),
            f'row_format "messages" renders each row with the chat template of {source.name}, which has none: {where}',
            _TEMPLATE_FIX,
        )
    ]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _json(source: TokenizerSource, name: str) -> dict:
    raw = read_small(source.folder / name, _MAX_CONFIG_BYTES) if source.folder is not None else None
    try:
        out = json.loads(raw) if raw is not None else {}
    except (ValueError, RecursionError):
        return {}
    return out if isinstance(out, dict) else {}


def end_marker(source: TokenizerSource) -> bool | None:
    """Whether the tokenizer has an end-of-sequence token (None: its files cannot be read)."""
    if source.gguf_file:
        return source.facts.eos_token_id is not None if isinstance(source.facts, GGUFFacts) else None
    if source.folder is None:
        return None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if _token_text(_json(source, name).get("eos_token")) is not None:
            return True
    return _json(source, "generation_config.json").get("eos_token_id") is not None


def on_policy_model_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """The run's tokenizer has an end marker, and for messages rows a chat template that
    renders a generation prompt (it reads `add_generation_prompt`)."""
    distillation = recipe.distillation if "distillation" in loaded.sections else None
    on_policy = distillation.on_policy if distillation is not None else None
    if recipe.task != "causal-lm" or on_policy is None or not on_policy.generates:
        return []
    source = run_tokenizer(recipe, loaded, models)
    if source is None:
        return []
    out: list[Finding] = []
    if end_marker(source) is False:
        out.append(
            Finding(
                AT,
                f"{source.name} has no end-of-sequence token, so a generated completion could never end",
                NO_END_FIX,
                at_key=True,
            )
        )
    template = source.chat_template()
    row_format = recipe.data.row_format if "data" in loaded.sections else None
    if row_format == "messages" and template is not None and "add_generation_prompt" not in template:
        out.append(
            Finding(
                AT,
                f"the chat template of {source.name} cannot render a generation prompt (it never reads "
                "add_generation_prompt), so the completion's turn would not be opened",
                NO_GENERATION_PROMPT_FIX,
                at_key=True,
            )
        )
    return out


def lm_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """The GGUF file and chat template rules (each skipped where a fact is unknown)."""
    return (
        gguf_findings(recipe, loaded, models)
        + chat_template_findings(recipe, loaded, models)
        + on_policy_model_findings(recipe, loaded, models)
    )
