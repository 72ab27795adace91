"""What kdcli knows about each model architecture, one row per `config.model_type`.

Torch-free: `check-recipe` reads it (is attention capture possible for this model?) and the
engine reads it (where the blocks are, which projections to hook). A model type without a row
still trains and still matches hidden features when its blocks form one `nn.ModuleList` of
`num_hidden_layers` entries (found by a generic search); attention capture needs a row with
`attention_capture=True`.

Paths are dotted module names as `model.get_submodule` takes them, from the top of a task
model (`AutoModelForSequenceClassification` / `...ForTokenClassification`), whose base model
sits under `config`'s `base_model_prefix` (CamemBERT and XLM-R reuse RoBERTa's `roberta`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One architecture's layout.

    blocks: the `nn.ModuleList` of transformer blocks, e.g. "bert.encoder.layer".
    query/key/value: the projections inside one block ("attention.self.query"), None where
        they are fused (GPT-2's `c_attn`).
    final_norm: a norm applied after the last block (Llama's "model.norm", GPT-2's
        "transformer.ln_f"), None for post-norm encoders whose last block output is final.
    attention_capture: kdcli can compute TextBrewer's pre-softmax attention scores for it
        (plain scaled dot-product of `query`/`key` over the block input, absolute positions).
    needs_pad_token: its tokenizers usually ship without a pad token and its sequence
        classification head finds the last token through `config.pad_token_id`.
    """

    model_type: str
    blocks: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    final_norm: str | None = None
    attention_capture: bool = False
    needs_pad_token: bool = False


def _bert_like(model_type: str, prefix: str) -> Architecture:
    return Architecture(
        model_type,
        blocks=f"{prefix}.encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_capture=True,
    )


def _llama_like(model_type: str) -> Architecture:
    return Architecture(
        model_type,
        blocks="model.layers",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        final_norm="model.norm",
        needs_pad_token=True,
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _bert_like("bert", "bert"),  # also the MiniLM checkpoints
        _bert_like("roberta", "roberta"),
        _bert_like("xlm-roberta", "roberta"),
        _bert_like("camembert", "roberta"),
        _bert_like("electra", "electra"),
        Architecture(
            "distilbert",
            blocks="distilbert.transformer.layer",
            query="attention.q_lin",
            key="attention.k_lin",
            value="attention.v_lin",
            attention_capture=True,
        ),
        # decoders: hidden features only (rotary positions, grouped heads, fused projections)
        _llama_like("llama"),
        _llama_like("qwen2"),
        Architecture("gpt2", blocks="transformer.h", final_norm="transformer.ln_f", needs_pad_token=True),
    )
}

#: Model types whose attention scores kdcli can capture, in the order error messages list them.
ATTENTION_MODEL_TYPES = tuple(t for t, arch in ARCHITECTURES.items() if arch.attention_capture)


def architecture(model_type: str | None) -> Architecture | None:
    """The row for a `config.model_type`, None when kdcli has none."""
    return ARCHITECTURES.get(model_type) if model_type else None


def attention_capture_supported(model_type: str | None) -> bool:
    """Whether attention matches can be computed for this `config.model_type`."""
    arch = architecture(model_type)
    return arch is not None and arch.attention_capture
