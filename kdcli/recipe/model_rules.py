"""check-recipe's model-aware rules: layers, sizes, heads, vocabulary, weights, labels."""

from __future__ import annotations

import os
from pathlib import Path

from kdcli import registry
from kdcli.facts.architectures import ATTENTION_MODEL_TYPES, attention_capture_supported
from kdcli.facts.modelinfo import (
    GENERIC_CONFIG_KEYS,
    ConfigUnavailable,
    GGUFFacts,
    ModelFacts,
    WeightsUnreadable,
    check_pickles,
    missing_weights,
    read_config,
    weight_disagreements,
    weight_shapes,
)
from kdcli.recipe.cache_rules import cache_findings
from kdcli.recipe.data_rules import values_shown
from kdcli.recipe.lm_rules import lm_findings
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.messages import JsonPath, show, suggest
from kdcli.recipe.prune_rules import prune_findings
from kdcli.recipe.resolve import Models, Resolver, gguf_file_at, student_ref_path, teacher_path
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Match, Recipe
from kdcli.recipe.sources import ConfigStudent
from kdcli.recipe.vocab_rules import shared_vocab_findings, vocab_findings

_HEADLESS_FIX = "fine-tune the teacher on the task first (kdcli train), or point teacher.model at a fine-tuned model"


def _layer_range(feature: str, layers: int) -> tuple[int, int, str]:
    if feature == "hidden":
        return 0, layers, f"hidden layers 0..{layers}, 0 being the embeddings"
    return 1, layers, f"attention layers 1..{layers}"


def _type_source(facts: ModelFacts) -> str:
    return "its GGUF header's general.architecture" if isinstance(facts, GGUFFacts) else "config.json model_type"


def _attention_capture_findings(at: JsonPath, teacher: ModelFacts | None, student: ModelFacts | None) -> list[Finding]:
    """An attention match on a model whose config.json `model_type` kdcli cannot capture
    attention scores of (`kdcli.facts.architectures`), as the run would refuse it."""
    out = []
    for who, facts in (("teacher", teacher), ("student", student)):
        if facts is not None and facts.model_type is not None and not attention_capture_supported(facts.model_type):
            out.append(
                Finding(
                    at + ("feature",),
                    f"the {who} is a {show(facts.model_type)} model ({_type_source(facts)}): kdcli computes attention "
                    f"features for {', '.join(ATTENTION_MODEL_TYPES)} models only",
                    'match hidden features instead ("feature": "hidden" with a hidden loss such as hidden_mse), '
                    f"or use a {who} of one of those types",
                )
            )
    return out


def proj_size_findings(at: JsonPath, match: Match, d_s: int | None, d_t: int | None) -> list[Finding]:
    """THE proj rule (check-recipe and the run's `Objective`): a hidden match's `proj` maps the
    student's hidden size to the teacher's; a loss that needs equal sizes gets a proj when they differ."""
    out: list[Finding] = []
    if match.feature != "hidden":
        return out
    proj = match.proj
    if proj is not None:
        fixed = [proj.kind, d_s or proj.dim_S, d_t or proj.dim_T]
        for pos, name, written, size, who in (
            (1, "dim_S", proj.dim_S, d_s, "student"),
            (2, "dim_T", proj.dim_T, d_t, "teacher"),
        ):
            if size is not None and written != size:
                message = f"proj {name} is {written} but the {who}'s hidden size is {size}"
                out.append(Finding(at + ("proj", pos), message, f"write {show(fixed)}"))
    elif match.spec.needs_proj_when_sizes_differ and d_s is not None and d_t is not None and d_s != d_t:
        free = "/".join(registry.loss_names_where(feature="hidden", same_size=None))
        out.append(
            Finding(
                at + ("proj",),
                f"{match.loss} needs equal hidden sizes, but the student's is {d_s} and the teacher's {d_t}",
                f'add "proj": {show(["linear", d_s, d_t])} ({free} accept different sizes)',
            )
        )
    return out


