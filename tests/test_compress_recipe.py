"""`student.prune` in the recipe (torch-free): check-recipe's refusals and `kdcli plan`'s exact
count of the pruned student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcli.recipe import check_file
from kdcli.recipe.prune_schema import PruneSpec, prune_targets
from tiny import make_tiny_lm, write_lm_rows

SOURCE = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compress_recipe")
    make_tiny_lm(root / "teacher", "llama", layers=4, hidden=32, heads=4, kv_heads=2)
    make_tiny_lm(root / "gpt2", "gpt2", layers=2, hidden=32, heads=4)
    write_lm_rows(root / "train.jsonl", "text", 10)
    return root


def _recipe(prune: dict | None = None, **changes) -> dict:
    doc = {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"prune": prune or {"hidden_size": 24, "rows": 8}},
        "data": {"train": "train.jsonl", "max_length": 32},
        "training": {"device": "cpu", "num_steps": 2},
        "distillation": {"kd_loss_type": "forward_kl"},
    }
    doc.update(changes)
    return doc


def _problems(ws: Path, doc: dict) -> dict[str, str]:
    path = ws / "r.json"
    path.write_text(json.dumps(doc))
    report, _ = check_file(path)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == "error"}


def test_a_valid_prune_is_clean(ws: Path) -> None:
    assert _problems(ws, _recipe({"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2})) == {}


@pytest.mark.parametrize(
    ("prune", "where", "words"),
    [
        ({"hidden_size": 64}, "student.prune.hidden_size", "above the source's 32"),
        ({"num_hidden_layers": 5}, "student.prune.num_hidden_layers", "above the source's 4"),
        ({"intermediate_size": 65}, "student.prune.intermediate_size", "at most 64"),
        ({"num_attention_heads": 3}, "student.prune.num_attention_heads", "does not split into the source's 2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "student.prune.num_key_value_heads", "above"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "student.prune.num_attention_heads", "hold 2"),
        ({"hidden_size": 30}, "student.prune.hidden_size", "e.g. 28"),
        ({"rows": 11}, "student.prune.rows", "more than the 10 training rows"),
    ],
)
def test_check_recipe_refuses(ws: Path, prune: dict, where: str, words: str) -> None:
    found = _problems(ws, _recipe(prune))
    assert words in found[where], found


def test_prune_with_init_from_teacher_is_refused(ws: Path) -> None:
    doc = _recipe()
    doc["student"]["init_from_teacher"] = [1, 2]
    found = _problems(ws, doc)
    assert any("prune and init_from_teacher" in m for m in found.values()), found


def test_unsupported_architecture_is_named(ws: Path) -> None:
    found = _problems(ws, _recipe(teacher={"model": "./gpt2"}))
    assert "'gpt2' model" in found["student.prune"]


def test_conflicting_override_is_refused(ws: Path) -> None:
    doc = _recipe()
    doc["student"]["overrides"] = {"hidden_size": 16}
    found = _problems(ws, doc)
    assert any("overrides.hidden_size is 16" in m for m in found.values()), found


def test_targets_keep_head_dim_and_default_groups() -> None:
    sizes, problems = prune_targets(SOURCE, PruneSpec(hidden_size=16, num_attention_heads=2))
    assert problems == []
    assert sizes == {
        "num_hidden_layers": 4,
        "hidden_size": 16,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    # fewer KV groups and no head count: whole groups
    assert prune_targets(SOURCE, PruneSpec(num_key_value_heads=1))[0]["num_attention_heads"] == 2


def test_plan_counts_the_pruned_student_exactly(ws: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kdcli.compress.prune import prune_model
    from kdcli.plan import plan_recipe

    prune = {"num_hidden_layers": 3, "hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2}
    path = ws / "plan.json"
    path.write_text(json.dumps(_recipe(prune)))
    doc = plan_recipe(path)
    source = AutoModelForCausalLM.from_pretrained(ws / "teacher")
    ids = torch.randint(4, 400, (2, 8))
    student, _ = prune_model(source, PruneSpec(**prune), lambda: iter([{"input_ids": ids}]))
    row = next(m for m in doc["models"] if m["role"] == "student")
    assert row["parameters"] == sum(p.numel() for p in student.parameters())


def test_kdcli_prune_prints_kept_sets_without_training(ws: Path, cli_runner) -> None:
    from kdcli.cli import app

    prune = {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2, "rows": 6}
    path = ws / "prune.json"
    path.write_text(json.dumps(_recipe(prune)))
    result = cli_runner.invoke(app, ["prune", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["rows"] == 6 and len(doc["layers"]) == 3 and len(doc["hidden"]) == 24
    assert [len(h) for h in doc["heads"]] == [2, 2, 2] and doc["student_parameters"] < doc["source_parameters"]
    assert len(doc["importance"]["hidden_scores"]) == 32 and doc["depth"]["by"] == "block_influence"
    assert not (ws / "runs").exists()  # nothing trained, nothing written
    result = cli_runner.invoke(app, ["prune", str(path)])
    assert result.exit_code == 0 and "parameters" in result.output
    path.write_text(json.dumps(_recipe({"hidden_size": 24}, student={"config": "./teacher"})))
    result = cli_runner.invoke(app, ["prune", str(path), "--json"])
    assert result.exit_code != 0 and "no student.prune" in json.loads(result.stdout)["error"]["message"]


def test_rows_above_the_training_set_stop_the_run_before_any_model_loads() -> None:
    """When check-recipe could not count the rows (a hub dataset), the run refuses them first."""
    from types import SimpleNamespace

    from kdcli.engine.setup import _measure_rows
    from kdcli.errors import UsageError

    student = SimpleNamespace(prune=PruneSpec(rows=20), init_measure=None)
    with pytest.raises(UsageError, match="rows 20 is more than the 12 training rows"):
        _measure_rows(SimpleNamespace(student=student), 12)
    assert _measure_rows(SimpleNamespace(student=SimpleNamespace(prune=PruneSpec(), init_measure=None)), 12) == 64
