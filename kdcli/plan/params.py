"""Parameter counts from a config.json alone (torch-free), for the architectures kdcli runs.

`shape_of(config, task, num_labels)` reads the sizes an estimate needs and counts the
parameters exactly as transformers builds the model for `task` (tests compare every formula
with an instantiated model, to the parameter):

- BERT family (bert, roberta, xlm-roberta, electra, distilbert): embeddings (word, position,
  token type, LayerNorm; ELECTRA's projection when `embedding_size` differs), per block
  attention 4(d^2 + d) + 2 LayerNorms 2 x 2d + FFN 2 d ff + ff + d, BERT's pooler d^2 + d
  (sequence classification), the head (RoBERTa/ELECTRA: dense d^2 + d + out d C + C;
  DistilBERT: pre-classifier d^2 + d + classifier; token classification: d C + C);
- Llama, Mistral, Qwen2 (and SmolLM, a Llama): embeddings V d; per block q d (H hd), k and v
  d (KV hd) each (+ biases: Qwen2 always, Llama with `attention_bias`), o (H hd) d, MLP 3 d ff
  (+ biases with `mlp_bias`), 2 RMSNorms d; final norm d; lm_head V d unless
  `tie_word_embeddings`;
- GPT-2: wte V d, wpe P d, per block ln_1/ln_2 2d each, c_attn d 3d + 3d, c_proj d^2 + d, MLP
  d ff + ff + ff d + d; ln_f 2d; the head tied to wte.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.errors import UsageError

ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
DECODERS = ("llama", "mistral", "qwen2")
GPT2 = ("gpt2",)
SUPPORTED = ENCODERS + DECODERS + GPT2
#: tie_word_embeddings when a config does not say (each architecture's config class default)
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gpt2": True}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about one model, and its parameter count by part."""

    model_type: str
    family: str  # "encoder" (BERT family), "decoder" (Llama/Mistral/Qwen2) or "gpt2"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    parameters: int
    embedding_parameters: int  # token (and position) embeddings: looked up, no matmul
    block_parameters: int  # one block
    head_parameters: int  # an untied LM head (V d) or the classification head
    attention_dropout: bool = False  # dropout on the attention probabilities in training

    @property
    def body_parameters(self) -> int:
        """Parameters a token's forward multiplies by (2 FLOPs each): all but embeddings and
        an LM head (counted apart, on target tokens)."""
        lm_head = self.head_parameters if self.family != "encoder" else 0
        return self.parameters - self.embedding_parameters - lm_head

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "layers": self.layers,
            "hidden_size": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "tied_head": self.tied,
            "parameters": self.parameters,
            "embedding_parameters": self.embedding_parameters,
            "block_parameters": self.block_parameters,
            "head_parameters": self.head_parameters,
            "attention_dropout": self.attention_dropout,
        }


def _int(config: dict, *names: str, default: int | None = None, where: str = "") -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is not None:
        return default
    raise UsageError(
        f"{where}: the config states no {names[0]}, which the parameter count needs. "
        f"Fix: write {names[0]} into its config.json or the student's overrides"
    )


def _encoder(config: dict, mt: str, task: str, labels: int, where: str) -> ModelShape:
    distil = mt == "distilbert"
    # the generic names first: in a config.json they appear only as overrides (attribute_map aliases)
    d = _int(config, "hidden_size", "dim", where=where)
    layers = _int(config, "num_hidden_layers", "n_layers", where=where)
    heads = _int(config, "num_attention_heads", "n_heads", where=where)
    ff = _int(config, "hidden_dim" if distil else "intermediate_size", "intermediate_size", where=where)
    vocab = _int(config, "vocab_size", where=where)
    positions = _int(config, "max_position_embeddings", default=512)
    types = 0 if distil else _int(config, "type_vocab_size", default=2)
    e = _int(config, "embedding_size", default=d) if mt == "electra" else d
    embeddings = (vocab + positions + types) * e + 2 * e + (e * d + d if e != d else 0)
    block = 4 * (d * d + d) + 2 * 2 * d + 2 * d * ff + ff + d
    classifier = d * labels + labels
    if task == "token-classification":
        head = classifier
    elif mt == "bert":
        head = d * d + d + classifier  # pooler + classifier
    else:  # RoBERTa/ELECTRA classification head, DistilBERT pre-classifier: a dense layer first
        head = d * d + d + classifier
    total = embeddings + layers * block + head
    drop = _dropout(config, "attention_dropout" if distil else "attention_probs_dropout_prob", 0.1)
    return ModelShape(
        mt, "encoder", layers, d, heads, heads, d // heads, ff, vocab, False, total, embeddings, block, head, drop
    )


