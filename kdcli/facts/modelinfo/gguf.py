"""GGUF headers read with `struct` alone (no torch, no numpy, no gguf package): model facts,
token list and chat template of a `.gguf` checkpoint, never its tensor data.

A GGUF file (versions 2 and 3, little-endian) is: the magic `GGUF`, a uint32 version, uint64
tensor and key/value counts, the key/values (a string key, a uint32 value type, the value), the
tensor infos (name, uint32 dims count, uint64 dims in ggml order, uint32 ggml type, uint64
offset), then the aligned tensor data. `read_gguf_header` reads all of it but the data, and seeks
past big arrays nobody asked for (`tokenizer.ggml.merges`, scores, token types) instead of
building them. Every count and length is bounded (by a limit and by the bytes left in the file),
so a truncated, random or hostile file is `GGUFUnreadable` naming the file, never a MemoryError
or a struct.error. Files are opened through `kdcli.facts.safe_files` (no FIFO, device or /proc file).

`gguf_facts(path)` gives the `ModelFacts` transformers would derive from the header
(`{arch}.block_count`, `{arch}.embedding_length`, ...), as `GGUFFacts`, which adds the token
list, bos/eos ids and the chat template.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from kdcli.facts.modelinfo.config import ModelFacts
from kdcli.facts.safe_files import NotRegularFile, open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
#: limits no real checkpoint comes near (the largest vocabularies have ~262k tokens)
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 18
MAX_ARRAY_LENGTH = 1 << 22
MAX_STRING_BYTES = 16 << 20
MAX_DIMS = 4
MAX_NESTING = 4
#: arrays of at most this many elements are always built; longer ones only when asked for
SMALL_ARRAY = 1024
#: the long arrays `read_gguf_header` builds by default
KEPT_ARRAYS = frozenset({"tokenizer.ggml.tokens"})
_CHUNK = 1 << 20

_STRING, _ARRAY = 8, 9
#: GGUF value type -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
#: ggml tensor type -> (block size in elements, bytes per block), for the data-bounds check
_GGML_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip
#: GGUF `general.architecture` -> transformers `model_type`, where they differ
_MODEL_TYPES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "command-r": "cohere",
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
}
GGUF_FIX = "re-download the GGUF file, or convert the model again (llama.cpp convert_hf_to_gguf.py)"


class GGUFUnreadable(Exception):
    """A file that is not a readable GGUF checkpoint; `reason` names the file and what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = GGUF_FIX


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array that was seeked past, not built: its element type and length."""

    type: int
    length: int


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info: `dims` in ggml order (innermost first), its ggml `type`, data `offset`."""

    dims: tuple[int, ...]
    type: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch shape (outermost first): token_embd.weight is (vocab rows, hidden)."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    source: str


@cache
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct("<" + fmt)


class _Reader:
    """Little-endian reads over a file through a growing buffer; every read is bounded by the
    bytes left in the file (`GGUFUnreadable` "truncated" otherwise)."""

    def __init__(self, f, size: int, path: str) -> None:
        self.f, self.size, self.path = f, size, path
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # read position in buf

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def fail(self, what: str) -> GGUFUnreadable:
        return GGUFUnreadable(f"{self.path} is not a readable GGUF file: {what} (at byte {self.offset})")

    def need(self, n: int, what: str) -> None:
        if self.offset + n > self.size:
            raise self.fail(f"the file is truncated: {what} needs {n} bytes, {self.size - self.offset} are left")
        if self.pos + n > len(self.buf):
            rest = self.buf[self.pos :]
            more = self.f.read(max(n - len(rest), _CHUNK))
            self.base, self.buf, self.pos = self.offset, rest + more, 0
            if len(self.buf) < n:
                raise self.fail(f"the file is truncated (it ends while reading {what})")

    def unpack(self, fmt: str, what: str):
        s = _struct(fmt)
        self.need(s.size, what)
        values = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return values[0] if len(values) == 1 else values

    def skip(self, n: int, what: str) -> None:
        if self.offset + n > self.size:
            raise self.fail(f"the file is truncated: {what} needs {n} bytes, {self.size - self.offset} are left")
        if self.pos + n <= len(self.buf):
            self.pos += n
        else:
            target = self.offset + n
            self.f.seek(target)
            self.base, self.buf, self.pos = target, b"", 0

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("Q", what)
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes (at most {limit} are read)")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")


