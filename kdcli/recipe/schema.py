"""The recipe's schema (pydantic, extra="forbid"): training, matches, schedulers, distillation, Recipe."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdcli import registry
from kdcli.recipe.messages import did_you_mean, show, suggest
from kdcli.recipe.on_policy import OnPolicy
from kdcli.recipe.paths import check_path_text, default_output_dir, local_path, model_ref
from kdcli.recipe.sources import ConfigStudent, DataSection, PretrainedModel, Student, Teacher
from kdcli.recipe.temperature import TemperatureSpecError, parse_temperature_scheduler
from kdcli.recipe.validation import Mode, RecipeContext, Section, Task, context_of, is_int, kind_of, recipe_error
from kdcli.tasks import CHUNK_SIZE

#: keys of a match's `proj[3]` (options of the projection's optimizer parameter group)
PROJ_OPTION_KEYS = ("lr", "weight_decay", "betas", "eps")


#: the devices training.device (and the --device flag) accept; torch-free, for the run too
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


def is_device(text: str) -> bool:
    """Whether `text` names a device kdcli runs on ("auto", "cpu", "cuda", "cuda:N", "mps")."""
    return DEVICE_PATTERN.fullmatch(text) is not None


#: the seeds training.seed (and the --seed flag) accept: what torch and numpy seed from
SEED_RANGE = range(0, 2**32)


def check_max_steps(max_steps: int | None) -> None:
    """THE step bound of `--max-steps` (`kdcli distill/train`, `distill.run(max_steps=)`): 1 or more."""
    if max_steps is not None and max_steps < 1:
        from kdcli.errors import UsageError

        raise UsageError(f"--max-steps {max_steps} is not a number of steps. Fix: pass 1 or more")


class TrainingSection(Section):
    """Optimisation and bookkeeping; every field has a default."""

    num_epochs: int = Field(3, ge=1, description="Passes over the training data.")
    num_steps: int | None = Field(None, ge=1, description="Optimizer steps; when set it wins over num_epochs.")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-4, gt=0, allow_inf_nan=False)
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, allow_inf_nan=False, description="Fraction of steps of linear warm-up."
    )
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, allow_inf_nan=False, description="Gradient clipping norm; <= 0 disables.")
    seed: int = Field(42, ge=SEED_RANGE.start, lt=SEED_RANGE.stop)
    device: str = Field("auto", description='"auto", "cpu", "cuda", "cuda:N" or "mps".')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="The saved student's weights: fp32, or bf16 / fp16 (half the file; checkpoints stay fp32).",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp (replicated student) or fsdp (FSDP2: student and teachers sharded per block).",
    )
    log_every: int = Field(10, ge=1, description="Log every N optimizer steps.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end only).")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at the end only).")
    output_dir: str | None = Field(
        None,
        description="Where the final model is saved (save_pretrained); relative to the recipe's "
        "folder; default runs/<recipe file name without .json>.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not is_device(value):
            guess = suggest(value, ["auto", "cpu", "cuda", "mps"])
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise recipe_error(f"unknown device {show(value)}", f'use "auto", "cpu", "cuda", "cuda:N" or "mps"{hint}')
        return value

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise recipe_error("output_dir is empty", "write a folder path, e.g. runs/my-run")
        local = local_path(value, context_of(info).base)
        check_path_text(value, local)
        return local


def _proj_from_list(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    if not isinstance(value, list) or len(value) not in (3, 4):
        raise recipe_error(
            f"proj must be a list [kind, dim_S, dim_T] or [kind, dim_S, dim_T, {{options}}], got {show(value)}",
            'write e.g. "proj": ["linear", 312, 768]',
        )
    out = {"kind": value[0], "dim_S": value[1], "dim_T": value[2]}
    if len(value) == 4:
        out["options"] = value[3]
    return out


class Proj(Section):
    """`proj = [kind, dim_S, dim_T, {options}?]`: maps student features (dim_S) to dim_T."""

    kind: str = Field(json_schema_extra={"enum": registry.projection_names()})
    dim_S: int = Field(ge=1)
    dim_T: int = Field(ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if value not in registry.projection_names():
            raise recipe_error(f"unknown projection {show(value)}", did_you_mean(value, registry.projection_names()))
        return value

    @field_validator("options")
    @classmethod
    def _check_options(cls, value: dict) -> dict:
        for key, option in value.items():
            if key not in PROJ_OPTION_KEYS:
                raise recipe_error(f"unknown projection option {show(key)}", did_you_mean(key, PROJ_OPTION_KEYS))
            if key in ("lr", "weight_decay", "eps"):
                number = isinstance(option, (int, float)) and not isinstance(option, bool)
                low = 0 if key == "weight_decay" else 1e-300  # lr and eps must be > 0
                if not number or not math.isfinite(option) or option < low:
                    symbol = ">=" if key == "weight_decay" else ">"
                    raise recipe_error(
                        f"projection option {key} must be a finite number {symbol} 0, got {show(option)}",
                        f'write e.g. "{key}": 1e-3',
                    )
        return value


ProjField = Annotated[
    Proj,
    BeforeValidator(
        _proj_from_list,
        json_schema_input_type=(
            tuple[Literal[tuple(registry.projection_names())], int, int]  # type: ignore[misc]
            | tuple[Literal[tuple(registry.projection_names())], int, int, dict[str, Any]]  # type: ignore[misc]
        ),
    ),
]


def _check_layer(value: Any) -> Any:
    if is_int(value) or (isinstance(value, list) and value and all(is_int(x) for x in value)):
        return value
    raise recipe_error(
        f"a layer is an integer (or a list of two for {'/'.join(registry.loss_names_where(layers_per_side=2))}), got {show(value)}",
        "write e.g. 4, or [8, 8] for a two-layer loss",
    )


Layer = Annotated[int | list[int], BeforeValidator(_check_layer)]


class Match(Section):
    """One intermediate match, as TextBrewer's `IntermediateMatch`."""

    layer_T: Layer = Field(description="Teacher layer: hidden 0..L (0 = embeddings), attention 1..L.")
    layer_S: Layer = Field(description="Student layer, numbered as layer_T.")
    feature: Literal[tuple(registry.feature_names("match"))]  # type: ignore[valid-type]
    loss: str = Field(json_schema_extra={"enum": registry.loss_names("match")})
    weight: float = Field(ge=0, allow_inf_nan=False)
    proj: ProjField | None = None

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, value: str) -> str:
        if value in registry.loss_names("kd"):
            raise recipe_error(
                f"{show(value)} is a KD loss on logits, not an intermediate-match loss",
                "set it as distillation.kd_loss_type; here use one of: " + ", ".join(registry.loss_names("match")),
            )
        if value not in registry.loss_names("match"):
            raise recipe_error(f"unknown loss {show(value)}", did_you_mean(value, registry.loss_names("match")))
        return value

    @property
    def spec(self) -> registry.LossSpec:
        return registry.get_loss(self.loss)