def match_model_findings(
    matches: list[tuple[int, Match]], teacher: ModelFacts | None, student: ModelFacts | None
) -> list[Finding]:
    """Layer numbers, projection sizes and head counts of the (index, match) pairs."""
    out: list[Finding] = []
    for i, match in matches:
        at: JsonPath = ("distillation", "intermediate_matches", i)
        spec = match.spec
        for side, facts, who in (("layer_T", teacher, "teacher"), ("layer_S", student, "student")):
            if facts is None or facts.num_hidden_layers is None:
                continue
            layer = getattr(match, side)
            low, high, described = _layer_range(match.feature, facts.num_hidden_layers)
            for j, number in enumerate(layer if isinstance(layer, list) else [layer]):
                if number > high:
                    where = at + ((side, j) if isinstance(layer, list) else (side,))
                    out.append(
                        Finding(
                            where,
                            f"{side} {number} does not exist: the {who} has {facts.num_hidden_layers} layers ({described})",
                            f"use a layer from {low} to {high}",
                        )
                    )
        if match.feature == "attention":
            out.extend(_attention_capture_findings(at, teacher, student))
        d_s = student.hidden_size if student else None
        d_t = teacher.hidden_size if teacher else None
        out.extend(proj_size_findings(at, match, d_s, d_t))
        if spec.same_size == "heads" and student and teacher:
            h_s, h_t = student.num_attention_heads, teacher.num_attention_heads
            if h_s is not None and h_t is not None and h_s != h_t:
                variant = registry.heads_free_variant(match.loss) or ""
                out.append(
                    Finding(
                        at + ("loss",),
                        f"{match.loss} compares head by head, but the student has {h_s} attention heads and the teacher {h_t}",
                        f"use {variant} (sums/averages over heads) or models with equal head counts",
                    )
                )
    return out


def init_findings(
    recipe: Recipe, loaded: LoadedRecipe, source: ModelFacts | None, student: ModelFacts | None
) -> list[Finding]:
    """`student.init_from_teacher`: one existing block per student block, of the same shape."""
    out: list[Finding] = []
    cs = recipe.student
    if not isinstance(cs, ConfigStudent) or cs.init_from_teacher is None:
        return out
    at: JsonPath = ("student", "init_from_teacher")
    who = "teacher" if recipe.teachers else "config model"
    measure = cs.init_measure
    if measure is not None:  # the blocks are chosen at run time; only the count can be checked now
        blocks = []
        if source is not None and source.num_hidden_layers is not None and measure.keep > source.num_hidden_layers:
            out.append(
                Finding(
                    at + ("keep",),
                    f"keep {measure.keep} blocks, but the {who} has {source.num_hidden_layers}",
                    f"keep at most {source.num_hidden_layers}",
                )
            )
    else:
        blocks = cs.init_from_teacher
    if (
        measure is None
        and student is not None
        and student.num_hidden_layers is not None
        and len(blocks) != student.num_hidden_layers
    ):
        out.append(
            Finding(
                at,
                f"init_from_teacher lists {len(blocks)} blocks but the student has {student.num_hidden_layers} layers",
                "list exactly one teacher block per student block (or change overrides.num_hidden_layers)",
            )
        )
    if source is not None and source.num_hidden_layers is not None:
        for i, block in enumerate(blocks):
            if block > source.num_hidden_layers:
                out.append(
                    Finding(
                        at + (i,),
                        f"block {block} does not exist: the {who} has blocks 1..{source.num_hidden_layers}",
                        f"use blocks from 1 to {source.num_hidden_layers}",
                    )
                )
    if source is not None and student is not None:
        for fact in ("hidden_size", "num_attention_heads", "intermediate_size"):
            s, t = getattr(student, fact), getattr(source, fact)
            if s is not None and t is not None and s != t:
                where = ("student", "overrides", fact) if fact in cs.overrides else at
                out.append(
                    Finding(
                        where,
                        f"init_from_teacher copies blocks of {fact} {t}, but the student's {fact} is {s}",
                        f"keep the {who}'s {fact} ({t}), or remove init_from_teacher",
                    )
                )
        if source.model_type and student.model_type and source.model_type != student.model_type:
            out.append(
                Finding(
                    at,
                    f"init_from_teacher copies {source.model_type} blocks into a {student.model_type} student",
                    "use a student config of the same architecture",
                )
            )
    return out


