"""The SST-2 quickstart (kdcli/demo/sst2.py, `python -m kdcli.demo`).

Fast tests run the whole demo pipeline (teacher -> distil -> control -> measure -> table and
summary) on tiny models with recipes shaped like the real ones; the slow test runs the real
`make demo` recipes from a copy of recipes/ (the full 10,000-row demo: many minutes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from kdcli.demo import sst2 as demo
from kdcli.run_files import outdir
from tiny import REPO, make_tiny_bert, write_sst2_sample


def tiny_recipes(root: Path) -> Path:
    """recipes/sst2-{teacher,distill,control}.json over a tiny BERT and 64 SST-2 rows."""
    recipes = root / "recipes"
    recipes.mkdir()
    make_tiny_bert(root / "base", layers=4, hidden=32)
    write_sst2_sample(recipes / "data", n_train=64, n_eval=32)
    data = {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 32}
    training = {"num_epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "seed": 0, "device": "cpu"}
    student = {"config": "../runs/sst2-teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]}
    docs = {
        "sst2-teacher.json": {
            "student": {"model": "../base"},
            "data": data,
            "training": {**training, "output_dir": "../runs/sst2-teacher"},
        },
        "sst2-distill.json": {
            "teacher": {"model": "../runs/sst2-teacher"},
            "student": student,
            "data": data,
            "training": {**training, "output_dir": "../runs/sst2-distill"},
            "distillation": {
                "temperature": 8,
                "intermediate_matches": [
                    {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
                ],
            },
        },
        "sst2-control.json": {
            "student": student,
            "data": data,
            "training": {**training, "output_dir": "../runs/sst2-control"},
        },
    }
    for name, doc in docs.items():
        (recipes / name).write_text(json.dumps(doc, indent=1))
    return recipes


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The demo run once on tiny recipes: (root, exit code, summary document)."""
    root = tmp_path_factory.mktemp("demo")
    recipes = tiny_recipes(root)
    code = demo.main(["--recipes", str(recipes), "--summary", str(root / "summary.json")])
    return root, code, json.loads((root / "summary.json").read_text())


def test_demo_trains_three_models_and_writes_the_summary(tiny_demo):
    root, code, summary = tiny_demo
    assert code == 0
    models = summary["models"]
    assert list(models) == ["teacher", "student", "control"]
    for key in models:
        assert demo.is_finished(root / "runs" / f"sst2-{'distill' if key == 'student' else key}")
    teacher, student = models["teacher"], models["student"]
    assert teacher["parameters"] > student["parameters"]  # 4 blocks vs 2
    assert student["parameters"] == models["control"]["parameters"]
    for figures in models.values():
        assert figures["dev_rows"] == 32
        assert 0.0 <= figures["dev_accuracy"] <= 1.0
        assert figures["latency_ms"] > 0 and figures["file_mb"] > 0
        assert figures["reused"] is False and figures["train_s"] > 0
    assert set(summary["targets"]) == {"keeps_97pct_of_teacher", "beats_control", "reaches_reference"}
    keep = summary["targets"]["keeps_97pct_of_teacher"]
    assert keep["met"] == (student["dev_accuracy"] >= 0.97 * teacher["dev_accuracy"])


def test_demo_accuracy_is_what_plain_transformers_measures(tiny_demo):
    """The table's accuracy agrees with the engine's own evaluation of the same dev rows."""
    root, _, summary = tiny_demo
    for key, folder in (("teacher", "sst2-teacher"), ("student", "sst2-distill"), ("control", "sst2-control")):
        engine = json.loads((root / "runs" / folder / "summary.json").read_text())["eval"]["accuracy"]
        assert abs(summary["models"][key]["dev_accuracy"] - engine) <= 1 / 32 + 1e-9


def test_rerun_reuses_finished_models(tiny_demo):
    root, _, first = tiny_demo
    teacher_file = root / "runs" / "sst2-teacher" / "model.safetensors"
    stamp = teacher_file.stat().st_mtime_ns
    code = demo.main(["--recipes", str(root / "recipes"), "--summary", str(root / "again.json"), "--reuse"])
    assert code == 0
    again = json.loads((root / "again.json").read_text())
    assert all(m["reused"] and m["train_s"] is None for m in again["models"].values())
    assert teacher_file.stat().st_mtime_ns == stamp
    for key in first["models"]:
        assert again["models"][key]["dev_accuracy"] == first["models"][key]["dev_accuracy"]


def test_unfinished_teacher_folder_is_trained_again(tmp_path):
    recipes = tiny_recipes(tmp_path)
    unfinished = tmp_path / "runs" / "sst2-teacher"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")  # a kdcli run that stopped before saving
    outdir.write_marker(unfinished, {"mode": "train"})
    assert not demo.is_finished(unfinished)
    run = demo.run_stage(demo.STAGES[0], recipes, reuse=True, console=Console(quiet=True))
    assert run.reused is False and demo.is_finished(unfinished)


def test_bad_recipe_is_one_error_line_and_exit_code(tmp_path, capsys):
    recipes = tiny_recipes(tmp_path)
    (recipes / "sst2-teacher.json").write_text('{"student": {"model": "../base"}, "data": {"train": "nope.tsv"}}')
    code = demo.main(["--recipes", str(recipes), "--summary", str(tmp_path / "s.json")])
    assert code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "nope.tsv" in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()


def figures(key: str, accuracy: float) -> demo.Figures:
    title = next(stage.title for stage in demo.STAGES if stage.key == key)
    return demo.Figures(key, title, f"runs/{key}", accuracy, 872, 1_000_000, 4.0, 10.0, 60.0, False)


def test_targets_and_table():
    table = {
        "teacher": figures("teacher", 0.86),
        "student": figures("student", 0.845),
        "control": figures("control", 0.82),
    }
    verdict = demo.targets(table)
    assert verdict["keeps_97pct_of_teacher"]["met"] is True  # 0.845 >= 0.8342
    assert verdict["beats_control"]["met"] is True
    assert verdict["reaches_reference"]["met"] is True  # 0.845 >= 0.841
    worse = {**table, "student": figures("student", 0.83)}
    verdict = demo.targets(worse)
    assert verdict["keeps_97pct_of_teacher"]["met"] is False
    assert verdict["reaches_reference"]["met"] is False
    assert verdict["beats_control"]["met"] is True

    console = Console(record=True, width=200)
    console.print(demo.table(table))
    text = console.export_text()
    assert "84.5%" in text and "98.3%" in text and "1.0 M" in text and "60 s" in text
    assert "student, distilled" in text


@pytest.mark.slow
def test_full_demo_meets_the_targets(tmp_path):
    """`make demo` on the real recipes (copied, so runs/ of the checkout is untouched)."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("sst2-teacher.json", "sst2-distill.json", "sst2-control.json"):
        shutil.copy(REPO / "recipes" / name, recipes / name)
    shutil.copytree(REPO / "recipes" / "data", recipes / "data")
    code = demo.main(["--recipes", str(recipes), "--summary", str(tmp_path / "summary.json")])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    models = summary["models"]
    assert all(m["dev_rows"] == 872 for m in models.values())
    assert models["student"]["latency_ms"] < models["teacher"]["latency_ms"]
    assert models["student"]["file_mb"] < models["teacher"]["file_mb"]
    assert summary["wall_s"] < 15 * 60
    assert summary["targets"]["keeps_97pct_of_teacher"]["met"], summary["targets"]
    assert summary["targets"]["beats_control"]["met"], summary["targets"]
