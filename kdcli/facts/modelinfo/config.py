"""Model facts read from a config.json alone: layers, sizes, heads, vocabulary, labels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdcli.facts.safe_files import NotRegularFile, read_regular_text
from kdcli.tasks import TASKS

# The spellings of each fact across architectures (first found wins).
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "dim", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_heads", "n_head", "num_heads"),
    "intermediate_size": ("intermediate_size", "hidden_dim", "n_inner", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len"),
    "num_key_value_heads": ("num_key_value_heads",),
}

#: `PretrainedConfig` attributes every architecture accepts, valid in `overrides` even when
#: the base config.json does not spell them out.
GENERIC_CONFIG_KEYS = frozenset(
    {
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "output_hidden_states",
        "output_attentions",
        "torch_dtype",
        "dtype",
        "return_dict",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "classifier_dropout",
        "chunk_size_feed_forward",
        "tie_word_embeddings",
        "is_decoder",
        "add_cross_attention",
        "finetuning_task",
        "attn_implementation",
        "architectures",
    }
)


class ConfigUnavailable(Exception):
    """A model's config.json could not be had; `reason` says why (one clause, no period)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    num_key_value_heads: int | None = None
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


def int_or_none(value) -> int | None:
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
            (int_or_none(config[s]) for s in spellings if int_or_none(config.get(s)) is not None),
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
    declared = int_or_none(config.get("num_labels"))
    if declared is not None:
        return declared
    return 2 if head in TASKS else None


def with_overrides(facts: ModelFacts, overrides: dict) -> ModelFacts:
    """The facts of a model built from `facts`' config with `overrides` applied (HF names)."""
    changes: dict = {}
    for fact, spellings in _SPELLINGS.items():
        for spelling in spellings:
            if spelling in overrides and int_or_none(overrides[spelling]) is not None:
                changes[fact] = overrides[spelling]
                break
    if isinstance(overrides.get("id2label"), dict) and overrides["id2label"]:
        changes["num_labels"] = len(overrides["id2label"])
    elif int_or_none(overrides.get("num_labels")) is not None:
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
