"""`kdcli export`: a causal LM folder -> GGUF (gguf's writer, name map, quantizers), read back
with transformers' GGUF loader: per-token KL to the source per type, the tokenizer, the chat
template and eos; a pruned student (head_dim != hidden / heads); bad input, one message each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcli.cli import app
from kdcli.compress.export_gguf import export_gguf
from kdcli.errors import UsageError
from tiny import make_tiny_lm, make_tiny_model

pytest.importorskip("gguf")

#: per-token KL(source || GGUF) bounds on the tiny models (measured: f16 ~1e-7, q8_0 ~1e-6, q4_0 ~4e-4)
KL_BOUND = {"f16": 1e-4, "q8_0": 1e-4, "q4_0": 1e-2}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    make_tiny_lm(root / "llama", "llama", layers=2, hidden=64, heads=4, kv_heads=2, tie=False)
    make_tiny_lm(root / "tied", "llama", layers=2, hidden=64, heads=4, kv_heads=2, tie=True)
    make_tiny_lm(root / "qwen2", "qwen2", layers=2, hidden=64, heads=4, kv_heads=2, tie=False)
    make_tiny_lm(root / "gpt2", "gpt2", layers=2, hidden=32, heads=4)
    make_tiny_model(root / "bert")
    return root


def _kl(source: Path, folder: Path, name: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    batch = tok(["the film was good and fun to see", "a bad movie"], return_tensors="pt", padding=True)
    a = AutoModelForCausalLM.from_pretrained(source).eval()
    b = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    with torch.no_grad():
        p, q = (m(**batch).logits.double().log_softmax(-1) for m in (a, b))
    return float((p.exp() * (p - q)).sum(-1)[batch["attention_mask"].bool()].mean())


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_round_trip_kl_per_type(world: Path, tmp_path: Path, qtype: str) -> None:
    doc = export_gguf(world / "llama", tmp_path / "m.gguf", qtype)
    assert doc["type"] == qtype and doc["tensors"] == 2 * 9 + 3
    assert _kl(world / "llama", tmp_path, "m.gguf") < KL_BOUND[qtype]


@pytest.mark.parametrize("name", ["tied", "qwen2"])
def test_tied_heads_and_qwen2(world: Path, tmp_path: Path, name: str) -> None:
    from gguf import GGUFReader

    export_gguf(world / name, tmp_path / "m.gguf", "f16")
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (name == "qwen2")
    assert _kl(world / name, tmp_path, "m.gguf") < 1e-4


def test_tokenizer_chat_template_and_eos_travel(world: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    export_gguf(world / "llama", tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = reader.fields
    assert "tokenizer.ggml.merges" in fields and "tokenizer.chat_template" in fields
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 0
    source, back = (
        AutoTokenizer.from_pretrained(world / "llama"),
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf"),
    )
    text = "the smart comedy was boring, and the drama fun!"
    assert back(text)["input_ids"] == source(text)["input_ids"]
    assert back.chat_template == source.chat_template


def test_a_pruned_student_exports(world: Path, tmp_path: Path) -> None:
    """hidden 48 with 4 heads of 16: head_dim is not hidden / heads, as pruning leaves it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcli.compress.prune import prune_model
    from kdcli.recipe.prune_schema import PruneSpec

    source = AutoModelForCausalLM.from_pretrained(world / "llama")
    ids = torch.randint(4, 400, (2, 12))
    student, _ = prune_model(
        source,
        PruneSpec(hidden_size=48, num_attention_heads=2, num_key_value_heads=1),
        lambda: iter([{"input_ids": ids}]),
    )
    student.save_pretrained(tmp_path / "s")
    AutoTokenizer.from_pretrained(world / "llama").save_pretrained(tmp_path / "s")
    export_gguf(tmp_path / "s", tmp_path / "s.gguf", "f16")
    assert _kl(tmp_path / "s", tmp_path, "s.gguf") < 1e-4


@pytest.mark.parametrize(
    ("folder", "words"),
    [("missing", "no config.json"), ("bert", "not a causal LM"), ("gpt2", "'gpt2' model")],
)
def test_bad_folders_are_one_message(world: Path, tmp_path: Path, folder: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        export_gguf(world / folder, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(world: Path, tmp_path: Path, cli_runner) -> None:
    target, neighbour = tmp_path / "m.gguf", tmp_path / "keep.txt"
    target.write_bytes(b"old")
    neighbour.write_text("mine")
    args = ["export", str(world / "llama"), "--gguf", str(target), "--type", "q8_0", "--json"]
    result = cli_runner.invoke(app, args)
    assert result.exit_code != 0
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and "--overwrite" in json.dumps(doc)
    assert target.read_bytes() == b"old"
    result = cli_runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "q8_0" and target.read_bytes()[:4] == b"GGUF"
    assert neighbour.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "m.gguf"]


def test_bad_type_and_path(world: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="f16, q8_0, q4_0"):
        export_gguf(world / "llama", tmp_path / "m.gguf", "q5_k")
    with pytest.raises(UsageError, match="must end in .gguf"):
        export_gguf(world / "llama", tmp_path / "m.bin")
