"""Rules across fields that need no model: losses fit features, layers, commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdcli import registry
from kdcli.recipe.messages import JsonPath, show
from kdcli.recipe.schema import DistillationConfig, Recipe
from kdcli.recipe.sources import DataSection
from kdcli.recipe.validation import Mode, is_int, kind_of


@dataclass(frozen=True)
class Finding:
    """A rule's finding before it is placed in the file: path, message, fix, severity."""

    path: JsonPath
    message: str
    fix: str = ""
    severity: str = "error"
    at_key: bool = False


def match_findings(raw: Any, at: JsonPath) -> list[Finding]:
    """The model-free rules of one intermediate match, as written (`at` is its JSON path).

    Works on the raw JSON so that a match with, say, a bad weight still gets its feature and
    layer rules checked; each rule looks only at fields that are individually well-formed.
    """
    out: list[Finding] = []
    if not isinstance(raw, dict):
        return out
    loss, feature = raw.get("loss"), raw.get("feature")
    spec = registry.get_loss(loss) if loss in registry.loss_names("match") else None
    feature = feature if feature in registry.feature_names("match") else None
    if spec is not None and feature is not None and spec.feature != feature:
        out.append(
            Finding(
                at + ("feature",),
                f"loss {loss} compares {spec.feature} features, but feature is {show(feature)}",
                f'set "feature": "{spec.feature}", or pick a {feature} loss: '
                + ", ".join(registry.loss_names_where(feature=feature)),
            )
        )
    for side in ("layer_T", "layer_S"):
        out.extend(_layer_findings(at, side, raw.get(side), loss, spec, feature))
    if raw.get("proj") is not None and feature == "attention":
        out.append(
            Finding(
                at + ("proj",),
                "proj maps hidden states; it is not valid on an attention feature",
                "remove proj (attention maps have no hidden dimension)",
            )
        )
    return out


