"""`kdcli report` (kdcli/run_report.py through the CLI) on the runs of tiny distillations: a
classifier distilled and trained, and a causal LM distilled. The PNG is a real PNG, the HTML
page holds the picture and the table, the table's figures are summary.json's; each bad input is
one message (one JSON document with --json), never a traceback, and never a half-written file."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.run_report import cell
from tiny import make_tiny_bert, make_tiny_lm, write_lm_rows, write_sst2_sample

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{distill,train,lm} of a tiny BERT distillation, its control, and a tiny causal LM."""
    root = tmp_path_factory.mktemp("report")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "student", hidden=32)
    write_sst2_sample(root, n_train=32, n_eval=16)
    common = {
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "eval": "dev.tsv", "max_length": 24},
        "training": {"num_steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 2, "device": "cpu"},
    }
    recipes = {
        "distill": {
            **common,
            "teacher": {"model": "teacher"},
            "distillation": {"temperature": 4, "hard_label_weight": 0.5},
        },
        "train": common,
    }
    make_tiny_lm(root / "lm-teacher", layers=4)
    write_lm_rows(root / "lm.jsonl", "text", 8)
    recipes["lm"] = {
        "task": "causal-lm",
        "teacher": {"model": "lm-teacher"},
        "student": {"config": "lm-teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        "data": {"train": "lm.jsonl", "eval": "lm.jsonl", "row_format": "text", "max_length": 32},
        "training": {**common["training"], "precision": "fp32"},
        "distillation": {"kd_loss_type": "forward_kl"},
    }
    for name, recipe in recipes.items():
        (root / f"{name}.json").write_text(json.dumps(recipe))
        mode = "train" if name == "train" else "distill"
        result = runner.invoke(app, [mode, str(root / f"{name}.json"), "-o", str(root / "runs" / name), "--quiet"])
        assert result.exit_code == 0, result.output
    return root / "runs"


def folders(runs: Path) -> list[str]:
    return [str(runs / name) for name in ("distill", "train", "lm")]


def png_header(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def report_json(args: list[str]) -> tuple[int, dict, str]:
    result = runner.invoke(app, ["report", *args, "--json"])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_png_of_three_runs(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    code, doc, _ = report_json([*folders(runs), "-o", str(out)])
    assert code == 0 and doc["ok"] is True and doc["format"] == "png"
    data = out.read_bytes()
    width, height = png_header(data)
    assert 1000 <= width <= 2000 and 600 <= height <= 3000 and 30_000 < len(data) == doc["bytes"] < 2_000_000
    assert [r["status"] for r in doc["runs"]] == ["finished"] * 3 and doc["notes"] == []
    assert [r["evaluations"] for r in doc["runs"]] == [2, 2, 2] and doc["runs"][0]["step_logs"] == 4
    from matplotlib.image import imread

    pixels = imread(out)
    assert pixels.shape[:2] == (height, width) and len({tuple(p) for p in pixels.reshape(-1, 4)[::97]}) > 20


def test_the_table_is_summary_json(runs: Path) -> None:
    code, doc, _ = report_json(folders(runs))  # no -o: the table only, nothing drawn
    assert code == 0 and doc["output"] is None and "bytes" not in doc
    table = doc["table"]
    assert table["runs"] == folders(runs)
    rows = {row["field"]: row["values"] for row in table["rows"]}
    for i, name in enumerate(("distill", "train", "lm")):
        summary = json.loads((runs / name / "summary.json").read_text())
        for key in ("mode", "steps", "final_loss", "student_parameters", "train_time_s", "samples_per_s"):
            assert rows[key][i] == summary[key], key
        for key, value in summary["eval"].items():
            assert rows[f"eval.{key}"][i] == value
        for key, value in summary["final_terms"].items():
            assert rows[f"final_terms.{key}"][i] == value
    assert rows["mode"] == ["distill", "train", "distill"] and rows["train_tokens_per_s"][:2] == [None, None]
    lm = json.loads((runs / "lm" / "summary.json").read_text())
    assert rows["teacher_eval.perplexity"][2] == lm["teacher_eval"]["perplexity"]
    assert rows["train_tokens_per_s"][2] == lm["train_tokens_per_s"] > 0


def test_the_table_on_stdout(runs: Path) -> None:
    result = runner.invoke(app, ["report", *folders(runs)], terminal_width=300)
    assert result.exit_code == 0, result.output
    summary = json.loads((runs / "distill" / "summary.json").read_text())
    assert "eval.accuracy" in result.stdout and cell(summary["final_loss"]) in result.stdout
    assert cell(summary["student_parameters"]) in result.stdout and result.stderr == ""


def test_html_page_holds_the_picture_and_the_table(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", *folders(runs), "-o", str(out)], terminal_width=300)
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count('src="data:image/png;base64,iVBORw0KGgo') == 1
    summary = json.loads((runs / "lm" / "summary.json").read_text())
    for value in (summary["final_loss"], summary["eval"]["kl"], summary["eval"]["perplexity"]):
        assert f"<td>{cell(value)}</td>" in page
    assert f"report written to {out}" in result.stdout


def test_a_run_in_progress(runs: Path, tmp_path: Path) -> None:
    going = tmp_path / "going"
    going.mkdir()
    lines = (runs / "distill" / "metrics.jsonl").read_text().splitlines()
    (going / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    code, doc, err = report_json([str(going), str(runs / "train"), "-o", str(tmp_path / "r.png")])
    assert code == 0 and doc["runs"][0]["status"] == "running or stopped" and doc["runs"][0]["step_logs"] == 2
    assert "line 4 is incomplete" in err and "no summary.json" in err and len(doc["notes"]) == 2
    assert doc["table"]["rows"][:2] == [
        {"field": "status", "values": ["running or stopped", "finished"]},
        {"field": "last_logged_step", "values": [2, 4]},
    ]


def test_output_exists_refused_unless_overwrite(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    out.write_bytes(b"mine")
    code, doc, err = report_json([str(runs / "distill"), "-o", str(out)])
    assert code == 2 and doc["ok"] is False and "exists" in doc["error"]["message"] and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    code, doc, _ = report_json([str(runs / "distill"), "-o", str(out), "--overwrite"])
    assert code == 0 and png_header(out.read_bytes()) and sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


@pytest.mark.parametrize("name", ["report.txt", "folder"])
def test_output_that_is_no_report_file(runs: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "folder").mkdir()
    code, doc, _ = report_json([str(runs / "distill"), "-o", str(tmp_path / name), "--overwrite"])
    assert code == 2 and (
        ".png picture or an .html page" in doc["error"]["message"] or "is a folder" in doc["error"]["message"]
    )


def test_bad_inputs_all_in_one_message(runs: Path, tmp_path: Path) -> None:
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo\n{"step": 3, "loss": 1}\n')
    out = tmp_path / "taken.png"
    out.write_bytes(b"mine")
    code, doc, err = report_json([str(tmp_path), str(garbled), "-o", str(out)])
    message = doc["error"]["message"]
    assert code == 2 and len(message.splitlines()) == 3, message
    assert "exists" in message and "no metrics.jsonl" in message and "metrics.jsonl:2: not a JSON object" in message
    assert err.count("error:") == 1 and out.read_bytes() == b"mine"


def test_without_matplotlib_one_message_how_to_get_plots(runs: Path, tmp_path: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.png"
    code, doc, err = report_json([str(runs / "distill"), "-o", str(out)])
    assert code == 1 and doc["error"]["type"] == "PlotsUnavailable"
    assert "pip install 'kdcli[plot]'" in doc["error"]["message"] and "pip install 'kdcli[plot]'" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    code, doc, _ = report_json([str(runs / "distill")])  # the table needs no matplotlib
    assert code == 0 and doc["table"]["rows"]


def test_output_that_cannot_be_written(runs: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, doc, err = report_json([str(runs / "distill"), "-o", str(tmp_path / "file" / "report.png")])
    assert code == 2 and "cannot be written" in doc["error"]["message"] and err.count("error:") == 1


def test_folder_names_are_shown_as_written(runs: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    shutil.copytree(runs / "train", tmp_path / "[red]<odd>")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "[red]<odd>", "-o", "r.html"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "[red]<odd>" in result.stdout  # not rich markup
    assert "<th>[red]&lt;odd&gt;</th>" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_the_report_needs_no_torch_and_a_real_process_prints_one_document(tmp_path: Path, repo_root: Path) -> None:
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n{"step": 2, "lo')
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from kdcli.cli import app\n"
        f"r = CliRunner().invoke(app, ['report', {str(run)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules)))\n"
        f"r = CliRunner().invoke(app, ['report', {str(run)!r}, '-o', {str(tmp_path / 'light.png')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [[], ["matplotlib"]]  # torch never
    args = [sys.executable, "-m", "kdcli", "report", str(run), "-o", str(tmp_path / "r.png"), "--json"]
    proc = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=120)
    doc = json.loads(proc.stdout)  # the whole of stdout: one document
    assert proc.returncode == 0 and doc["ok"] and doc["runs"][0]["last_step"] == 1
    assert "line 2 is incomplete" in proc.stderr and png_header((tmp_path / "r.png").read_bytes())
