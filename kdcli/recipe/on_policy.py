"""`distillation.on_policy`: the share of each step's rows whose completion the student samples
(GKD's lambda) or the teacher writes (sequence-level KD), and how they sample (torch-free)."""

from __future__ import annotations

from pydantic import Field, model_validator

from kdcli.recipe.validation import Section, recipe_error


class OnPolicy(Section):
    """On-policy distillation for causal-lm `prompt-completion` and `messages` rows: the prompt is
    everything before the last assistant turn, and a generated completion replaces that turn."""

    student_share: float = Field(
        0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="GKD's lambda: the share of each step's rows whose completion the student samples.",
    )
    teacher_share: float = Field(
        0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Sequence-level KD: the share of each step's rows the (first) teacher completes.",
    )
    max_new_tokens: int = Field(
        128, ge=1, description="The longest completion; one cut here gets no end marker (it counts as cut)."
    )
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling (1: off).")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: off).")

    @model_validator(mode="after")
    def _shares_fit(self) -> OnPolicy:
        total = self.student_share + self.teacher_share
        if total > 1 + 1e-9:
            raise recipe_error(
                f"student_share {self.student_share:g} + teacher_share {self.teacher_share:g} = {total:g}, "
                "above 1 (they are shares of each step's rows)",
                "lower one of them so that they sum to at most 1 (the rest keep the dataset's completion)",
            )
        return self

    @property
    def generates(self) -> bool:
        """Any row of a step gets a generated completion."""
        return self.student_share > 0 or self.teacher_share > 0
