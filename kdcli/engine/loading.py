"""The run's tokenizer, teachers and student, as the recipe names them."""

from __future__ import annotations

from collections.abc import Callable

from kdcli import data as kdata
from kdcli import models as kmodels
from kdcli.engine.recipe_facts import Mode
from kdcli.recipe import PretrainedModel


def load_models(recipe, mode: Mode, labels: kdata.Labels, warn: Callable[[str], None]):
    """The teachers (eval mode, frozen) and the student, for the recipe's task and labels."""
    task = recipe.task
    id2label = labels.id2label
    teachers = []
    if mode == "distill":
        # a teacher whose logits are used must keep its head, of the data's size
        uses_logits = recipe.distillation.uses_teacher_logits
        for ref in recipe.teachers:
            loaded = kmodels.load_model(
                ref.model,
                task,
                id2label=id2label,
                revision=ref.revision,
                trust_remote_code=ref.trust_remote_code,
                role="teacher",
                resize_head=not uses_logits,
                warn=warn,
            )
            if loaded.new_head:
                warn(
                    f"warning: teacher {ref.model} has no trained {labels.num_labels}-way head (a new "
                    "one was initialised at random), so its logits teach nothing. Fine-tune it first "
                    "with `kdcli train`"
                )
            teachers.append(loaded.model.eval().requires_grad_(False))
    student_ref = recipe.student
    if isinstance(student_ref, PretrainedModel):
        loaded = kmodels.load_model(
            student_ref.model,
            task,
            id2label=id2label,
            revision=student_ref.revision,
            trust_remote_code=student_ref.trust_remote_code,
            role="student",
            warn=warn,
        )
        return teachers, loaded.model
    init_from, layers = None, student_ref.init_from_teacher
    if layers is not None:
        if teachers:
            init_from = teachers[0]
        else:  # train mode: copy from the model the student's config comes from
            init_from = kmodels.load_model(
                recipe.init_source,
                task,
                id2label=id2label,
                revision=student_ref.revision,
                trust_remote_code=student_ref.trust_remote_code,
                role="student.config",
                warn=warn,
            ).model
    student = kmodels.build_student(
        student_ref.config,
        student_ref.overrides,
        task,
        labels.num_labels,
        id2label,
        init_from=init_from,
        init_layers=layers,
        revision=student_ref.revision,
        trust_remote_code=student_ref.trust_remote_code,
        warn=warn,
    )
    return teachers, student


def tokenizer_ref(recipe) -> tuple[str, str | None, bool]:
    """(reference, revision, trust_remote_code) of the tokenizer: the recipe's `tokenizer`,
    else the first teacher's, else the student's model (or config)."""
    if recipe.tokenizer:
        return recipe.tokenizer, None, False
    if recipe.teachers:
        t = recipe.teachers[0]
        return t.model, t.revision, t.trust_remote_code
    s = recipe.student
    return (getattr(s, "model", None) or s.config), s.revision, s.trust_remote_code