def _normalise_temperature_scheduler(value: Any) -> Any:
    try:
        return parse_temperature_scheduler(value)
    except TemperatureSpecError as exc:
        raise recipe_error(exc.message, exc.fix) from None


TemperatureScheduler = Annotated[
    Literal["none"] | list[str | float],
    BeforeValidator(
        _normalise_temperature_scheduler,
        json_schema_input_type=(
            Literal[tuple(["none", *registry.scheduler_names("temperature")])]  # type: ignore[misc]
            | list[str | float | dict[str, float]]
        ),
    ),
]


def _weight_scheduler(value: str) -> str:
    names = ["none", *registry.scheduler_names("weight")]
    if value not in names:
        raise recipe_error(f"unknown weight scheduler {show(value)}", did_you_mean(value, names))
    return value


WeightScheduler = Annotated[str, Field(json_schema_extra={"enum": ["none", *registry.scheduler_names("weight")]})]


class TeacherCache(Section):
    """`distillation.teacher_cache`: the teachers' outputs per training row, kept on disk."""

    dir: str | None = Field(
        None,
        description="The cache's folder, relative to the recipe's folder; default <output_dir>/teacher-cache. "
        "Each set of inputs (teacher weights, tokenizer, rows, max_length, matches, dtype, ...) gets its own "
        "subfolder named by their sha256.",
    )
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="How logits, hidden states and scores are stored."
    )
    top_k: int = Field(
        64,
        ge=1,
        description="causal-lm: the teacher's top-k tokens kept per target token (kd_loss_options.top_k must equal it).",
    )

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise recipe_error(
                "teacher_cache.dir is empty", "write a folder path, or remove dir for <output_dir>/teacher-cache"
            )
        local = local_path(value, context_of(info).base)
        check_path_text(value, local)
        return local


