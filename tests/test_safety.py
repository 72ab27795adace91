"""`kdcli distill` refuses, before training and in one line, what would silently train garbage:
a config.json that is not its weights', labels the teacher's head cannot produce, a student with
another vocabulary, ambiguous csv records, damaged weights; and it announces trust_remote_code."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from tiny import TINY_VOCAB, make_tiny_bert, write_sst2_sample

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "student")
    write_sst2_sample(root, n_train=16, n_eval=8)
    return root


def _recipe(root, name: str, **changes) -> str:
    recipe = {
        "teacher": {"model": "teacher"},
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "eval": "dev.tsv", "max_length": 24},
        "training": {"num_steps": 1, "batch_size": 8},
        "distillation": {"temperature": 4},
        **changes,
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def _bad_config(root):
    shutil.copytree(root / "teacher", root / "t-bad", dirs_exist_ok=True)
    config = json.loads((root / "t-bad" / "config.json").read_text())
    (root / "t-bad" / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    return {"teacher": {"model": "t-bad"}}


def _five_labels(root):
    rows = (root / "train.tsv").read_text().splitlines()[1:]
    (root / "five.tsv").write_text(
        "label\tsentence\n" + "".join(f"{i % 5}\t{r.split(chr(9))[1]}\n" for i, r in enumerate(rows))
    )
    return {"data": {"train": "five.tsv", "max_length": 24}}


def _other_vocab(root):
    from transformers import BertTokenizer

    folder = make_tiny_bert(root / "s-other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    BertTokenizer(vocab={t: i for i, t in enumerate(TINY_VOCAB[:5] + TINY_VOCAB[5:][::-1])}).save_pretrained(folder)
    return {"student": {"model": "s-other"}}


def _extra_field(root):
    (root / "extra.csv").write_text("label,sentence\n0,a film\n1,a,film\n")
    return {"data": {"train": "extra.csv", "max_length": 24}}


def _truncated(root):
    shutil.copytree(root / "student", root / "s-cut", dirs_exist_ok=True)
    weights = root / "s-cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    return {"student": {"model": "s-cut"}}


CASES = [
    ("config over other weights", _bad_config, "config.json disagrees with its weights"),
    ("labels the teacher cannot produce", _five_labels, "the teacher's head has 2 classes but data.train has 5 labels"),
    ("a student with another vocabulary", _other_vocab, "the student was trained with another vocabulary"),
    ("a csv record with an extra field", _extra_field, "extra.csv, line 3: 3 fields but the header has 2"),
    ("truncated weights", _truncated, "the student's weights cannot be read"),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_distill_refuses_before_training(root, make, words):
    name = make.__name__.strip("_")
    out = root / f"out-{name}"
    result = runner.invoke(app, ["distill", _recipe(root, name, **make(root)), "-o", str(out), "--max-steps", "1"])
    assert result.exit_code == 1, result.output
    assert words in result.stderr and "Fix:" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_trust_remote_code_is_announced_at_run_time(root):
    shutil.copytree(root / "teacher", root / "t-remote", dirs_exist_ok=True)
    (root / "t-remote" / "modeling_custom.py").write_text("x = 1\n")
    recipe = _recipe(root, "remote", teacher={"model": "t-remote", "trust_remote_code": True})
    # --quiet silences progress, not this warning
    result = runner.invoke(app, ["distill", recipe, "-o", str(root / "out-remote"), "--max-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    warning = f"teacher {root / 't-remote'}: trust_remote_code is on, so the Python code of this folder runs"
    assert warning in result.stderr and "modeling_custom.py" in result.stderr