def _strings(r: _Reader, length: int, what: str, build: bool) -> list[str] | None:
    """`length` strings (None when not `build`: seeked past); the loop `_Reader.string` would
    do, with the in-buffer case inlined (the 49k tokens and merges of a vocabulary are most of
    a header's parse time)."""
    out: list[str] = []
    unpack_length = _struct("Q").unpack_from
    for _ in range(length):
        if r.pos + 8 > len(r.buf):
            r.need(8, what)
        (n,) = unpack_length(r.buf, r.pos)
        r.pos += 8
        if n > MAX_STRING_BYTES:
            raise r.fail(f"{what} claims {n} bytes (at most {MAX_STRING_BYTES} are read)")
        if not build:
            r.skip(n, what)
            continue
        if r.pos + n > len(r.buf):
            r.need(n, what)
        out.append(r.buf[r.pos : r.pos + n].decode("utf-8", "replace"))
        r.pos += n
    return out if build else None


def _value(r: _Reader, vtype: int, key: str, build: bool, depth: int = 0) -> Any:
    """One value of type `vtype`; arrays are built when `build` or short, else seeked past."""
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype], f"the value of {key!r}")
    if vtype == _STRING:
        return r.string(f"the string value of {key!r}")
    if vtype != _ARRAY:
        raise r.fail(f"key {key!r} has unknown value type {vtype}")
    if depth >= MAX_NESTING:
        raise r.fail(f"key {key!r} nests arrays over {MAX_NESTING} deep")
    etype, length = r.unpack("IQ", f"the array header of {key!r}")
    if length > MAX_ARRAY_LENGTH:
        raise r.fail(f"array {key!r} claims {length} elements (at most {MAX_ARRAY_LENGTH} are read)")
    if etype in _SCALARS:
        s = _struct(_SCALARS[etype])
        if not (build or length <= SMALL_ARRAY):
            r.skip(length * s.size, f"array {key!r}")
            return SkippedArray(etype, length)
        r.need(length * s.size, f"array {key!r}")
        values = [v[0] for v in s.iter_unpack(r.buf[r.pos : r.pos + length * s.size])]
        r.pos += length * s.size
        return values
    if etype == _STRING:
        if length * 8 > r.size - r.offset:  # each string has at least its 8-byte length
            raise r.fail(f"array {key!r} claims {length} strings, more than the rest of the file holds (truncated?)")
        strings = _strings(r, length, f"an element of {key!r}", build or length <= SMALL_ARRAY)
        return strings if strings is not None else SkippedArray(etype, length)
    if etype == _ARRAY:
        values = [_value(r, _ARRAY, key, build, depth + 1) for _ in range(length)]
        return values if build or length <= SMALL_ARRAY else SkippedArray(etype, length)
    raise r.fail(f"array {key!r} has unknown element type {etype}")