def override_findings(recipe: Recipe, base: ModelFacts | None) -> list[Finding]:
    """Every override names a field of the base config (a close miss is an error, others warn)."""
    out: list[Finding] = []
    cs = recipe.student
    if not isinstance(cs, ConfigStudent) or base is None or not base.config_keys:
        return out
    known = set(base.config_keys) | GENERIC_CONFIG_KEYS
    for key in cs.overrides:
        if key in known:
            continue
        guess = suggest(key, sorted(base.config_keys))
        if guess is not None:
            out.append(
                Finding(
                    ("student", "overrides", key),
                    f"override {show(key)} is not a field of the base config",
                    f"did you mean '{guess}'?",
                    at_key=True,
                )
            )
        else:
            out.append(
                Finding(
                    ("student", "overrides", key),
                    f"override {show(key)} is not in the base config; transformers will keep it as an extra attribute that the model may ignore",
                    "check the field name in the model's configuration class",
                    "warning",
                    at_key=True,
                )
            )
    return out


_NO_WEIGHTS_FIX = (
    "save the model there with "
    "save_pretrained (config.json with model.safetensors), or point at the folder that holds them"
)
_WEIGHTS_CONFIG_FIX = (
    "use the config.json that was saved with these weights (it must describe the tensors in the "
    "file), or save the model again with save_pretrained"
)


def weight_findings(recipe: Recipe, models: Models) -> list[Finding]:
    """Each loaded model folder's safetensors headers are whole and agree with its config.json
    (vocabulary rows, embedding width, block count, hidden width, head rows)."""
    out: list[Finding] = []
    seen: set[str] = set()
    for path, role, ref, _ in models.refs:
        if role == "student config" and not (recipe.init_source and not recipe.teachers):
            continue  # a student built from a config: no weights are loaded from there
        folder = Path(ref) if os.path.isabs(ref) else None
        if folder is None or ref in seen or gguf_file_at(recipe, path) or not (folder / "config.json").is_file():
            continue
        seen.add(ref)
        missing = missing_weights(folder)
        if missing is not None:  # distill's from_pretrained would refuse it
            out.append(Finding(path, f"the {role}'s folder has a config.json but {missing}", _NO_WEIGHTS_FIX))
            continue
        try:
            shapes = weight_shapes(folder)
            check_pickles(folder)
            config = read_config(folder) if shapes else {}
        except WeightsUnreadable as exc:
            reason = exc.reason.replace(str(folder) + os.sep, "")  # the finding's path names the folder
            out.append(Finding(path, f"the {role}'s weights cannot be read: {reason}", exc.fix))
            continue
        except ConfigUnavailable:
            continue
        disagreements = weight_disagreements(shapes or {}, config)
        if disagreements:
            more = f" (and {len(disagreements) - 3} more)" if len(disagreements) > 3 else ""
            out.append(
                Finding(
                    path,
                    f"the {role}'s config.json disagrees with its weights: {'; '.join(disagreements[:3])}{more}; "
                    "loading it would start those tensors at random",
                    _WEIGHTS_CONFIG_FIX,
                )
            )
    return out


def block_count_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """Every model the run builds has at least one transformer block (a config with
    num_hidden_layers 0 has nothing to distil from or into)."""
    out: list[Finding] = []
    named = [(teacher_path(recipe, i) + ("model",), "teacher", r.facts) for i, r in enumerate(models.teachers)]
    if models.student.facts is not None and not models.student.partial:
        named.append((student_ref_path(recipe, loaded), "student", models.student.facts))
    for path, role, facts in named:
        if facts is not None and facts.num_hidden_layers is not None and facts.num_hidden_layers < 1:
            out.append(
                Finding(
                    path,
                    f"the {role} has {facts.num_hidden_layers} transformer blocks ({facts.source}): "
                    "there is no model to run",
                    f"use a {role} with 1 or more blocks"
                    + (' (or set student.overrides "num_hidden_layers")' if role == "student" else ""),
                )
            )
    return out


