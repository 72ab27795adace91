"""`distillation.on_policy` in check-recipe: every "Bad input" of issue 18 is one message at the
recipe path, with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcli.recipe import check_file
from tiny import make_tiny_lm, write_lm_rows


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onpolicy")
    make_tiny_lm(root / "teacher", "llama", layers=2, hidden=32)
    write_lm_rows(root / "train.jsonl", "prompt-completion", 8)
    write_lm_rows(root / "chat.jsonl", "messages", 8)
    write_lm_rows(root / "text.jsonl", "text", 8)
    return root


def recipe(on_policy: dict | None = None, data: dict | None = None, **distillation) -> dict:
    return {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": "train.jsonl", "row_format": "prompt-completion", "max_length": 48, **(data or {})},
        "training": {"num_steps": 2, "batch_size": 4, "device": "cpu", "precision": "fp32", "output_dir": "out"},
        "distillation": {"kd_loss_type": "forward_kl", "temperature": 1.0, "on_policy": on_policy, **distillation},
    }


def problems(root: Path, doc: dict, severity: str = "error") -> dict[str, str]:
    path = root / "r.json"
    path.write_text(json.dumps(doc, indent=1))
    report, _ = check_file(path)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == severity}


def test_a_good_on_policy_recipe_is_clean(ws):
    on_policy = {"student_share": 0.5, "teacher_share": 0.25, "max_new_tokens": 16, "top_p": 0.9, "top_k": 20}
    assert problems(ws, recipe(on_policy)) == {}
    chat = {"train": "chat.jsonl", "row_format": "messages"}
    assert problems(ws, recipe({"student_share": 1, "max_new_tokens": 16}, chat)) == {}


@pytest.mark.parametrize(
    ("on_policy", "path", "words"),
    [
        ({"student_share": 1.5}, "distillation.on_policy.student_share", "must be <= 1, got 1.5"),
        ({"teacher_share": -0.1}, "distillation.on_policy.teacher_share", "must be >= 0"),
        ({"student_share": 0.7, "teacher_share": 0.5}, "distillation.on_policy", "= 1.2, above 1"),
        ({"max_new_tokens": 0}, "distillation.on_policy.max_new_tokens", "must be >= 1"),
        ({"max_new_tokens": 48}, "distillation.on_policy.max_new_tokens", "no position for the prompt"),
        ({"temperature": 0}, "distillation.on_policy.temperature", "must be > 0"),
        ({"top_p": 0}, "distillation.on_policy.top_p", "must be > 0"),
        ({"top_k": -1}, "distillation.on_policy.top_k", "must be >= 0"),
        ({"lambda": 0.5}, "distillation.on_policy.lambda", ""),
    ],
)
def test_bad_settings_name_the_path(ws, on_policy, path, words):
    found = problems(ws, recipe(on_policy))
    assert list(found) == [path] and words in found[path], found


def test_the_shares_sum_message_has_the_fix(ws):
    found = problems(ws, recipe({"student_share": 0.7, "teacher_share": 0.5}))
    assert "sum to at most 1" in found["distillation.on_policy"]


def test_text_rows_and_encoder_tasks_are_refused(ws):
    found = problems(
        ws, recipe({"student_share": 0.5, "max_new_tokens": 8}, {"train": "text.jsonl", "row_format": "text"})
    )
    assert list(found) == ["distillation.on_policy"] and "row_format" in found["distillation.on_policy"]
    doc = recipe({"student_share": 0.5})
    doc["task"] = "sequence-classification"
    found = problems(ws, doc)
    assert "needs task causal-lm" in found["distillation.on_policy"], found


def test_options_it_cannot_serve(ws):
    found = problems(ws, recipe({"student_share": 0.5, "max_new_tokens": 8}, kd_loss_weight=0, hard_label_weight=1))
    assert "kd_loss_weight" in found["distillation.on_policy"], found
    warned = problems(ws, recipe({"student_share": 1, "max_new_tokens": 8}, hard_label_weight=1), "warning")
    assert "dataset rows only" in warned["distillation.hard_label_weight"], warned


def _retokenize(root: Path, name: str, **config_changes) -> Path:
    """A copy of the teacher whose tokenizer_config.json has `config_changes` (None removes)."""
    import shutil

    folder = root / name
    if not folder.exists():
        shutil.copytree(root / "teacher", folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def test_a_tokenizer_without_an_end_marker(ws):
    _retokenize(ws, "no-eos", eos_token=None)
    for extra in ("special_tokens_map.json", "generation_config.json"):
        (ws / "no-eos" / extra).unlink(missing_ok=True)
    doc = recipe({"student_share": 0.5, "max_new_tokens": 8})
    doc["tokenizer"] = "./no-eos"
    found = problems(ws, doc)
    assert "no end-of-sequence token" in found.get("distillation.on_policy", ""), found


def test_a_template_without_a_generation_prompt(ws):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    folder = _retokenize(ws, "no-gen", chat_template=template)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # the template transformers saves beside it
    doc = recipe({"student_share": 0.5, "max_new_tokens": 8}, {"train": "chat.jsonl", "row_format": "messages"})
    doc["tokenizer"] = "./no-gen"
    found = problems(ws, doc)
    assert "cannot render a generation prompt" in found.get("distillation.on_policy", ""), found
