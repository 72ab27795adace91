"""The schema of the models and data a recipe names: teacher, student, data."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdcli.recipe.messages import show
from kdcli.recipe.paths import check_path_text, data_format_of, local_path, looks_local_data, model_ref
from kdcli.recipe.prune_schema import PruneSpec
from kdcli.recipe.validation import DataFormat, RowFormat, Section, context_of, recipe_error

#: model config fields that `student.overrides` must give as positive integers
SIZE_OVERRIDES = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _gguf_name(value: str | None) -> str | None:
    """A GGUF file's name inside its model folder: a plain relative name ending in .gguf."""
    if value is None:
        return None
    if not value.endswith(".gguf") or value.startswith(("/", "~")) or ".." in value.split("/") or "\\" in value:
        raise recipe_error(
            f"gguf_file must be the name of a .gguf file inside the model folder, got {show(value)}",
            'write e.g. "gguf_file": "model.Q4_1.gguf" and put the folder in "model"',
        )
    check_path_text(value)
    return value


class PretrainedModel(Section):
    """A model loaded with `from_pretrained`: a teacher, or a student given by `model`."""

    model: str = Field(description="Hub id, local folder (relative to the recipe's folder), or pkg:<package>/<folder>.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code.")
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `model` (e.g. model.Q4_1.gguf), dequantized by transformers "
        "(needs the gguf package); causal-lm only.",
    )

    _check_model = field_validator("model")(model_ref)
    _check_gguf = field_validator("gguf_file")(lambda v: _gguf_name(v))

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.model)


#: how `student.init_from_teacher` may choose the blocks by measurement (`kdcli.compress.block_ranking`)
INIT_MEASURES = ("angular_distance", "block_influence", "evenly_spaced")


class InitByMeasure(Section):
    """`init_from_teacher` chosen by measurement on the recipe's first training rows."""

    keep: int = Field(ge=1, description="Teacher blocks to keep (the student's layer count).")
    by: Literal[INIT_MEASURES] = Field(  # type: ignore[valid-type]
        "angular_distance",
        description="angular_distance (Gromov et al. 2024: drop the contiguous run that changes the hidden state "
        "least), block_influence (ShortGPT: drop the blocks whose output is closest to their input), or "
        "evenly_spaced.",
    )
    rows: int = Field(32, ge=1, le=10_000, description="Training rows measured (the first N).")


def _init_form(value: Any) -> str:
    return "<measure>" if isinstance(value, (dict, InitByMeasure)) else "<blocks>"


InitFromTeacher = Annotated[
    Annotated[list[int], Tag("<blocks>")] | Annotated[InitByMeasure, Tag("<measure>")],
    Discriminator(_init_form),
]


