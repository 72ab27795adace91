"""kdcli.models.gguf_tokenizer: a Llama-3-style GGUF (byte-level token list without
`<|endoftext|>`) gets a tokenizer with exactly the file's ids, so check-recipe's vocabulary (read
from the header) is the run's, and distill accepts the teacher instead of refusing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gguf_files import LLAMA3_SPECIALS, llama3_tokens, write_llama3_gguf
from kdcli import distill
from kdcli.models import load_tokenizer
from kdcli.models.gguf_tokenizer import unlisted_ids
from kdcli.recipe import check_file, load_recipe

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama3")
    write_llama3_gguf(root / "teacher" / "m.gguf")
    rows = ["the cat sat", "the cat", "sat the cat the", "cat sat sat"] * 2
    (root / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return root


def _write_recipe(path: Path, student: dict, output_dir: str) -> Path:
    """A one-step causal-lm recipe with the GGUF teacher and `student`, written to `path`."""
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "teacher", "gguf_file": "m.gguf"},
        "student": student,
        "data": {"train": "train.jsonl", "text_column": "text", "max_length": 16},
        "training": {"num_steps": 1, "batch_size": 4, "device": "cpu", "output_dir": output_dir},
        "distillation": {"kd_loss_type": "forward_kl"},
    }
    path.write_text(json.dumps(recipe))
    return path


def test_the_tokenizer_has_exactly_the_files_ids(llama3: Path) -> None:
    from transformers import AutoTokenizer

    listed = len(llama3_tokens()[0])
    plain = AutoTokenizer.from_pretrained(llama3 / "teacher", gguf_file="m.gguf")
    assert len(plain) == listed + 1 and unlisted_ids(plain) == {listed: "<|endoftext|>"}  # what transformers adds
    tokenizer = load_tokenizer(str(llama3 / "teacher"), gguf_file="m.gguf")
    assert len(tokenizer) == listed and "<|endoftext|>" not in tokenizer.get_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert tokenizer.chat_template == plain.chat_template
    text = "the cat sat<|eot_id|>"
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"]  # encoding unchanged
    assert max(tokenizer("<|endoftext|>")["input_ids"]) < listed  # now plain bytes
    assert set(LLAMA3_SPECIALS) <= set(tokenizer.all_special_tokens) | set(tokenizer.get_vocab())


def test_check_recipe_and_distill_agree_on_a_llama3_style_gguf_teacher(llama3: Path) -> None:
    """check-recipe said valid, then distill refused: the tokenizer had one id (<|endoftext|>)
    more than the model's embeddings."""
    path = _write_recipe(llama3 / "recipe.json", {"config": "teacher", "gguf_file": "m.gguf"}, "out")
    report, _ = check_file(path)
    assert report.valid, report.problems
    summary = distill.run(load_recipe(path, mode="distill"), quiet=True)
    assert summary["steps"] == 1
    saved = json.loads((llama3 / "out" / "tokenizer.json").read_text())
    assert not any(t["content"] == "<|endoftext|>" for t in saved["added_tokens"])


def test_a_gguf_student_trains_and_saves_as_plain_safetensors(llama3: Path) -> None:
    """A student read from a GGUF file (`student.model` + `gguf_file`) used to train and then
    fail at the final save: transformers keeps its GGUF quantizer on the dequantized model and
    `save_pretrained` refused ("quantized with gguf and is not serializable")."""
    from transformers import AutoModelForCausalLM

    student = {"model": "teacher", "gguf_file": "m.gguf"}
    path = _write_recipe(llama3 / "recipe-gguf-student.json", student, "out-gguf-student")
    report, _ = check_file(path)
    assert report.valid, report.problems
    summary = distill.run(load_recipe(path, mode="distill"), quiet=True)
    assert summary["steps"] == 1
    out = llama3 / "out-gguf-student"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and getattr(model, "hf_quantizer", None) is None
