"""`kdcli export RUN_DIR --gguf OUT.gguf --type f16|q8_0|q4_0`: a Llama-family causal LM
(Llama, Mistral written as llama.cpp writes it, Qwen2) as a GGUF file, with the `gguf`
package's writer, tensor name map (`get_tensor_name_map`) and quantizers (`quants.quantize`).

What goes in, as llama.cpp's convert_hf_to_gguf.py lays it out:
- the hyperparameters (context, width, blocks, MLP, heads, KV heads, head_dim as rope
  dimensions and key/value length, RMSNorm epsilon, rope theta);
- the tokenizer: every token with its type (normal, control for special added tokens, user
  defined for other added tokens, unused for padding rows), the BPE merges, special token ids
  and add-bos/eos flags, the chat template (`gguf.SpecialVocab`);
- the generation settings of generation_config.json (eos, sampling temperature/top-k/top-p);
- the weights: Llama's q/k rows permuted as llama.cpp expects (transformers' GGUF loader
  un-permutes them), 1-D tensors in F32, 2-D in the asked type (rows not a multiple of the
  quantization block fall back to F16, as llama.cpp does); with q4_0 the output head (the
  token embeddings when tied) is q8_0, as llama.cpp's quantizer keeps it at higher precision
  (it uses Q6_K, which the gguf package cannot write).

The file is written next to OUT.gguf under a temporary name and moved into place, so an
existing file is replaced whole or not at all (only with `overwrite`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kdcli.errors import UsageError

TYPES = ("f16", "q8_0", "q4_0")
#: transformers model_type -> GGUF architecture name
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        raise UsageError(
            f"{folder} is not a model folder (no config.json). Fix: give a run's output folder "
            "(what kdcli distill / train wrote) or a save_pretrained folder"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read ({exc.__class__.__name__}). Fix: save the model again") from None
    archs = config.get("architectures") or []
    if not isinstance(config, dict) or not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UsageError(
            f"{folder} holds a {archs or config.get('model_type')} model, not a causal LM. "
            "Fix: export the output of a causal-lm run"
        )
    if config.get("model_type") not in ARCHS:
        raise UsageError(
            f"kdcli export writes {', '.join(ARCHS)} models; {folder} is a {config.get('model_type')!r} model. "
            "Fix: use llama.cpp's convert_hf_to_gguf.py for this family"
        )
    return config


def _check_target(path: Path, overwrite: bool) -> None:
    if path.suffix != ".gguf":
        raise UsageError(f"--gguf {path}: the file name must end in .gguf. Fix: e.g. --gguf student.{path.name}.gguf")
    if path.is_dir():
        raise UsageError(f"--gguf {path} is a folder. Fix: give a file path ending in .gguf")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists. Fix: pass --overwrite to replace it (only that file), or another --gguf path")
    if not path.parent.is_dir():
        raise UsageError(f"--gguf {path}: the folder {path.parent} does not exist. Fix: create it first")


def _permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(data, qtype: str):
    """(array, raw GGML type) of one tensor in the asked type (1-D: F32)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = data.astype(np.float32)
    if data.ndim == 1 or qtype == "f16":
        return (data, Q.F32) if data.ndim == 1 else (data.astype(np.float16), Q.F16)
    kind = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    try:
        return quants.quantize(data, kind), kind
    except quants.QuantError:  # rows not a multiple of the block size
        return data.astype(np.float16), Q.F16


def _hparams(w, config: dict, model) -> None:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", None)
    if theta:
        w.add_rope_freq_base(float(theta))
    w.add_vocab_size(c.vocab_size)


def _tokenizer(w, folder: Path, tokenizer, vocab_size: int, eos: int | None) -> None:
    """The token list and types (llama.cpp's BPE layout), merges, special ids (eos: the
    generation config's when it has one), chat template."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if eos is not None:
        special.special_token_ids["eos"] = eos
    special.add_to_gguf(w, quiet=True)


def _eos(model) -> int | None:
    """The generation config's end-of-sequence id (the first of a list)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else None


def _generation(w, model) -> None:
    """The sampling settings of the model's generation config (when it samples)."""
    from gguf import Keys

    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.do_sample:
        for key, value in ((Keys.General.SAMPLING_TEMP, gen.temperature), (Keys.General.SAMPLING_TOP_P, gen.top_p)):
            if value is not None:
                w.add_float32(key, float(value))
        if gen.top_k is not None:
            w.add_uint32(Keys.General.SAMPLING_TOP_K, int(gen.top_k))


def _tensors(w, model, arch_name: str, qtype: str) -> int:
    import gguf

    c = model.config
    arch = gguf.MODEL_ARCH.LLAMA if arch_name == "llama" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    count = 0
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"kdcli export: no GGUF name for tensor {key}. Fix: use llama.cpp's convert_hf_to_gguf.py")
        data = value.detach().float().cpu().numpy()
        if arch_name == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads, heads)
        elif arch_name == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, heads, kv)
        head = name == "output.weight" or (name == "token_embd.weight" and c.tie_word_embeddings)
        array, raw = _tensor(data, "q8_0" if qtype == "q4_0" and head else qtype)
        w.add_tensor(name, array, raw_dtype=raw)
        count += 1
    return count


def export_gguf(run_dir: str | Path, out: str | Path, qtype: str = "f16", *, overwrite: bool = False) -> dict:
    """Write the causal LM in `run_dir` to `out` (a .gguf file) in `qtype`; the document says
    what was written. UsageError for every input mistake (nothing is written then)."""
    folder, target = Path(run_dir).expanduser(), Path(out).expanduser()
    if qtype not in TYPES:
        raise UsageError(f"--type {qtype!r} is not a type kdcli writes. Fix: use one of {', '.join(TYPES)}")
    config = _read_config(folder)
    _check_target(target, overwrite)
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch_name = ARCHS[config["model_type"]]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch_name == "qwen2" and head_dim * c.num_attention_heads != c.hidden_size:
        raise UsageError(
            f"a qwen2 model with head_dim {head_dim} != hidden_size / heads cannot be read back from GGUF "
            "by transformers. Fix: prune qwen2 students with hidden_size = heads x head_dim"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
    try:
        w = gguf.GGUFWriter(tmp, arch_name)
        w.add_name(folder.name)
        w.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, config, model)
        _tokenizer(w, folder, tokenizer, c.vocab_size, _eos(model))
        _generation(w, model)
        count = _tensors(w, model, arch_name, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(target), "type": qtype, "bytes": target.stat().st_size, "tensors": count, "arch": arch_name}
