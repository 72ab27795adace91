"""The structure of a loaded model: its sizes and its list of transformer blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcli.models.common import Blocks, Dims, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn
    from transformers import PreTrainedModel


def model_dims(model: PreTrainedModel) -> Dims:
    """Layers, hidden size, attention heads and vocabulary size of a model (from its config)."""
    config = model.config
    return Dims(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=int(config.num_attention_heads),
        vocab_size=int(config.vocab_size),
    )


def encoder_blocks(model: nn.Module) -> Blocks:
    """The model's transformer blocks: the list `kdcli.facts.architectures` names for its model
    type (BERT `bert.encoder.layer`, DistilBERT `distilbert.transformer.layer`, ...), else the
    first `nn.ModuleList` whose length is `config.num_hidden_layers`. `ModelError` when there
    is none (e.g. ALBERT's shared layers)."""
    from torch import nn

    from kdcli.facts.architectures import architecture

    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    arch = architecture(getattr(config, "model_type", None))
    if arch is not None and count is not None:
        for path in (arch.blocks, arch.blocks.partition(".")[2]):  # task model, or bare base model
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return Blocks(path=path, modules=module)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count:
            return Blocks(path=name, modules=module)
    kind = getattr(config, "model_type", type(model).__name__)
    raise ModelError(
        f"cannot find the {count} transformer blocks of a {kind!r} model (no list of "
        f"{count} layers). Fix: use a BERT-family model (bert, roberta, xlm-roberta, electra, distilbert)"
    )
