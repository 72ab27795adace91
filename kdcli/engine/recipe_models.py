"""The run's tokenizer, teachers and student, as the recipe names them."""

from __future__ import annotations

from collections.abc import Callable

from kdcli import data as kdata
from kdcli import models as kmodels
from kdcli.engine.recipe_facts import Mode
from kdcli.recipe import PretrainedModel


def load_models(
    recipe,
    mode: Mode,
    labels: kdata.Labels | None,
    warn: Callable[[str], None],
    sample_batches: Callable | None = None,
    say: Callable[[str], None] | None = None,
):
    """The teachers (eval mode, frozen), the student, for the recipe's task and labels (None
    for causal-lm: the head is the vocabulary's), and the `BlockRanking` that chose the
    student's blocks when `init_from_teacher` is a measurement (else None), measured on
    `sample_batches()` and announced with `say`."""
    task = recipe.task
    id2label = labels.id2label if labels is not None else None
    num_labels = labels.num_labels if labels is not None else None
    teachers = load_teachers(recipe, labels, warn) if mode == "distill" else []
    student_ref = recipe.student

    def load_student_side(ref: str, role: str):
        """The student's weights (`role` "student") or the model its config comes from ("student.config")."""
        return kmodels.load_model(
            ref,
            task,
            id2label=id2label,
            revision=student_ref.revision,
            trust_remote_code=student_ref.trust_remote_code,
            role=role,
            warn=warn,
            gguf_file=student_ref.gguf_file,
        ).model

    if isinstance(student_ref, PretrainedModel):
        return teachers, load_student_side(student_ref.model, "student"), None
    if student_ref.prune is not None:
        return teachers, *_pruned_student(recipe, teachers, id2label, warn, sample_batches, say)
    init_from, layers, ranking = None, student_ref.init_blocks, None
    measure = student_ref.init_measure
    if layers is not None or measure is not None:
        if teachers:
            init_from = teachers[0]
        else:  # train mode: copy from the model the student's config comes from
            init_from = load_student_side(recipe.init_source, "student.config")
    if measure is not None:
        from kdcli.compress.blocks import choose_blocks

        assert init_from is not None and sample_batches is not None  # set above; a measure comes with data
        ranking = choose_blocks(init_from, sample_batches, measure.keep, measure.by)
        layers = list(ranking.kept)
        if say is not None:
            say(f"student.init_from_teacher: {ranking.describe()}")
    student = kmodels.build_student(
        student_ref.config,
        student_ref.overrides,
        task,
        num_labels,
        id2label,
        init_from=init_from,
        init_layers=layers,
        revision=student_ref.revision,
        trust_remote_code=student_ref.trust_remote_code,
        warn=warn,
        gguf_file=student_ref.gguf_file,
    )
    source = init_from if init_from is not None else (teachers[0] if teachers else None)
    if source is not None and getattr(source, "generation_config", None) is not None and recipe.task == "causal-lm":
        # a student built from the teacher's config generates as the teacher does (eos, pad, ...)
        import copy

        student.generation_config = copy.deepcopy(source.generation_config)
    return teachers, student, ranking


def load_teachers(recipe, labels: kdata.Labels | None, warn: Callable[[str], None]) -> list:
    """The recipe's teachers (eval mode, frozen) for its task and labels; a teacher whose logits
    are used keeps its head, of the data's size (a new random head is warned about)."""
    id2label = labels.id2label if labels is not None else None
    uses_logits = recipe.distillation.uses_teacher_logits
    teachers = []
    for ref in recipe.teachers:
        loaded = kmodels.load_model(
            ref.model,
            recipe.task,
            id2label=id2label,
            revision=ref.revision,
            trust_remote_code=ref.trust_remote_code,
            role="teacher",
            resize_head=not uses_logits,
            warn=warn,
            gguf_file=ref.gguf_file,
        )
        if loaded.new_head and labels is not None:
            warn(
                f"warning: teacher {ref.model} has no trained {labels.num_labels}-way head (a new "
                "one was initialised at random), so its logits teach nothing. Fine-tune it first "
                "with `kdcli train`"
            )
        teachers.append(loaded.model.eval().requires_grad_(False))
    return teachers


def prune_source(recipe, teachers: list, warn: Callable[[str], None]):
    """The model `student.prune` slices: the first teacher when the student's config is its
    model (already loaded), else the config's model, loaded."""
    s = recipe.student
    if teachers and (s.config, s.gguf_file, s.revision) == (
        recipe.teachers[0].model,
        recipe.teachers[0].gguf_file,
        recipe.teachers[0].revision,
    ):
        return teachers[0]
    return kmodels.load_model(
        s.config,
        recipe.task,
        revision=s.revision,
        trust_remote_code=s.trust_remote_code,
        role="student.prune.from",
        warn=warn,
        gguf_file=s.gguf_file,
    ).model.eval()


def _pruned_student(recipe, teachers, id2label, warn, sample_batches, say):
    """(student, PrunePlan) of `student.prune`, measured on the first `prune.rows` rows."""
    from kdcli.compress.prune import prune_model

    spec = recipe.student.prune
    student, plan = prune_model(prune_source(recipe, teachers, warn), spec, sample_batches, recipe.student.overrides)
    if say is not None:
        sizes = ", ".join(f"{k} {v}" for k, v in plan.sizes.items())
        say(f"student.prune: {sizes}; blocks {list(plan.layers)}; measured on {plan.importance.tokens} tokens")
    return student, plan


def tokenizer_ref(recipe) -> tuple[str, str | None, bool, str | None]:
    """(reference, revision, trust_remote_code, gguf_file) of the tokenizer: the recipe's
    `tokenizer`, else the first teacher's, else the student's model (or config); a GGUF
    model's tokenizer is the one inside its file."""
    if recipe.tokenizer:
        return recipe.tokenizer, None, False, None
    if recipe.teachers:
        t = recipe.teachers[0]
        return t.model, t.revision, t.trust_remote_code, t.gguf_file
    s = recipe.student
    return (getattr(s, "model", None) or s.config), s.revision, s.trust_remote_code, s.gguf_file
