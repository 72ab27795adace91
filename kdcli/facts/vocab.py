"""Tokenizer vocabularies read from their files, without torch or transformers: do two models
read the same token ids the same way?

A distillation feeds the teacher and the student the SAME input ids (one tokenizer, the
recipe's `tokenizer` or the teacher's). A student trained with another vocabulary reads those
ids as other tokens (silent garbage), and one with fewer embeddings than the tokenizer has ids
fails mid-run (IndexError). `check-recipe` and the run both compare vocabularies with this module.

- `read_vocab(folder)`: id -> token of the tokenizer saved in a folder, from `tokenizer.json`
  (WordPiece/BPE/WordLevel `model.vocab` maps, Unigram `model.vocab` lists, plus
  `added_tokens`), else `vocab.txt` (line i is id i), else `vocab.json`, else a SentencePiece
  model (`spiece.model`, `sentencepiece.bpe.model`, `tokenizer.model`: its pieces, read from the
  protobuf). None when the folder has none of them or they cannot be parsed.
- `vocab_of(mapping, source)`: the same from a loaded tokenizer's `get_vocab()` (token -> id).
- `first_difference(a, b)`: None when every id both vocabularies have is the same token (a
  padded vocabulary, larger than its tokenizer, agrees with it); else the first id that differs.

- `vocab_of_tokens(tokens, source)`: the same from a token list in id order (a GGUF header's
  `tokenizer.ggml.tokens`, `kdcli.facts.modelinfo.gguf`).
- `chat_template_of(folder)`: the chat template a tokenizer folder ships (tokenizer_config.json
  `chat_template`, chat_template.jinja, chat_template.json), or None.

Ids of a SentencePiece file are not Hugging Face ids (fairseq models shift them), so a vocabulary
read from a SentencePiece file is compared only with another one read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kdcli.facts.safe_files import NotRegularFile, read_regular_bytes, read_regular_text, read_small

SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
#: tokenizer files larger than this are not read (the largest real ones are a few tens of MB)
MAX_VOCAB_FILE_BYTES = 256 * 1024 * 1024
#: tokenizer files `read_vocab` reads, in the order it tries them
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", *SENTENCEPIECE_FILES)


@dataclass(frozen=True)
class Vocab:
    """id -> token of one tokenizer; `source` names the file it was read from."""

    tokens: dict[int, str]
    source: str
    kind: str = "hf"  # "hf": Hugging Face ids; "spm": a SentencePiece file's own ids

    @property
    def size(self) -> int:
        """How many ids the tokenizer can produce: the largest id + 1."""
        return max(self.tokens) + 1 if self.tokens else 0


@dataclass(frozen=True)
class Difference:
    """An id two vocabularies map to different tokens (`None`: the id is missing on that side)."""

    id: int
    a: str | None
    b: str | None
    count: int  # how many shared ids differ in all

    def describe(self, a_name: str, b_name: str) -> str:
        more = f" ({self.count} ids differ)" if self.count > 1 else ""
        return f"id {self.id} is {self.a!r} in {a_name} but {self.b!r} in {b_name}{more}"


def vocab_of(mapping: Mapping[str, int], source: str) -> Vocab:
    """A vocabulary from a token -> id mapping (a loaded tokenizer's `get_vocab()`)."""
    return Vocab({int(i): str(t) for t, i in mapping.items()}, source)


def vocab_of_tokens(tokens: Sequence[str], source: str) -> Vocab:
    """A vocabulary from a token list in id order (a GGUF header's `tokenizer.ggml.tokens`)."""
    return Vocab(dict(enumerate(tokens)), source)


#: tokenizer_config.json files larger than this are not read for their chat template
MAX_TOKENIZER_CONFIG_BYTES = 64 * 1024 * 1024


def chat_template_of(folder: str | Path) -> str | None:
    """The chat template a tokenizer folder ships, as transformers finds it: chat_template.jinja,
    chat_template.json's `chat_template`, tokenizer_config.json's `chat_template` (a string, or
    a list of named templates); None when it has none (or the files cannot be read)."""
    folder = Path(folder)
    jinja = read_small(folder / "chat_template.jinja", MAX_TOKENIZER_CONFIG_BYTES)
    if jinja is not None and jinja.strip():
        return jinja.decode("utf-8", "replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        raw = read_small(folder / name, MAX_TOKENIZER_CONFIG_BYTES)
        try:
            template = json.loads(raw).get("chat_template") if raw is not None else None
        except (ValueError, AttributeError, RecursionError):
            continue
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def _from_tokenizer_json(path: Path) -> Vocab | None:
    data = json.loads(read_regular_text(path))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return None
    vocab = model.get("vocab")
    tokens: dict[int, str] = {}
    if isinstance(vocab, dict):
        tokens = {int(i): str(t) for t, i in vocab.items() if isinstance(i, int)}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        tokens = {i: str(item[0]) for i, item in enumerate(vocab) if isinstance(item, list) and item}
    else:
        return None
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int) and isinstance(added.get("content"), str):
            tokens[added["id"]] = added["content"]
    return Vocab(tokens, path.name)


def _from_vocab_txt(path: Path) -> Vocab:
    lines = read_regular_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return Vocab({i: line.rstrip("\r") for i, line in enumerate(lines)}, path.name)


def _from_vocab_json(path: Path) -> Vocab | None:
    data = json.loads(read_regular_text(path))
    if not isinstance(data, dict):
        return None
    return Vocab({int(i): str(t) for t, i in data.items() if isinstance(i, int)}, path.name)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; value: int or bytes."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, wire, value


def _from_sentencepiece(path: Path) -> Vocab:
    """The pieces of a SentencePiece ModelProto (field 1: repeated SentencePiece, whose
    field 1 is the piece string), in id order."""
    tokens: dict[int, str] = {}
    for number, wire, value in _fields(read_regular_bytes(path)):
        if number == 1 and wire == 2:
            piece = next((v for n, w, v in _fields(value) if n == 1 and w == 2), b"")
            tokens[len(tokens)] = piece.decode("utf-8", "replace")
    return Vocab(tokens, path.name, kind="spm")


_READERS = {
    "tokenizer.json": _from_tokenizer_json,
    "vocab.txt": _from_vocab_txt,
    "vocab.json": _from_vocab_json,
    **{name: _from_sentencepiece for name in SENTENCEPIECE_FILES},
}


def read_vocab(folder: str | Path) -> Vocab | None:
    """The vocabulary of the tokenizer saved in `folder` (see the module doc), or None."""
    folder = Path(folder)
    for name in VOCAB_FILES:
        path = folder / name
        if not path.is_file() or path.stat().st_size > MAX_VOCAB_FILE_BYTES:
            continue
        try:
            vocab = _READERS[name](path)
        except (
            OSError,
            ValueError,
            UnicodeDecodeError,
            IndexError,
            TypeError,
            RecursionError,
            AttributeError,
            NotRegularFile,
        ):
            vocab = None
        if vocab is not None and vocab.tokens:
            return vocab
    return None


def first_difference(a: Vocab, b: Vocab) -> Difference | None:
    """The first id both vocabularies have that they map to different tokens (None: they agree
    on every shared id, or they cannot be compared: a SentencePiece file against HF ids)."""
    if a.kind != b.kind:
        return None
    shared = sorted(set(a.tokens) & set(b.tokens))
    differing = [i for i in shared if a.tokens[i] != b.tokens[i]]
    if not differing:
        if not shared and (a.tokens or b.tokens):
            first = min(a.tokens or b.tokens)
            return Difference(first, a.tokens.get(first), b.tokens.get(first), 1)
        return None
    first = differing[0]
    return Difference(first, a.tokens[first], b.tokens[first], len(differing))


#: how to fix a vocabulary disagreement between the tokenizer of a run and one of its models
VOCAB_FIX = (
    "distil between models that share one tokenizer (e.g. a student built from a config, which "
    "learns the teacher's vocabulary, or one fine-tuned from the teacher's base model), and set "
    "`tokenizer` to that tokenizer if the teacher's folder has another"
)


def vocabulary_problem(used: Vocab, used_name: str, own: Vocab | None, rows: int | None, who: str) -> str | None:
    """Why a model cannot read the ids of the tokenizer a run uses (one clause), or None.

    `used`: that tokenizer's vocabulary, `used_name` naming it; `own`: the vocabulary the model
    was trained with (None: unknown, e.g. a model built from a config); `rows`: its number of
    token embeddings (None: unknown); `who`: "the teacher", "the student", ...
    """
    if rows is not None and rows < used.size:
        return (
            f"{who} has {rows} token embeddings but {used_name} ({used.source}) produces ids up to "
            f"{used.size - 1}: every id past {rows - 1} would stop the run"
        )
    if own is not None:
        diff = first_difference(used, own)
        if diff is not None:
            return (
                f"{who} was trained with another vocabulary than {used_name}: "
                f"{diff.describe(f'{used_name} ({used.source})', f'its own {own.source}')}, so it "
                "would read the input ids as other tokens"
            )
    return None
