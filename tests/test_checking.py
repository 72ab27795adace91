"""kdcli.checking: model-aware rules (from config.json only), data columns, produced models,
unchecked rules and --strict, and the three report formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from kdcli.checking import (
    CheckReport,
    check_file,
    check_paths,
    count_labels,
    expand_paths,
    load_checked,
    read_header,
    render_github,
    render_text,
)
from kdcli.errors import RecipeError, UsageError
from kdcli.recipe import DataSource

TEACHER = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "id2label": {"0": "NEGATIVE", "1": "POSITIVE"},
}
STUDENT = {
    "model_type": "bert",
    "architectures": ["BertForMaskedLM"],
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
}


def base_recipe() -> dict:
    return {
        "teacher": {"model": "./teacher"},
        "student": {"model": "./student"},
        "data": {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 64},
        "training": {"num_epochs": 1},
        "distillation": {
            "temperature": 8,
            "intermediate_matches": [
                {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 64]},
                {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "mmd", "weight": 1},
                {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
            ],
        },
    }


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name, config in (("teacher", TEACHER), ("student", STUDENT)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "data").mkdir()
    rows = "label\tsentence\n1\ta fine film\n0\ta dull \"quoted' one\n"
    (tmp_path / "data" / "train.tsv").write_text(rows)
    (tmp_path / "data" / "dev.tsv").write_text(rows)
    records = [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}, {"tokens": ["c"], "tags": ["I-X"]}]
    (tmp_path / "data" / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "data" / "flat.jsonl").write_text(json.dumps({"tokens": "a b", "tags": "O"}) + "\n")
    return tmp_path


def write(folder: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(recipe, indent=2))
    return path


def problems(path: Path, severity: str = "error", strict: bool = False) -> dict[str, str]:
    report, _ = check_file(path, strict=strict)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == severity}


def test_base_recipe_is_clean(ws: Path) -> None:
    report, _ = check_file(write(ws, base_recipe()))
    assert report.valid and report.problems == [], report.problems


M = ("distillation", "intermediate_matches")


def _set(path: tuple, value):
    def mutate(r: dict) -> None:
        node = r
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _config_student(overrides: dict, init=None):
    def mutate(r: dict) -> None:
        r["student"] = {"config": "./teacher", "overrides": overrides}
        if init is not None:
            r["student"]["init_from_teacher"] = init
        r["distillation"]["intermediate_matches"] = []

    return mutate


def _teacher_config(**changes):
    def mutate(r: dict, ws: Path) -> None:
        (ws / "teacher" / "config.json").write_text(json.dumps({**TEACHER, **changes}))

    return mutate


RULES = [
    ("teacher hidden layer out of range", _set(M + (0, "layer_T"), 5), "distillation.intermediate_matches[0].layer_T", "teacher has 4 layers"),
    ("student layer in a list out of range", _set(M + (1, "layer_S"), [2, 3]), "distillation.intermediate_matches[1].layer_S[1]", "student has 2 layers"),
    ("attention layer out of range", _set(M + (2, "layer_T"), 5), "distillation.intermediate_matches[2].layer_T", "attention layers 1..4"),
    ("proj dim_S differs from the student", _set(M + (0, "proj"), ["linear", 64, 64]), "distillation.intermediate_matches[0].proj[1]", "student's hidden size is 32"),
    ("proj dim_T differs from the teacher", _set(M + (0, "proj"), ["linear", 32, 768]), "distillation.intermediate_matches[0].proj[2]", "teacher's hidden size is 64"),
    ("proj required for hidden_mse", _set(M + (0, "proj"), None), "distillation.intermediate_matches[0].proj", '"proj": ["linear", 32, 64]'),
    ("proj required for fsp", _set(M + (1, "loss"), "fsp"), "distillation.intermediate_matches[1].proj", "needs equal hidden sizes"),
    ("heads must agree for attention_mse", _set(M + (2, "loss"), "attention_mse"), "distillation.intermediate_matches[2].loss", "attention_mse_sum"),
    ("heads must agree for attention_ce", _set(M + (2, "loss"), "attention_ce"), "distillation.intermediate_matches[2].loss", "attention_ce_mean"),
    ("max_length over position embeddings", _set(("data", "max_length"), 512), "data.max_length", "128 position embeddings"),
    ("missing text column", _set(("data", "text_column"), "sentense"), "data.text_column", 'set data.text_column to "sentence"'),
    ("missing default label column", _set(("data", "train"), "data/ner.jsonl"), "data.label_column", "the default label_column"),
    ("init list length", _config_student({"num_hidden_layers": 2}, [1, 2, 3]), "student.init_from_teacher", "lists 3 blocks but the student has 2 layers"),
    ("init block out of range", _config_student({"num_hidden_layers": 2}, [2, 9]), "student.init_from_teacher[1]", "blocks 1..4"),
    ("init into another width", _config_student({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}, [2, 4]), "student.overrides.hidden_size", "hidden_size 64"),
    ("override typo", _config_student({"num_hiden_layers": 2}), "student.overrides.num_hiden_layers", "did you mean 'num_hidden_layers'"),
]


@pytest.mark.parametrize("mutate, path, words", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_model_rule_names_its_exact_path(ws: Path, mutate, path: str, words: str) -> None:
    recipe = base_recipe()
    mutate(recipe)
    found = problems(write(ws, recipe))
    assert path in found, found
    assert words in found[path]


def test_mmd_and_sum_variants_accept_different_sizes(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"] = [
        {"layer_T": [2, 4], "layer_S": [1, 2], "feature": "hidden", "loss": "nst", "weight": 1},
        {"layer_T": 3, "layer_S": 1, "feature": "attention", "loss": "attention_ce_mean", "weight": 1},
    ]
    assert problems(write(ws, recipe)) == {}


def test_shared_vocabulary_when_matching(ws: Path) -> None:
    (ws / "student" / "config.json").write_text(json.dumps({**STUDENT, "vocab_size": 2000}))
    recipe = base_recipe()
    found = problems(write(ws, recipe))
    assert "student.model" in found and "1000 tokens and the student's 2000" in found["student.model"]
    recipe["distillation"]["intermediate_matches"] = []  # logits only, sequence-level: allowed
    assert "student.model" not in problems(write(ws, recipe))


def test_teacher_head_must_match_the_data_labels(ws: Path) -> None:
    (ws / "teacher" / "config.json").write_text(json.dumps({**TEACHER, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    found = problems(write(ws, base_recipe()))
    assert "3 classes but data.train has 2 labels" in found["teacher.model"]


def test_headless_teacher_is_a_warning(ws: Path) -> None:
    (ws / "teacher" / "config.json").write_text(json.dumps({**TEACHER, "architectures": ["BertModel"]}))
    path = write(ws, base_recipe())
    assert "randomly initialised head" in problems(path, "warning")["teacher.model"]
    assert check_file(path)[0].valid


def test_unknown_override_far_from_any_field_is_a_warning(ws: Path) -> None:
    recipe = base_recipe()
    _config_student({"num_hidden_layers": 2, "my_custom_flag": True})(recipe)
    path = write(ws, recipe)
    assert "student.overrides.my_custom_flag" in problems(path, "warning")
    assert check_file(path)[0].valid


def test_token_classification_needs_list_columns(ws: Path) -> None:
    recipe = base_recipe()
    recipe["task"] = "token-classification"
    recipe["data"] = {"train": "data/ner.jsonl", "text_column": "tokens", "label_column": "tags"}
    recipe["teacher"] = {"model": "./student"}  # any teacher; heads are checked elsewhere
    recipe["distillation"]["intermediate_matches"] = []
    assert problems(write(ws, recipe)) == {}
    recipe["data"]["train"] = "data/flat.jsonl"
    found = problems(write(ws, recipe))
    assert "list of words" in found["data.text_column"] and "list of tags" in found["data.label_column"]


def test_unreadable_hub_config_is_a_warning_or_with_strict_an_error(ws: Path) -> None:
    recipe = base_recipe()
    recipe["teacher"] = {"model": "bert-base-uncased"}
    recipe["student"] = {"overrides": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}}
    recipe["distillation"]["intermediate_matches"][0]["proj"] = ["linear", 48, 768]
    path = write(ws, recipe)
    warnings = problems(path, "warning")
    assert "could not read the config of teacher and student config" in warnings["teacher.model"]
    assert "not checked: layer numbers" in warnings["teacher.model"]
    # the student's size is known from its overrides, so its side is still checked
    assert "student's hidden size is 32" in problems(path)["distillation.intermediate_matches[0].proj[1]"]
    strict = problems(path, strict=True)
    assert "could not read the config" in strict["teacher.model"]


def test_hub_dataset_columns_are_unchecked(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["eval"] = {"path": "glue", "config": "sst2"}
    path = write(ws, recipe)
    assert "were not checked" in problems(path, "warning")["data.eval"]
    assert "data.eval" in problems(path, strict=True)


def test_produced_teacher_is_described_by_its_producer(ws: Path) -> None:
    producer = {
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 3}},
        "data": {"train": "data/train.tsv"},
        "training": {"output_dir": "./runs/ft"},
    }
    write(ws, producer, "a-finetune.json")
    recipe = base_recipe()
    recipe["teacher"] = {"model": "./runs/ft"}
    recipe["distillation"]["intermediate_matches"][1]["layer_T"] = [4, 4]  # the producer's student has 3 layers
    report, loaded = check_file(write(ws, recipe, "b-distill.json"))
    assert any("produced by" in n for n in report.notes)
    found = {p.path: p.message for p in report.errors}
    assert "teacher has 3 layers" in found["distillation.intermediate_matches[1].layer_T[0]"]
    assert not any(p.path == "teacher.model" for p in report.problems)  # 2 labels from its data: matches


def test_recipes_producing_each_other_do_not_loop(ws: Path) -> None:
    a = base_recipe()
    a["student"] = {"config": "./runs/b"}
    a["training"]["output_dir"] = "./runs/a"
    b = base_recipe()
    b["student"] = {"config": "./runs/a"}
    b["training"]["output_dir"] = "./runs/b"
    write(ws, a, "a.json")
    write(ws, b, "b.json")
    report = check_paths([ws / "a.json", ws / "b.json"])
    assert len(report.files) == 2  # finished; the cycle leaves the rules unchecked
    assert any("cycle" in p.message for f in report.files for p in f.problems)


def test_load_checked_raises_with_model_rules(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][0]["layer_T"] = 9
    with pytest.raises(RecipeError) as info:
        load_checked(write(ws, recipe), mode="distill")
    assert info.value.problems[0].path == "distillation.intermediate_matches[0].layer_T"
    assert load_checked(write(ws, base_recipe()), mode="distill").kind == "distill"


# --- data helpers --------------------------------------------------------------------------


def test_read_header_and_count_labels(ws: Path) -> None:
    tsv = DataSource(path=str(ws / "data" / "train.tsv"), format="tsv", delimiter="\t")
    assert read_header(tsv).columns == ["label", "sentence"]
    assert count_labels(tsv, "label") == 2
    ner = DataSource(path=str(ws / "data" / "ner.jsonl"), format="jsonl")
    assert read_header(ner).list_columns == {"tokens": True, "tags": True}
    assert count_labels(ner, "tags", token_level=True) == 3
    (ws / "data" / "arr.json").write_text(json.dumps([{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]))
    arr = DataSource(path=str(ws / "data" / "arr.json"), format="json")
    assert read_header(arr).columns == ["text", "label"] and count_labels(arr, "label") == 2


def test_parquet_header(ws: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = ws / "data" / "t.parquet"
    pq.write_table(pa.table({"tokens": [["a", "b"]], "tags": [["O", "O"]], "id": [1]}), path)
    header = read_header(DataSource(path=str(path), format="parquet"))
    assert header.columns == ["tokens", "tags", "id"]
    assert header.list_columns == {"tokens": True, "tags": True, "id": False}


def test_expand_paths(ws: Path) -> None:
    write(ws, base_recipe(), "r1.json")
    (ws / "sub").mkdir()
    write(ws / "sub", base_recipe(), "r2.json")
    (ws / "sub" / "package.json").write_text('{"name": "not a recipe"}')
    found = expand_paths([ws])
    assert [p.name for p in found] == ["r1.json", "r2.json"]  # configs in teacher/ etc. skipped
    with pytest.raises(UsageError):
        expand_paths([ws / "missing.json"])


# --- rendering -------------------------------------------------------------------------------


def _bad_report(ws: Path) -> CheckReport:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][2]["layer_T"] = 9
    recipe["teacher"]["trust_remote_code"] = True
    return check_paths([write(ws, recipe, "bad.json"), write(ws, base_recipe(), "good.json")])


def test_render_text_groups_per_file(ws: Path) -> None:
    console = Console(record=True, width=300)
    render_text(_bad_report(ws), console)
    text = console.export_text()
    assert "bad.json distill: invalid (1 error, 1 warning)" in text
    assert "distillation.intermediate_matches[2].layer_T" in text  # brackets not eaten as markup
    assert "good.json distill: ok" in text
    assert "2 files checked: 1 valid, 1 invalid (1 error, 1 warning)" in text


def test_render_github_annotations(ws: Path) -> None:
    lines = render_github(_bad_report(ws)).splitlines()
    error = next(line for line in lines if line.startswith("::error "))
    assert "file=bad.json" in error or "bad.json" in error
    assert ",line=" in error and ",col=" in error
    assert "title=kdcli check-recipe%3A distillation.intermediate_matches[2].layer_T" in error
    assert any(line.startswith("::warning ") for line in lines)
    assert lines[-1].startswith("kdcli check-recipe: 2 files")


def test_report_to_dict(ws: Path) -> None:
    doc = _bad_report(ws).to_dict()
    assert doc["valid"] is False and doc["summary"]["errors"] == 1
    bad = doc["files"][0]
    assert bad["valid"] is False and bad["kind"] == "distill"
    assert {"file", "path", "line", "col", "severity", "message", "fix"} <= set(bad["problems"][0])


def test_wrong_delimiter_gets_a_hint(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["eval"] = {"path": "data/dev.tsv", "format": "csv"}
    found = problems(write(ws, recipe))
    assert "looks tab-separated" in found["data.text_column"]
