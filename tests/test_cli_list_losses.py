"""`kdcli list-losses`: the rich tables, `--json` (one document on stdout), `--feature`, and
that the command never imports torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kdcli import registry
from kdcli.cli import app


def _json(cli_runner, *args: str) -> dict:
    result = cli_runner.invoke(app, ["list-losses", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one document


def test_table_lists_every_name_alias_and_fact(cli_runner):
    result = cli_runner.invoke(app, ["list-losses"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for header in (
        "name",
        "aliases",
        "feature",
        "layers per side",
        "input shapes",
        "needs proj when sizes differ",
        "formula",
    ):
        assert header in text
    for spec in registry.LOSSES:
        assert spec.name in text
        for alias in spec.aliases:
            assert alias in text
    for name in (
        *registry.projection_names(),
        *registry.scheduler_names("temperature"),
        *registry.scheduler_names("weight"),
    ):
        assert name in text
    assert "yes: hidden sizes must agree" in text and "no; head counts must agree" in text
    assert "…" not in text  # nothing is cut short (long cells fold onto more lines)
    assert f"clamped to at least {registry.MIN_TEMPERATURE}" in text


def test_json_is_one_document_with_the_registry_facts(cli_runner):
    doc = _json(cli_runner)
    assert set(doc) == {"losses", "projections", "schedulers", "min_temperature"}
    assert doc["losses"] == [spec.to_dict() for spec in registry.LOSSES]
    assert [p["name"] for p in doc["projections"]] == ["linear", "relu", "tanh"]
    assert {s["name"]: s["kind"] for s in doc["schedulers"]} == {
        "constant": "temperature",
        "flsw": "temperature",
        "cwsm": "temperature",
        "linear_decay": "weight",
        "linear_growth": "weight",
    }
    by_name = {loss["name"]: loss for loss in doc["losses"]}
    assert by_name["fsp"]["aliases"] == ["gram"] and by_name["fsp"]["layers_per_side"] == 2
    assert by_name["mmd"]["needs_proj_when_sizes_differ"] is False
    assert by_name["cos"]["needs_proj_when_sizes_differ"] is True
    assert by_name["attention_ce"]["same_size"] == "heads"
    assert doc["min_temperature"] == registry.MIN_TEMPERATURE


@pytest.mark.parametrize("feature", ["attention", "hidden", "logits"])
def test_feature_filter(cli_runner, feature):
    doc = _json(cli_runner, "--feature", feature)
    expected = [s.name for s in registry.LOSSES if s.feature == feature]
    assert expected and [loss["name"] for loss in doc["losses"]] == expected
    table = cli_runner.invoke(app, ["list-losses", "--feature", feature])
    assert table.exit_code == 0
    others = [s.name for s in registry.LOSSES if s.feature != feature and s.name not in " ".join(expected)]
    for name in expected:
        assert name in table.stdout
    for name in others:
        assert f"│ {name} " not in table.stdout


def test_bad_feature_is_a_usage_error_naming_the_choices(cli_runner):
    result = cli_runner.invoke(app, ["list-losses", "--feature", "logit"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "'logit'" in result.stderr
    for choice in ("logits", "hidden", "attention"):
        assert choice in result.stderr
    assert "Traceback" not in result.output


def test_help(cli_runner):
    result = cli_runner.invoke(app, ["list-losses", "--help"])
    assert result.exit_code == 0
    assert "--json" in result.stdout and "--feature" in result.stdout


def test_command_path_never_imports_torch(repo_root):
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from kdcli.cli import app\n"
        "r = CliRunner().invoke(app, ['list-losses'])\n"
        "j = CliRunner().invoke(app, ['list-losses', '--json'])\n"
        "assert r.exit_code == 0 and j.exit_code == 0\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_real_process_stdout_is_pure_json(repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "kdcli", "list-losses", "--json", "--feature", "hidden"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {loss["feature"] for loss in doc["losses"]} == {"hidden"}


def _readme_loss_rows(text: str) -> dict[str, tuple[list[str], str, int]]:
    """README's loss table as written: name -> (aliases, feature, layers per side)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name | aliases | feature | layers per side |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        aliases = [] if cells[1] == "-" else [a.strip(" `") for a in cells[1].split(",")]
        rows[cells[0].strip("`")] = (aliases, cells[2], int(cells[3]))
    return rows


def _recipe_doc_names(text: str, key: str) -> dict[str, list[str]]:
    """docs/recipe.md's row for `key` as written: `name` (= `alias`) -> aliases."""
    row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
    listed = row.split(":", 1)[1].split("|")[0]
    return {name: [alias] if alias else [] for name, alias in re.findall(r"`(\w+)`(?: \(= `(\w+)`\))?", listed)}


def test_the_docs_loss_tables_match_list_losses(cli_runner):
    """README's loss table and docs/recipe.md's loss names are the registry's, as
    `kdcli list-losses --json` prints it: names, aliases, features, layers per side."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = _json(cli_runner)
    want = {spec["name"]: (spec["aliases"], spec["feature"], spec["layers_per_side"]) for spec in doc["losses"]}
    assert _readme_loss_rows((root / "README.md").read_text(encoding="utf-8")) == want
    recipe_doc = (root / "docs" / "recipe.md").read_text(encoding="utf-8")
    for key, kind in (("loss", "match"), ("kd_loss_type", "kd")):
        assert _recipe_doc_names(recipe_doc, key) == {
            s["name"]: s["aliases"] for s in doc["losses"] if s["kind"] == kind
        }
    features = next(line for line in recipe_doc.splitlines() if line.startswith("| `feature` |"))
    assert [f for f in registry.feature_names("match") if f'"{f}"' in features] == registry.feature_names("match")
