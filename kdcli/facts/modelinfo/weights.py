"""Weight shapes read from safetensors headers, and where they disagree with config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kdcli.facts.modelinfo.config import facts_from_config, int_or_none
from kdcli.facts.safe_files import NotRegularFile, open_regular, read_regular_text

#: bytes per element of each safetensors dtype
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_WEIGHTS_FIX = "re-download the model, or save it again with save_pretrained"


class WeightsUnreadable(Exception):
    """A weight file that is not what its name says; `reason` names the file and what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = _WEIGHTS_FIX


def read_safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file: an 8-byte little-endian header length, a
    JSON header, then the tensor bytes. The header is checked against the file as the
    safetensors library checks it (the tensors exactly cover the rest of the file), so a
    truncated, empty or random file is `WeightsUnreadable` here rather than a traceback later."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open_regular(path) as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if size < 8:
                what = "empty" if size == 0 else f"{size} bytes"
                raise WeightsUnreadable(f"{path} is not a safetensors file (it is {what})")
            if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise WeightsUnreadable(
                    f"{path} is not a safetensors file or is truncated (its first 8 bytes give a "
                    f"{length}-byte header, the file has {size} bytes)"
                )
            raw = f.read(length)
    except NotRegularFile as exc:
        raise WeightsUnreadable(f"{path} is not read: {exc}") from None
    except OSError as exc:
        raise WeightsUnreadable(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WeightsUnreadable(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsUnreadable(f"{path} is not a safetensors file (its header is not a JSON object)")
    return _header_shapes(path, header, size - 8 - length)


def _header_shapes(path: Path, header: dict, data_bytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a parsed safetensors header whose tensors must exactly cover
    the file's `data_bytes` bytes of data (else WeightsUnreadable)."""
    shapes: dict[str, tuple[int, ...]] = {}
    covered = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise WeightsUnreadable(f"{path} has a malformed header entry for {name!r}") from None
        if not 0 <= begin <= end <= data_bytes:
            raise WeightsUnreadable(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of the data but the file "
                f"holds {data_bytes} bytes of data"
            )
        count = 1
        for dim in shape:
            count *= dim
        if dtype in _DTYPE_BYTES and count * _DTYPE_BYTES[dtype] != end - begin:
            raise WeightsUnreadable(
                f"{path} is damaged: tensor {name!r} of shape {shape} ({dtype}) has {end - begin} bytes"
            )
        covered = max(covered, end)
        shapes[name] = shape
    if covered != data_bytes:
        raise WeightsUnreadable(
            f"{path} is damaged: its tensors cover {covered} bytes but the file holds {data_bytes} bytes of data"
        )
    return shapes


def weight_shapes(folder: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape from a folder's `model.safetensors`, or from the shards its
    `model.safetensors.index.json` names; None when the folder has neither (e.g. only a
    pytorch_model.bin). `WeightsUnreadable` for a damaged file or a missing shard."""
    folder = Path(folder)
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return read_safetensors_header(single)
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(read_regular_text(index)).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError, NotRegularFile):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsUnreadable(f"{index} is not a safetensors index (no weight_map)")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        path = folder / shard
        if not path.is_file():
            raise WeightsUnreadable(f"{index} names the shard {shard}, which is not in {folder}")
        shapes.update(read_safetensors_header(path))
    return shapes


#: the weight files transformers' from_pretrained looks for in a folder
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


def missing_weights(folder: str | Path) -> str | None:
    """Why a model folder has nothing for from_pretrained to load (None when it has weights):
    none of `WEIGHT_FILES`, nor a sharded pytorch_model-*.bin, is in it."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("pytorch_model*.bin")):
        return None
    return f"no weights: none of {', '.join(WEIGHT_FILES)} is in the folder"


_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks))\.(\d+)\.")


def _blocks(shapes: dict[str, tuple[int, ...]]) -> tuple[str, int] | None:
    """The transformer block list in the weights: (its dotted path, how many blocks)."""
    found: dict[str, set[int]] = {}
    for name in shapes:
        match = _BLOCK.match(name)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not found:
        return None
    path, numbers = max(found.items(), key=lambda item: len(item[1]))
    return path, max(numbers) + 1


def weight_disagreements(shapes: dict[str, tuple[int, ...]], config: dict) -> list[str]:
    """Where a config.json and the shapes of its weights disagree: the word embeddings (rows =
    vocab_size, width = embedding_size or hidden_size), the number of transformer blocks, the
    width of the first block's norms (hidden_size) and the classification head's rows
    (num_labels). Each item is one clause naming both values; [] when they agree."""
    facts = facts_from_config(config, "config.json")
    out: list[str] = []
    embedding = next((k for k in sorted(shapes) if k.endswith("word_embeddings.weight")), None)
    if embedding is not None and len(shapes[embedding]) == 2:
        rows, width = shapes[embedding]
        if facts.vocab_size is not None and rows != facts.vocab_size:
            out.append(f"vocab_size is {facts.vocab_size} but {embedding} has {rows} rows")
        declared = int_or_none(config.get("embedding_size")) or facts.hidden_size
        if declared is not None and width != declared:
            name = "embedding_size" if int_or_none(config.get("embedding_size")) else "hidden_size"
            out.append(f"{name} is {declared} but {embedding} is {width} wide {shapes[embedding]}")
    blocks = _blocks(shapes)
    if blocks is not None:
        path, count = blocks
        if facts.num_hidden_layers is not None and count != facts.num_hidden_layers:
            out.append(
                f"num_hidden_layers is {facts.num_hidden_layers} but the weights hold {count} blocks ({path}.0-{count - 1})"
            )
        if facts.hidden_size is not None:
            norms = {
                k: v for k, v in shapes.items() if k.startswith(f"{path}.0.") and "norm" in k.lower() and len(v) == 1
            }
            if norms and all(v[0] != facts.hidden_size for v in norms.values()):
                key = sorted(norms)[0]
                out.append(f"hidden_size is {facts.hidden_size} but {key} is {norms[key][0]} wide")
    head = next(
        (k for k in ("classifier.out_proj.weight", "classifier.weight") if k in shapes and len(shapes[k]) == 2), None
    )
    if head is not None and facts.head and facts.num_labels is not None and shapes[head][0] != facts.num_labels:
        out.append(f"the config declares {facts.num_labels} labels but the head {head} has {shapes[head][0]} rows")
    return out


def weight_head_size(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The number of classes of the classification head stored in the weights, if any."""
    for key in ("classifier.out_proj.weight", "classifier.weight"):
        if key in shapes and len(shapes[key]) == 2:
            return shapes[key][0]
    return None