class ConfigStudent(Section):
    """A student built from a config (plus overrides), optionally initialised from teacher blocks."""

    config: str | None = Field(
        None,
        description="Model whose config.json is the base (hub id, folder or pkg:); "
        "defaults to the first teacher's model.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='Hugging Face config fields to change, e.g. {"num_hidden_layers": 3}.',
    )
    init_from_teacher: InitFromTeacher | None = Field(
        None,
        description="Teacher blocks (1..L) copied into the student's blocks in order; one per "
        "student block. In a train recipe, blocks of the model named by `config`. Or "
        '{"keep": K, "by": "angular_distance"}: the K blocks chosen by measurement on the training rows.',
    )
    prune: PruneSpec | None = Field(
        None,
        description='Slice the student out of a model by measured importance: {"hidden_size": 384, '
        '"num_hidden_layers": 24, ...} (docs/compress.md).',
    )
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = Field(
        None, description="A GGUF file inside `config` whose header is the base config (default: the teacher's)."
    )

    _check_gguf = field_validator("gguf_file")(lambda v: _gguf_name(v))

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else model_ref(value, info)

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict) -> dict:
        for key in SIZE_OVERRIDES:
            if key in value:
                size = value[key]
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    raise recipe_error(
                        f"overrides.{key} must be a positive integer, got {show(size)}",
                        f'write e.g. "{key}": {3 if key == "num_hidden_layers" else 384}',
                    )
        hidden, heads = value.get("hidden_size"), value.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
            raise recipe_error(
                f"overrides.hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                "choose sizes with hidden_size % num_attention_heads == 0 (e.g. 384 and 12)",
            )
        return value

    @model_validator(mode="after")
    def _pruned_sizes(self) -> ConfigStudent:
        prune = self.prune
        if prune is None:
            return self
        if self.init_from_teacher is not None:
            raise recipe_error(
                "prune and init_from_teacher both say where the student's weights come from",
                "keep one: prune (depth via prune.num_hidden_layers and prune.depth_by) or init_from_teacher",
            )
        if prune.source is not None and self.config is not None and prune.source != self.config:
            raise recipe_error(
                f"prune.from {show(prune.source)} and config {show(self.config)} name different models",
                "remove config (prune.from becomes the student's config)",
            )
        if prune.source is not None:
            self.config = prune.source
        for key, size in prune.sizes().items():
            if key in self.overrides and self.overrides[key] != size:
                raise recipe_error(
                    f"prune.{key} is {size} but overrides.{key} is {show(self.overrides[key])}",
                    f"remove overrides.{key} (prune sets it)",
                )
            self.overrides[key] = size
        return self

    @model_validator(mode="after")
    def _measured_layers(self) -> ConfigStudent:
        measure = self.init_measure
        if measure is None:
            return self
        layers = self.overrides.get("num_hidden_layers")
        if layers is None:
            self.overrides["num_hidden_layers"] = measure.keep
        elif layers != measure.keep:
            raise recipe_error(
                f"init_from_teacher keeps {measure.keep} blocks but overrides.num_hidden_layers is {show(layers)}",
                f"remove overrides.num_hidden_layers (keep sets it), or make it {measure.keep}",
            )
        return self

    @property
    def init_measure(self) -> InitByMeasure | None:
        """The measurement that chooses the blocks, when `init_from_teacher` is one."""
        return self.init_from_teacher if isinstance(self.init_from_teacher, InitByMeasure) else None

    @property
    def init_blocks(self) -> list[int] | None:
        """The blocks `init_from_teacher` lists (None when unset or chosen by measurement)."""
        return self.init_from_teacher if isinstance(self.init_from_teacher, list) else None

    @field_validator("init_from_teacher")
    @classmethod
    def _check_init(cls, value):
        if value is None or isinstance(value, InitByMeasure):
            return value
        if not value:
            raise recipe_error(
                "init_from_teacher is an empty list",
                "list one teacher block per student block, e.g. [2, 4, 6], or remove it",
            )
        for block in value:
            if block < 1:
                raise recipe_error(
                    f"init_from_teacher lists block {block}; blocks are numbered 1..L",
                    "use block numbers from 1 (the first transformer block) to the teacher's layer count",
                )
        return value


def _student_form(value: Any) -> str | None:
    if isinstance(value, dict):
        return "<pretrained>" if "model" in value else "<config>"
    if isinstance(value, PretrainedModel):
        return "<pretrained>"
    if isinstance(value, ConfigStudent):
        return "<config>"
    return None


def _check_student_shape(value: Any) -> Any:
    if not isinstance(value, (dict, PretrainedModel, ConfigStudent)):
        raise recipe_error(
            f"student must be an object, got {show(value)}",
            'write {"model": "<hub id or folder>"} or {"config": "<model>", "overrides": {...}}',
        )
    return value


Student = Annotated[
    Annotated[PretrainedModel, Tag("<pretrained>")] | Annotated[ConfigStudent, Tag("<config>")],
    Discriminator(_student_form),
    BeforeValidator(_check_student_shape),
]


def _teacher_form(value: Any) -> str | None:
    if isinstance(value, (dict, PretrainedModel)):
        return "<one>"
    if isinstance(value, list):
        return "<list>"
    return None


def _check_teacher_shape(value: Any) -> Any:
    if isinstance(value, str):
        raise recipe_error(
            "teacher must be an object, not a string",
            f'write "teacher": {{"model": {show(value)}}}',
        )
    if isinstance(value, list) and not value:
        raise recipe_error("teacher is an empty list", 'name at least one teacher: [{"model": "..."}]')
    if not isinstance(value, (dict, list, PretrainedModel)):
        raise recipe_error(
            f"teacher must be an object or a list of objects, got {show(value)}",
            'write {"model": "<hub id or folder>"} or a list of such objects (multi-teacher)',
        )
    return value