def _decoder(config: dict, mt: str, task: str, labels: int, where: str) -> ModelShape:
    d = _int(config, "hidden_size", where=where)
    layers = _int(config, "num_hidden_layers", where=where)
    heads = _int(config, "num_attention_heads", where=where)
    kv = _int(config, "num_key_value_heads", default=heads)
    hd = _int(config, "head_dim", default=d // heads)
    ff = _int(config, "intermediate_size", where=where)
    vocab = _int(config, "vocab_size", where=where)
    qkv_bias = mt == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = mt != "qwen2" and bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False)) if mt == "llama" else False
    tied = bool(config.get("tie_word_embeddings", _TIE_DEFAULT[mt]))
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    attention += (heads * hd + 2 * kv * hd if qkv_bias else 0) + (d if o_bias else 0)
    mlp = 3 * d * ff + (2 * ff + d if mlp_bias else 0)
    block = attention + mlp + 2 * d
    embeddings = vocab * d
    head = (0 if tied else vocab * d) if task == "causal-lm" else d * labels  # *ForSequenceClassification: score
    total = embeddings + layers * block + d + head
    drop = _dropout(config, "attention_dropout", 0.0)
    return ModelShape(mt, "decoder", layers, d, heads, kv, hd, ff, vocab, tied, total, embeddings, block, head, drop)


def _gpt2(config: dict, task: str, labels: int, where: str) -> ModelShape:
    d = _int(config, "hidden_size", "n_embd", where=where)
    layers = _int(config, "num_hidden_layers", "n_layer", where=where)
    heads = _int(config, "num_attention_heads", "n_head", where=where)
    ff = _int(config, "n_inner", "intermediate_size", default=4 * d)
    vocab = _int(config, "vocab_size", where=where)
    positions = _int(config, "max_position_embeddings", "n_positions", default=1024)
    tied = bool(config.get("tie_word_embeddings", True))
    block = 2 * 2 * d + 3 * d * d + 3 * d + d * d + d + d * ff + ff + ff * d + d
    embeddings = (vocab + positions) * d
    head = (0 if tied else vocab * d) if task == "causal-lm" else d * labels
    total = embeddings + layers * block + 2 * d + head
    drop = _dropout(config, "attn_pdrop", 0.1)
    return ModelShape(
        "gpt2", "gpt2", layers, d, heads, heads, d // heads, ff, vocab, tied, total, embeddings, block, head, drop
    )


def shape_of(config: dict, task: str, num_labels: int | None = None, where: str = "model") -> ModelShape:
    """The shape and exact parameter count of the model transformers builds from `config` for
    `task` (`num_labels`: the classification head's size; default the config's, else 2)."""
    mt = config.get("model_type")
    labels = num_labels or _config_labels(config)
    if mt in ENCODERS:
        return _encoder(config, mt, task, labels, where)
    if mt in DECODERS:
        return _decoder(config, mt, task, labels, where)
    if mt in GPT2:
        return _gpt2(config, task, labels, where)
    raise UsageError(
        f"{where}: kdcli plan has no parameter formula for model_type {mt!r}. "
        f"Fix: use one of {', '.join(SUPPORTED)}, or count this model's parameters by hand"
    )


def _config_labels(config: dict) -> int:
    for key in ("id2label", "label2id"):
        if isinstance(config.get(key), dict) and config[key]:
            return len(config[key])
    value = config.get("num_labels")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 2


def _dropout(config: dict, name: str, default: float) -> bool:
    value = config.get(name, default)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
