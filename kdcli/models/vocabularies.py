"""Every model of a run reads the tokenizer's ids as its own tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kdcli.models.common import (
    TOKENIZER_FILES,
    ModelError,
    quiet_transformers,
    resolve_model_ref,
)
from kdcli.models.loading import load_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kdcli.facts.vocab import Vocab


def _own_vocab(ref: str) -> Vocab | None:
    """The vocabulary a model was trained with, from its folder's tokenizer files (or its hub
    tokenizer); None when it cannot be had."""
    from kdcli.facts.vocab import read_vocab, vocab_of

    ref = resolve_model_ref(ref)
    folder = Path(ref).expanduser()
    if folder.is_dir():
        vocab = read_vocab(folder)
        if vocab is not None and vocab.kind == "hf":
            return vocab
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            return None
    try:
        with quiet_transformers():
            tokenizer = load_tokenizer(ref)
    except ModelError:
        return None
    return vocab_of(tokenizer.get_vocab(), "tokenizer")


def check_vocabularies(
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_ref: str,
    models: Sequence[tuple[str, str | None, PreTrainedModel]],
) -> None:
    """Refuse a run whose models cannot read the tokenizer's ids: `models` holds (role,
    reference or None for a model built from a config, model). A model needs as many token
    embeddings as the tokenizer has ids, and a pretrained one must have been trained with the
    same vocabulary (every id both have maps to the same token; a padded vocabulary is fine).
    `ModelError` naming the model, an id that differs and the fix."""
    from kdcli.facts.vocab import VOCAB_FIX, vocab_of, vocabulary_problem

    used = vocab_of(tokenizer.get_vocab(), "get_vocab()")
    own_path = str(Path(resolve_model_ref(tokenizer_ref)).expanduser())
    used_name = f"the tokenizer {tokenizer_ref}"
    for role, ref, model in models:
        embeddings = model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        own = None
        if ref is not None and str(Path(resolve_model_ref(ref)).expanduser()) != own_path:
            own = _own_vocab(ref)
        problem = vocabulary_problem(used, used_name, own, rows, f"the {role}")
        if problem is not None:
            where = f"{role} {ref!r}" if ref is not None else role
            raise ModelError(f"{where}: {problem}. Fix: {VOCAB_FIX}")
