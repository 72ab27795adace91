"""The recipe: one JSON file describing a distillation (`kdcli distill`) or a training run
(`kdcli train`), and `kdcli check-recipe`, which checks it against the models and data it names.

Reading a recipe happens in four passes, and every problem of every pass is reported at once
(`errors.RecipeError(problems=[...])`), each with the file, the dotted path
(`distillation.intermediate_matches[2].proj`), the line and column, the bad value and a fix:

1. `jsonpos.parse_json`: a JSON parser that keeps the position of every value and key.
2. Structure (`schema`, `sources`: pydantic, `extra="forbid"`, strict types), its errors
   translated by `translate`: unknown keys (with a did-you-mean), types, ranges, registered
   names (losses, projections, schedulers from `kdcli.registry`). Relative paths resolve
   against the recipe file's folder (`paths`), never the working directory.
3. Rules across fields that need no model (`rules`).
4. Files (`files`): local model folders and data files exist; a model folder another recipe
   writes counts as available (`discover.find_producers`) except when loading a recipe to run it.

`load.read_recipe` runs the four passes, `load.load_recipe` raises on any error.
`check` adds the model-aware rules (`model_rules`, with facts from `resolve`) and the data rules
(`data_rules`, reading files with `data_files`); `check.load_checked` is the run's entry point;
`report` and `render` are check-recipe's output. Nothing here imports torch or transformers.

Modules: messages (paths shown, did-you-mean) / jsonpos / validation (what validators share) /
paths / sources + schema / translate / rules / discover / loaded / files / load / report /
resolve / data_files / data_rules / model_rules / check / render.
"""

from kdcli.facts.safe_files import NotRegularFile, is_file, open_regular
from kdcli.recipe.check import check_file, check_loaded, check_paths, load_checked
from kdcli.recipe.data_files import DataHeader, DataUnreadable, read_header
from kdcli.recipe.data_rules import LabelScan, count_labels, data_findings, scan_labels
from kdcli.recipe.discover import (
    DISCOVERY_MAX_BYTES,
    RECIPE_MAX_BYTES,
    expand_paths,
    find_producers,
    output_dir_of,
)
from kdcli.recipe.jsonpos import JsonSyntaxError, Position, SourceMap, parse_json
from kdcli.recipe.load import load_recipe, read_recipe
from kdcli.recipe.loaded import LoadedRecipe, display_name
from kdcli.recipe.messages import JsonPath, PathKey, dotted, show, suggest
from kdcli.recipe.paths import (
    DATA_EXTENSIONS,
    data_format_of,
    default_output_dir,
    leaves_repository,
    path_problem,
    repository_root,
    resolve_model_ref,
)
from kdcli.recipe.render import render_github, render_text
from kdcli.recipe.report import CheckReport, FileReport
from kdcli.recipe.rules import Finding, distillation_findings, match_findings
from kdcli.recipe.schema import (
    DEVICE_PATTERN,
    SEED_RANGE,
    DistillationConfig,
    Match,
    Proj,
    Recipe,
    TrainingSection,
    check_max_steps,
    is_device,
    recipe_json_schema,
)
from kdcli.recipe.sources import ConfigStudent, DataSection, DataSource, PretrainedModel
from kdcli.recipe.temperature import TemperatureSpecError, parse_temperature_scheduler
from kdcli.recipe.validation import DataFormat, Mode, Task

__all__ = [
    "DATA_EXTENSIONS",
    "DISCOVERY_MAX_BYTES",
    "RECIPE_MAX_BYTES",
    "DEVICE_PATTERN",
    "SEED_RANGE",
    "check_max_steps",
    "CheckReport",
    "ConfigStudent",
    "DataFormat",
    "DataHeader",
    "DataSection",
    "DataSource",
    "DataUnreadable",
    "DistillationConfig",
    "FileReport",
    "Finding",
    "JsonPath",
    "JsonSyntaxError",
    "LabelScan",
    "LoadedRecipe",
    "Match",
    "Mode",
    "NotRegularFile",
    "PathKey",
    "Position",
    "PretrainedModel",
    "Proj",
    "Recipe",
    "SourceMap",
    "TemperatureSpecError",
    "Task",
    "TrainingSection",
    "check_file",
    "check_loaded",
    "check_paths",
    "count_labels",
    "data_findings",
    "data_format_of",
    "default_output_dir",
    "display_name",
    "distillation_findings",
    "dotted",
    "expand_paths",
    "find_producers",
    "is_device",
    "is_file",
    "leaves_repository",
    "load_checked",
    "load_recipe",
    "match_findings",
    "open_regular",
    "output_dir_of",
    "parse_json",
    "parse_temperature_scheduler",
    "path_problem",
    "read_header",
    "read_recipe",
    "recipe_json_schema",
    "render_github",
    "render_text",
    "repository_root",
    "resolve_model_ref",
    "scan_labels",
    "show",
    "suggest",
]