def _layer_findings(
    at: JsonPath, side: str, layer: Any, loss: str, spec: registry.LossSpec | None, feature: str | None
) -> list[Finding]:
    """One side's layer as written (`layer_T` or `layer_S` of the match at `at`, whose loss is
    written `loss`): the loss's number of layers per side, and numbers no model has."""
    out: list[Finding] = []
    if not (is_int(layer) or (isinstance(layer, list) and bool(layer) and all(is_int(x) for x in layer))):
        return out
    if spec is not None and spec.layers_per_side == 2:
        if not (isinstance(layer, list) and len(layer) == 2):
            example = [layer, layer] if is_int(layer) else layer[:2] * (2 // len(layer[:2]))
            out.append(
                Finding(
                    at + (side,),
                    f"loss {loss} compares two layers per side, so {side} must be a list of two layers, got {show(layer)}",
                    f'write "{side}": {show(example)}',
                )
            )
    elif spec is not None and isinstance(layer, list):
        out.append(
            Finding(
                at + (side,),
                f"loss {loss} compares one layer per side, so {side} must be one integer, got {show(layer)}",
                f'write "{side}": {layer[0]} (lists of two are for {registry.spelled(registry.loss_names_where(layers_per_side=2))})',
            )
        )
    for i, number in enumerate(layer if isinstance(layer, list) else [layer]):
        where = at + (side, i) if isinstance(layer, list) else at + (side,)
        if number < 0:
            out.append(
                Finding(where, f"{side} {number} is negative", "layers are numbered from 0 (hidden) or 1 (attention)")
            )
        elif number == 0 and feature == "attention":
            out.append(
                Finding(
                    where,
                    f"{side} 0 is the embedding output, which has no attention; attention layers are 1..L",
                    "use the block number, from 1 (first block) to the model's layer count",
                )
            )
    return out


def _raw_match_findings(raw_matches: Any) -> list[Finding]:
    out: list[Finding] = []
    if isinstance(raw_matches, list):
        for i, raw in enumerate(raw_matches):
            out.extend(match_findings(raw, ("distillation", "intermediate_matches", i)))
    return out


def distillation_findings(config: DistillationConfig, n_teachers: int) -> list[Finding]:
    """Rules across the distillation section."""
    out: list[Finding] = []
    at: JsonPath = ("distillation",)
    active = [
        config.uses_teacher_logits,
        config.uses_hard_labels,
        *(m.weight > 0 for m in config.intermediate_matches),
    ]
    if not any(active):
        out.append(
            Finding(
                at,
                "every loss term has weight 0 (kd_loss_weight, hard_label_weight and every match weight), so nothing would be learned",
                'give at least one term a weight > 0, e.g. "kd_loss_weight": 1',
            )
        )
    if config.is_caching_logits and config.intermediate_matches:
        out.append(
            Finding(
                at + ("is_caching_logits",),
                "is_caching_logits skips the teacher's forward pass, but intermediate_matches need the teacher's features every step",
                'replace it with "teacher_cache": {} (on disk, with the matched features), or remove intermediate_matches',
            )
        )
    if config.is_caching_logits and config.teacher_cache is not None:
        out.append(
            Finding(
                at + ("is_caching_logits",),
                "is_caching_logits (in memory) and teacher_cache (on disk) both cache the teacher's outputs",
                "keep one: remove is_caching_logits (teacher_cache also keeps matched features), or remove teacher_cache",
            )
        )
    out.extend(_kd_option_findings(config, at + ("kd_loss_options",)))
    if config.temperature_scheduler != "none" and registry.get_loss(config.kd_loss_type).options:
        out.append(
            Finding(
                at + ("temperature_scheduler",),
                f"a temperature scheduler gives each example its own temperature; {config.kd_loss_type} takes one temperature (the schedulers apply to ce and mse, as in the reference)",
                'remove temperature_scheduler, or use "kd_loss_type": "ce"',
            )
        )
    if n_teachers > 1 and config.intermediate_matches:
        out.append(
            Finding(
                at + ("intermediate_matches",),
                f"{n_teachers} teachers are given; multi-teacher distillation averages the teachers' logits and has no intermediate matches (as in the reference)",
                "use one teacher, or remove intermediate_matches",
            )
        )
    return out


def _kd_option_findings(config: DistillationConfig, at: JsonPath) -> list[Finding]:
    """Each `kd_loss_options` entry is an option of `kd_loss_type` with a value in its range."""
    spec = registry.get_loss(config.kd_loss_type)
    out: list[Finding] = []
    for name, value in config.kd_loss_options.items():
        option = spec.option(name)
        if option is None:
            known = [o.name for o in spec.options]
            fix = (
                f"{spec.name} takes: {', '.join(known)}"
                if known
                else f"remove kd_loss_options ({spec.name} has none; the divergences forward_kl, jsd, ... do)"
            )
            out.append(Finding(at + (name,), f"{show(name)} is not an option of {spec.name}", fix, at_key=True))
            continue
        wanted = option.check(value)
        if wanted is not None:
            out.append(
                Finding(
                    at + (name,),
                    f"{spec.name}'s option {name} must be {wanted}, got {show(value)}",
                    f'write e.g. "{name}": {show(option.default) if option.default is not None else 64}',
                )
            )
    return out


def parallel_findings(view: Recipe, sections: frozenset[str]) -> list[Finding]:
    """FSDP2 runs in fp32 or bf16 (fp16 would need a sharded gradient scaler)."""
    if "training" not in sections or view.training.parallel != "fsdp" or view.training.precision != "fp16":
        return []
    return [
        Finding(
            ("training", "precision"),
            'training.parallel "fsdp" runs in fp32 or bf16; fp16 needs a gradient scaler over sharded gradients',
            'use "precision": "bf16" (or "fp32")',
        )
    ]


def causal_lm_findings(raw: dict, view: Recipe, sections: frozenset[str]) -> list[Finding]:
    """What a causal-lm recipe cannot ask for: per-example temperatures, probability_shift and
    the in-memory logit cache (all need full-vocabulary logits, which the chunked loss never
    holds), sentence pairs and label columns (next-token targets come from the text)."""
    if raw.get("task") != "causal-lm":
        return []
    out: list[Finding] = []
    config = view.distillation if "distillation" in sections else None
    at: JsonPath = ("distillation",)
    if config is not None:
        if config.temperature_scheduler != "none":
            out.append(
                Finding(
                    at + ("temperature_scheduler",),
                    "causal-lm distillation takes one temperature: a per-token temperature scheduler needs every token's full-vocabulary logits at once, which the chunked KD loss never holds",
                    'remove temperature_scheduler (set "temperature")',
                )
            )
        if config.probability_shift:
            out.append(
                Finding(
                    at + ("probability_shift",),
                    "probability_shift is for classification labels; causal-lm targets are next tokens",
                    "remove probability_shift",
                )
            )
        if config.is_caching_logits:
            out.append(
                Finding(
                    at + ("is_caching_logits",),
                    "is_caching_logits would keep full-vocabulary logits of every training token in memory",
                    'remove is_caching_logits; "teacher_cache": {} keeps the teacher\'s top-k tokens on disk instead',
                )
            )
    if "data" in sections and view.data.text_pair_column is not None:
        out.append(
            Finding(
                ("data", "text_pair_column"),
                "causal-lm rows are text, prompt + completion, or messages; there are no sentence pairs",
                'remove text_pair_column; for prompts and answers use "row_format": "prompt-completion"',
            )
        )
    return out


def _teacher_list(raw: dict) -> list[tuple[JsonPath, Any]]:
    """(path, teacher as written) of each teacher of a recipe: one object or a list."""
    teachers = raw.get("teacher")
    if isinstance(teachers, list):
        return [(("teacher", i), t) for i, t in enumerate(teachers)]
    return [(("teacher",), teachers)] if teachers is not None else []


def command_findings(raw: dict, mode: Mode | None) -> list[Finding]:
    """The recipe fits the command (`mode`; None to lint): a distill recipe has a teacher and a
    distillation section, a train recipe neither, and a config-student has a config to start from."""
    out: list[Finding] = []
    has_teacher = raw.get("teacher") is not None
    has_distillation = kind_of(raw) == "distill"
    if mode == "distill" and not has_distillation:
        out.append(
            Finding(
                (),
                "`kdcli distill` needs a `distillation` section; this recipe has none (it is a `kdcli train` recipe)",
                'add "distillation": {...} and a teacher, or run `kdcli train`',
            )
        )
    elif mode == "train" and has_distillation:
        out.append(
            Finding(
                ("distillation",),
                "`kdcli train` recipes have no distillation section; this is a `kdcli distill` recipe",
                "run `kdcli distill`, or remove distillation (and teacher) to train the student alone",
                at_key=True,
            )
        )
    if has_teacher and not has_distillation and mode != "distill":
        out.append(
            Finding(
                ("teacher",),
                "a teacher is given but there is no distillation section; a `kdcli train` recipe has no teacher",
                'add "distillation": {} to distil (kdcli distill), or remove teacher to train the student alone',
                at_key=True,
            )
        )
    if has_distillation and not has_teacher:
        out.append(
            Finding(
                ("distillation",),
                "a distillation section needs a teacher, and there is none",
                'add "teacher": {"model": "<hub id or folder>"}',
                at_key=True,
            )
        )
    student = raw.get("student")
    if isinstance(student, dict) and "model" not in student and student.get("config") is None and not has_teacher:
        out.append(
            Finding(
                ("student",),
                "a student declared by config needs `config` here: there is no teacher to take it from",
                'add "config": "<hub id or folder>" (the model whose config.json the student starts from)',
            )
        )
    return out


def trust_findings(raw: dict) -> list[Finding]:
    """A warning for each model whose repository code would run (trust_remote_code)."""
    models = [(path, "teacher", teacher) for path, teacher in _teacher_list(raw)] + [
        (("student",), "student", raw.get("student"))
    ]
    return [
        Finding(
            path + ("trust_remote_code",),
            f"trust_remote_code runs Python code from the {role}'s repository",
            "keep it only for repositories you trust",
            "warning",
        )
        for path, role, model in models
        if isinstance(model, dict) and model.get("trust_remote_code") is True
    ]


def task_findings(raw: dict, data: DataSection) -> list[Finding]:
    """Data that a token-classification recipe cannot read: csv/tsv files, sentence pairs."""
    out: list[Finding] = []
    if raw.get("task") == "token-classification":
        for name, source in (("train", data.train), ("eval", data.eval)):
            if source is not None and source.format in ("csv", "tsv"):
                out.append(
                    Finding(
                        ("data", name),
                        f"token-classification needs a list of words and a list of tags per record; a {source.format} file holds one text per row",
                        "use a json, jsonl or parquet file",
                    )
                )
        if data.text_pair_column is not None:
            out.append(
                Finding(
                    ("data", "text_pair_column"),
                    "token-classification takes one list of words per record, not sentence pairs",
                    "remove text_pair_column",
                )
            )
    return out


def section_findings(raw: dict, view: Recipe, sections: frozenset[str], mode: Mode | None) -> list[Finding]:
    """Rules across sections, each run when the sections it needs are well-formed (`view` and
    `sections` as in LoadedRecipe)."""
    out = command_findings(raw, mode) + trust_findings(raw)
    if kind_of(raw) == "distill":
        if "distillation" in sections and view.distillation is not None:
            out.extend(distillation_findings(view.distillation, len(_teacher_list(raw))))
        if isinstance(raw["distillation"], dict):
            out.extend(_raw_match_findings(raw["distillation"].get("intermediate_matches")))
    if "data" in sections:
        out.extend(task_findings(raw, view.data))
    out.extend(causal_lm_findings(raw, view, sections))
    out.extend(parallel_findings(view, sections))
    return out