def _max_length_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """data.max_length fits the position embeddings of every model (the first that is short)."""
    if "data" not in loaded.sections:
        return []
    for role, facts in [("teacher", r.facts) for r in models.teachers] + [("student", models.student.facts)]:
        limit = facts.max_position_embeddings if facts else None
        if limit is not None and recipe.data.max_length > limit:
            return [
                Finding(
                    ("data", "max_length"),
                    f"max_length {recipe.data.max_length} exceeds the {role}'s {limit} position embeddings",
                    f"use max_length <= {limit}",
                )
            ]
    return []


def _teacher_head_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models, resolver: Resolver) -> list[Finding]:
    """When the KD loss reads the teachers' logits: each teacher has a head for the task, with
    as many classes as the data has labels (counted as the run counts them)."""
    out: list[Finding] = []
    kd = recipe.distillation
    if kd is None or not kd.uses_teacher_logits or "data" not in loaded.sections or recipe.task == "causal-lm":
        return out
    scan = resolver.labels(recipe.data)
    data_labels = scan.labels
    for i, t in enumerate(models.teachers):
        facts = t.facts
        if facts is None:
            continue
        path = teacher_path(recipe, i) + ("model",)
        if facts.head not in (None, recipe.task):
            kind = "no classification head" if facts.head == "" else f"a {facts.head} head"
            out.append(
                Finding(
                    path,
                    f"the teacher has {kind} for {recipe.task} (config: {facts.source}); its logits would come from a randomly initialised head",
                    _HEADLESS_FIX,
                    "warning",
                )
            )
        elif facts.head == recipe.task and facts.num_labels is not None and data_labels is not None:
            n_data = data_labels.num_labels
            if n_data > facts.num_labels or (scan.complete and n_data != facts.num_labels):
                also = ", counting data.eval too" if recipe.data.eval is not None else ""
                shown = data_labels.describe() if values_shown(recipe, loaded) else f"{n_data} labels"
                out.append(
                    Finding(
                        path,
                        f"the teacher's head has {facts.num_labels} classes but data.train has {shown}{also}: the teacher cannot produce these labels",
                        "distil on data labelled like the teacher's training data, or use a teacher trained on these labels",
                    )
                )
    return out


def model_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models, resolver: Resolver) -> list[Finding]:
    """All rules that need the models' configs (each skipped where a fact is unknown)."""
    teachers = models.teachers
    s = models.student.facts
    out = match_model_findings(loaded.matches, teachers[0].facts if teachers else None, s)
    if "student" in loaded.sections:
        out += init_findings(recipe, loaded, models.init_source.facts if models.init_source else None, s)
        out += override_findings(recipe, models.base.facts if models.base else None)
        out += prune_findings(recipe, loaded, models)
    out += weight_findings(recipe, models)
    out += block_count_findings(recipe, loaded, models)
    vocab, tokens_compared = vocab_findings(recipe, loaded, models)
    out += vocab
    if not tokens_compared:
        out += shared_vocab_findings(recipe, loaded, models)
    out += _max_length_findings(recipe, loaded, models)
    out += _teacher_head_findings(recipe, loaded, models, resolver)
    out += lm_findings(recipe, loaded, models)
    out += cache_findings(recipe, loaded, models)
    return out


def unchecked_rules(recipe: Recipe, loaded: LoadedRecipe, role: str) -> list[str]:
    rules = []
    matches = [m for _, m in loaded.matches]
    if matches:
        rules.append("layer numbers")
        if any(m.feature == "hidden" for m in matches):
            rules.append("hidden sizes and proj")
        if any(m.spec.same_size == "heads" for m in matches):
            rules.append("attention heads")
    if recipe.teachers and (matches or recipe.task in ("token-classification", "causal-lm")):
        rules.append("shared vocabulary")
    if (
        role in ("init", "student config")
        and isinstance(recipe.student, ConfigStudent)
        and recipe.student.init_from_teacher
    ):
        rules.append("init_from_teacher")
    if role == "student config" and isinstance(recipe.student, ConfigStudent) and recipe.student.overrides:
        rules.append("override names")
    if role == "teacher" and recipe.distillation is not None and recipe.task != "causal-lm":
        rules.append("teacher head and labels")
    rules.append("max_length")
    return list(dict.fromkeys(rules))