class DistillationConfig(Section):
    """TextBrewer 0.2.1's `DistillationConfig`: same names, same defaults."""

    temperature: float = Field(4, gt=0, allow_inf_nan=False)
    temperature_scheduler: TemperatureScheduler = "none"
    hard_label_weight: float = Field(0, ge=0, allow_inf_nan=False)
    hard_label_weight_scheduler: WeightScheduler = "none"
    kd_loss_type: str = Field("ce", json_schema_extra={"enum": registry.loss_names("kd")})
    kd_loss_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the KD loss (kdcli list-losses): beta (jsd), alpha (skew_kl), t_squared, top_k, top_k_mode, normalise.",
    )
    chunk_size: int = Field(
        CHUNK_SIZE, ge=1, description="causal-lm: tokens per chunk of the KD loss (full-vocabulary logits never exist)."
    )
    kd_loss_weight: float = Field(1, ge=0, allow_inf_nan=False)
    kd_loss_weight_scheduler: WeightScheduler = "none"
    probability_shift: bool = False
    intermediate_matches: list[Match] = Field(default_factory=list)
    is_caching_logits: bool = False
    teacher_cache: TeacherCache | None = Field(
        None,
        description="Keep the teachers' outputs (logits, matched hidden states and attention scores; causal-lm: "
        "top-k log-probabilities) on disk per training row; later epochs and runs skip the teacher. Not with "
        "is_caching_logits.",
    )
    on_policy: OnPolicy | None = Field(
        None,
        description="causal-lm: completions the student samples (student_share, GKD's lambda) or the teacher "
        "writes (teacher_share) replace the dataset's for that share of each step's rows.",
    )

    _check_schedulers = field_validator("hard_label_weight_scheduler", "kd_loss_weight_scheduler")(_weight_scheduler)

    @field_validator("kd_loss_type")
    @classmethod
    def _check_kd_loss(cls, value: str) -> str:
        names = registry.loss_names("kd")
        if value not in names:
            hint = (
                f"{show(value)} is an intermediate-match loss; put it in intermediate_matches. KD losses: "
                + ", ".join(names)
                if value in registry.loss_names("match")
                else did_you_mean(value, names)
            )
            raise recipe_error(f"unknown kd_loss_type {show(value)}", hint)
        return value

    @field_validator("intermediate_matches", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def uses_teacher_logits(self) -> bool:
        """The KD term is active (a weight > 0 or a weight scheduler), so it reads the teachers'
        logits: their heads must fit the data's labels (the run and check-recipe both ask)."""
        return self.kd_loss_weight > 0 or self.kd_loss_weight_scheduler != "none"

    @property
    def uses_hard_labels(self) -> bool:
        return self.hard_label_weight > 0 or self.hard_label_weight_scheduler != "none"

    @property
    def kd_options(self) -> dict[str, Any]:
        """The KD loss's options: the registry's defaults, then what the recipe sets."""
        return {**registry.get_loss(self.kd_loss_type).option_defaults(), **self.kd_loss_options}


class Recipe(Section):
    """A kdcli recipe. `kdcli distill` needs `teacher` and `distillation`; `kdcli train` has neither."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        populate_by_name=True,
        title="kdcli recipe",
        json_schema_extra={"description": "A kdcli recipe: see docs/recipe.md."},
    )

    schema_: str | None = Field(None, alias="$schema", description="JSON Schema URL or path, for editors.")
    description: str | None = Field(None, description="Free text: what the recipe does and why.")
    teacher: Teacher | None = Field(
        None, description="Teacher model, or a list of teachers (their logits are averaged)."
    )
    student: Student = Field(
        description='{"model": ...} or {"config": ..., "overrides": {...}, "init_from_teacher": [...]}.'
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer (hub id, folder or pkg:); default: the first teacher's, else the student's model."
    )
    task: Task = "sequence-classification"
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    distillation: DistillationConfig | None = Field(None, description="Present in kdcli distill recipes only.")

    _source: Path | None = PrivateAttr(None)

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else model_ref(value, info)

    @model_validator(mode="after")
    def _defaults(self, info: ValidationInfo) -> Recipe:
        apply_defaults(self, context_of(info))
        return self

    @property
    def source(self) -> Path | None:
        """The recipe file (absolute), when loaded with `load_recipe`."""
        return self._source

    @property
    def teachers(self) -> list[PretrainedModel]:
        """The teachers as a list (a single `teacher` object becomes a one-element list)."""
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]

    @property
    def kind(self) -> Mode:
        """ "distill" when the recipe has a distillation section, else "train"."""
        return kind_of({"distillation": self.distillation})

    @property
    def init_source(self) -> str | None:
        """The model whose blocks `student.init_from_teacher` copies (first teacher, else `config`)."""
        if not isinstance(self.student, ConfigStudent) or self.student.init_from_teacher is None:
            return None
        return self.teachers[0].model if self.teachers else self.student.config


def recipe_json_schema() -> dict:
    """The JSON Schema of a recipe (what `kdcli schema` prints)."""
    schema = Recipe.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def apply_defaults(recipe: Recipe, ctx: RecipeContext) -> None:
    data = getattr(recipe, "data", None)  # None in check-recipe's best-effort view of a broken recipe
    if recipe.task == "causal-lm" and data is not None and "text_column" not in data.model_fields_set:
        data.text_column = "text"  # causal-lm text rows: the usual column name
    if recipe.training.output_dir is None:
        recipe.training.output_dir = default_output_dir(ctx.base, ctx.stem)
    if isinstance(recipe.student, ConfigStudent) and recipe.student.config is None and recipe.teachers:
        recipe.student.config = recipe.teachers[0].model
        if recipe.student.revision is None:
            recipe.student.revision = recipe.teachers[0].revision
        if recipe.student.gguf_file is None:
            recipe.student.gguf_file = recipe.teachers[0].gguf_file
