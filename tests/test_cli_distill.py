"""`kdcli distill` and `kdcli train` through the CLI (exit codes, stdout/stderr, --json)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from tiny import make_tiny_bert, write_sst2_sample

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "student", hidden=32)
    write_sst2_sample(root, n_train=32, n_eval=16)
    common = {
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "eval": "dev.tsv", "max_length": 24},
        "training": {"num_steps": 3, "batch_size": 8, "log_every": 1},
    }
    (root / "distill.json").write_text(
        json.dumps(
            {
                **common,
                "teacher": {"model": "teacher"},
                "distillation": {
                    "temperature": 4,
                    "intermediate_matches": [
                        {
                            "layer_T": 2,
                            "layer_S": 2,
                            "feature": "hidden",
                            "loss": "hidden_mse",
                            "weight": 1,
                            "proj": ["linear", 32, 64],
                        },
                    ],
                },
            }
        )
    )
    (root / "train.json").write_text(json.dumps(common))
    return root


def test_distill_json_prints_one_document_and_refuses_a_used_folder(folder):
    out = folder / "out-json"
    args = ["distill", str(folder / "distill.json"), "--output-dir", str(out), "--max-steps", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert summary["ok"] is True and summary["steps"] == 2 and summary["mode"] == "distill"
    assert "hidden_mse[2->2]" in summary["final_terms"]
    assert "step 2/2" in result.stderr  # plain progress lines: stderr is not a terminal

    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "is not empty" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.output
    failed = json.loads(again.stdout)  # still exactly one JSON document: the error
    assert failed["ok"] is False and failed["error"]["exit_code"] == 2 and "is not empty" in failed["error"]["message"]

    resumed = runner.invoke(app, [*args, "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from_step"] == 2 and resumed.stderr == ""


def test_train_renders_a_table(folder):
    result = runner.invoke(
        app, ["train", str(folder / "train.json"), "-o", str(folder / "out-train"), "--quiet", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "kdcli train" in result.stdout and "final_loss" in result.stdout and "eval.accuracy" in result.stdout
    assert result.stderr == ""


def test_distill_needs_a_distillation_recipe(folder):
    result = runner.invoke(app, ["distill", str(folder / "train.json"), "-o", str(folder / "out-x")])
    assert result.exit_code == 1
    assert "train.json" in result.stderr and "Traceback" not in result.output
    assert not (folder / "out-x").exists()


def test_bad_flags_are_usage_errors(folder):
    recipe = str(folder / "distill.json")
    bad_device = runner.invoke(app, ["distill", recipe, "--device", "gpu"])
    assert bad_device.exit_code == 2 and "not a device" in bad_device.stderr
    assert runner.invoke(app, ["distill", recipe, "--max-steps", "0"]).exit_code == 2
    missing = runner.invoke(app, ["distill", str(folder / "nope.json")])
    assert missing.exit_code == 2 and "no such recipe file" in missing.stderr