Teacher = Annotated[
    Annotated[PretrainedModel, Tag("<one>")] | Annotated[list[PretrainedModel], Tag("<list>")],
    Discriminator(_teacher_form),
    BeforeValidator(_check_teacher_shape),
]


class DataSource(Section):
    """A data file (csv, tsv, json, jsonl, parquet) or a hub dataset."""

    path: str = Field(description="File path (relative to the recipe's folder) or hub dataset id.")
    format: DataFormat | None = Field(
        None, validate_default=True, description="File format; inferred from the extension."
    )
    delimiter: str | None = Field(
        None, validate_default=True, description="csv field delimiter (default ','); tsv is always a tab."
    )
    split: str | None = Field(
        None, description="Hub dataset split (default: train for data.train, validation for data.eval)."
    )
    config: str | None = Field(None, description="Hub dataset configuration name, e.g. sst2 of glue.")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise recipe_error("the data path is empty", "write a file path or a hub dataset id")
        check_path_text(value)
        base = context_of(info).base
        if not looks_local_data(value, base):
            return value
        local = local_path(value, base)
        check_path_text(value, local)
        return local

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if path is None:
            return value
        local = os.path.isabs(path)
        if not local:
            if value is not None:
                raise recipe_error(
                    f"format {show(value)} applies to local files; {show(path)} is a hub dataset",
                    "remove format, or give a local file path (starting with ./ for a relative one)",
                )
            return None
        if value is None:
            value = data_format_of(path)
            if value is None:
                raise recipe_error(
                    f"cannot tell the format of {show(os.path.basename(path))} from its extension",
                    "use a .csv, .tsv, .json, .jsonl or .parquet file, or set format",
                )
        return value

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if "format" not in info.data:
            return value
        if fmt == "tsv":
            if value not in (None, "\t"):
                raise recipe_error(
                    f"delimiter {show(value)} contradicts format tsv (always tab-separated)",
                    "remove delimiter, or use format csv with this delimiter",
                )
            return "\t"
        if fmt == "csv":
            if value is None:
                return ","
            if len(value) != 1:
                raise recipe_error(f"delimiter must be one character, got {show(value)}", 'write e.g. ";" or "|"')
            return value
        if value is not None:
            raise recipe_error(
                f"delimiter applies to csv files, not {fmt or 'hub datasets'}",
                "remove delimiter",
            )
        return None

    @field_validator("split", "config")
    @classmethod
    def _hub_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if value is not None and path is not None and os.path.isabs(path):
            raise recipe_error(
                f"{info.field_name} applies to hub datasets; {show(os.path.basename(path))} is a local file",
                f"remove {info.field_name} (a local file is one split)",
            )
        return value

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.path)


def _source_from_string(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


SourceField = Annotated[DataSource, BeforeValidator(_source_from_string, json_schema_input_type=str | DataSource)]


class DataSection(Section):
    """Where the examples come from and how they are tokenised."""

    train: SourceField = Field(description="Training data: a path / hub id, or an object.")
    eval: SourceField | None = Field(None, description="Evaluation data (optional).")
    text_column: str = Field(
        "sentence",
        description='Column of texts (token-classification: lists of words; causal-lm text rows: default "text").',
    )
    text_pair_column: str | None = Field(None, description="Second text column for sentence pairs.")
    label_column: str = Field("label", description="Column of labels (token-classification: lists of tags).")
    max_length: int = Field(128, ge=1, le=1_000_000, description="Tokens per example after truncation.")
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N evaluation examples.")
    group_by_length: bool = Field(True, description="Batch examples of similar length together.")
    row_format: RowFormat = Field(
        "text",
        description="causal-lm: text (every token is a target), prompt-completion (the completion's "
        "tokens are), messages (chat turns rendered with the chat template; the assistant turns are).",
    )
    prompt_column: str = Field("prompt", description="causal-lm prompt-completion: the prompt column.")
    completion_column: str = Field("completion", description="causal-lm prompt-completion: the completion column.")
    messages_column: str = Field(
        "messages", description='causal-lm messages: a list of {"role", "content"} turns per row.'
    )

    @model_validator(mode="after")
    def _default_splits(self) -> DataSection:
        if not self.train.is_local and self.train.split is None:
            self.train.split = "train"
        if self.eval is not None and not self.eval.is_local and self.eval.split is None:
            self.eval.split = "validation"
        return self
