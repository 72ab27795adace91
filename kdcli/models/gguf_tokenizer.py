"""A tokenizer built from a GGUF file, with exactly the file's token ids.

transformers builds a byte-level ("gpt2") GGUF tokenizer through `GPT2Tokenizer`, whose default
special token `<|endoftext|>` is added as one more id when the file's token list lacks it, as
Llama-3-style files do. The file then sets bos/eos/unk/pad from its own ids, so that extra id
plays no part, yet it makes the tokenizer one id larger than the model's embeddings (and than
what check-recipe reads from the file's header), which the run would refuse.
`without_unlisted_tokens` removes such ids: added tokens beyond the file's vocabulary that no
special-token role uses. What is left is the vocabulary check-recipe computes from the header.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def unlisted_ids(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """id -> token of the added tokens beyond the file's vocabulary that no role uses."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    listed = backend.get_vocab_size(with_added_tokens=False)
    roles = {getattr(tokenizer, role, None) for role in _ROLES} - {None}
    return {
        i: str(token) for i, token in tokenizer.added_tokens_decoder.items() if i >= listed and str(token) not in roles
    }


def without_unlisted_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer` with the `unlisted_ids` removed (the same object when there are none): it is
    saved and read back with those tokens taken out of tokenizer.json and its config."""
    from transformers import AutoTokenizer

    drop = unlisted_ids(tokenizer)
    if not drop or max(drop) != len(tokenizer) - 1 or len(drop) != len(tokenizer) - min(drop):
        return tokenizer  # only trailing ids can go without renumbering the others
    with tempfile.TemporaryDirectory(prefix="kdcli-gguf-tokenizer-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t.get("id") not in drop]
        (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for i in drop:
            config.get("added_tokens_decoder", {}).pop(str(i), None)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(config.get(key), list):
                config[key] = [t for t in config[key] if t not in drop.values()]
        config_path.write_text(json.dumps(config), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)