def read_gguf_header(path: str | Path, keep: frozenset[str] | set[str] = KEPT_ARRAYS) -> GGUFHeader:
    """The version, metadata and tensor infos of a GGUF file (see the module doc); arrays longer
    than SMALL_ARRAY whose key is not in `keep` are `SkippedArray`s. `GGUFUnreadable` for
    anything but a regular, whole, little-endian GGUF v2/v3 file."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            return _read(_Reader(f, size, str(path)), keep)
    except NotRegularFile as exc:
        raise GGUFUnreadable(f"{path} is not read: {exc}") from None
    except OSError as exc:
        raise GGUFUnreadable(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None


def _read(r: _Reader, keep: frozenset[str] | set[str]) -> GGUFHeader:
    if r.size < 4:
        raise GGUFUnreadable(f"{r.path} is not a GGUF file (it has {r.size} bytes)")
    r.need(4, "the magic")
    if r.buf[:4] != MAGIC:
        raise GGUFUnreadable(f"{r.path} is not a GGUF file (it does not start with the bytes GGUF)")
    r.pos = 4
    version = r.unpack("I", "the version")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise GGUFUnreadable(f"{r.path} is a big-endian GGUF file; kdcli reads little-endian ones")
        raise GGUFUnreadable(f"{r.path} is GGUF version {version}; kdcli reads versions 2 and 3")
    n_tensors, n_kv = r.unpack("QQ", "the tensor and key/value counts")
    if n_kv > MAX_KV_COUNT or n_tensors > MAX_TENSOR_COUNT:
        raise r.fail(f"it claims {n_tensors} tensors and {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string("a metadata key", 65536)
        vtype = r.unpack("I", f"the value type of {key!r}")
        metadata[key] = _value(r, vtype, key, key in keep)
    tensors: dict[str, GGUFTensor] = {}
    for _ in range(n_tensors):
        name = r.string("a tensor name", 65536)
        n_dims = r.unpack("I", f"the dims count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise r.fail(f"tensor {name!r} claims {n_dims} dimensions (ggml has at most {MAX_DIMS})")
        dims = tuple(r.unpack("Q", f"the dims of tensor {name!r}") for _ in range(n_dims))
        ttype, offset = r.unpack("IQ", f"the type and offset of tensor {name!r}")
        tensors[name] = GGUFTensor(dims, ttype, offset)
    _check_data(r, metadata, tensors)
    return GGUFHeader(version, metadata, tensors, r.path)


def _check_data(r: _Reader, metadata: dict, tensors: dict[str, GGUFTensor]) -> None:
    """Each tensor of a known ggml type ends within the file (a file cut short is refused)."""
    alignment = metadata.get("general.alignment", 32)
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
    start = -(-r.offset // alignment) * alignment
    for name, t in tensors.items():
        if t.type not in _GGML_SIZES:
            continue
        block, nbytes = _GGML_SIZES[t.type]
        count = 1
        for d in t.dims:
            count *= d
        end = start + t.offset + -(-count // block) * nbytes
        if end > r.size:
            raise GGUFUnreadable(
                f"{r.path} is truncated: tensor {name!r} ends at byte {end} but the file has {r.size} bytes"
            )


@dataclass(frozen=True)
class GGUFFacts(ModelFacts):
    """`ModelFacts` from a GGUF header, plus what its tokenizer metadata says."""

    tie_word_embeddings: bool | None = None
    tokens: tuple[str, ...] = field(default=(), repr=False)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str | None = field(default=None, repr=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_type_of(architecture: str, name: str = "") -> str:
    """The transformers `model_type` of a GGUF `general.architecture` (llama.cpp calls Mistral
    models llama; transformers tells them apart by `general.name`)."""
    if architecture == "llama" and "mistral" in name.lower():
        return "mistral"
    return _MODEL_TYPES.get(architecture, architecture)


def facts_of_header(header: GGUFHeader) -> GGUFFacts:
    """The facts transformers would derive from a GGUF header (`GGUFUnreadable` without
    `general.architecture`)."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFUnreadable(f"{header.source} has no general.architecture in its metadata")
    tokens = meta.get("tokenizer.ggml.tokens")
    tokens = tuple(tokens) if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else ()
    embedding = header.tensors.get("token_embd.weight")
    rows = embedding.shape[0] if embedding is not None and len(embedding.dims) == 2 else None
    heads = _int(meta.get(f"{arch}.attention.head_count"))
    kv_heads = _int(meta.get(f"{arch}.attention.head_count_kv"))
    template = meta.get("tokenizer.chat_template")
    name = meta.get("general.name")
    return GGUFFacts(
        source=header.source,
        model_type=model_type_of(arch, name if isinstance(name, str) else ""),
        num_hidden_layers=_int(meta.get(f"{arch}.block_count")),
        hidden_size=_int(meta.get(f"{arch}.embedding_length")),
        num_attention_heads=heads,
        intermediate_size=_int(meta.get(f"{arch}.feed_forward_length")),
        vocab_size=_int(meta.get(f"{arch}.vocab_size")) or (len(tokens) if tokens else None) or rows,
        max_position_embeddings=_int(meta.get(f"{arch}.context_length")),
        num_key_value_heads=kv_heads if kv_heads is not None else heads,
        tie_word_embeddings="output.weight" not in header.tensors,
        tokens=tokens,
        bos_token_id=_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int(meta.get("tokenizer.ggml.eos_token_id")),
        chat_template=template if isinstance(template, str) else None,
    )


def gguf_facts(path: str | Path) -> GGUFFacts:
    """The facts of a GGUF checkpoint, read from its header (raises GGUFUnreadable)."""
    return facts_of_header(read_gguf_header(path))
